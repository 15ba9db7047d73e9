//! Path safety: every relpath that comes from a manifest, a repository or a
//! peer is checked here before anything is written (G4). Relpaths use `/`,
//! have no empty, `.` or `..` components, are not absolute, and never enter
//! `.dsg/`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UnsafePath {
    pub path: String,
    pub why: &'static str,
}

impl fmt::Display for UnsafePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unsafe path {:?}: {}", self.path, self.why)
    }
}

pub fn check_relpath(p: &str) -> Result<(), UnsafePath> {
    let bad = |why| {
        Err(UnsafePath {
            path: p.to_string(),
            why,
        })
    };
    if p.is_empty() {
        return bad("empty path");
    }
    if p.starts_with('/') {
        return bad("absolute path");
    }
    if p.contains('\0') {
        return bad("contains NUL");
    }
    for (i, c) in p.split('/').enumerate() {
        match c {
            "" => return bad("empty path component"),
            "." | ".." => return bad("relative component escapes or is ambiguous"),
            ".dsg" if i == 0 => return bad("inside .dsg/"),
            _ => {}
        }
    }
    Ok(())
}

/// Lexically resolves a symlink's target against the link's directory.
/// `None` if the result would leave the project (or the target is absolute).
pub fn resolve_link(link_path: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link_path.split('/').collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// A link must be relative and resolve inside the project (the original's
/// check was off by one, defect 6).
pub fn check_link_target(link_path: &str, target: &str) -> Result<(), UnsafePath> {
    let bad = |why| {
        Err(UnsafePath {
            path: format!("{link_path} -> {target}"),
            why,
        })
    };
    if target.is_empty() {
        return bad("empty symlink target");
    }
    if target.starts_with('/') {
        return bad("symlink target must be a relative path");
    }
    match resolve_link(link_path, target) {
        None => bad("symlink target escapes the project directory"),
        Some(r) if r.split('/').next() == Some(".dsg") => bad("symlink target points into .dsg/"),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relpaths() {
        assert!(check_relpath("input/a.csv").is_ok());
        assert!(check_relpath("input/.hidden/a").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "../x",
            "a/..",
            ".dsg/last-sync.json",
            "a/",
        ] {
            assert!(check_relpath(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn links() {
        assert!(check_link_target("output/link.csv", "../input/a.csv").is_ok());
        assert!(check_link_target("output/t/latest.csv", "table3.csv").is_ok());
        // The original accepted this one (off by one); it escapes.
        assert!(check_link_target("a/link", "../../x").is_err());
        assert!(check_link_target("link", "../x").is_err());
        assert!(check_link_target("a/link", "/etc/passwd").is_err());
        assert!(check_link_target("a/link", "../.dsg/last-sync.json").is_err());
        assert_eq!(resolve_link("a/b/l", "../c/./d").as_deref(), Some("a/c/d"));
    }
}
