//! `conflicts.txt`: the file a blocked sync writes at the project root and
//! `sync --continue` reads back (spec-cli §9). The layout is the original's,
//! so a team using both programs sees one format; the parser accepts what
//! the instructions produce when followed literally (one option line kept
//! per file, with or without its underscore and its comment), which the
//! original's parser did not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dsg_core::manifest::{Entry, EntryKind, Mtime};
use dsg_core::scan::LocalView;
use dsg_core::state::State;
use serde::Serialize;

use crate::status::{Comparison, Row};
use crate::sync::Fork;
use crate::{EngineError, Result};

pub const FILE_NAME: &str = "conflicts.txt";

/// The header line that marks a conflicts file written by a sync that
/// adopts the repository's history (`--adopt-repository-history`):
/// `--continue` then adopts it too. The original skips it as a comment.
const ADOPT_MARK: &str = "# Adopting the repository's history:";

/// The line under each file that records the versions it was written for.
const VERSIONS_MARK: &str = "# Versions:";

/// One way to settle a conflicting path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Choice {
    /// Publish the local version (or its absence).
    #[serde(rename = "L")]
    Local,
    /// Take the repository's version (or its absence).
    #[serde(rename = "R")]
    Remote,
    /// Restore the last-synced version on both sides.
    #[serde(rename = "C")]
    Cache,
}

impl Choice {
    pub fn letter(self) -> char {
        match self {
            Choice::Local => 'L',
            Choice::Remote => 'R',
            Choice::Cache => 'C',
        }
    }

    fn from_letter(c: char) -> Option<Choice> {
        match c {
            'L' => Some(Choice::Local),
            'R' => Some(Choice::Remote),
            'C' => Some(Choice::Cache),
            _ => None,
        }
    }

    fn comment(self) -> &'static str {
        match self {
            Choice::Local => "Use Local version (upload)",
            Choice::Remote => "Use Remote version (download)",
            Choice::Cache => "Use Cached version (restore)",
        }
    }
}

/// A conflicting path as `conflicts.txt` and `status` present it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Conflict {
    pub path: String,
    /// Why it conflicts, in the original's words where it has them.
    pub reason: String,
    /// The choices, the safest (or most recent) first.
    pub choices: Vec<Choice>,
    /// The three versions it was written for (`L=… C=… R=…`), so that
    /// `--continue` never applies a choice to content the user has not
    /// seen: a file changed since, here or in the repository, is refused.
    #[serde(skip)]
    pub versions: String,
}

/// The conflicts among `rows`: the table's conflict states, and (when the
/// repository's history forked) the rows the fork put at risk.
pub fn conflicts(cmp: &Comparison, rows: &[Row], fork: Option<&Fork>) -> Vec<Conflict> {
    rows.iter()
        .filter(|r| r.action == dsg_core::state::Action::Conflict)
        .map(|r| describe(cmp, r, fork))
        .collect()
}

fn describe(cmp: &Comparison, r: &Row, fork: Option<&Fork>) -> Conflict {
    use Choice::*;
    let (l, c, rem) = (
        cmp.local().get(&r.path),
        cmp.cache.get(&r.path),
        cmp.remote().get(&r.path),
    );
    let (reason, choices) = match r.state {
        State::AllNe => {
            let mut by_age = vec![(Local, mtime(l)), (Remote, mtime(rem)), (Cache, mtime(c))];
            // Newest first; the sort is stable, so ties keep L, R, C.
            by_age.sort_by_key(|a| std::cmp::Reverse(a.1));
            (
                "111: all three copies differ".to_string(),
                by_age.into_iter().map(|(ch, _)| ch).collect(),
            )
        }
        State::XcLneR => (
            "101: cache missing; local and remote differ".to_string(),
            if mtime(rem) >= mtime(l) || mtime(rem).is_none() || mtime(l).is_none() {
                vec![Remote, Local]
            } else {
                vec![Local, Remote]
            },
        ),
        State::XlCneR => (
            "011: local missing; remote and cache differ".to_string(),
            vec![Remote, Cache],
        ),
        State::XrLneC => (
            "110: remote missing; local and cache differ".to_string(),
            vec![Local, Cache],
        ),
        // A row the forked history put at risk: unchanged here since a last
        // sync the repository no longer holds. Keeping the local version
        // loses nothing anywhere (the repository keeps its history).
        State::XrLeqC => (
            format!(
                "fork: unchanged here since {}, which the repository's history no longer holds; the repository does not have this file",
                fork.map(|f| f.last_sync_id.as_str()).unwrap_or("the last sync")
            ),
            vec![Local, Remote],
        ),
        _ => (
            format!(
                "fork: unchanged here since {}, which the repository's history no longer holds; the repository has another version",
                fork.map(|f| f.last_sync_id.as_str()).unwrap_or("the last sync")
            ),
            vec![Local, Remote],
        ),
    };
    let choices = if fork.is_some() {
        // The last sync is not in the repository's history: its versions
        // cannot be read back from there.
        choices.into_iter().filter(|c| *c != Cache).collect()
    } else {
        choices
    };
    Conflict {
        path: r.path.to_string(),
        reason,
        choices,
        versions: format!("L={} C={} R={}", version(l), version(c), version(rem)),
    }
}

/// One side's version of a path as `conflicts.txt` records it.
fn version(e: Option<&Entry>) -> String {
    match e.map(|e| &e.kind) {
        None => "-".into(),
        Some(EntryKind::File { hash: Some(h), .. }) => h.to_hex(),
        Some(EntryKind::File { size, mtime, .. }) => format!("size:{size}@{mtime}"),
        Some(EntryKind::Link { target }) => format!("link:{}", hex_of(target)),
    }
}

/// A link target, safe on one line whatever it holds.
fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// An entry's mtime as unix seconds, for ordering the choices.
fn mtime(e: Option<&Entry>) -> Option<i64> {
    match &e?.kind {
        EntryKind::File {
            mtime: Mtime::Fixed { utc_secs, .. },
            ..
        } => Some(*utc_secs),
        EntryKind::File {
            mtime: Mtime::Raw(s),
            ..
        } => dsg_core::timefmt::parse(s).map(|t| t.timestamp()),
        EntryKind::Link { .. } => None,
    }
}

/// The text of `conflicts.txt`.
pub fn render(conflicts: &[Conflict], user: &str, backups: bool, fork: Option<&Fork>) -> String {
    let mut s = String::new();
    s.push_str("# DSG Conflict Resolution\n");
    s.push_str(&format!(
        "# Generated: {}\n",
        chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
    ));
    s.push_str(&format!("# User: {user}\n"));
    s.push_str(&format!(
        "# Backup on conflict: {}\n",
        if backups { "enabled" } else { "disabled" }
    ));
    if let Some(f) = fork {
        s.push_str(&format!(
            "{ADOPT_MARK} {} {} (this project's last sync {} is no longer in it)\n",
            f.head_id,
            f.head_hash.as_deref().unwrap_or("?"),
            f.last_sync_id
        ));
    }
    s.push_str(
        "\n# Instructions:\n\
         # 1. For each file below, choose ONE option by removing the underscore prefix\n\
         # 2. Delete the other lines for that file\n\
         # 3. Save this file and run 'dsg sync --continue'\n\
         \n# Options:\n\
         #   _R = Use Remote version (download)\n\
         #   _L = Use Local version (upload)\n\
         #   _C = Use Cached version (restore)\n",
    );
    let mut sorted: Vec<&Conflict> = conflicts.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for c in sorted {
        s.push_str(&format!(
            "\n# File: {}\n# Conflict: {}\n{VERSIONS_MARK} {}\n",
            c.path, c.reason, c.versions
        ));
        for ch in &c.choices {
            s.push_str(&format!("_{}  # {}\n", ch.letter(), ch.comment()));
        }
    }
    s
}

/// What a user's edited `conflicts.txt` says.
#[derive(Debug, Default, PartialEq)]
pub struct Resolutions {
    pub choices: BTreeMap<String, Choice>,
    /// Per file, the versions recorded under it (files written by dsg).
    pub versions: BTreeMap<String, String>,
    /// Written by a sync that adopts the repository's history.
    pub adopt: bool,
}

/// Parses `conflicts.txt` (spec-cli §9.2). Errors name the line and what
/// is expected there.
pub fn parse(text: &str) -> std::result::Result<Resolutions, String> {
    let mut out = Resolutions::default();
    let mut current: Option<String> = None;
    // Editors on Windows may add a byte-order mark (and CRLF line ends,
    // which `lines` and `trim` take care of).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let at = |msg: String| format!("line {}: {msg}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(path) = line.strip_prefix("# File:") {
            let path = path.trim();
            if path.is_empty() {
                return Err(at("'# File:' names no file".into()));
            }
            if out.choices.contains_key(path) {
                return Err(at(format!("{path} is listed twice")));
            }
            current = Some(path.to_string());
            continue;
        }
        if line.starts_with(ADOPT_MARK) {
            out.adopt = true;
            continue;
        }
        if let Some(v) = line.strip_prefix(VERSIONS_MARK) {
            if let Some(path) = &current {
                out.versions.insert(path.clone(), v.trim().to_string());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let choice = parse_choice(line).map_err(at)?;
        let Some(path) = current.take() else {
            return Err(at(format!(
                "found the choice '{line}' but no file before it: keep exactly one option line after each '# File: ...' line"
            )));
        };
        out.choices.insert(path, choice);
    }
    if out.choices.is_empty() {
        return Err(
            "no choices found: keep one option line (R, L or C) under each '# File: ...' line"
                .into(),
        );
    }
    Ok(out)
}

/// `R`, `_R`, `R  # comment`, `_R  # comment` (and L, C).
fn parse_choice(line: &str) -> std::result::Result<Choice, String> {
    let body = line.strip_prefix('_').unwrap_or(line);
    let mut chars = body.chars();
    let first = chars.next().unwrap_or(' ');
    let rest = chars.as_str().trim_start();
    let tail_ok = rest.is_empty() || rest.starts_with('#');
    match Choice::from_letter(first) {
        Some(c) if tail_ok => Ok(c),
        _ if line.starts_with('_') => Err(format!(
            "invalid choice '{line}': expected one of R, L, C (with or without the underscore)"
        )),
        _ => Err(format!(
            "unrecognized line '{line}': expected a comment (#), a file header (# File: ...) or a choice (R, L, C, _R, _L, _C)"
        )),
    }
}

/// Whether the project has a `conflicts.txt` written by dsg (its first
/// line), not a file of the user's that happens to have the name.
pub fn is_ours(root: &Path) -> bool {
    std::fs::read_to_string(path(root)).is_ok_and(|t| {
        t.strip_prefix('\u{feff}')
            .unwrap_or(&t)
            .starts_with("# DSG Conflict Resolution")
    })
}

/// Whether the project's `conflicts.txt` already holds the user's choices
/// (it parses): a new blocked sync must not overwrite them.
pub fn holds_choices(root: &Path) -> bool {
    std::fs::read_to_string(path(root)).is_ok_and(|t| parse(&t).is_ok())
}

pub fn path(root: &Path) -> PathBuf {
    root.join(FILE_NAME)
}

/// Reads and parses the project's `conflicts.txt` for `--continue`.
pub fn read(root: &Path) -> Result<Resolutions> {
    let p = path(root);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::Blocked {
                message: format!("{} not found; nothing was changed", p.display()),
                hint: "run 'dsg sync' first: a sync blocked by conflicts writes it".into(),
                paths: Vec::new(),
            })
        }
        Err(e) => return Err(EngineError::io(&p, e)),
    };
    parse(&text).map_err(|msg| EngineError::Blocked {
        message: format!("{}: {msg}; nothing was changed", p.display()),
        hint: "keep exactly one option line (R, L or C, with or without '_') under each '# File: ...' line, then run 'dsg sync --continue' again; 'dsg sync' writes a fresh conflicts.txt".into(),
        paths: Vec::new(),
    })
}

/// Checks that `res` settles exactly the current `conflicts`, with a choice
/// each path offers.
pub fn check_complete(res: &Resolutions, conflicts: &[Conflict], root: &Path) -> Result<()> {
    let file = path(root);
    let missing: Vec<&str> = conflicts
        .iter()
        .filter(|c| !res.choices.contains_key(&c.path))
        .map(|c| c.path.as_str())
        .collect();
    let extra: Vec<&str> = res
        .choices
        .keys()
        .filter(|p| !conflicts.iter().any(|c| &c.path == *p))
        .map(|p| p.as_str())
        .collect();
    let refused: Vec<String> = conflicts
        .iter()
        .filter_map(|c| {
            let ch = res.choices.get(&c.path)?;
            (!c.choices.contains(ch))
                .then(|| format!("{} ({} is not offered)", c.path, ch.letter()))
        })
        .collect();
    let blocked = |message: String, paths: Vec<String>, hint: &str| EngineError::Blocked {
        message: format!("{}: {message}; nothing was changed", file.display()),
        hint: hint.into(),
        paths,
    };
    if !missing.is_empty() {
        return Err(blocked(
            format!("no choice for {}: {}", crate::sync::plural(missing.len(), "conflicting file"), list(&missing)),
            missing.iter().map(|s| s.to_string()).collect(),
            "keep one option line (R, L or C) under each '# File: ...' line, then run 'dsg sync --continue' again",
        ));
    }
    if !extra.is_empty() {
        return Err(blocked(
            format!("choices for {} no longer in conflict: {}", crate::sync::plural(extra.len(), "file"), list(&extra)),
            extra.iter().map(|s| s.to_string()).collect(),
            "they may have been settled already: run 'dsg sync' without --continue to write a fresh conflicts.txt",
        ));
    }
    if !refused.is_empty() {
        return Err(blocked(
            format!(
                "choices this conflict does not offer: {}",
                refused.join(", ")
            ),
            Vec::new(),
            "keep one of the option lines written under that file",
        ));
    }
    let changed: Vec<&str> = conflicts
        .iter()
        .filter(|c| res.versions.get(&c.path).is_some_and(|v| *v != c.versions))
        .map(|c| c.path.as_str())
        .collect();
    if !changed.is_empty() {
        return Err(blocked(
            format!(
                "{} changed since conflicts.txt was written (here or in the repository), so its choice may not be what you meant: {}",
                crate::sync::plural(changed.len(), "file"),
                list(&changed)
            ),
            changed.iter().map(|s| s.to_string()).collect(),
            "run 'dsg sync' to write a fresh conflicts.txt for what is there now, and choose again",
        ));
    }
    Ok(())
}

fn list(paths: &[&str]) -> String {
    let mut s = paths.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if paths.len() > 5 {
        s.push_str(&format!(" … and {} more", paths.len() - 5));
    }
    s
}

/// The backup name of a local file a resolution overwrites or deletes:
/// `<name>~YYYYMMDDTHHMMSS±ZZZZ~` in local time, which the scanner never
/// tracks (`names::is_conflict_backup_name`).
pub fn backup_name(path: &str, now: chrono::DateTime<chrono::Local>) -> String {
    format!("{path}~{}~", now.format("%Y%m%dT%H%M%S%z"))
}

/// Keeps a copy of each of `paths` (relative to `root`) under its backup
/// name. A hard link costs nothing and keeps the bytes: the sync moves the
/// original name aside and never writes into the file. All or nothing: on
/// any failure the backups made so far are removed.
pub fn make_backups(
    root: &Path,
    paths: &[std::sync::Arc<str>],
    local: LocalView<'_>,
) -> Result<Vec<PathBuf>> {
    let now = chrono::Local::now();
    let mut made: Vec<PathBuf> = Vec::new();
    for p in paths {
        if local.get(p).is_none() {
            continue;
        }
        let src = root.join(&**p);
        let dst = root.join(backup_name(p, now));
        if same_file(&src, &dst) {
            // Left by an earlier run of this resolution that did not get
            // to its commit point (a crash, within the same second): it
            // is already the backup.
            continue;
        }
        let res = if dst.symlink_metadata().is_ok() {
            Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("the backup {} already exists", dst.display()),
            ))
        } else {
            copy_or_link(&src, &dst)
        };
        if let Err(e) = res {
            for m in &made {
                let _ = std::fs::remove_file(m);
            }
            return Err(EngineError::State {
                message: format!(
                    "cannot back up {} before replacing it: {e}; nothing was changed",
                    src.display()
                ),
                hint: "check the folder's permissions and free space, or set backup_on_conflict: false in your dsg.yml".into(),
            });
        }
        made.push(dst);
    }
    Ok(made)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn copy_or_link(src: &Path, dst: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)?;
        return std::os::unix::fs::symlink(target, dst);
    }
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        // Filesystems without hard links: a copy (mtime kept below).
        Err(_) => {
            std::fs::copy(src, dst)?;
            let f = std::fs::File::options().write(true).open(dst)?;
            f.set_modified(meta.modified()?)?;
            f.sync_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Conflict> {
        vec![
            Conflict {
                path: "input/b.csv".into(),
                reason: "110: remote missing; local and cache differ".into(),
                choices: vec![Choice::Local, Choice::Cache],
                versions: "L=a C=b R=-".into(),
            },
            Conflict {
                path: "input/a.csv".into(),
                reason: "111: all three copies differ".into(),
                choices: vec![Choice::Remote, Choice::Local, Choice::Cache],
                versions: "L=a C=b R=c".into(),
            },
        ]
    }

    #[test]
    fn untouched_file_has_no_choice_and_every_literal_edit_parses() {
        let text = render(&sample(), "Bob <bob@example.org>", true, None);
        assert!(text.starts_with("# DSG Conflict Resolution\n"));
        assert!(text.contains("# Backup on conflict: enabled\n"));
        // Blocks sorted by path.
        assert!(text.find("input/a.csv").unwrap() < text.find("input/b.csv").unwrap());
        // Untouched: two option lines under one header is an error.
        let e = parse(&text).unwrap_err();
        assert!(e.contains("no file before it"), "{e}");
        // Following the instructions literally: remove the underscore of
        // one line, delete the others (comment kept).
        let mut edited = String::new();
        let mut seen = std::collections::HashSet::new();
        let mut file = String::new();
        for l in text.lines() {
            if let Some(p) = l.strip_prefix("# File: ") {
                file = p.to_string();
            }
            if let Some(rest) = l.strip_prefix('_') {
                if !seen.insert(file.clone()) {
                    continue;
                }
                edited.push_str(rest);
                edited.push('\n');
                continue;
            }
            edited.push_str(l);
            edited.push('\n');
        }
        let r = parse(&edited).unwrap();
        assert_eq!(r.choices["input/a.csv"], Choice::Remote);
        assert_eq!(r.choices["input/b.csv"], Choice::Local);
        assert!(!r.adopt);
        // Underscore kept, comment dropped: valid too.
        let r = parse("# File: x\n_C\n# File: y\nL\n").unwrap();
        assert_eq!(r.choices["x"], Choice::Cache);
        assert_eq!(r.choices["y"], Choice::Local);
    }

    #[test]
    fn windows_editors_bom_and_crlf_parse() {
        let text = render(&sample(), "u", true, None);
        assert!(text.contains("\n# Versions: L=a C=b R=-\n"), "{text}");
        // The first option of each file kept, its underscore removed.
        let mut first = true;
        let chosen: String = text
            .lines()
            .filter_map(|l| {
                if l.starts_with("# File:") {
                    first = true;
                }
                match l.strip_prefix('_') {
                    Some(rest) if first => {
                        first = false;
                        Some(format!("{rest}\n"))
                    }
                    Some(_) => None,
                    None => Some(format!("{l}\n")),
                }
            })
            .collect();
        let windows = format!("\u{feff}{}", chosen.replace('\n', "\r\n"));
        let r = parse(&windows).unwrap();
        assert_eq!(r.choices["input/a.csv"], Choice::Remote);
        assert_eq!(r.choices["input/b.csv"], Choice::Local);
        assert_eq!(r.versions["input/b.csv"], "L=a C=b R=-");
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse("# File: x\n_Q  # what\n")
                .unwrap_err()
                .split(':')
                .next(),
            Some("line 2")
        );
        assert!(parse("# File: x\nkeep mine\n")
            .unwrap_err()
            .starts_with("line 2: unrecognized line"));
        assert!(parse("L\n")
            .unwrap_err()
            .starts_with("line 1: found the choice"));
        assert!(parse("# only comments\n")
            .unwrap_err()
            .starts_with("no choices"));
        assert!(parse("# File: x\nL\n# File: x\nR\n")
            .unwrap_err()
            .contains("listed twice"));
        // `Lx` is not `L` followed by a comment.
        assert!(parse("# File: x\nLx\n").is_err());
    }

    #[test]
    fn adopt_mark_round_trips() {
        let f = Fork {
            last_sync_id: "s5".into(),
            last_sync_hash: Some("aa".into()),
            head_id: "s6".into(),
            head_hash: Some("bb".into()),
        };
        let text = render(&sample(), "u", false, Some(&f));
        assert!(text.contains("# Backup on conflict: disabled\n"));
        // Keep the header, choose one option per file.
        let head: String = text
            .lines()
            .take_while(|l| !l.starts_with("# File:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let r = parse(&format!(
            "{head}# File: input/a.csv\nR\n# File: input/b.csv\nL  # x\n"
        ))
        .unwrap();
        assert_eq!(r.choices.len(), 2);
        assert!(r.adopt);
    }

    #[test]
    fn backup_names_are_never_scanned() {
        use chrono::TimeZone;
        for off in [-7 * 3600, 0, 5 * 3600 + 1800, 14 * 3600] {
            let tz = chrono::FixedOffset::east_opt(off).unwrap();
            let t = tz.with_ymd_and_hms(2025, 7, 14, 10, 11, 12).unwrap();
            let name = format!("data.csv~{}~", t.format("%Y%m%dT%H%M%S%z"));
            assert!(dsg_core::names::is_conflict_backup_name(&name), "{name}");
        }
        let n = backup_name("input/d.csv", chrono::Local::now());
        assert!(dsg_core::names::is_conflict_backup_name(&n), "{n}");
    }
}
