//! Spec §4.1: every rule with a failing and a passing case, using the spec's
//! own examples, plus the §3.4 backup-name pattern.

use dsg_core::names::{
    is_conflict_backup_name, validate_os_path, validate_path, NameProblemKind as K,
};

#[track_caller]
fn fails(p: &str, kind: K, msg: &str) {
    let err = validate_path(p).expect_err(p);
    assert_eq!(err.kind(), kind, "{p:?}: {err}");
    assert_eq!(err.to_string(), msg, "{p:?}");
}

#[track_caller]
fn ok(p: &str) {
    if let Err(e) = validate_path(p) {
        panic!("{p:?} should be valid, got: {e}");
    }
}

#[test]
fn rule1_empty() {
    fails("", K::Empty, "Path cannot be empty");
    ok("a");
}

#[cfg(unix)]
#[test]
fn rule2_utf8() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let err = validate_os_path(OsStr::from_bytes(b"data/caf\xe9.csv")).unwrap_err();
    assert_eq!(err.kind(), K::NotUtf8);
    assert_eq!(err.to_string(), "Path must be UTF-8 encodable");
    // Rule 1 comes first.
    assert_eq!(
        validate_os_path(OsStr::new("")).unwrap_err().kind(),
        K::Empty
    );
    // UTF-8 input goes on to the other rules.
    assert!(validate_os_path(OsStr::new("data/caf\u{e9}.csv")).is_ok());
    assert_eq!(
        validate_os_path(OsStr::new("data/CON")).unwrap_err().kind(),
        K::Reserved
    );
}

#[test]
fn rule3_backslash_relative() {
    let msg = "Path contains invalid relative component '.\\'";
    fails("a\\.\\\\b", K::BackslashRelative, msg); // contains `\.\\`
    fails(".\\x", K::BackslashRelative, msg);
    fails("x\\.", K::BackslashRelative, msg);
    // Other backslashes are separators: these are `a/b` and `a/.b`.
    ok("a\\b");
    ok("a\\.b");
    // `a\.\b` (single backslashes) is not rule 3, but becomes `a/./b` (rule 4).
    fails(
        "a\\.\\b",
        K::DotRelative,
        "Path contains invalid relative component './'",
    );
    // After conversion, later rules see separators: `x\CON` is `x/CON`.
    fails("x\\CON", K::Reserved, "Reserved name 'CON' (Windows)");
}

#[test]
fn rule4_dot() {
    let msg = "Path contains invalid relative component './'";
    fails("./x", K::DotRelative, msg);
    fails("a/./b", K::DotRelative, msg);
    fails("a/.", K::DotRelative, msg);
    ok("a/.b/c");
    ok("a/b.");
}

#[test]
fn rule5_dotdot() {
    let msg = "Path contains invalid relative component '..'";
    fails("a/../b", K::DotDotRelative, msg);
    fails("../x", K::DotDotRelative, msg);
    fails("x/..", K::DotDotRelative, msg);
    ok("a/..b/c");
    ok("a/b../c");
}

#[test]
fn lone_dot_has_no_components() {
    // The reference code's check between rules 5 and 6 (not in the spec list).
    fails(
        ".",
        K::NoComponents,
        "Path must contain at least one component",
    );
}

#[test]
fn rule6_bare_drive_root() {
    let msg = "Path is a bare Windows drive root";
    fails("C:", K::BareDriveRoot, msg);
    fails("c:/", K::BareDriveRoot, msg);
    fails("C://", K::BareDriveRoot, msg);
    fails("C:\\", K::BareDriveRoot, msg);
    ok("C:/folder/file.txt");
    ok("C:\\folder\\file.txt");
}

#[test]
fn rule7_root_or_drive_only() {
    fails(
        "/",
        K::RootOrDriveOnly,
        "Path '/' is not a valid file path (root or drive-only)",
    );
    fails(
        "///",
        K::RootOrDriveOnly,
        "Path '/' is not a valid file path (root or drive-only)",
    );
    // Python's isalpha is Unicode-wide, and é: is not caught by rule 6's ASCII class.
    fails(
        "\u{e9}:",
        K::RootOrDriveOnly,
        "Path '\u{e9}:' is not a valid file path (root or drive-only)",
    );
    // Deliberate divergence: Python keeps a `//` root and calls it valid.
    fails(
        "//",
        K::RootOrDriveOnly,
        "Path '//' is not a valid file path (root or drive-only)",
    );
    // Absolute paths are allowed; a non-letter drive-like name is skipped.
    ok("/abs/path.txt");
    ok("1:");
    ok("/C:");
}

#[test]
fn rule8a_length() {
    let c256 = "x".repeat(256);
    fails(
        &format!("dir/{c256}"),
        K::TooLong,
        &format!("Component '{c256}' exceeds max length of 255 bytes"),
    );
    // Bytes, not chars: 128 two-byte chars are 256 bytes.
    let e128 = "\u{e9}".repeat(128);
    assert_eq!(validate_path(&e128).unwrap_err().kind(), K::TooLong);
    ok(&"x".repeat(255));
    ok(&"\u{e9}".repeat(127));
    // No limit on the whole path.
    ok(&vec!["abcdefgh"; 1000].join("/"));
}

#[test]
fn rule8b_trailing_tilde() {
    fails(
        "a/notes.txt~",
        K::BackupSuffix,
        "Temporary/backup file 'notes.txt~' not allowed",
    );
    fails(
        "dir~/x",
        K::BackupSuffix,
        "Temporary/backup file 'dir~' not allowed",
    );
    // 8b comes before 8c and 8e.
    assert_eq!(validate_path("CON~").unwrap_err().kind(), K::BackupSuffix);
    assert_eq!(validate_path("~").unwrap_err().kind(), K::BackupSuffix);
    ok("a~b");
}

#[test]
fn rule8c_reserved() {
    for name in [
        "CON.txt",
        "aux.tar.gz",
        "nul.",
        "CON",
        "con",
        "Lpt9",
        "COM1.csv",
    ] {
        fails(
            &format!("data/{name}"),
            K::Reserved,
            &format!("Reserved name '{name}' (Windows)"),
        );
    }
    for name in [
        "com0",
        "lpt1x",
        ".con",
        "console.txt",
        "conx",
        "my.con",
        "lpt10",
    ] {
        ok(&format!("data/{name}"));
    }
}

#[test]
fn rule8d_relative_component() {
    fails(
        "..",
        K::RelativeComponent,
        "Relative path component '..' not allowed",
    );
    ok("...");
    ok("a/.../b");
}

#[test]
fn rule8e_leading_tilde() {
    fails(
        "a/~lock.csv",
        K::DisallowedPrefix,
        "Component '~lock.csv' has disallowed prefix",
    );
    ok("a/x~lock.csv");
}

#[test]
fn rule8f_whitespace() {
    let msg = |c: &str| format!("Component '{c}' has leading/trailing whitespace");
    fails(" a.csv", K::Whitespace, &msg(" a.csv"));
    fails("d/a.csv ", K::Whitespace, &msg("a.csv "));
    // NBSP at the end is whitespace for Python's strip()...
    fails("a\u{a0}", K::Whitespace, &msg("a\u{a0}"));
    // ...and so is U+001C (Python isspace), which therefore is reported as
    // whitespace rather than as an illegal character.
    fails("\u{1c}a", K::Whitespace, &msg("\u{1c}a"));
    ok("inner space.txt");
    ok("a\u{a0}b"); // NBSP inside is allowed
}

#[test]
fn rule8g_illegal_chars() {
    for c in [
        "a<b", "a>b", "a\"b", "a|b", "a?b", "a*b", "a\tb", "a\u{0}b", "a\u{1c}b",
    ] {
        fails(
            c,
            K::IllegalChars,
            &format!("Component '{c}' contains illegal characters"),
        );
    }
    ok("bad:name.txt");
    ok("a/.valid/path");
}

#[test]
fn rule8h_non_printable() {
    for c in [
        "a\u{7f}b",   // DEL (Cc)
        "a\u{200b}b", // zero-width space (Cf)
        "a\u{202e}b", // RTL override (Cf)
        "a\u{2028}b", // line separator (Zl, listed explicitly)
        "a\u{e000}",  // private use (Co)
        "a\u{378}",   // unassigned (Cn)
        "a\u{85}b",   // NEL: C1 control inside a name (at the edge it is whitespace)
    ] {
        fails(
            c,
            K::NonPrintable,
            &format!("Component '{c}' contains non-printable or control characters"),
        );
    }
    ok("na\u{ef}ve.csv");
    ok("\u{65e5}\u{672c}.txt");
}

#[test]
fn rule8i_nfc() {
    fails(
        "data/cafe\u{301}.csv",
        K::NotNfc,
        "Component 'cafe\u{301}.csv' is not NFC-normalized",
    );
    ok("data/caf\u{e9}.csv");
}

#[test]
fn problems_name_the_offending_component() {
    let err = validate_path("ok/CON.txt/x").unwrap_err();
    assert_eq!(err.component(), Some("CON.txt"));
    assert!(err.to_string().contains("'CON.txt'"));
    // The first failing component wins, in path order.
    let err = validate_path("a~/cafe\u{301}").unwrap_err();
    assert_eq!(err.component(), Some("a~"));
    // Whole-path rules have no component.
    assert_eq!(validate_path("./x").unwrap_err().component(), None);
}

#[test]
fn deliberately_allowed() {
    for p in [
        "bad:name.txt",
        "a/.valid/path",
        "C:/folder/file.txt",
        "/abs/file",
        "with inner spaces/and more.csv",
        "a//b",
    ] {
        ok(p);
    }
}

#[test]
fn backup_pattern_accepts_both_offset_signs() {
    assert!(is_conflict_backup_name("data.csv~20250713T165322-0700~"));
    assert!(is_conflict_backup_name("data.csv~20250713T165322+0000~"));
    assert!(is_conflict_backup_name("data.csv~20250713T165322+0530~"));
    assert!(is_conflict_backup_name("~20250713T165322-0700~"));
    assert!(is_conflict_backup_name("\u{e9}~20250713T165322-0700~"));
}

#[test]
fn backup_pattern_rejects_near_misses() {
    for name in [
        "data.csv",
        "data.csv~",
        "data.csv~2025071T165322-0700~",        // 7 date digits
        "data.csv~20250713T16532-0700~",        // 5 time digits
        "data.csv~20250713T165322-0700",        // no closing ~
        "data.csv20250713T165322-0700~",        // no opening ~
        "data.csv~20250713X165322-0700~",       // no T
        "data.csv~20250713T165322 0700~",       // no sign
        "data.csv~20250713T165322-070~",        // 3 offset digits
        "data.csv~20250713T165322-0700~.b",     // not at the end
        "data.csv~2025071\u{663}T165322-0700~", // non-ASCII digit
        "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
    ] {
        assert!(!is_conflict_backup_name(name), "{name:?}");
    }
}
