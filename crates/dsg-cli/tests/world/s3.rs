//! The S3 side of a world (`Kind::S3`): a repository in `DSG_TEST_BUCKET`
//! of the loopback SeaweedFS cluster (`/var/tmp/dsg-test/s3.env`, or
//! `DSG_TEST_S3_ENV`), under a key prefix of its own (`world/<pid>-<n>`),
//! whose objects are removed when the world is dropped.
//!
//! The suites look at a repository as a directory (`World::repo()`): here
//! that directory is a *view* written from the store, read through the
//! test's own client (`dsg_s3::Store`), not the product's reader: the head
//! manifest's files (each from its `data/` object), `.dsg/last-sync.json`
//! (the head manifest, checked against the hash `HEAD` records),
//! `.dsg/sync-messages.json` and `.dsg/archive/<sN>-sync.json.lz4` for the
//! other snapshots `HEAD` names, every mtime a fixed one (objects carry
//! none; a rebuilt view lists the same). The view is rebuilt whenever
//! `HEAD`'s bytes change. A snapshot object or content that `HEAD` needs and
//! the store lacks fails the test there.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use dsg_s3::Store;

pub use super::s3_cluster::{cluster_or_skip, Cluster};
use serde_json::Value;

use super::sync_support::*;

/// The mtime of every path of a view.
const VIEW_MTIME: i64 = 1_000_000_000;

/// `HEAD` as the tests read it.
#[derive(Clone, Debug)]
pub struct HeadDoc {
    /// (id, tx, hash) of the head snapshot.
    pub head: Option<(String, String, u64)>,
    pub snapshots: Vec<(String, String, u64)>,
}

fn snap_ref(v: &Value) -> (String, String, u64) {
    (
        v["id"].as_str().expect("HEAD: snapshot id").to_string(),
        v["tx"].as_str().expect("HEAD: snapshot tx").to_string(),
        v["hash"].as_u64().expect("HEAD: snapshot hash"),
    )
}

pub fn manifest_key((id, tx, _): &(String, String, u64)) -> String {
    format!("snapshots/{id}-{tx}.json.lz4")
}

pub fn messages_key((id, tx, _): &(String, String, u64)) -> String {
    format!("snapshots/{id}-{tx}.messages.json")
}

/// The `data/` key of a manifest file entry.
pub fn data_key(size: u64, hash: &str) -> String {
    let h = u64::from_str_radix(hash, 16).unwrap_or_else(|_| panic!("bad hash {hash:?}"));
    format!("data/{h:016x}-{size}")
}

/// The S3 side of one world (see the module docs). Derefs to its `Env`
/// (clients; `repo()` there is the view's path, unrefreshed: use
/// `World::repo`).
pub struct S3Env {
    pub env: Env,
    pub cluster: Cluster,
    /// The world's key prefix; the repository is `<prefix>/<repo_name>`.
    pub prefix: String,
    /// The repository's objects.
    pub store: Store,
    _view_parent: tempfile::TempDir,
    /// `HEAD`'s bytes the view was written for (`Some(None)`: no `HEAD`).
    view_of: Mutex<Option<Option<Vec<u8>>>>,
}

impl std::ops::Deref for S3Env {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

impl Drop for S3Env {
    fn drop(&mut self) {
        let all = self.cluster.store(&self.prefix);
        if let Ok(ups) = all.multipart_list("") {
            for (k, id) in ups {
                let _ = all.multipart_abort(&k, &id);
            }
        }
        if let Ok(keys) = all.list("") {
            for (k, _) in keys {
                let _ = all.delete(&k);
            }
        }
    }
}

impl S3Env {
    pub fn new(_prefix: &str) -> Option<S3Env> {
        let cluster = cluster_or_skip()?;
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "world/{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let view_parent = tempfile::Builder::new()
            .prefix("dsg-s3view-")
            .tempdir()
            .unwrap();
        let env = Env::on(view_parent.path());
        let store = cluster.store(&format!("{prefix}/{}", env.repo_name));
        // A prefix left by an earlier run of a recycled pid.
        for (k, _) in store.list("").expect("listing the world's prefix") {
            store.delete(&k).unwrap();
        }
        Some(S3Env {
            env,
            cluster,
            prefix,
            store,
            _view_parent: view_parent,
            view_of: Mutex::new(None),
        })
    }

    /// `dsg init` arguments for this repository.
    pub fn init_args(&self) -> Vec<String> {
        [
            "init",
            "--no-interactive",
            "--repo-type",
            "s3",
            "--endpoint",
            &self.cluster.endpoint,
            "--bucket",
            &self.cluster.bucket,
            "--prefix",
            &self.prefix,
            "--repo-name",
            &self.env.repo_name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// An object's bytes, `None` when absent.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.store
            .get(key)
            .unwrap_or_else(|e| panic!("GET {key}: {e}"))
            .map(|(b, _)| b)
    }

    /// Every key of the repository (relative to its prefix).
    pub fn keys(&self) -> Vec<String> {
        let l = self.store.list("").expect("listing the repository");
        l.into_iter().map(|(k, _)| k).collect()
    }

    pub fn head_doc(&self) -> Option<HeadDoc> {
        let bytes = self.get("HEAD")?;
        let v: Value = serde_json::from_slice(&bytes).expect("HEAD is JSON");
        assert_eq!(v["format"], "dsg-s3/1", "HEAD format");
        Some(HeadDoc {
            head: (!v["head"].is_null()).then(|| snap_ref(&v["head"])),
            snapshots: v["snapshots"]
                .as_array()
                .expect("HEAD: snapshots")
                .iter()
                .map(snap_ref)
                .collect(),
        })
    }

    /// A snapshot's manifest JSON bytes (decompressed, checked against the
    /// hash `HEAD` records).
    pub fn manifest_bytes(&self, r: &(String, String, u64)) -> Vec<u8> {
        let key = manifest_key(r);
        let lz4 = self
            .get(&key)
            .unwrap_or_else(|| panic!("{key}: missing, though HEAD names it"));
        let mut json = Vec::new();
        lz4_flex::frame::FrameDecoder::new(&lz4[..])
            .read_to_end(&mut json)
            .unwrap_or_else(|e| panic!("{key}: not LZ4: {e}"));
        assert_eq!(
            dsg_core::hash::Hash::of_bytes(&json).0,
            r.2,
            "{key}: its JSON does not hash to what HEAD records"
        );
        json
    }

    /// Replaces the manifest object of snapshot `id` (a tampering test).
    pub fn overwrite_manifest(&self, id: &str, bytes: &[u8]) {
        let doc = self.head_doc().expect("HEAD");
        let r = doc
            .snapshots
            .iter()
            .find(|r| r.0 == id)
            .unwrap_or_else(|| panic!("HEAD names no {id}"));
        self.store
            .put(&manifest_key(r), bytes, &dsg_s3::Cond::None)
            .expect("overwriting a manifest object");
        self.invalidate_view();
    }

    /// Forgets the view (after changing objects behind `HEAD`'s back).
    pub fn invalidate_view(&self) {
        *self.view_of.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The view of the repository (see the module docs), rebuilt if `HEAD`
    /// changed; its path (absent when there is no head).
    pub fn view(&self) -> PathBuf {
        let root = self.env.repo();
        // Held while the view is rewritten (threads of one test share it).
        let mut view_of = self.view_of.lock().unwrap_or_else(|e| e.into_inner());
        let head = self.get("HEAD");
        if view_of.as_ref() == Some(&head) {
            return root;
        }
        if root.exists() {
            fs::remove_dir_all(&root).unwrap();
        }
        let doc = self.head_doc();
        if let Some(h) = doc.as_ref().and_then(|d| d.head.clone()) {
            self.write_view(&root, doc.as_ref().unwrap(), &h);
        }
        *view_of = Some(head);
        root
    }

    fn write_view(&self, root: &Path, doc: &HeadDoc, head: &(String, String, u64)) {
        let dsg = root.join(".dsg");
        fs::create_dir_all(dsg.join("archive")).unwrap();
        let json = self.manifest_bytes(head);
        fs::write(dsg.join("last-sync.json"), &json).unwrap();
        let mkey = messages_key(head);
        let messages = self
            .get(&mkey)
            .unwrap_or_else(|| panic!("{mkey}: missing, though HEAD names it"));
        fs::write(dsg.join("sync-messages.json"), messages).unwrap();
        for r in doc.snapshots.iter().filter(|r| *r != head) {
            let key = manifest_key(r);
            let lz4 = self
                .get(&key)
                .unwrap_or_else(|| panic!("{key}: missing, though HEAD names it"));
            fs::write(
                dsg.join("archive").join(format!("{}-sync.json.lz4", r.0)),
                lz4,
            )
            .unwrap();
        }
        for (path, ent) in manifest_entries(&parse_manifest(&json)) {
            let full = root.join(&path);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            match ent {
                Ent::File { size, hash } => {
                    let key = data_key(size, &hash);
                    let body = self
                        .get(&key)
                        .unwrap_or_else(|| panic!("{key}: missing, the contents of {path}"));
                    fs::write(&full, body).unwrap();
                }
                Ent::Link(t) => std::os::unix::fs::symlink(t, &full).unwrap(),
            }
        }
        let mut all: Vec<PathBuf> = walk_all(root).into_iter().map(|(p, _)| p).collect();
        all.push(root.to_path_buf());
        for p in all {
            set_mtime(&p, VIEW_MTIME);
        }
    }

    /// The snapshot ids `pruned.json` records (their data may be gone).
    pub fn pruned_ids(&self) -> BTreeSet<String> {
        let Some(bytes) = self.get("pruned.json") else {
            return BTreeSet::new();
        };
        let v: Value = serde_json::from_slice(&bytes).expect("pruned.json is JSON");
        let m = v["pruned"].as_object().expect("pruned.json: pruned");
        m.keys().cloned().collect()
    }

    /// Every `data/` key some snapshot `HEAD` names, and `pruned.json` does
    /// not, references.
    pub fn referenced_data(&self, doc: &HeadDoc) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let pruned = self.pruned_ids();
        for r in doc.snapshots.iter().filter(|r| !pruned.contains(&r.0)) {
            let m = parse_manifest(&self.manifest_bytes(r));
            for ent in manifest_entries(&m).into_values() {
                if let Ent::File { size, hash } = ent {
                    out.insert(data_key(size, &hash));
                }
            }
        }
        out
    }

    /// The repository is sound: `HEAD` names s1..sN in order with sN its
    /// head, every snapshot's objects and every content they reference
    /// exist, the view matches the head manifest. Returns N.
    #[track_caller]
    pub fn assert_head_sound(&self, ctx: &str) -> u64 {
        let doc = self.head_doc().unwrap_or_else(|| panic!("{ctx}: no HEAD"));
        let ids: Vec<&str> = doc.snapshots.iter().map(|r| r.0.as_str()).collect();
        let n = ids.len() as u64;
        let want: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
        assert_eq!(ids, want, "{ctx}: HEAD's snapshots");
        assert_eq!(
            doc.head.as_ref(),
            doc.snapshots.last(),
            "{ctx}: HEAD's head is not its last snapshot"
        );
        let keys: BTreeSet<String> = self.keys().into_iter().collect();
        for r in &doc.snapshots {
            for k in [manifest_key(r), messages_key(r)] {
                assert!(
                    keys.contains(&k),
                    "{ctx}: {k} missing, though HEAD names it"
                );
            }
        }
        let missing: Vec<_> = self
            .referenced_data(&doc)
            .into_iter()
            .filter(|k| !keys.contains(k))
            .collect();
        assert!(missing.is_empty(), "{ctx}: contents missing: {missing:?}");
        let view = self.view();
        let head = read_json(&view.join(".dsg/last-sync.json"));
        assert_tree_matches_manifest(&view, &head, &format!("{ctx}: repository"));
        assert_chain(&view);
        n
    }

    /// Nothing a transaction leaves: no `txs/` journal, no `data/` object no
    /// unpruned snapshot references, no snapshot object `HEAD` does not
    /// name, no unfinished multipart upload, nothing else beside `HEAD`,
    /// `lock` and `pruned.json`; the lease released.
    #[track_caller]
    pub fn assert_no_leftovers(&self, ctx: &str) {
        let doc = self.head_doc();
        let (referenced, named) = match &doc {
            Some(d) => (
                self.referenced_data(d),
                d.snapshots
                    .iter()
                    .flat_map(|r| [manifest_key(r), messages_key(r)])
                    .collect(),
            ),
            None => (BTreeSet::new(), BTreeSet::new()),
        };
        let bad: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| {
                !(k == "HEAD"
                    || k == "lock"
                    || k == "pruned.json"
                    || referenced.contains(k)
                    || named.contains(k))
            })
            .collect();
        assert!(bad.is_empty(), "{ctx}: leftover objects {bad:?}");
        let ups = self.store.multipart_list("").expect("listing uploads");
        assert!(ups.is_empty(), "{ctx}: unfinished uploads {ups:?}");
        if let Some(lock) = self.get("lock") {
            let v: Value = serde_json::from_slice(&lock).expect("lock is JSON");
            assert_eq!(v["free"], true, "{ctx}: the lease is still held: {v}");
        }
    }

    /// Waits until a lease a killed writer left has expired (so that the
    /// next command may take it over).
    pub fn wait_lease_expiry(&self) {
        let Some(lock) = self.get("lock") else { return };
        let v: Value = serde_json::from_slice(&lock).expect("lock is JSON");
        if v["free"] == true {
            return;
        }
        let expires = v["expires"].as_u64().expect("lock: expires");
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            if now > expires {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Every object's key and size, and the lease's bytes: for "nothing
    /// changed" checks.
    pub fn listing(&self) -> BTreeMap<String, Node> {
        let l = self.store.list("").expect("listing").into_iter();
        let mut out: BTreeMap<String, Node> = l.map(|(k, n)| (k, Node::Big(n, 0))).collect();
        if let Some(lock) = self.get("lock") {
            out.insert("lock".into(), Node::File(lock));
        }
        out
    }
}

/// Sets the mtime (and atime) of `p`, not following a symlink.
fn set_mtime(p: &Path, secs: i64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}
