//! `snapmount`: a snapshot's whole tree, read-only, at a folder.
//!
//! `dsg snapmount (--snapshot sN | -n K) --mountpoint DIR` runs in the
//! foreground, serving the mount until it is unmounted (like `restic
//! mount`): by Ctrl-C, SIGTERM or SIGHUP here, or by `dsg snapmount
//! --unmount DIR` (or `fusermount -u DIR`) from another shell. A ZFS
//! repository on this machine is shown as a read-only clone of `@sN`;
//! everything else (xfs, and any repository over SSH) as a read-only FUSE
//! filesystem reading through the repository connection
//! (`dsg_mount::SnapFs`). Each mount is recorded in
//! `.dsg/mounts/<id>/` (`dsg_sync::mounts`) so that the next command
//! removes it if this process is killed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use dsg_core::config::RepoType;
use dsg_sync::mounts::{self, MountKind, MountRecord};
use dsg_sync::snapshots::{self, Which};
use dsg_sync::EngineError;
use serde_json::json;

use crate::output::Out;

#[derive(Args)]
pub struct SnapmountCmd {
    /// The snapshot: s<N>, or head (the repository's newest)
    #[arg(long, conflicts_with_all = ["num", "unmount"])]
    snapshot: Option<String>,
    /// The N-th newest snapshot: 1 is the head (the default), 2 the one before it
    #[arg(
        short = 'n',
        long = "num",
        value_name = "N",
        conflicts_with = "unmount"
    )]
    num: Option<u64>,
    /// Where to show the snapshot: an empty folder (made if missing)
    #[arg(long, value_name = "DIR", required_unless_present = "unmount")]
    mountpoint: Option<PathBuf>,
    /// Remove the snapmount at DIR (from any shell) and exit
    #[arg(long, value_name = "DIR", conflicts_with = "mountpoint")]
    unmount: Option<PathBuf>,
}

/// Set by SIGINT, SIGTERM or SIGHUP: unmount and exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst) || dsg_sync::INTERRUPTED.load(Ordering::SeqCst)
}

/// `dir` made absolute without touching it (a dead FUSE mount cannot be
/// stat'ed): its parent resolved, its own name kept.
fn absolute_mountpoint(dir: &Path) -> Result<PathBuf, EngineError> {
    let abs = std::path::absolute(crate::cwd()?.join(dir)).map_err(|e| EngineError::io(dir, e))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(EngineError::Usage(format!(
            "{}: name a folder to mount on",
            dir.display()
        )));
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| EngineError::io(parent, e))?;
    Ok(parent.join(name))
}

pub fn cmd_snapmount(a: SnapmountCmd, out: &Out) -> Result<(), EngineError> {
    if let Some(dir) = a.unmount {
        return unmount(&dir, out);
    }
    let which = match (&a.snapshot, a.num) {
        (Some(s), _) => Which::parse(s)?,
        (None, Some(k)) => Which::Newest(k),
        (None, None) => Which::Head,
    };
    let dir = a.mountpoint.expect("clap requires --mountpoint");
    catch_signals();
    let (project, mut client) = crate::open_connected()?;
    let mp = prepare_mountpoint(&project.root, &dir)?;
    let snap = snapshots::resolve(&project, &mut client, &which)?;
    let repo = &project.config.repository;
    let kind = if repo.kind == RepoType::Zfs && repo.is_local() {
        MountKind::ZfsClone
    } else {
        MountKind::Fuse
    };
    if kind == MountKind::Fuse {
        fuse_available()?;
    }
    let root = project.root.clone();
    let mut rec = MountRecord::new(kind, &mp, &snap.id);
    rec.save(&root)
        .map_err(|e| EngineError::io(rec.dir(&root), e))?;
    let announce = |extra: &str| {
        let text = format!(
            "Mounted snapshot {} (head {}) read-only at {}{extra}; Ctrl-C here or 'dsg snapmount --unmount {}' unmounts it",
            snap.id,
            snap.head_id,
            mp.display(),
            mp.display()
        );
        // stdout stays for the --json document.
        if out.json {
            eprintln!("{text}");
        } else {
            out.line(&text);
        }
    };
    let served = match kind {
        MountKind::Fuse => {
            let fs =
                dsg_mount::SnapFs::new(client, &snap.id, &snap.manifest, &rec.cache_dir(&root));
            let counts = fs.counts();
            match dsg_mount::mount(fs, &mp) {
                Ok(m) => {
                    announce(&format!(
                        " ({}, {}, {}; each file is fetched and verified on first open)",
                        crate::human::count(counts.files, "file"),
                        crate::human::count(counts.links, "link"),
                        crate::human::bytes(counts.bytes)
                    ));
                    m.run(stopping).map_err(|e| EngineError::io(&mp, e))
                }
                Err(e) => Err(EngineError::State {
                    message: format!("cannot mount {} at {}: {e}", snap.id, mp.display()),
                    hint:
                        "snapmount needs /dev/fuse and fusermount3 (Debian: apt-get install fuse3)"
                            .into(),
                }),
            }
        }
        MountKind::ZfsClone => {
            let r = client.mount_snapshot(&snap.id, &mp.to_string_lossy());
            match r {
                Ok(dataset) => {
                    rec.clone = Some(dataset.clone());
                    let _ = rec.save(&root);
                    announce(&format!(" (ZFS clone {dataset})"));
                    // Held until stopped, or until someone unmounted it.
                    while !stopping() && mounts::is_mounted(&mp) {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    // The agent destroys the clone when the connection ends.
                    client.close().map_err(EngineError::from)
                }
                Err(e) => {
                    let _ = client.close();
                    Err(e.into())
                }
            }
        }
    };
    // Whatever happened, nothing may stay mounted under our record.
    if kind == MountKind::Fuse {
        let _ = mounts::fuse_unmount(&mp, true);
    }
    if !mounts::is_mounted(&mp) {
        rec.remove(&root);
    }
    served?;
    if out.json {
        out.json_doc(&json!({
            "status": "ok",
            "command": "snapmount",
            "result": {
                "snapshot_id": snap.id,
                "head_id": snap.head_id,
                "mountpoint": mp,
                "kind": kind.label(),
                "unmounted": true,
            }
        }));
    } else {
        out.line(&format!("Unmounted {} from {}", snap.id, mp.display()));
    }
    Ok(())
}

/// The mountpoint, absolute: made if missing; must be an empty folder,
/// not mounted already, and not where the project's scan would read it.
fn prepare_mountpoint(root: &Path, dir: &Path) -> Result<PathBuf, EngineError> {
    let mp = absolute_mountpoint(dir)?;
    if mounts::is_mounted(&mp) {
        return Err(EngineError::State {
            message: format!("{} is a mountpoint already", mp.display()),
            hint: format!(
                "choose another folder, or unmount it first ('dsg snapmount --unmount {}' for a snapmount)",
                mp.display()
            ),
        });
    }
    match std::fs::symlink_metadata(&mp) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&mp).map_err(|e| EngineError::io(&mp, e))?;
        }
        Err(e) => return Err(EngineError::io(&mp, e)),
        Ok(md) if !md.is_dir() => {
            return Err(EngineError::Usage(format!(
                "--mountpoint {}: not a folder",
                mp.display()
            )))
        }
        Ok(_) => {
            let mut rd = std::fs::read_dir(&mp).map_err(|e| EngineError::io(&mp, e))?;
            if rd.next().is_some() {
                return Err(EngineError::State {
                    message: format!("{} is not empty; nothing was mounted", mp.display()),
                    hint: "mount on an empty folder (or a new name: it is made)".into(),
                });
            }
        }
    }
    // Inside the project, only in a hidden folder: the scan reads
    // everything else, and would take the snapshot for new files.
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    if let Ok(rel) = mp.strip_prefix(&root) {
        let hidden = rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
        if !hidden {
            return Err(EngineError::Usage(format!(
                "--mountpoint {}: inside the project, where dsg would scan the snapshot as new files; mount outside it (or in a hidden folder)",
                mp.display()
            )));
        }
    }
    Ok(mp)
}

/// FUSE needs /dev/fuse, and fusermount unless we are root.
fn fuse_available() -> Result<(), EngineError> {
    let hint = "install FUSE (Debian: apt-get install fuse3; scripts/setup-services does) and make /dev/fuse available";
    if !Path::new("/dev/fuse").exists() {
        return Err(EngineError::State {
            message: "cannot mount: /dev/fuse does not exist".into(),
            hint: hint.into(),
        });
    }
    if mounts::fusermount().is_none() && unsafe { libc::geteuid() } != 0 {
        return Err(EngineError::State {
            message: "cannot mount: neither fusermount3 nor fusermount is on PATH".into(),
            hint: hint.into(),
        });
    }
    Ok(())
}

/// `--unmount DIR`: asks the live snapmount to stop (FUSE: unmount, which
/// ends its session; ZFS: SIGTERM, after which it destroys its clone) and
/// waits for it; a dead one's mount is removed here.
fn unmount(dir: &Path, out: &Out) -> Result<(), EngineError> {
    let project = crate::open_project()?;
    let root = project.root.clone();
    let mp = absolute_mountpoint(dir)?;
    let canon = mp.canonicalize().ok();
    let rec = mounts::list(&root)
        .into_iter()
        .find(|r| r.mountpoint == mp || Some(&r.mountpoint) == canon.as_ref());
    let Some(rec) = rec else {
        return Err(EngineError::State {
            message: format!("no snapmount of this project is at {}", mp.display()),
            hint: if mounts::is_mounted(&mp) {
                "it is mounted, but not by dsg snapmount of this project; run the command in the project that mounted it".into()
            } else {
                "nothing is mounted there".into()
            },
        });
    };
    let mp = rec.mountpoint.clone();
    if rec.owner_alive() {
        match rec.kind {
            MountKind::Fuse => mounts::fuse_unmount(&mp, false).map_err(|e| EngineError::State {
                message: e,
                hint: format!(
                    "a program is using {} (a shell inside it, an open file): leave it and run again",
                    mp.display()
                ),
            })?,
            MountKind::ZfsClone => unsafe {
                libc::kill(rec.pid as libc::pid_t, libc::SIGTERM);
            },
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while rec.owner_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if rec.owner_alive() {
            return Err(EngineError::State {
                message: format!(
                    "the snapmount of {} at {} (pid {}) did not finish within 60 s",
                    rec.snapshot,
                    mp.display(),
                    rec.pid
                ),
                hint: "it may be busy destroying its clone; run the command again".into(),
            });
        }
    }
    // Whatever the owner left (it died, or was killed meanwhile).
    if rec.dir(&root).exists() {
        let cfg = project.config.clone();
        let mut connect = || dsg_repo::RepoClient::connect(&cfg).ok();
        mounts::clean_dead(&root, &rec, &mut connect).map_err(|e| EngineError::State {
            message: e,
            hint: "run the command again once nothing uses the mount".into(),
        })?;
    }
    if mounts::is_mounted(&mp) {
        return Err(EngineError::State {
            message: format!("{} is still mounted", mp.display()),
            hint: "run the command again once nothing uses the mount".into(),
        });
    }
    if out.json {
        out.json_doc(&json!({
            "status": "ok",
            "command": "snapmount",
            "result": {
                "snapshot_id": rec.snapshot,
                "mountpoint": mp,
                "kind": rec.kind.label(),
                "unmounted": true,
            }
        }));
    } else {
        out.line(&format!("Unmounted {} from {}", rec.snapshot, mp.display()));
    }
    Ok(())
}
