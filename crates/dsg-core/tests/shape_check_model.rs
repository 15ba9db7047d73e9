//! Review probe: the streamed shape check against check_shape, a wider
//! alphabet (bytes on both sides of '/', NFC pairs, deeper paths).
use dsg_core::hash::Hash;
use dsg_core::manifest::{Entry, EntryKind, Manifest, Mtime, ShapeCheck};
use dsg_core::paths::check_relpath;
use proptest::prelude::*;

fn file(path: &str) -> Entry {
    Entry {
        path: path.into(),
        user: "u".into(),
        kind: EntryKind::File {
            size: 1,
            mtime: Mtime::from_unix(1_700_000_000, 0),
            hash: Some(Hash::of_bytes(path.as_bytes())),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20000))]
    #[test]
    fn streamed_shape_equals_check_shape_wide(
        paths in proptest::collection::btree_set(
            "(a|!| |0|\\.|e\u{301}|\u{e9}|\u{c5}|A\u{30a}){1,2}(/(a|!| |0|e\u{301}|\u{e9}|A\u{30a}){1,2}){0,3}",
            0..16,
        ),
    ) {
        let paths: Vec<&str> = paths.iter().map(|p| p.as_str()).filter(|p| check_relpath(p).is_ok()).collect();
        let m = Manifest::from_entries(paths.iter().map(|p| file(p)).collect());
        let mut c = ShapeCheck::new();
        let mut first = Ok(());
        for e in m.entries() {
            if let Err(e) = c.push(&e.path) { first = Err(e); break; }
        }
        let json = m.to_json_bytes();
        let streamed = first.and_then(|()| c.finish(|| &json[..]));
        prop_assert_eq!(streamed.is_ok(), m.check_shape().is_ok(), "{:?} {:?}", paths, streamed);
    }
}
