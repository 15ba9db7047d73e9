//! L, the local manifest, as a view over C (the cache manifest): a file
//! whose content did not change since the last sync has exactly C's entry
//! in L (its path, attribution and mtime string are carried over), so L
//! refers to that entry by its index (4 bytes) instead of holding a copy
//! of it (~120 bytes with its path). Only changed and new files are held
//! whole.

use crate::manifest::{Entry, Manifest};

/// The top bit of a slot: set, the rest indexes `own`; clear, C's entries.
const OWN: u32 = 1 << 31;

/// L, built by [`super::to_local`] against one cache manifest, and read
/// through [`LocalManifest::view`] with that same manifest.
#[derive(Debug, Default)]
pub struct LocalManifest {
    /// One per entry, in path order: where the entry is.
    slots: Vec<u32>,
    /// The entries that are not C's, in path order.
    own: Vec<Entry>,
    /// C's length when L was built: a view over another manifest is refused.
    base_len: usize,
}

/// Where one entry of L is, as it is being built.
pub(super) enum Slot<'a> {
    /// C's entry at this index, unchanged.
    Same(usize, &'a Entry),
    /// A changed or new entry.
    Own(Entry),
}

impl LocalManifest {
    /// An empty L with room for `n` entries.
    pub(super) fn with_capacity(n: usize) -> LocalManifest {
        LocalManifest {
            slots: Vec::with_capacity(n),
            own: Vec::new(),
            base_len: 0,
        }
    }

    /// Adds the next entry in path order. `left` is how many entries are
    /// still to come.
    pub(super) fn push(&mut self, slot: Slot<'_>, left: usize) {
        let e = match slot {
            Slot::Same(i, _) if i < OWN as usize => {
                self.slots.push(i as u32);
                return;
            }
            // An index too large for a slot (2^31 files): a copy instead.
            Slot::Same(_, e) => e.clone(),
            Slot::Own(e) => e,
        };
        if self.own.len() == self.own.capacity() {
            // Doubling while few, then in steps of an eighth of the scan:
            // when most files changed, not twice their size at the end.
            let step = (self.slots.capacity() / 8).max(4096);
            let more = self.own.len().max(16).min(step).min(left + 1);
            self.own.reserve_exact(more);
        }
        let k = u32::try_from(self.own.len())
            .ok()
            .filter(|k| k & OWN == 0)
            .expect("fewer than 2^31 files");
        self.own.push(e);
        self.slots.push(k | OWN);
    }

    /// Done: L is read over a cache of `base_len` entries.
    pub(super) fn finish(&mut self, base_len: usize) {
        self.base_len = base_len;
        self.own.shrink_to_fit();
    }

    /// L's entries, read with `cache`, the manifest L was built against.
    ///
    /// # Panics
    /// When `cache` is not that manifest (its length differs).
    pub fn view<'a>(&'a self, cache: &'a Manifest) -> LocalView<'a> {
        assert_eq!(
            cache.len(),
            self.base_len,
            "a local manifest is read with the cache it was built against"
        );
        LocalView {
            slots: &self.slots,
            own: &self.own,
            base: cache.entries(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A copy as a plain manifest: what L would be without the view.
    pub fn to_manifest(&self, cache: &Manifest) -> Manifest {
        Manifest::from_sorted_entries(self.view(cache).iter().cloned().collect())
    }
}

/// L read through C: entries in path order.
#[derive(Clone, Copy, Debug)]
pub struct LocalView<'a> {
    slots: &'a [u32],
    own: &'a [Entry],
    base: &'a [Entry],
}

impl<'a> LocalView<'a> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The entry at position `i` (path order).
    pub fn at(&self, i: usize) -> &'a Entry {
        let s = self.slots[i];
        if s & OWN != 0 {
            &self.own[(s & !OWN) as usize]
        } else {
            &self.base[s as usize]
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a Entry> + Clone + 'a {
        let v = *self;
        (0..v.len()).map(move |i| v.at(i))
    }

    /// The position of `path` (binary search).
    pub fn position(&self, path: &str) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.at(mid).path.as_bytes().cmp(path.as_bytes()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    pub fn get(&self, path: &str) -> Option<&'a Entry> {
        self.position(path).map(|i| self.at(i))
    }
}
