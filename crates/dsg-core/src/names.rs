//! Filename rules: validation (spec-data-model §4.1), the conflict-backup name
//! pattern (§3.4), and a pure, tree-level normalisation planner plus its
//! applier (§4.2/§4.3, redesigned per §8 items 14 and 21).
//!
//! # Unicode versions
//!
//! The reference implementation runs on Python 3.13, whose `unicodedata` is
//! Unicode **15.1**. Here general categories come from `unicode-general-category`
//! (Unicode [`unicode_general_category::UNICODE_VERSION`], 16.0 at the time of
//! writing) and NFC from `unicode-normalization`
//! ([`unicode_normalization::UNICODE_VERSION`], newer still). Consequences:
//!
//! * characters first assigned in Unicode 16.0 are `Cn` (unassigned) for Python
//!   and therefore rejected there by rule 8h, but accepted here;
//! * NFC cannot differ for characters assigned in 15.1 (Unicode's normalisation
//!   stability policy), and newer characters never reach the NFC check in Python
//!   because 8h rejects them first, so rule 8i agrees wherever 8h does.
//!
//! A unit test pins both crate versions so that a dependency bump forces someone
//! to re-read this note.
//!
//! # Why one table for validating and fixing
//!
//! In the reference code the validator and the fixer used different predicates
//! (§8 item 21), so the fixer could leave names that the validator rejects
//! (`CON.txt`, leading `~`, whitespace, ...). Here every fix is driven by the
//! same predicates the validator uses ([`WINDOWS_RESERVED_NAMES`],
//! `is_illegal_char`, `is_unsafe_char`, `py_is_space`), and every planned
//! destination is re-validated with [`validate_path`] before it is accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Component, Path};

use unicode_general_category::get_general_category;
use unicode_normalization::{is_nfc, UnicodeNormalization};

/// Maximum UTF-8 length of one path component (rule 8a).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Windows reserved device names (rule 8c), lower-case. Shared by the
/// validator and the fixer (§8 item 21).
pub const WINDOWS_RESERVED_NAMES: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// Suffix inserted after the stem of a reserved name (`CON.txt` → `CON_renamed.txt`).
const RESERVED_SUFFIX: &str = "_renamed";

/// Code points rejected by rule 8h in addition to general category `C*`.
/// Several are not `C*` (U+2028/U+2029 are `Zl`/`Zp`, U+1D159 is `So`) but are
/// invisible or reorder text, which is what the rule is about.
const EXTRA_UNSAFE_CODEPOINTS: [u32; 23] = [
    0x2028, 0x2029, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x200B, 0x200C, 0x200D, 0x2060, 0x2066,
    0x2067, 0x2068, 0x2069, 0xFFF9, 0xFFFA, 0xFFFB, 0xFFFC, 0x1D159, 0x1D173, 0x1D17A, 0x0378,
];

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Which rule of §4.1 a path broke. Variants are listed in check order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum NameProblemKind {
    /// 1: empty path.
    Empty,
    /// 2: not UTF-8 (only reachable through [`validate_os_path`]).
    NotUtf8,
    /// 3: `\.\\` inside, leading `.\` or trailing `\.`.
    BackslashRelative,
    /// 4: `/./` inside, leading `./` or trailing `/.`.
    DotRelative,
    /// 5: `/../` inside, leading `../` or trailing `/..`.
    DotDotRelative,
    /// Reference-code check between 5 and 6 that the spec omits: the path has
    /// no components at all. Only the path `.` reaches it.
    NoComponents,
    /// 6: the whole path is `X:` followed only by slashes.
    BareDriveRoot,
    /// 7: the only component is a root or a drive (`/`, `é:`).
    RootOrDriveOnly,
    /// 8a: component longer than [`MAX_COMPONENT_BYTES`].
    TooLong,
    /// 8b: component ends with `~`.
    BackupSuffix,
    /// 8c: Windows reserved name (stem before the first `.`).
    Reserved,
    /// 8d: component is `.` or `..`.
    RelativeComponent,
    /// 8e: component starts with `~`.
    DisallowedPrefix,
    /// 8f: leading or trailing (Python) whitespace.
    Whitespace,
    /// 8g: U+0000–U+001F or one of `< > " | ? *`.
    IllegalChars,
    /// 8h: general category `C*` or an invisible/bidi code point.
    NonPrintable,
    /// 8i: component is not in NFC.
    NotNfc,
}

/// Why a path failed [`validate_path`]. `Display` gives the reference message
/// text; for per-component rules the message names the offending component,
/// which is also available from [`NameProblem::component`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameProblem {
    kind: NameProblemKind,
    /// The offending component (rules 7 and 8), `None` for whole-path rules.
    component: Option<String>,
}

impl NameProblem {
    fn new(kind: NameProblemKind, component: Option<&str>) -> Self {
        NameProblem {
            kind,
            component: component.map(str::to_owned),
        }
    }

    pub fn kind(&self) -> NameProblemKind {
        self.kind
    }

    /// The component the message is about, for rules 7 and 8a–8i.
    pub fn component(&self) -> Option<&str> {
        self.component.as_deref()
    }
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use NameProblemKind::*;
        let c = self.component.as_deref().unwrap_or("");
        match self.kind {
            Empty => f.write_str("Path cannot be empty"),
            NotUtf8 => f.write_str("Path must be UTF-8 encodable"),
            BackslashRelative => f.write_str("Path contains invalid relative component '.\\'"),
            DotRelative => f.write_str("Path contains invalid relative component './'"),
            DotDotRelative => f.write_str("Path contains invalid relative component '..'"),
            NoComponents => f.write_str("Path must contain at least one component"),
            BareDriveRoot => f.write_str("Path is a bare Windows drive root"),
            RootOrDriveOnly => {
                write!(
                    f,
                    "Path '{c}' is not a valid file path (root or drive-only)"
                )
            }
            TooLong => write!(
                f,
                "Component '{c}' exceeds max length of {MAX_COMPONENT_BYTES} bytes"
            ),
            BackupSuffix => write!(f, "Temporary/backup file '{c}' not allowed"),
            Reserved => write!(f, "Reserved name '{c}' (Windows)"),
            RelativeComponent => write!(f, "Relative path component '{c}' not allowed"),
            DisallowedPrefix => write!(f, "Component '{c}' has disallowed prefix"),
            Whitespace => write!(f, "Component '{c}' has leading/trailing whitespace"),
            IllegalChars => write!(f, "Component '{c}' contains illegal characters"),
            NonPrintable => write!(
                f,
                "Component '{c}' contains non-printable or control characters"
            ),
            NotNfc => write!(f, "Component '{c}' is not NFC-normalized"),
        }
    }
}

impl std::error::Error for NameProblem {}

/// Validate a relpath with the rules of spec §4.1, in order; the first failure
/// wins. `Ok(())` is the reference's `(True, "Path is valid")`.
pub fn validate_path(p: &str) -> Result<(), NameProblem> {
    use NameProblemKind::*;
    let fail = |kind| Err(NameProblem::new(kind, None));

    // 1. (2 cannot fail for &str; see validate_os_path.)
    if p.is_empty() {
        return fail(Empty);
    }
    // 3. Checked on the raw text, before backslashes become separators.
    if p.contains("\\.\\\\") || p.starts_with(".\\") || p.ends_with("\\.") {
        return fail(BackslashRelative);
    }
    let p = p.replace('\\', "/");
    // 4, 5.
    if p.contains("/./") || p.starts_with("./") || p.ends_with("/.") {
        return fail(DotRelative);
    }
    if p.contains("/../") || p.starts_with("../") || p.ends_with("/..") {
        return fail(DotDotRelative);
    }
    let (root, comps) = posix_parts(&p);
    if root.is_none() && comps.is_empty() {
        return fail(NoComponents);
    }
    // 6. `[A-Za-z]:/*` on the whole (backslash-converted) string.
    {
        let b = p.as_bytes();
        if b.len() >= 2
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && b[2..].iter().all(|&x| x == b'/')
        {
            return fail(BareDriveRoot);
        }
    }
    // 7. Python's PurePosixPath gives a single part.
    match (root, comps.as_slice()) {
        (Some(r), []) => return Err(NameProblem::new(RootOrDriveOnly, Some(r))),
        (None, [c]) if is_drive_component(c) => {
            return Err(NameProblem::new(RootOrDriveOnly, Some(c)))
        }
        _ => {}
    }
    // 8.
    for c in comps {
        check_component(c)?;
    }
    Ok(())
}

/// Like [`validate_path`] for a raw OS path: non-UTF-8 bytes give rule 2's
/// "Path must be UTF-8 encodable" (rule 1 still comes first).
pub fn validate_os_path(p: &OsStr) -> Result<(), NameProblem> {
    if p.is_empty() {
        return Err(NameProblem::new(NameProblemKind::Empty, None));
    }
    match p.to_str() {
        Some(s) => validate_path(s),
        None => Err(NameProblem::new(NameProblemKind::NotUtf8, None)),
    }
}

/// Split like Python's `PurePosixPath(p).parts`: a root of `/` (or exactly
/// `//`, which POSIX lets implementations treat specially and Python keeps),
/// then the non-empty components with `.` dropped.
fn posix_parts(p: &str) -> (Option<&str>, Vec<&str>) {
    let root = if p.starts_with("//") && !p.starts_with("///") {
        Some("//")
    } else if p.starts_with('/') {
        Some("/")
    } else {
        None
    };
    let comps = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    (root, comps)
}

/// Rule 7's drive test: two chars, a letter (Python `isalpha`, i.e. category
/// `L*`, not just ASCII) then `:`.
fn is_drive_component(c: &str) -> bool {
    let mut it = c.chars();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(':'), None) => get_general_category(a).abbreviation().starts_with('L'),
        _ => false,
    }
}

/// Rule 8's skip: any two-char component ending in `:` is treated as a drive
/// (whatever the first char is), so `1:` passes unchecked.
fn is_skipped_component(c: &str) -> bool {
    if c.is_empty() {
        return true;
    }
    let mut it = c.chars();
    matches!(
        (it.next(), it.next(), it.next()),
        (Some(_), Some(':'), None)
    )
}

/// Rules 8a–8i for one component (no `/` inside).
fn check_component(c: &str) -> Result<(), NameProblem> {
    use NameProblemKind::*;
    if is_skipped_component(c) {
        return Ok(());
    }
    let kind = if c.len() > MAX_COMPONENT_BYTES {
        TooLong
    } else if c.ends_with('~') {
        BackupSuffix
    } else if reserved_stem_len(c).is_some() {
        Reserved
    } else if c == "." || c == ".." {
        RelativeComponent
    } else if c.starts_with('~') {
        DisallowedPrefix
    } else if py_strip(c) != c {
        Whitespace
    } else if c.chars().any(is_illegal_char) {
        IllegalChars
    } else if c.chars().any(is_unsafe_char) {
        NonPrintable
    } else if !is_nfc(c) {
        NotNfc
    } else {
        return Ok(());
    };
    Err(NameProblem::new(kind, Some(c)))
}

/// If the text before the first `.` is a reserved name (any case), its byte
/// length. Using the stem, not the whole name, is what makes `CON.txt`,
/// `aux.tar.gz` and `nul.` reserved while `.con` is not.
fn reserved_stem_len(c: &str) -> Option<usize> {
    let stem = c.split('.').next().unwrap_or("");
    // Python's str.lower() is full Unicode lower-casing; so is to_lowercase().
    let lower = stem.to_lowercase();
    WINDOWS_RESERVED_NAMES
        .contains(&lower.as_str())
        .then_some(stem.len())
}

/// Python's `str.isspace()`: the Unicode `White_Space` property plus
/// U+001C–U+001F (bidi class B/S), which Rust's `char::is_whitespace` lacks.
/// The difference matters for message order: Python reports `"\x1ca"` as a
/// whitespace problem (8f), not an illegal character (8g).
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Rule 8g's set.
fn is_illegal_char(c: char) -> bool {
    (c as u32) < 0x20 || matches!(c, '<' | '>' | '"' | '|' | '?' | '*')
}

/// Rule 8h's set.
fn is_unsafe_char(c: char) -> bool {
    get_general_category(c).abbreviation().starts_with('C')
        || EXTRA_UNSAFE_CODEPOINTS.contains(&(c as u32))
}

// ---------------------------------------------------------------------------
// Conflict-backup names (§3.4)
// ---------------------------------------------------------------------------

/// Does `file_name` end like a conflict backup, i.e. match
/// `~\d{8}T\d{6}[+-]\d{4}~$`? Both offset signs are accepted: the reference
/// only accepted `-`, so backups made at UTC or east of it were not excluded
/// and then blocked sync (§8 item 13). Digits are ASCII only, because the
/// suffix is produced by strftime (Python's `\d` would also take other Unicode
/// decimal digits).
pub fn is_conflict_backup_name(file_name: &str) -> bool {
    // "~" 8 digits "T" 6 digits sign 4 digits "~"
    const LEN: usize = 1 + 8 + 1 + 6 + 1 + 4 + 1;
    let b = file_name.as_bytes();
    if b.len() < LEN {
        return false;
    }
    // Comparing bytes, so the cut need not be on a char boundary.
    let s = &b[b.len() - LEN..];
    let digits = |r: std::ops::Range<usize>| s[r].iter().all(u8::is_ascii_digit);
    s[0] == b'~'
        && digits(1..9)
        && s[9] == b'T'
        && digits(10..16)
        && (s[16] == b'+' || s[16] == b'-')
        && digits(17..21)
        && s[21] == b'~'
}

// ---------------------------------------------------------------------------
// Fixing one component
// ---------------------------------------------------------------------------

/// Fixes can expose new problems (removing a zero-width space can leave
/// trailing whitespace; stripping `~` can leave `CON`), so passes repeat until
/// nothing changes. A few passes always suffice in practice; the bound only
/// guards against oscillation (e.g. truncation re-creating a reserved stem),
/// in which case re-validation reports the name as unfixable.
const MAX_FIX_PASSES: usize = 8;

/// Fix a real filesystem component. Backslashes are separators for the
/// validator, so each backslash-separated piece is fixed on its own and the
/// pieces are re-joined; pieces that already pass rule 8 are left alone (that
/// also keeps deliberately-skipped drive-like pieces such as `C:` intact).
fn fix_component(c: &str) -> String {
    c.split('\\')
        .map(|piece| {
            if check_component(piece).is_ok() {
                piece.to_owned()
            } else {
                fix_piece(piece)
            }
        })
        .collect::<Vec<_>>()
        .join("\\")
}

fn fix_piece(piece: &str) -> String {
    let mut cur = piece.to_owned();
    for _ in 0..MAX_FIX_PASSES {
        let next = fix_pass(&cur);
        if next == cur {
            break;
        }
        cur = next;
    }
    cur
}

/// One pass of every fix, in an order where earlier fixes expose problems for
/// later ones rather than the other way round.
fn fix_pass(s: &str) -> String {
    // 8i: NFC first, so later steps see canonical text.
    let s: String = s.nfc().collect();
    // 8f before 8g: a tab or newline at the edge is trimmed, not turned into `_`.
    let s = py_strip(&s);
    // 8g → `_` (keeps the name readable and the same length);
    // 8h → removed (invisible characters carry no meaning worth keeping).
    let s: String = s
        .chars()
        .filter_map(|ch| {
            if is_illegal_char(ch) {
                Some('_')
            } else if is_unsafe_char(ch) {
                None
            } else {
                Some(ch)
            }
        })
        .collect();
    // 8b, 8e, then whitespace uncovered by them (`~ a` → `a`).
    let s = py_strip(py_strip(&s).trim_end_matches('~').trim_start_matches('~'));
    // 8c: `CON` → `CON_renamed`, `aux.tar.gz` → `aux_renamed.tar.gz`.
    let s = match reserved_stem_len(s) {
        Some(n) => format!("{}{}{}", &s[..n], RESERVED_SUFFIX, &s[n..]),
        None => s.to_owned(),
    };
    // 8a last, because the reserved-name fix can lengthen the name.
    truncate_component(&s, MAX_COMPONENT_BYTES)
}

/// Cut `s` to at most `max` bytes on a char boundary, keeping the extension
/// (from the last `.`, if that is not the first char) when at least one char
/// of the stem still fits in front of it.
fn truncate_component(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    if let Some(dot) = s.rfind('.').filter(|&d| d > 0) {
        let (stem, ext) = s.split_at(dot);
        if ext.len() < max {
            let kept = floor_char_boundary(stem, max - ext.len());
            if !kept.is_empty() {
                return format!("{kept}{ext}");
            }
        }
    }
    floor_char_boundary(s, max).to_owned()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary (std's `floor_char_boundary` is newer than our MSRV).
fn floor_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// First problem of a real component as the validator would see it once
/// backslashes become separators (so `.\x` is a `.` piece, hence invalid).
fn component_problem(c: &str) -> Option<NameProblem> {
    c.split('\\')
        .filter(|p| !p.is_empty())
        .find_map(|p| check_component(p).err())
}

// ---------------------------------------------------------------------------
// Planning
// ---------------------------------------------------------------------------

/// One rename, relative to the project root. `from` already reflects every
/// earlier rename of the plan (a child of a renamed directory is addressed by
/// its new parent).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Rename {
    pub from: String,
    pub to: String,
    /// Renamed as a unit, carrying everything below it.
    pub is_dir: bool,
}

/// Output of [`plan_normalization`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NormalizePlan {
    /// In the order they must be applied: parents before children.
    pub renames: Vec<Rename>,
    /// `(original path, reason)`: no automatic fix yields a valid name. For a
    /// directory, nothing below it is planned.
    pub unfixable: Vec<(String, String)>,
    /// `(original path, message)`: a fix exists but its name is taken (by an
    /// existing entry or by another fixed sibling). Not planned; for a
    /// directory, nothing below it is planned either.
    pub conflicts: Vec<(String, String)>,
}

impl NormalizePlan {
    /// Nothing to rename and nothing to report: the tree is already valid.
    pub fn is_empty(&self) -> bool {
        self.renames.is_empty() && self.unfixable.is_empty() && self.conflicts.is_empty()
    }
}

/// Plan the renames that make every path of a scanned tree valid, without
/// touching the disk (the reference fixer renamed things even during a dry
/// run, §8 item 14).
///
/// `paths` are all relpaths of the tree (files and symlinks, `/`-separated);
/// directories are the prefixes. All fixes a component needs are applied (NFC,
/// reserved stem → `_renamed`, leading/trailing `~` stripped, `<>"|?*` and
/// U+0000–U+001F → `_`, whitespace trimmed, other `C*`/invisible characters
/// removed, truncation to 255 bytes keeping the extension) and the result is
/// re-validated.
///
/// An invalid directory is renamed once, as a unit, before anything below it;
/// entries below it keep their names unless they are invalid themselves.
/// A fix whose name already exists next to it, or that two siblings would
/// share, is reported in `conflicts` instead of being planned. Paths that are
/// not plain relpaths (leading `/`, empty, `.` or `..` components) are never
/// renamed; if invalid they are reported as unfixable.
pub fn plan_normalization(paths: &[String]) -> NormalizePlan {
    let mut plan = NormalizePlan::default();
    let mut root = Node::default();
    let mut seen_odd = BTreeSet::new();
    for p in paths {
        if is_plain_relpath(p) {
            root.insert(p);
        } else if seen_odd.insert(p.as_str()) {
            if let Err(e) = validate_path(p) {
                plan.unfixable.push((
                    p.clone(),
                    format!(
                        "{e}; not a plain relative path ('/'-separated, no empty, '.' or '..' \
                         components), so it is not renamed automatically"
                    ),
                ));
            }
        }
    }
    plan_children(&root, "", "", &mut plan);
    plan
}

/// Directory tree built from the relpaths. `BTreeMap` gives a deterministic,
/// byte-ordered plan.
#[derive(Default)]
struct Node {
    children: BTreeMap<String, Node>,
    /// A path ends here (file or symlink). Inconsistent input can make a node
    /// both a leaf and a directory; it is then handled as both.
    is_leaf: bool,
}

impl Node {
    fn insert(&mut self, path: &str) {
        let mut node = self;
        for comp in path.split('/') {
            node = node.children.entry(comp.to_owned()).or_default();
        }
        node.is_leaf = true;
    }
}

fn is_plain_relpath(p: &str) -> bool {
    !p.is_empty() && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

enum Decision {
    Keep,
    Rename { fixed: String, problem: NameProblem },
    Blocked,
}

/// A child of a directory: its name, its node and what becomes of it.
type Decided<'a> = (&'a str, &'a Node, Decision);
/// The children that would get each fixed name.
type Claims<'a> = BTreeMap<String, Vec<&'a str>>;

/// Plan one directory level, then recurse. `orig_dir` is the directory's path
/// in the input (used in reports), `cur_dir` its path once earlier renames are
/// applied (used in renames).
fn plan_children(node: &Node, orig_dir: &str, cur_dir: &str, plan: &mut NormalizePlan) {
    let (decisions, claimed) = decide_children(node, orig_dir, cur_dir, plan);
    for (name, child, decision) in decisions {
        let orig = join(orig_dir, name);
        match decision {
            Decision::Blocked => {}
            Decision::Keep => {
                let cur = join(cur_dir, name);
                // A valid component can still make an invalid path on its own
                // (rules 6/7: a lone `é:`); only a leaf is a whole path.
                if child.is_leaf {
                    if let Err(e) = validate_path(&cur) {
                        plan.unfixable.push((orig.clone(), e.to_string()));
                    }
                }
                plan_children(child, &orig, &cur, plan);
            }
            Decision::Rename { fixed, problem } => {
                if let Some(why) = rename_conflict(node, name, &fixed, &claimed, orig_dir) {
                    plan.conflicts.push((
                        orig,
                        format!(
                            "{problem}; cannot rename it to '{fixed}': {why}{}",
                            below_note(child)
                        ),
                    ));
                } else {
                    let to = join(cur_dir, &fixed);
                    plan.renames.push(Rename {
                        from: join(cur_dir, name),
                        to: to.clone(),
                        is_dir: !child.children.is_empty(),
                    });
                    // The renamed leaf's destination was validated above.
                    plan_children(child, &orig, &to, plan);
                }
            }
        }
    }
}

/// Added to a refusal: what it means for the subtree.
fn below_note(child: &Node) -> &'static str {
    if child.children.is_empty() {
        ""
    } else {
        "; nothing below it was planned"
    }
}

/// What becomes of each child of `node`, and which children claim each
/// fixed name. Every child is decided before any is renamed: collisions are
/// only possible between siblings (parents map injectively because their
/// own collisions are refused). Unfixable names go to `plan`.
fn decide_children<'a>(
    node: &'a Node,
    orig_dir: &str,
    cur_dir: &str,
    plan: &mut NormalizePlan,
) -> (Vec<Decided<'a>>, Claims<'a>) {
    let mut decisions: Vec<Decided> = Vec::with_capacity(node.children.len());
    let mut claimed = Claims::new();
    for (name, child) in &node.children {
        let Some(problem) = component_problem(name) else {
            decisions.push((name, child, Decision::Keep));
            continue;
        };
        let orig = join(orig_dir, name);
        let fixed = fix_component(name);
        let decision = if fixed.is_empty() || fixed == "." || fixed == ".." {
            plan.unfixable.push((
                orig,
                format!(
                    "{problem}; no usable name is left after removing what is not allowed{}",
                    below_note(child)
                ),
            ));
            Decision::Blocked
        } else if let Err(e) = validate_path(&join(cur_dir, &fixed)) {
            plan.unfixable.push((
                orig,
                format!(
                    "{problem}; the fixed name '{fixed}' is still invalid: {e}{}",
                    below_note(child)
                ),
            ));
            Decision::Blocked
        } else {
            claimed.entry(fixed.clone()).or_default().push(name);
            Decision::Rename { fixed, problem }
        };
        decisions.push((name, child, decision));
    }
    (decisions, claimed)
}

/// Why `name` cannot be renamed to `fixed`, if it cannot.
fn rename_conflict(
    node: &Node,
    name: &str,
    fixed: &str,
    claimed: &Claims,
    orig_dir: &str,
) -> Option<String> {
    // Every existing sibling counts, even one that is itself renamed away:
    // such a sibling is invalid, so it can never be equal to a (valid)
    // fixed name anyway.
    if node.children.contains_key(fixed) {
        return Some("an entry with that name already exists in the same directory".into());
    }
    let rivals: Vec<String> = claimed[fixed]
        .iter()
        .filter(|n| **n != name)
        .map(|r| format!("'{}'", join(orig_dir, r)))
        .collect();
    (!rivals.is_empty()).then(|| format!("{} would get the same name", rivals.join(", ")))
}

// ---------------------------------------------------------------------------
// Applying
// ---------------------------------------------------------------------------

/// Why one rename of [`apply_normalization`] failed.
#[derive(Debug, thiserror::Error)]
pub enum NormalizeFailure {
    #[error("not a plain relative path, refusing to touch it")]
    NotRelative,
    #[error("source cannot be examined: {0}")]
    Source(#[source] io::Error),
    #[error("destination already exists")]
    DestinationExists,
    #[error("cannot check whether the destination exists: {0}")]
    CheckDestination(#[source] io::Error),
    #[error("cannot create the destination's parent directory: {0}")]
    CreateParent(#[source] io::Error),
    #[error("{0}")]
    Rename(#[source] io::Error),
}

/// A rename of the plan failed; the ones before it were done (`done`), the
/// ones after it were not attempted.
#[derive(Debug, thiserror::Error)]
#[error("cannot rename '{from}' to '{to}': {reason}")]
pub struct NormalizeError {
    pub from: String,
    pub to: String,
    #[source]
    pub reason: NormalizeFailure,
    pub done: Vec<Rename>,
}

/// Perform the plan's renames under `root`, in order, stopping at the first
/// failure. Symlinks are renamed as links (only `symlink_metadata` and
/// `rename` are used, which never follow the final component).
///
/// The destination is checked first because POSIX `rename` silently replaces
/// an existing file (or empty directory). The check and the rename are not
/// atomic; std has no "rename unless it exists" call.
pub fn apply_normalization(
    root: &Path,
    plan: &NormalizePlan,
) -> Result<Vec<Rename>, NormalizeError> {
    let mut done = Vec::with_capacity(plan.renames.len());
    for r in &plan.renames {
        if let Err(reason) = apply_one(root, r) {
            return Err(NormalizeError {
                from: r.from.clone(),
                to: r.to.clone(),
                reason,
                done,
            });
        }
        tracing::debug!(from = %r.from, to = %r.to, is_dir = r.is_dir, "renamed for normalisation");
        done.push(r.clone());
    }
    Ok(done)
}

fn apply_one(root: &Path, r: &Rename) -> Result<(), NormalizeFailure> {
    // A plan is plain data and could come from anywhere (e.g. deserialised);
    // never let it address anything outside `root`.
    let safe = |p: &str| {
        is_plain_relpath(p)
            && Path::new(p)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
    };
    if !safe(&r.from) || !safe(&r.to) {
        return Err(NormalizeFailure::NotRelative);
    }
    let from = root.join(&r.from);
    let to = root.join(&r.to);
    let from_meta = std::fs::symlink_metadata(&from).map_err(NormalizeFailure::Source)?;
    match std::fs::symlink_metadata(&to) {
        Ok(to_meta) => {
            if !is_alias_of_itself(&r.from, &r.to, &from_meta, &to_meta) {
                return Err(NormalizeFailure::DestinationExists);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NormalizeFailure::CheckDestination(e)),
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(NormalizeFailure::CreateParent)?;
    }
    std::fs::rename(&from, &to).map_err(NormalizeFailure::Rename)
}

/// On a normalisation- or case-insensitive filesystem (macOS APFS/HFS+) the
/// NFC destination of an NFD name "exists" because it is the same entry, yet
/// the rename is needed to change the stored bytes. Accept that only when both
/// names fold to the same text *and* are the same inode: hard links with
/// unrelated names are real, distinct destinations (and `rename` between two
/// links of one file would silently do nothing).
#[cfg(unix)]
fn is_alias_of_itself(
    from: &str,
    to: &str,
    from_meta: &std::fs::Metadata,
    to_meta: &std::fs::Metadata,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let fold = |s: &str| s.nfc().collect::<String>().to_lowercase();
    from_meta.dev() == to_meta.dev() && from_meta.ino() == to_meta.ino() && fold(from) == fold(to)
}

#[cfg(not(unix))]
fn is_alias_of_itself(
    _from: &str,
    _to: &str,
    _from_meta: &std::fs::Metadata,
    _to_meta: &std::fs::Metadata,
) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Unicode caveat in the module docs is only true for these versions.
    #[test]
    fn unicode_table_versions_are_the_documented_ones() {
        assert_eq!(unicode_general_category::UNICODE_VERSION, (16, 0, 0));
        assert!(unicode_normalization::UNICODE_VERSION >= (15, 1, 0));
    }

    #[test]
    fn py_space_matches_python_isspace() {
        // Python 3: ''.join(c for c in map(chr, range(0x110000)) if c.isspace())
        let python: Vec<u32> = [
            0x09..=0x0D,
            0x1C..=0x20,
            0x85..=0x85,
            0xA0..=0xA0,
            0x1680..=0x1680,
            0x2000..=0x200A,
            0x2028..=0x2029,
            0x202F..=0x202F,
            0x205F..=0x205F,
            0x3000..=0x3000,
        ]
        .into_iter()
        .flatten()
        .collect();
        let ours: Vec<u32> = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .filter(|&c| py_is_space(c))
            .map(|c| c as u32)
            .collect();
        assert_eq!(ours, python);
    }

    #[test]
    fn extra_unsafe_list_is_rejected_even_where_category_is_not_c() {
        for cp in [0x2028u32, 0x2029, 0x1D159] {
            let c = char::from_u32(cp).unwrap();
            assert!(!get_general_category(c).abbreviation().starts_with('C'));
            assert!(is_unsafe_char(c), "U+{cp:04X}");
        }
        assert!(!is_unsafe_char('\u{a0}'));
        assert!(is_unsafe_char('\u{7f}'));
    }

    #[test]
    fn fix_piece_applies_every_fix() {
        assert_eq!(fix_piece(" ~CON.txt~ "), "CON_renamed.txt");
        assert_eq!(fix_piece("aux.tar.gz"), "aux_renamed.tar.gz");
        assert_eq!(fix_piece("nul."), "nul_renamed.");
        assert_eq!(fix_piece("a<b>|c?*"), "a_b__c__");
        assert_eq!(fix_piece("x\u{1}y"), "x_y");
        assert_eq!(fix_piece("\ta\n"), "a");
        assert_eq!(fix_piece("a\u{7f}b\u{200b}"), "ab");
        // Removing the ZWSP exposes a trailing space, then a reserved stem.
        assert_eq!(fix_piece("con \u{200b}"), "con_renamed");
        assert_eq!(fix_piece("~ a ~"), "a");
        assert_eq!(fix_piece("cafe\u{301}.csv"), "caf\u{e9}.csv");
        assert_eq!(fix_piece("~~~"), "");
    }

    #[test]
    fn truncation_keeps_extension_and_char_boundaries() {
        let long = format!("{}.csv", "a".repeat(300));
        let t = truncate_component(&long, 255);
        assert_eq!(t.len(), 255);
        assert!(t.ends_with(".csv"));

        let multi = format!("{}.txt", "\u{e9}".repeat(200)); // 404 bytes
        let t = truncate_component(&multi, 255);
        assert!(t.len() <= 255 && t.len() >= 254, "{}", t.len());
        assert!(t.ends_with(".txt"));

        // An "extension" that leaves no room for the stem is not kept.
        let hidden_long = format!("a.{}", "b".repeat(300));
        assert_eq!(truncate_component(&hidden_long, 255).len(), 255);
        assert!(truncate_component(&hidden_long, 255).starts_with("a.b"));

        // A leading dot is not an extension separator.
        let dotfile = format!(".{}", "x".repeat(300));
        assert_eq!(truncate_component(&dotfile, 255), dotfile[..255]);

        assert_eq!(truncate_component("short.txt", 255), "short.txt");
    }

    #[test]
    fn fix_component_fixes_each_backslash_piece() {
        assert_eq!(fix_component("notes\\CON"), "notes\\CON_renamed");
        // A drive-like piece is skipped by the validator, so it is left alone.
        assert_eq!(fix_component("C:\\a~"), "C:\\a");
        // `.` pieces cannot be fixed; they stay and re-validation rejects them.
        assert_eq!(fix_component(".\\x"), ".\\x");
    }

    #[test]
    fn component_problem_sees_backslash_pieces() {
        assert!(component_problem("a\\b").is_none());
        assert_eq!(
            component_problem(".\\x").map(|p| p.kind()),
            Some(NameProblemKind::RelativeComponent)
        );
        assert_eq!(
            component_problem("x\\con").map(|p| p.kind()),
            Some(NameProblemKind::Reserved)
        );
    }
}
