//! One test world for the suites that run on every repository kind (crash,
//! faults, replace, states): a user config, any number of clients and one
//! repository, built by `World::new(Kind::Xfs | Kind::Zfs | Kind::Ssh,
//! prefix)`.
//!
//! - `Kind::Xfs`: a posix repository on the XFS mount (`sync_support::Env`).
//! - `Kind::Zfs`: the dataset `POOL/N` on the test pool
//!   (`zfs_support::ZEnv`); `None` (skipped) without `DSG_TEST_ZFS_POOL`
//!   outside CI.
//! - `Kind::Ssh`: the same XFS repository reached through the test sshd
//!   (`--host dsgtest`, `dsg agent` behind it); `None` (skipped) without
//!   `DSG_TEST_SSH_CONFIG` outside CI. The failpoints of the remote agent
//!   (`repo.*`) do not fire over ssh (the agent does not get the client's
//!   `DSG_FAILPOINT`); the client's do.
//! - `Kind::S3`: a repository in the loopback S3 cluster's test bucket
//!   under a key prefix of its own (`s3::S3Env`); `None` (skipped) without
//!   `/var/tmp/dsg-test/s3.env` outside CI. `World::repo()` is a view of
//!   it written from the store (see `s3.rs`).
//!
//! Besides the kinds: `World::zfs_over_ssh` (a zfs repository reached
//! through the test sshd; its kind is `Zfs`) and `World::zfs_in_pool_mount`
//! (a zfs repository whose parent is a directory on the pool's own mount).
//!
//! A test crate declares only `mod world;` and `use world::*;`: this module
//! brings in the other support modules itself and re-exports `support`,
//! `sync_support` and `zfs_support` (not `ssh_support`, whose listings have
//! the same names as `support`'s but other rules).
//!
//! [`per_kind!`] turns a body `fn name(kind: Kind)` into one `#[test]` per
//! kind: `name::xfs`, `name::zfs`, `name::ssh`, `name::s3`.
#![allow(dead_code)]

pub mod s3;

#[path = "../s3_support/cluster.rs"]
pub mod s3_cluster;
#[path = "../ssh_support/mod.rs"]
pub mod ssh_support;
#[path = "../support/mod.rs"]
pub mod support;
#[path = "../sync_support/mod.rs"]
pub mod sync_support;
#[path = "../zfs_support/mod.rs"]
pub mod zfs_support;

use std::process::{Command, Output};

pub use ssh_support::Ssh;
pub use sync_support::World as Pair;
pub use sync_support::*;
pub use zfs_support::*;

/// The kind of repository a world's tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Xfs,
    Zfs,
    Ssh,
    S3,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Xfs => "xfs",
            Kind::Zfs => "zfs",
            Kind::Ssh => "ssh",
            Kind::S3 => "s3",
        }
    }

    /// The repository's commit record of a sync (the last step before
    /// which a crash rolls back).
    pub fn repo_committed(self) -> &'static str {
        match self {
            Kind::Zfs => "zfs.journal.committed",
            Kind::Xfs | Kind::Ssh => "repo.journal.committed",
            Kind::S3 => "s3.commit.committed",
        }
    }

    /// The steps of the repository's side of a sync that a sync must pass
    /// (`DSG_FAILPOINT=list`), in order; none over ssh (the agent's
    /// failpoints are not reported to the client).
    pub fn repo_sync_steps(self) -> &'static [&'static str] {
        match self {
            Kind::Xfs => &[
                "repo.journal.begin",
                "repo.stage_file",
                "repo.before_commit",
                "repo.journal.committed",
                "repo.apply.0",
                "repo.apply.meta",
                "repo.journal.done",
            ],
            Kind::Zfs => &[
                "zfs.journal.begin",
                "zfs.clone",
                "zfs.snapshot",
                "zfs.journal.committed",
                "zfs.promote",
                "zfs.rename_old",
                "zfs.unmount_old",
                "zfs.rename_new",
                "zfs.mount_new",
                "zfs.destroy_old",
                "zfs.journal.done",
            ],
            Kind::Ssh => &[],
            // `s3.stage.parts` only with a file of more than one part.
            Kind::S3 => &[
                "s3.stage.journaled",
                "s3.commit.snapshot",
                "s3.commit.head",
                "s3.commit.committed",
            ],
        }
    }

    /// The steps an init must pass and its commit point (a crash at or
    /// after it leaves the new repository).
    pub fn init_steps(self) -> (&'static [&'static str], &'static str) {
        match self {
            Kind::Zfs => (&["zfs.init.snapshot", "zfs.init.rename"], "zfs.init.rename"),
            Kind::Xfs | Kind::Ssh => (
                &["repo.init.before_rename", "repo.init.after_rename"],
                "repo.init.after_rename",
            ),
            // The commit point is the conditional PUT of HEAD, between
            // `s3.commit.head` and `s3.commit.committed`.
            Kind::S3 => (
                &[
                    "s3.stage.journaled",
                    "s3.commit.snapshot",
                    "s3.commit.head",
                    "s3.commit.committed",
                ],
                "s3.commit.committed",
            ),
        }
    }

    /// The steps a replacing init (`init --force`) must pass and its commit
    /// point.
    pub fn replace_steps(self) -> (&'static [&'static str], &'static str) {
        match self {
            Kind::Zfs => (
                &[
                    "zfs.replace.journal",
                    "zfs.snapshot",
                    "zfs.journal.committed",
                    "zfs.rename_old",
                    "zfs.rename_new",
                    "zfs.destroy_old",
                ],
                "zfs.journal.committed",
            ),
            Kind::Xfs | Kind::Ssh => (&["repo.replace.exchanged"], "repo.replace.exchanged"),
            Kind::S3 => panic!("an s3 repository is not replaced (init --force)"),
        }
    }

    /// Whether a world that recovered to exactly OLD is crashed again at the
    /// next point instead of building a fresh one (zfs: a world costs
    /// several `zfs` commands).
    pub fn reuses_old_worlds(self) -> bool {
        self == Kind::Zfs
    }
}

/// A listing with mtimes (`full_listing`, `state_listing`).
pub type Listing = std::collections::BTreeMap<String, (Node, i64, i64)>;

/// The repository side of a world.
enum Backend {
    Posix(Env),
    Zfs(ZEnv),
    S3(Box<s3::S3Env>),
}

/// One test world (see the module docs). Derefs to `sync_support::Env`:
/// `client`, `write`, `link`, `remove`, `read`, `prepare_clone`, `repo`,
/// `repo_parent`, `repo_name`, `tmp`.
pub struct World {
    pub kind: Kind,
    backend: Backend,
    ssh: Option<Ssh>,
}

impl std::ops::Deref for World {
    type Target = Env;
    fn deref(&self) -> &Env {
        match &self.backend {
            Backend::Posix(e) => e,
            Backend::Zfs(z) => z,
            Backend::S3(s) => s,
        }
    }
}

/// A world's state: the G1 pair (client and repository trees, manifests,
/// messages, archives) and, on zfs, the repository dataset's snapshots.
#[derive(Clone, Debug)]
pub struct State {
    pub pair: Pair,
    pub snaps: Vec<String>,
}

impl State {
    /// Exactly OLD or exactly NEW (with the snapshot lists); panics with
    /// both differences otherwise.
    #[track_caller]
    pub fn classify(&self, old: &State, new: &State, ctx: &str) -> Outcome {
        let o = self.pair.mismatch_old(&old.pair).or_else(|| {
            (self.snaps != old.snaps)
                .then(|| format!("snapshots {:?}, expected {:?}\n", self.snaps, old.snaps))
        });
        let Some(o) = o else { return Outcome::Old };
        let n = self.pair.mismatch_new(&new.pair).or_else(|| {
            (self.snaps != new.snaps)
                .then(|| format!("snapshots {:?}, expected {:?}\n", self.snaps, new.snaps))
        });
        let Some(n) = n else { return Outcome::New };
        panic!("{ctx}: the world is neither OLD nor NEW\n--- vs OLD:\n{o}--- vs NEW:\n{n}");
    }

    /// What differs from NEW (`None`: nothing).
    pub fn mismatch_new(&self, new: &State) -> Option<String> {
        self.pair.mismatch_new(&new.pair).or_else(|| {
            (self.snaps != new.snaps)
                .then(|| format!("snapshots {:?}, expected {:?}\n", self.snaps, new.snaps))
        })
    }

    /// What differs from OLD (`None`: nothing).
    pub fn mismatch_old(&self, old: &State) -> Option<String> {
        self.pair.mismatch_old(&old.pair).or_else(|| {
            (self.snaps != old.snaps)
                .then(|| format!("snapshots {:?}, expected {:?}\n", self.snaps, old.snaps))
        })
    }
}

impl World {
    /// A fresh world of `kind`, or `None` (after printing why) when its
    /// service is not set up; under `CI=true` a missing service fails.
    pub fn new(kind: Kind, prefix: &str) -> Option<World> {
        let (backend, ssh) = match kind {
            Kind::Xfs => (Backend::Posix(Env::new(prefix)), None),
            Kind::Zfs => (Backend::Zfs(ZEnv::new(prefix)?), None),
            Kind::Ssh => {
                let ssh = ssh_support::ssh_or_skip()?;
                (Backend::Posix(Env::new(prefix)), Some(ssh))
            }
            Kind::S3 => (Backend::S3(Box::new(s3::S3Env::new(prefix)?)), None),
        };
        Some(World { kind, backend, ssh })
    }

    /// Like `new` where the service was already found present (a second
    /// world of the same test): panics instead of skipping.
    pub fn again(kind: Kind, prefix: &str) -> World {
        World::new(kind, prefix).expect("the service was there a moment ago")
    }

    /// A zfs world whose repository is reached through the test sshd
    /// (`dsg agent --type zfs` behind it); `None` (skipped) without the sshd
    /// or the pool outside CI. Its kind is `Zfs`.
    pub fn zfs_over_ssh(prefix: &str) -> Option<World> {
        let ssh = ssh_support::ssh_or_skip()?;
        let z = ZEnv::new(prefix)?;
        Some(World {
            kind: Kind::Zfs,
            backend: Backend::Zfs(z),
            ssh: Some(ssh),
        })
    }

    /// A zfs world whose repository parent is a new directory on the
    /// pool's root filesystem (as on a server whose pool is mounted at the
    /// repository path); `None` (skipped) without the pool outside CI.
    pub fn zfs_in_pool_mount(prefix: &str) -> Option<World> {
        let (pool, _) = zfs_config()?;
        let mnt = zfs_ok(&["get", "-H", "-o", "value", "mountpoint", &pool]);
        let z = ZEnv::new_in(prefix, &pool, std::path::Path::new(mnt.trim()));
        Some(World {
            kind: Kind::Zfs,
            backend: Backend::Zfs(z),
            ssh: None,
        })
    }

    /// The test sshd of an ssh world (`Kind::Ssh`, `zfs_over_ssh`).
    pub fn ssh(&self) -> &Ssh {
        self.ssh.as_ref().expect("not a world over ssh")
    }

    /// A posix world (xfs, or ssh when `ssh` is given) whose repository
    /// parent is `parent` (e.g. a small tmpfs); left in place on drop.
    pub fn on(kind: Kind, parent: &std::path::Path) -> Option<World> {
        let ssh = match kind {
            Kind::Xfs => None,
            Kind::Ssh => Some(ssh_support::ssh_or_skip()?),
            Kind::Zfs => panic!("World::on: a zfs repository lives on its pool"),
            Kind::S3 => panic!("World::on: an s3 repository lives in its bucket"),
        };
        Some(World {
            kind,
            backend: Backend::Posix(Env::on(parent)),
            ssh,
        })
    }

    pub fn env(&self) -> &Env {
        self
    }

    /// The zfs side (zfs worlds only).
    pub fn zfs(&self) -> &ZEnv {
        match &self.backend {
            Backend::Zfs(z) => z,
            _ => panic!("{}: not a zfs world", self.kind.label()),
        }
    }

    /// The s3 side (s3 worlds only).
    pub fn s3(&self) -> &s3::S3Env {
        match &self.backend {
            Backend::S3(s) => s,
            _ => panic!("{}: not an s3 world", self.kind.label()),
        }
    }

    /// The repository's directory (s3: its view, refreshed from the store;
    /// absent when the store holds no head).
    pub fn repo(&self) -> std::path::PathBuf {
        match &self.backend {
            Backend::S3(s) => s.view(),
            _ => self.env().repo(),
        }
    }

    /// `state_listing` of the repository, for "a failed command changed
    /// nothing" checks; on s3 also every object's key and size (as
    /// `s3:<key>`), as the view shows only what `HEAD` names.
    pub fn repo_listing(&self) -> Listing {
        self.with_objects(state_listing(&self.repo()))
    }

    /// `full_listing` of the repository; on s3 with every object (see
    /// `repo_listing`).
    pub fn repo_full_listing(&self) -> Listing {
        self.with_objects(full_listing(&self.repo()))
    }

    /// `l` (a listing of the repository) with, on s3, every object's key
    /// and size (the lease's bytes) as `s3:<key>`.
    pub fn with_objects(&self, mut l: Listing) -> Listing {
        if let Backend::S3(s) = &self.backend {
            for (k, n) in s.listing() {
                l.insert(format!("s3:{k}"), (n, 0, 0));
            }
        }
        l
    }

    /// After a command was killed: on s3, waits for the lease it held to
    /// expire, so that the next command can take it over (the other kinds'
    /// locks die with their holder).
    pub fn settle_after_crash(&self) {
        if let Backend::S3(s) = &self.backend {
            s.wait_lease_expiry();
        }
    }

    /// The `--host` of this world's repository.
    pub fn host(&self) -> String {
        match &self.ssh {
            Some(s) => s.host.clone(),
            None => "localhost".into(),
        }
    }

    /// `dsg init` arguments for this kind (`--repo-type`, `--pool`,
    /// `--host`, `--remote-dsg`).
    pub fn init_args(&self) -> Vec<String> {
        let mut v = match &self.backend {
            Backend::Zfs(z) => {
                let mut v = init_args_for(&self.host(), &z.repo_parent, &z.repo_name, "zfs");
                v.extend(["--pool".to_string(), z.pool.clone()]);
                v
            }
            Backend::Posix(e) => init_args_for(&self.host(), &e.repo_parent, &e.repo_name, "xfs"),
            Backend::S3(s) => s.init_args(),
        };
        if self.ssh.is_some() {
            v.push("--remote-dsg".into());
            v.push(dsg_bin().to_str().unwrap().into());
        }
        v
    }

    /// `init_args` plus `--force` and, when given, `--confirm-replace C`.
    pub fn replace_args(&self, confirm: Option<&str>) -> Vec<String> {
        let mut v = self.init_args();
        v.push("--force".into());
        if let Some(c) = confirm {
            v.push("--confirm-replace".into());
            v.push(c.into());
        }
        v
    }

    /// `dsg args` in client `name` (see `Env::command`); over ssh with
    /// `DSG_SSH_COMMAND` for the test sshd.
    pub fn command(&self, name: &str, args: &[&str]) -> Command {
        self.command_as(&[], name, args)
    }

    /// Like `command`, run through `prefix` (e.g. `setpriv …`).
    pub fn command_as(&self, prefix: &[String], name: &str, args: &[&str]) -> Command {
        let mut c = self.env().command_as(prefix, name, args);
        if let Some(s) = &self.ssh {
            c.env("DSG_SSH_COMMAND", s.command());
        }
        if let Backend::S3(s) = &self.backend {
            c.env_remove("AWS_SESSION_TOKEN").env_remove("AWS_PROFILE");
            for (k, v) in s.cluster.vars() {
                c.env(k, v);
            }
        }
        c
    }

    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        self.run_env(name, args, &[])
    }

    /// Runs `dsg` with extra environment (which may replace
    /// `DSG_SSH_COMMAND`). On zfs: killed after `DSG_LIMIT`, and after a
    /// success the dataset must be mounted where it belongs.
    pub fn run_env(&self, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
        match &self.backend {
            Backend::Zfs(z) => match &self.ssh {
                None => z.run_env(name, args, envs),
                Some(s) => {
                    let sc = s.command();
                    let mut all = vec![("DSG_SSH_COMMAND", sc.as_str())];
                    all.extend_from_slice(envs);
                    z.run_env(name, args, &all)
                }
            },
            Backend::Posix(_) | Backend::S3(_) => {
                let mut c = self.command(name, args);
                for (k, v) in envs {
                    c.env(k, v);
                }
                c.output().unwrap()
            }
        }
    }

    /// Starts `dsg args` in client `name` with extra environment, its
    /// output piped (wait with `wait_within`).
    pub fn spawn(&self, name: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Child {
        let mut c = self.command(name, args);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `run_env` with owned arguments.
    pub fn run_args(&self, name: &str, args: &[String], envs: &[(&str, &str)]) -> Output {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.run_env(name, &a, envs)
    }

    /// Runs and asserts exit status 0.
    #[track_caller]
    pub fn ok(&self, name: &str, args: &[&str]) -> Output {
        let o = self.run(name, args);
        assert_ok(
            &o,
            &format!("[{}] dsg {args:?} in {name}", self.kind.label()),
        );
        o
    }

    /// `dsg init` in client `name` (which must hold the data already).
    #[track_caller]
    pub fn init(&self, name: &str) -> Output {
        let args = self.init_args();
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.ok(name, &a)
    }

    /// Prepares and runs `dsg clone` in client `to`.
    #[track_caller]
    pub fn clone_client(&self, from: &str, to: &str) -> Output {
        self.prepare_clone(from, to);
        self.ok(to, &["clone"])
    }

    /// `status --json` rows as (path, state, action).
    pub fn status_rows(&self, name: &str) -> Vec<(String, String, String)> {
        let o = self.ok(name, &["status", "--json"]);
        rows_of(&json_of(&o), "files")
    }

    #[track_caller]
    pub fn assert_clean(&self, name: &str) {
        let rows = self.status_rows(name);
        assert!(
            rows.is_empty(),
            "[{}] status in {name} not clean: {rows:?}",
            self.kind.label()
        );
    }

    /// The repository's head manifest (read on its disk).
    pub fn head(&self) -> serde_json::Value {
        read_json(&self.repo().join(".dsg/last-sync.json"))
    }

    /// The repository's snapshots (zfs: the dataset's, in creation order;
    /// the other kinds keep none).
    pub fn snapshots(&self) -> Vec<String> {
        match &self.backend {
            Backend::Zfs(z) => z.snapshots(),
            Backend::Posix(_) | Backend::S3(_) => Vec::new(),
        }
    }

    /// The state of client `client` and the repository.
    pub fn capture(&self, client: &str) -> State {
        // s3: refresh the view Env::capture lists.
        self.repo();
        State {
            pair: self.env().capture(client),
            snaps: self.snapshots(),
        }
    }

    /// The repository exists (zfs: its dataset `POOL/N`; else its head).
    #[track_caller]
    pub fn assert_repo_present(&self, ctx: &str) {
        match &self.backend {
            Backend::Zfs(z) => assert!(
                z.datasets().contains(&z.dataset()),
                "{ctx}: {} is missing; datasets: {:?}",
                z.dataset(),
                z.datasets()
            ),
            Backend::Posix(e) => assert!(
                e.repo().join(".dsg/last-sync.json").is_file(),
                "{ctx}: repository missing"
            ),
            Backend::S3(s) => assert!(
                s.head_doc().and_then(|d| d.head).is_some(),
                "{ctx}: repository missing (no HEAD, or one without a head)"
            ),
        }
    }

    /// The repository is sound after a command: its tree equals its head
    /// manifest and no transaction is left (zfs: also the dataset is
    /// `POOL/N`, not a clone, mounted, snapshots `s1..sN`; no `POOL/N--*`,
    /// `.dsg-tx.*` or journal). Returns the head's number N.
    #[track_caller]
    pub fn assert_repo_sound(&self, ctx: &str) -> u64 {
        match &self.backend {
            Backend::Zfs(z) => {
                let n = z.assert_repo_dataset(ctx);
                z.assert_no_zfs_leftovers(ctx);
                n
            }
            Backend::Posix(e) => {
                let head = self.head();
                assert_tree_matches_manifest(&e.repo(), &head, &format!("{ctx}: repository"));
                assert_no_repo_leftovers(&e.repo_parent, &e.repo());
                snap_num(&snapshot_id(&head))
            }
            Backend::S3(s) => {
                let n = s.assert_head_sound(ctx);
                s.assert_no_leftovers(ctx);
                n
            }
        }
    }

    /// `assert_repo_sound` after a crash and one command that reads the
    /// repository (`dsg status`): on s3 without the leftovers check, as a
    /// read leaves a dead writer's objects to the next writer (`finish`
    /// checks them after the re-run); the other kinds in full.
    #[track_caller]
    pub fn assert_repo_sound_after_read(&self, ctx: &str) -> u64 {
        match &self.backend {
            Backend::S3(s) => s.assert_head_sound(ctx),
            _ => self.assert_repo_sound(ctx),
        }
    }

    /// No transaction leftovers in or beside the repository.
    #[track_caller]
    pub fn assert_no_repo_leftovers(&self, ctx: &str) {
        match &self.backend {
            Backend::Posix(e) | Backend::Zfs(ZEnv { env: e, .. }) => {
                assert_no_repo_leftovers(&e.repo_parent, &e.repo())
            }
            Backend::S3(s) => s.assert_no_leftovers(ctx),
        }
    }

    /// No repository at all and nothing beside where it would be (after a
    /// rolled-back init).
    #[track_caller]
    pub fn assert_no_repo(&self, ctx: &str) {
        match &self.backend {
            Backend::Zfs(z) => {
                assert_eq!(z.datasets(), Vec::<String>::new(), "{ctx}: datasets");
                assert_eq!(z.all_snapshots(), Vec::<String>::new(), "{ctx}: snapshots");
                let left = z.parent_leftovers();
                assert!(left.is_empty(), "{ctx}: leftovers beside it: {left:?}");
            }
            Backend::Posix(e) => assert_no_repo_leftovers(&e.repo_parent, &e.repo()),
            // What the dead init wrote stays for the next writer, which
            // removes it (checked once an init succeeds).
            Backend::S3(s) => assert!(
                s.head_doc().and_then(|d| d.head).is_none(),
                "{ctx}: the store holds a head"
            ),
        }
        assert!(!self.repo().exists(), "{ctx}: repository directory exists");
    }
}

/// `per_kind!(name: xfs, zfs, ssh, s3);` — one `#[test]` per listed kind
/// for the body `fn name(kind: Kind)`: `name::xfs`, `name::zfs`, `name::ssh`
/// (so `cargo test xfs` picks one kind). Several at once:
/// `per_kind!(a: xfs, zfs; b: xfs);`.
#[macro_export]
macro_rules! per_kind {
    ($($name:ident : $($kind:ident),+);+ $(;)?) => {
        $(
            mod $name {
                $( $crate::per_kind!(@test $name $kind); )+
            }
        )+
    };
    (@test $name:ident xfs) => {
        #[test]
        fn xfs() {
            super::$name($crate::world::Kind::Xfs)
        }
    };
    (@test $name:ident zfs) => {
        #[test]
        fn zfs() {
            super::$name($crate::world::Kind::Zfs)
        }
    };
    (@test $name:ident ssh) => {
        #[test]
        fn ssh() {
            super::$name($crate::world::Kind::Ssh)
        }
    };
    (@test $name:ident s3) => {
        #[test]
        fn s3() {
            super::$name($crate::world::Kind::S3)
        }
    };
}

/// `let w = world_or_skip!(kind, "prefix");` — a fresh world, or return
/// from the test (skipped) when the kind's service is missing outside CI.
#[macro_export]
macro_rules! world_or_skip {
    ($kind:expr, $prefix:expr) => {
        match $crate::world::World::new($kind, $prefix) {
            Some(w) => w,
            None => return,
        }
    };
}
