//! The one atomic-write helper. Every file dsg writes that must survive a
//! crash whole-or-not-at-all goes through `write_atomic`:
//! temp file in the same directory → write → fsync → rename over the target →
//! fsync the directory. A reader therefore sees the old bytes or the new
//! bytes, never a mix, and after the directory fsync the rename is durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn werr(path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| werr(path)(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    // The temp name is unique per process and call so concurrent writers in
    // one directory never share a temp file; the `.dsg-tmp.` prefix lets
    // recovery recognise and remove leftovers.
    let tmp = dir.join(format!(
        ".dsg-tmp.{}.{}.{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple(),
        name.to_string_lossy()
    ));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr(path))
}

/// A file written in pieces and published whole: its bytes go to a temp
/// file beside `path` (`write_atomic`'s naming, so a killed writer's is
/// recognised), and `commit` makes it durable and renames it into place.
/// Dropped without `commit`, the temp file is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile, WriteError> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| {
            werr(path)(io::Error::new(io::ErrorKind::InvalidInput, "no file name"))
        })?;
        let tmp = dir.join(format!(
            ".dsg-tmp.{}.{}.{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple(),
            name.to_string_lossy()
        ));
        // Readable too: a caller may verify or copy out what it wrote.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(werr(path))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    /// The temp file, to write into.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until committed")
    }

    /// fsync, then rename into place; `replace: false` never replaces an
    /// existing file (`AlreadyExists`, and the temp file is removed), even
    /// one created since the caller looked.
    pub fn commit(mut self, replace: bool) -> Result<(), WriteError> {
        let f = self.file.take().expect("open until committed");
        f.sync_all().map_err(werr(&self.path))?;
        drop(f);
        // Without replacing: a hard link fails if the name exists (and,
        // unlike a look first, whatever appeared there meanwhile).
        let published = if replace {
            fs::rename(&self.tmp, &self.path)
        } else {
            fs::hard_link(&self.tmp, &self.path).map(|()| {
                let _ = fs::remove_file(&self.tmp);
            })
        };
        published.map_err(werr(&self.path))?;
        let dir = self.tmp.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.tmp = PathBuf::new();
        sync_dir(&dir).map_err(werr(&self.path))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Makes a directory's entries (creations, renames, unlinks) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// True for names `write_atomic` uses for its temp files.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(".dsg-tmp.")
}

/// Removes from `dir` the temp files of writers that died mid-write (a
/// kill -9 between create and rename). Those of live processes — another
/// dsg command in the same project — are left alone: their rename is still
/// to come. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for de in rd.flatten() {
        let name = de.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix(".dsg-tmp.") else {
            continue;
        };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        let dead = match pid {
            Some(p) if p == std::process::id() => false,
            Some(p) => !Path::new(&format!("/proc/{p}")).exists(),
            None => false,
        };
        if dead && fs::remove_file(de.path()).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temps_of_dead_writers_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = d.path().join(format!(".dsg-tmp.{dead}.abc.stat-cache"));
        let live = d
            .path()
            .join(format!(".dsg-tmp.{}.def.stat-cache", std::process::id()));
        let other = d.path().join("stat-cache");
        for p in [&stale, &live, &other] {
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(d.path()), 1);
        assert!(!stale.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn atomic_file_publishes_whole_and_never_replaces_unless_asked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.bin");
        let mut a = AtomicFile::create(&p).unwrap();
        a.file().write_all(b"first").unwrap();
        assert!(!p.exists(), "nothing at the path before the commit");
        a.commit(false).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        let mut b = AtomicFile::create(&p).unwrap();
        b.file().write_all(b"second").unwrap();
        let e = b.commit(false).unwrap_err();
        assert_eq!(e.source.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"first");
        let mut c = AtomicFile::create(&p).unwrap();
        c.file().write_all(b"third").unwrap();
        c.commit(true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"third");
        drop(AtomicFile::create(&p).unwrap());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn replaces_whole_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two two");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failure_names_the_path_and_keeps_old_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub");
        fs::create_dir(&p).unwrap();
        // Renaming a file over a non-empty directory fails.
        fs::write(p.join("x"), b"x").unwrap();
        let e = write_atomic(&p, b"new").unwrap_err();
        assert!(e.to_string().contains("sub"), "{e}");
        assert!(p.join("x").exists());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
