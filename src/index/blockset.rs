//! A set of block numbers (`u32`), kept sorted and de-duplicated.
//!
//! Building is append-then-normalise: [`BlockSet::insert`] pushes, and the set sorts and
//! de-duplicates lazily, which is much cheaper than keeping a tree while decoding a segment
//! with hundreds of thousands of block references.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlockSet {
    blocks: Vec<u32>,
    #[serde(skip)]
    dirty: bool,
}

impl PartialEq for BlockSet {
    fn eq(&self, other: &Self) -> bool {
        self.to_vec() == other.to_vec()
    }
}
impl Eq for BlockSet {}

impl BlockSet {
    pub fn new() -> BlockSet {
        BlockSet::default()
    }

    pub fn insert(&mut self, block: u32) {
        if let Some(&last) = self.blocks.last() {
            if last == block {
                return;
            }
            if last > block {
                self.dirty = true;
            }
        }
        self.blocks.push(block);
    }

    /// Sorts and de-duplicates; call before reading if built with `insert`.
    pub fn normalize(&mut self) {
        if self.dirty {
            self.blocks.sort_unstable();
            self.blocks.dedup();
            self.dirty = false;
        }
    }

    fn sorted(&self) -> std::borrow::Cow<'_, [u32]> {
        if self.dirty {
            let mut v = self.blocks.clone();
            v.sort_unstable();
            v.dedup();
            std::borrow::Cow::Owned(v)
        } else {
            std::borrow::Cow::Borrowed(&self.blocks)
        }
    }

    pub fn to_vec(&self) -> Vec<u32> {
        self.sorted().into_owned()
    }

    pub fn len(&self) -> usize {
        self.sorted().len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn contains(&self, block: u32) -> bool {
        self.sorted().binary_search(&block).is_ok()
    }

    /// Adds every block of `other`.
    pub fn union_with(&mut self, other: &BlockSet) {
        self.blocks.extend_from_slice(&other.blocks);
        self.dirty = true;
        self.normalize();
    }

    /// Iterates in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        // Normalised sets borrow; others sort a copy. Callers normally normalise first.
        self.to_vec().into_iter()
    }

    /// Builds a set from sorted or unsorted blocks.
    pub fn from_blocks(blocks: impl IntoIterator<Item = u32>) -> BlockSet {
        let mut s = BlockSet {
            blocks: blocks.into_iter().collect(),
            dirty: true,
        };
        s.normalize();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_normalise_union() {
        let mut s = BlockSet::new();
        for b in [5, 5, 3, 9, 3, 0] {
            s.insert(b);
        }
        assert_eq!(s.to_vec(), vec![0, 3, 5, 9]);
        assert!(s.contains(9) && !s.contains(4));
        s.union_with(&BlockSet::from_blocks([4, 9, 100]));
        assert_eq!(s.to_vec(), vec![0, 3, 4, 5, 9, 100]);
        assert_eq!(s.len(), 6);
    }
}
