//! An extent map: which layer of the chain holds each byte range of the volume.
//!
//! Invariants:
//! - Entries never overlap; each maps `[start, end)` to one value.
//! - Adjacent entries with the same value are merged, so a sequentially written layer
//!   costs one entry, not one per block (Longhorn spends a byte per 4 KiB instead).
//! - A range with no entry is held by no layer.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included, Unbounded};

#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    // start -> (end, value)
    map: BTreeMap<u64, (u64, u16)>,
}

/// One piece of a lookup: `[start, end)` held by `layer`, or by nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    pub layer: Option<u16>,
}

impl ExtentMap {
    pub fn new() -> ExtentMap {
        ExtentMap::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Removes `[start, end)` from the map, splitting entries that straddle its edges.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // An entry beginning before `start` may reach into the range.
        if let Some((&s, &(e, v))) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, (start, v));
                if e > end {
                    self.map.insert(end, (e, v));
                }
            }
        }
        // Entries starting inside the range: remove them one by one (no allocation).
        while let Some((&s, _)) = self.map.range(start..end).next() {
            if let Some((e, v)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, v));
                }
            }
        }
    }

    /// Maps `[start, end)` to `value`, replacing what was there.
    pub fn insert(&mut self, start: u64, end: u64, value: u16) {
        if start >= end {
            return;
        }
        // Overwriting what the same layer already holds (the common case for a head
        // that has been written once) changes nothing.
        if let Some((&s, &(e, v))) = self.map.range(..=start).next_back() {
            if s <= start && e >= end && v == value {
                return;
            }
        }
        self.remove(start, end);
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &(pe, pv))) = self.map.range(..s).next_back() {
            if pe == s && pv == value {
                self.map.remove(&ps);
                s = ps;
            }
        }
        if let Some(&(ne, nv)) = self.map.get(&e) {
            if nv == value {
                self.map.remove(&e);
                e = ne;
            }
        }
        self.map.insert(s, (e, value));
    }

    /// The pieces of `[start, end)`, in order, covering it exactly.
    pub fn lookup(&self, start: u64, end: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        self.lookup_into(start, end, &mut out);
        out
    }

    pub fn lookup_into(&self, start: u64, end: u64, out: &mut Vec<Segment>) {
        let mut pos = start;
        let first = match self.map.range(..=start).next_back() {
            Some((&s, _)) => Included(s),
            None => Unbounded,
        };
        for (&s, &(e, v)) in self.map.range((first, Excluded(end))) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push(Segment { start: pos, end: s, layer: None });
                pos = s;
            }
            let seg_end = e.min(end);
            out.push(Segment { start: pos, end: seg_end, layer: Some(v) });
            pos = seg_end;
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push(Segment { start: pos, end, layer: None });
        }
    }

    /// True when some entry overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.lookup(start, end).iter().any(|s| s.layer.is_some())
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, u16)> + '_ {
        self.map.iter().map(|(&s, &(e, v))| (s, e, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(m: &ExtentMap, s: u64, e: u64) -> Vec<(u64, u64, Option<u16>)> {
        m.lookup(s, e).iter().map(|g| (g.start, g.end, g.layer)).collect()
    }

    #[test]
    fn insert_lookup_merge_split() {
        let mut m = ExtentMap::new();
        m.insert(0, 4096, 0);
        m.insert(4096, 8192, 0);
        assert_eq!(m.len(), 1, "adjacent same-layer extents merge");
        m.insert(1024, 2048, 1);
        assert_eq!(segs(&m, 0, 10000), vec![
            (0, 1024, Some(0)),
            (1024, 2048, Some(1)),
            (2048, 8192, Some(0)),
            (8192, 10000, None)
        ]);
        m.remove(512, 4096);
        assert_eq!(segs(&m, 0, 8192), vec![(0, 512, Some(0)), (512, 4096, None), (4096, 8192, Some(0))]);
        assert!(m.overlaps(4000, 4097));
        assert!(!m.overlaps(600, 4000));
    }

    #[test]
    fn matches_a_byte_model() {
        // A simple deterministic pseudo-random sequence checked against a byte array.
        let size = 1 << 16;
        let mut model = vec![None::<u16>; size];
        let mut m = ExtentMap::new();
        let mut x: u64 = 0x1234_5678;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = (x % size as u64) as usize;
            let l = ((x >> 20) % 3000) as usize + 1;
            let b = (a + l).min(size);
            let v = ((x >> 40) % 4) as u16;
            if (x >> 50) % 5 == 0 {
                m.remove(a as u64, b as u64);
                model[a..b].iter_mut().for_each(|c| *c = None);
            } else {
                m.insert(a as u64, b as u64, v);
                model[a..b].iter_mut().for_each(|c| *c = Some(v));
            }
        }
        for g in m.lookup(0, size as u64) {
            for i in g.start..g.end {
                assert_eq!(model[i as usize], g.layer, "byte {i}");
            }
        }
        let mut prev: Option<(u64, u16)> = None;
        for (s, e, v) in m.iter() {
            assert!(s < e);
            if let Some((pe, pv)) = prev {
                assert!(pe <= s, "entries overlap");
                assert!(!(pe == s && pv == v), "adjacent equal entries not merged");
            }
            prev = Some((e, v));
        }
    }
}
