//! The 15 sync states (DESIGN §4) and the action each implies. `status` and
//! `sync` both call `classify`, so they cannot disagree.

use serde::Serialize;

use crate::manifest::{Entry, Manifest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum State {
    #[serde(rename = "sLCR__all_eq")]
    AllEq,
    #[serde(rename = "sLCR__L_eq_C_ne_R")]
    LeqCneR,
    #[serde(rename = "sLCR__L_eq_R_ne_C")]
    LeqRneC,
    #[serde(rename = "sLCR__C_eq_R_ne_L")]
    CeqRneL,
    #[serde(rename = "sLCR__all_ne")]
    AllNe,
    #[serde(rename = "sxLCR__C_eq_R")]
    XlCeqR,
    #[serde(rename = "sxLCR__C_ne_R")]
    XlCneR,
    #[serde(rename = "sLxCR__L_eq_R")]
    XcLeqR,
    #[serde(rename = "sLxCR__L_ne_R")]
    XcLneR,
    #[serde(rename = "sLCxR__L_eq_C")]
    XrLeqC,
    #[serde(rename = "sLCxR__L_ne_C")]
    XrLneC,
    #[serde(rename = "sxLCxR__only_R")]
    OnlyR,
    #[serde(rename = "sxLCRx__only_C")]
    OnlyC,
    #[serde(rename = "sLxCxR__only_L")]
    OnlyL,
    #[serde(rename = "sxLxCxR__none")]
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    None,
    Upload,
    Download,
    DeleteLocal,
    DeleteRemote,
    UpdateCache,
    Conflict,
    /// A conflict settled by restoring the last-synced version on both
    /// sides (`conflicts.txt` choice C); never the table's own action.
    Restore,
}

impl State {
    pub const ALL: [State; 15] = [
        State::AllEq,
        State::LeqCneR,
        State::LeqRneC,
        State::CeqRneL,
        State::AllNe,
        State::XlCeqR,
        State::XlCneR,
        State::XcLeqR,
        State::XcLneR,
        State::XrLeqC,
        State::XrLneC,
        State::OnlyR,
        State::OnlyC,
        State::OnlyL,
        State::None,
    ];

    /// The state's number in DESIGN §4 (1–15).
    pub fn number(self) -> usize {
        State::ALL.iter().position(|s| *s == self).unwrap() + 1
    }

    pub fn id(self) -> &'static str {
        match self {
            State::AllEq => "sLCR__all_eq",
            State::LeqCneR => "sLCR__L_eq_C_ne_R",
            State::LeqRneC => "sLCR__L_eq_R_ne_C",
            State::CeqRneL => "sLCR__C_eq_R_ne_L",
            State::AllNe => "sLCR__all_ne",
            State::XlCeqR => "sxLCR__C_eq_R",
            State::XlCneR => "sxLCR__C_ne_R",
            State::XcLeqR => "sLxCR__L_eq_R",
            State::XcLneR => "sLxCR__L_ne_R",
            State::XrLeqC => "sLCxR__L_eq_C",
            State::XrLneC => "sLCxR__L_ne_C",
            State::OnlyR => "sxLCxR__only_R",
            State::OnlyC => "sxLCRx__only_C",
            State::OnlyL => "sLxCxR__only_L",
            State::None => "sxLxCxR__none",
        }
    }

    pub fn action(self) -> Action {
        match self {
            State::AllEq | State::None => Action::None,
            State::LeqCneR | State::OnlyR => Action::Download,
            State::LeqRneC | State::XcLeqR | State::OnlyC => Action::UpdateCache,
            State::CeqRneL | State::OnlyL => Action::Upload,
            State::AllNe | State::XlCneR | State::XcLneR | State::XrLneC => Action::Conflict,
            State::XlCeqR => Action::DeleteRemote,
            State::XrLeqC => Action::DeleteLocal,
        }
    }

    /// A short human description for `status`.
    pub fn label(self) -> &'static str {
        match self {
            State::AllEq => "synced",
            State::LeqCneR => "modified on remote",
            State::LeqRneC => "synced (cache outdated)",
            State::CeqRneL => "modified locally",
            State::AllNe => "conflict (all differ)",
            State::XlCeqR => "deleted locally",
            State::XlCneR => "deleted locally, changed on remote",
            State::XcLeqR => "synced (no cache)",
            State::XcLneR => "conflict (no cache)",
            State::XrLeqC => "deleted on remote",
            State::XrLneC => "modified locally, deleted on remote",
            State::OnlyR => "new on remote",
            State::OnlyC => "in cache only",
            State::OnlyL => "new (local only)",
            State::None => "not found",
        }
    }
}

/// The classification rule, on presence bits and pairwise equalities. Kept
/// apart from manifests so it can be checked against a model directly.
pub fn classify_one(l: bool, c: bool, r: bool, l_eq_c: bool, l_eq_r: bool, c_eq_r: bool) -> State {
    match (l, c, r) {
        (true, true, true) => {
            if l_eq_c && l_eq_r {
                State::AllEq
            } else if l_eq_c {
                State::LeqCneR
            } else if l_eq_r {
                State::LeqRneC
            } else if c_eq_r {
                State::CeqRneL
            } else {
                State::AllNe
            }
        }
        (false, true, true) => {
            if c_eq_r {
                State::XlCeqR
            } else {
                State::XlCneR
            }
        }
        (true, false, true) => {
            if l_eq_r {
                State::XcLeqR
            } else {
                State::XcLneR
            }
        }
        (true, true, false) => {
            if l_eq_c {
                State::XrLeqC
            } else {
                State::XrLneC
            }
        }
        (false, false, true) => State::OnlyR,
        (false, true, false) => State::OnlyC,
        (true, false, false) => State::OnlyL,
        (false, false, false) => State::None,
    }
}

#[derive(Clone, Debug)]
pub struct Classified<'a> {
    pub path: &'a str,
    pub state: State,
    pub l: Option<&'a Entry>,
    pub c: Option<&'a Entry>,
    pub r: Option<&'a Entry>,
}

fn eq(a: Option<&Entry>, b: Option<&Entry>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.same_content(b))
}

/// Classifies every path of L ∪ C ∪ R, in path order, with one merge pass over
/// the three sorted manifests.
pub fn classify<'a>(l: &'a Manifest, c: &'a Manifest, r: &'a Manifest) -> Vec<Classified<'a>> {
    classify_iter(l.entries(), c.entries(), r.entries()).collect()
}

/// `classify` one path at a time, over any three sequences of entries in
/// path order (L may be a view over C): a caller that keeps only the
/// changed paths never holds a classification of every file (48 bytes
/// each).
pub fn classify_iter<'a>(
    l: impl IntoIterator<Item = &'a Entry> + 'a,
    c: impl IntoIterator<Item = &'a Entry> + 'a,
    r: impl IntoIterator<Item = &'a Entry> + 'a,
) -> impl Iterator<Item = Classified<'a>> + 'a {
    let (mut le, mut ce, mut re) = (
        l.into_iter().peekable(),
        c.into_iter().peekable(),
        r.into_iter().peekable(),
    );
    std::iter::from_fn(move || {
        let mut min: Option<&'a str> = None;
        for p in [le.peek(), ce.peek(), re.peek()].into_iter().flatten() {
            if min.is_none_or(|m| p.path.as_bytes() < m.as_bytes()) {
                min = Some(&p.path);
            }
        }
        let path = min?;
        let (a, b, d) = (
            le.next_if(|e| &*e.path == path),
            ce.next_if(|e| &*e.path == path),
            re.next_if(|e| &*e.path == path),
        );
        let state = classify_one(
            a.is_some(),
            b.is_some(),
            d.is_some(),
            eq(a, b),
            eq(a, d),
            eq(b, d),
        );
        Some(Classified {
            path,
            state,
            l: a,
            c: b,
            r: d,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::manifest::{EntryKind, Mtime};
    use proptest::prelude::*;

    /// The model: the DESIGN §4 table written as data, row by row.
    fn model(l: Option<u8>, c: Option<u8>, r: Option<u8>) -> (usize, &'static str) {
        let bits = (l.is_some() as u8) << 2 | (c.is_some() as u8) << 1 | r.is_some() as u8;
        match bits {
            0b111 if l == c && c == r => (1, "none"),
            0b111 if l == c => (2, "download"),
            0b111 if l == r => (3, "update_cache"),
            0b111 if c == r => (4, "upload"),
            0b111 => (5, "conflict"),
            0b011 if c == r => (6, "delete_remote"),
            0b011 => (7, "conflict"),
            0b101 if l == r => (8, "update_cache"),
            0b101 => (9, "conflict"),
            0b110 if l == c => (10, "delete_local"),
            0b110 => (11, "conflict"),
            0b001 => (12, "download"),
            0b010 => (13, "update_cache"),
            0b100 => (14, "upload"),
            _ => (15, "none"),
        }
    }

    fn entry(path: &str, v: u8) -> Entry {
        // Values 0..3 are files of different content, 4..5 links: a file and a
        // link are never equal.
        let kind = if v < 4 {
            EntryKind::File {
                size: 1,
                mtime: Mtime::parse("2025-06-01T10:00:00-07:00"),
                hash: Some(Hash(v as u64)),
            }
        } else {
            EntryKind::Link {
                target: format!("t{v}").into(),
            }
        };
        Entry {
            path: path.into(),
            user: "u@example.org".into(),
            kind,
        }
    }

    proptest! {
        #[test]
        fn classifier_matches_model(rows in proptest::collection::vec(
            (proptest::option::of(0u8..6), proptest::option::of(0u8..6), proptest::option::of(0u8..6)), 1..40)) {
            let mut ls = vec![]; let mut cs = vec![]; let mut rs = vec![];
            for (i, (l, c, r)) in rows.iter().enumerate() {
                let p = format!("d/{i:03}");
                if let Some(v) = l { ls.push(entry(&p, *v)); }
                if let Some(v) = c { cs.push(entry(&p, *v)); }
                if let Some(v) = r { rs.push(entry(&p, *v)); }
            }
            let (lm, cm, rm) = (Manifest::from_entries(ls), Manifest::from_entries(cs), Manifest::from_entries(rs));
            let out = classify(&lm, &cm, &rm);
            let expected: Vec<_> = rows.iter().filter(|(l, c, r)| l.is_some() || c.is_some() || r.is_some()).collect();
            prop_assert_eq!(out.len(), expected.len());
            for (got, (l, c, r)) in out.iter().zip(expected) {
                let (n, action) = model(*l, *c, *r);
                prop_assert_eq!(got.state.number(), n);
                prop_assert_eq!(serde_json::to_value(got.state.action()).unwrap(), serde_json::json!(action));
                prop_assert_eq!(serde_json::to_value(got.state).unwrap(), serde_json::json!(got.state.id()));
            }
        }
    }

    #[test]
    fn every_state_reachable() {
        let mut seen = std::collections::BTreeSet::new();
        for bits in 0..8u8 {
            for eqs in 0..8u8 {
                seen.insert(classify_one(
                    bits & 4 != 0,
                    bits & 2 != 0,
                    bits & 1 != 0,
                    eqs & 4 != 0,
                    eqs & 2 != 0,
                    eqs & 1 != 0,
                ));
            }
        }
        assert_eq!(seen.len(), 15);
    }
}
