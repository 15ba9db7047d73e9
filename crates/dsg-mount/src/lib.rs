//! `snapmount`'s read-only FUSE filesystem: a snapshot's whole tree,
//! listed from the snapshot's manifest, whose files are read through the
//! repository connection (`GetVersions`), so it works the same over SSH
//! and copies nothing but what is opened.
//!
//! - Directories, files and symlinks come from the manifest alone (a
//!   directory is every path prefix); listing touches no repository.
//! - A file's bytes are fetched whole on its first open into a private
//!   cache folder, hashed as they arrive, and kept only when size and XXH3
//!   match the manifest; every read is then served from that verified copy
//!   (`pread`). A copy is keyed by hash, so equal files are fetched once.
//!   A file that fails verification (or whose entry has no hash, from the
//!   original dsg) cannot be opened: `EIO`.
//! - Symlinks are symlinks with the target the manifest records.
//! - Everything is read-only: the mount is `ro` (the kernel answers
//!   `EROFS` to writes), and an open for writing is refused here too.
//!
//! The session runs on the calling thread; `Mounted::run` returns once the
//! filesystem is unmounted (by `fusermount -u`, or by `stop` turning true).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dsg_core::hash::Hash;
use dsg_core::manifest::{EntryKind, Manifest};
use dsg_repo::{Incoming, RepoClient};
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, Request, Session,
};
use xxhash_rust::xxh3::Xxh3;

/// How long the kernel may cache names and attributes: nothing in a
/// snapshot ever changes.
const TTL: Duration = Duration::from_secs(3600);

enum Node {
    Dir {
        parent: u64,
        children: BTreeMap<OsString, u64>,
    },
    File {
        path: String,
        size: u64,
        hash: Option<Hash>,
        mtime: SystemTime,
    },
    Link {
        target: String,
    },
}

/// A snapshot as a FUSE filesystem.
pub struct SnapFs {
    /// Inode `i` is `nodes[i - 1]`; 1 is the root.
    nodes: Vec<Node>,
    snapshot: String,
    client: RepoClient,
    cache: PathBuf,
    /// Verified copies, by content hash.
    verified: HashMap<u64, PathBuf>,
    open: HashMap<u64, File>,
    next_fh: u64,
    uid: u32,
    gid: u32,
    /// The snapshot's time (directories' mtime).
    created: SystemTime,
}

/// What the tree holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub files: u64,
    pub links: u64,
    pub dirs: u64,
    pub bytes: u64,
}

fn secs(t: Option<i64>) -> SystemTime {
    match t {
        Some(s) if s >= 0 => UNIX_EPOCH + Duration::from_secs(s as u64),
        _ => UNIX_EPOCH,
    }
}

impl SnapFs {
    /// The tree of `manifest` (snapshot `snapshot`), reading file bytes
    /// through `client` into `cache` (a private, empty folder).
    pub fn new(client: RepoClient, snapshot: &str, manifest: &Manifest, cache: &Path) -> SnapFs {
        let created = manifest
            .metadata
            .as_ref()
            .and_then(|m| dsg_core::timefmt::parse(&m.created_at))
            .map(|d| secs(Some(d.timestamp())))
            .unwrap_or_else(SystemTime::now);
        let mut fs = SnapFs {
            nodes: vec![Node::Dir {
                parent: 1,
                children: BTreeMap::new(),
            }],
            snapshot: snapshot.to_string(),
            client,
            cache: cache.to_path_buf(),
            verified: HashMap::new(),
            open: HashMap::new(),
            next_fh: 1,
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            created,
        };
        for e in manifest.entries() {
            let node = match &e.kind {
                EntryKind::File { size, mtime, hash } => Node::File {
                    path: e.path.to_string(),
                    size: *size,
                    hash: *hash,
                    mtime: secs(mtime.unix_secs()),
                },
                EntryKind::Link { target } => Node::Link {
                    target: target.to_string(),
                },
            };
            if !fs.insert(&e.path, node) {
                tracing::warn!("{}: not shown (a parent is not a directory)", e.path);
            }
        }
        fs
    }

    fn insert(&mut self, path: &str, node: Node) -> bool {
        let mut dir = 1u64;
        let parts: Vec<&str> = path.split('/').collect();
        let (last, parents) = parts.split_last().expect("split yields one part");
        for part in parents {
            let next = match &self.nodes[dir as usize - 1] {
                Node::Dir { children, .. } => children.get(OsStr::new(part)).copied(),
                _ => return false,
            };
            dir = match next {
                Some(ino) => ino,
                None => {
                    self.nodes.push(Node::Dir {
                        parent: dir,
                        children: BTreeMap::new(),
                    });
                    let ino = self.nodes.len() as u64;
                    self.child_add(dir, part, ino);
                    ino
                }
            };
            if !matches!(self.nodes[dir as usize - 1], Node::Dir { .. }) {
                return false;
            }
        }
        if let Node::Dir { children, .. } = &self.nodes[dir as usize - 1] {
            if children.contains_key(OsStr::new(last)) {
                return false;
            }
        }
        self.nodes.push(node);
        let ino = self.nodes.len() as u64;
        self.child_add(dir, last, ino);
        true
    }

    fn child_add(&mut self, dir: u64, name: &str, ino: u64) {
        if let Node::Dir { children, .. } = &mut self.nodes[dir as usize - 1] {
            children.insert(OsString::from(name), ino);
        }
    }

    fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    /// What the tree holds.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for n in &self.nodes {
            match n {
                Node::Dir { .. } => c.dirs += 1,
                Node::File { size, .. } => {
                    c.files += 1;
                    c.bytes += size;
                }
                Node::Link { .. } => c.links += 1,
            }
        }
        c
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, mtime, nlink) = match self.node(ino)? {
            Node::Dir { children, .. } => {
                let subdirs = children
                    .values()
                    .filter(|c| matches!(self.node(**c), Some(Node::Dir { .. })))
                    .count() as u32;
                (FileType::Directory, 0, 0o555, self.created, 2 + subdirs)
            }
            Node::File { size, mtime, .. } => (FileType::RegularFile, *size, 0o444, *mtime, 1),
            Node::Link { target } => (
                FileType::Symlink,
                target.len() as u64,
                0o777,
                self.created,
                1,
            ),
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The verified local copy of file `ino`, fetched through the
    /// repository on first use.
    fn local_copy(&mut self, ino: u64) -> Result<PathBuf, String> {
        let Some(Node::File {
            path, size, hash, ..
        }) = self.node(ino)
        else {
            return Err("not a file".into());
        };
        let (path, size) = (path.clone(), *size);
        let Some(hash) = *hash else {
            return Err(format!(
                "{path}: its entry has no hash (written by the original dsg), so its bytes cannot be verified"
            ));
        };
        if let Some(p) = self.verified.get(&hash.0) {
            return Ok(p.clone());
        }
        let dest = self.cache.join(hash.to_hex());
        let tmp = self.cache.join(format!("{}.part", hash.to_hex()));
        let mut out = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut got: Option<(u64, Hash)> = None;
        let mut buf = vec![0u8; 1 << 20];
        let r = self
            .client
            .get_versions(&self.snapshot, &[path.as_str()], |inc| {
                let Incoming::File { data, .. } = inc else {
                    return Err(io::Error::other(
                        "the repository holds a link where the manifest records a file",
                    ));
                };
                let mut h = Xxh3::new();
                let mut n = 0u64;
                loop {
                    let k = data.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                    out.write_all(&buf[..k])?;
                    n += k as u64;
                }
                got = Some((n, Hash(h.digest())));
                Ok(())
            });
        let verdict = match (r, got) {
            (Err(e), _) => Err(format!("{path} of {}: {e}", self.snapshot)),
            (Ok(()), None) => Err(format!("{path}: the repository sent nothing")),
            (Ok(()), Some((n, h))) if n != size || h != hash => Err(format!(
                "{path} of {} failed verification: the repository sent {n} bytes hashing to {}, the manifest records {size} bytes hashing to {}",
                self.snapshot,
                h.to_hex(),
                hash.to_hex()
            )),
            (Ok(()), Some(_)) => Ok(()),
        };
        if let Err(e) = verdict {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        self.verified.insert(hash.0, dest.clone());
        Ok(dest)
    }
}

impl Filesystem for SnapFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let child = match self.node(parent) {
            Some(Node::Dir { children, .. }) => children.get(name).copied(),
            Some(_) => return reply.error(libc::ENOTDIR),
            None => None,
        };
        match child.and_then(|c| self.attr(c)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.node(ino) {
            Some(Node::Link { target }) => reply.data(target.as_bytes()),
            Some(_) => reply.error(libc::EINVAL),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return reply.error(libc::EROFS);
        }
        match self.node(ino) {
            Some(Node::File { .. }) => {}
            Some(Node::Dir { .. }) => return reply.error(libc::EISDIR),
            Some(Node::Link { .. }) => return reply.error(libc::ELOOP),
            None => return reply.error(libc::ENOENT),
        }
        let file = self
            .local_copy(ino)
            .and_then(|p| File::open(&p).map_err(|e| format!("{}: {e}", p.display())));
        match file {
            Ok(f) => {
                let fh = self.next_fh;
                self.next_fh += 1;
                self.open.insert(fh, f);
                // The bytes never change: the kernel may keep its cache.
                reply.opened(fh, fuser::consts::FOPEN_KEEP_CACHE);
            }
            Err(e) => {
                tracing::warn!("snapmount: {e}");
                eprintln!("dsg snapmount: {e}");
                reply.error(libc::EIO)
            }
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(f) = self.open.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match f.read_at(&mut buf[n..], offset.max(0) as u64 + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        reply.data(&buf[..n]);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.open.remove(&fh);
        reply.ok();
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.node(ino) {
            Some(Node::Dir { .. }) => reply.opened(0, 0),
            Some(_) => reply.error(libc::ENOTDIR),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(Node::Dir { parent, children }) = self.node(ino) else {
            return reply.error(libc::ENOTDIR);
        };
        let mut all: Vec<(u64, FileType, &OsStr)> = vec![
            (ino, FileType::Directory, OsStr::new(".")),
            (*parent, FileType::Directory, OsStr::new("..")),
        ];
        for (name, c) in children {
            let kind = match self.node(*c) {
                Some(Node::Dir { .. }) => FileType::Directory,
                Some(Node::Link { .. }) => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            all.push((*c, kind, name.as_os_str()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, mask: i32, reply: fuser::ReplyEmpty) {
        if self.node(ino).is_none() {
            return reply.error(libc::ENOENT);
        }
        if mask & libc::W_OK != 0 {
            return reply.error(libc::EROFS);
        }
        reply.ok();
    }
}

/// A mounted `SnapFs`, not yet served.
pub struct Mounted {
    session: Session<SnapFs>,
}

/// Mounts `fs` read-only at `mountpoint` (an existing, empty folder).
pub fn mount(fs: SnapFs, mountpoint: &Path) -> io::Result<Mounted> {
    let name = format!("dsg:{}", fs.snapshot);
    let opts = [
        MountOption::RO,
        MountOption::FSName(name),
        MountOption::Subtype("dsg".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    Ok(Mounted {
        session: Session::new(fs, mountpoint, &opts)?,
    })
}

impl Mounted {
    /// Serves the filesystem until it is unmounted: from outside
    /// (`fusermount -u`), or here once `stop()` turns true (polled every
    /// 100 ms).
    pub fn run(mut self, stop: impl Fn() -> bool + Send + 'static) -> io::Result<()> {
        let mut unmounter = self.session.unmount_callable();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done2 = done.clone();
        let watcher = std::thread::spawn(move || {
            while !done2.load(std::sync::atomic::Ordering::SeqCst) {
                if stop() {
                    let _ = unmounter.unmount();
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = self.session.run();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = watcher.join();
        drop(self.session);
        r
    }
}
