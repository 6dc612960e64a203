//! Reading a snapshot as the volume was when it was taken: the replica side of backups.
//!
//! Two primitives, served over the replica protocol (`SNAPSHOT_READ`, `SNAPSHOT_RANGES`):
//!
//! - `snapshot_read(S, offset, len)`: `[offset, offset+len)` of the volume as of
//!   snapshot `S`, resolved through the layers bottom..=S (the head and the snapshots
//!   above `S` are ignored). A range no layer up to `S` holds reads as zeros.
//! - `snapshot_ranges(S, since)`: where the volume as of `S` may differ from the volume
//!   as of `since`: the union of the data extents of the layers above `since` up to
//!   `S`. Zeros written over older data are data in the layer that wrote them (see
//!   `store`), so every change is covered. Without `since`, or when `since` is not
//!   below `S` in the chain (reverted away, merged, never existed), the answer is the
//!   data extents of every layer up to `S` and `incremental` is false.
//!
//! Layers below the head never change content, so nothing is cached: each call scans
//! the allocation (SEEK_DATA/SEEK_HOLE) of the layers it needs, under the chain's read
//! lock, so a merge or a rotation cannot swap files under it. Reads never touch the
//! head, so backups of a snapshot do not slow the volume's own I/O beyond the disk
//! bandwidth they use.

use crate::extent::ExtentMap;
use crate::snapshot::snap_file;
use crate::store::{self, Chain, Store};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::FileExt;

/// Largest `SNAPSHOT_READ`.
pub const MAX_READ: u64 = 8 << 20;

/// Payload of `SNAPSHOT_READ` (offset and count are in the header) and `SNAPSHOT_RANGES`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ExportRequest {
    /// The snapshot's user-facing name (the part after `volume-snap-`).
    pub snapshot: String,
    /// `SNAPSHOT_RANGES` only: the snapshot of the previous backup.
    #[serde(default)]
    pub since: Option<String>,
}

/// Reply of `SNAPSHOT_RANGES`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotRanges {
    /// Whether `ranges` are relative to `since` (false: every data extent up to S).
    pub incremental: bool,
    /// Sorted, non-overlapping, 4 KiB-aligned `[start, end)` ranges.
    pub ranges: Vec<(u64, u64)>,
    /// Where the next page starts (ask again with that offset), when there is one.
    #[serde(default)]
    pub next: Option<u64>,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Index of snapshot `name` in the chain; never the head.
fn layer_of(chain: &Chain, name: &str) -> io::Result<usize> {
    let file = snap_file(name);
    let last = chain.layers.len() - 1;
    match chain.layers.iter().position(|l| l.name == file) {
        Some(i) if i < last => Ok(i),
        _ => Err(bad(format!("snapshot {name:?} is not in this replica's chain"))),
    }
}

/// Data ranges of `file` inside `[start, end)`, 4 KiB aligned.
fn data_in(file: &std::fs::File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    Ok(store::data_ranges(file, start, end, usize::MAX)?.0)
}

/// Most ranges in one `SNAPSHOT_RANGES` or `FILE_EXTENTS` reply: about 3 MB of JSON,
/// well inside a frame, however fragmented the volume is. The rest comes in more pages.
pub const MAX_RANGES_PER_REPLY: usize = 100_000;

impl Store {
    fn export_chain(&self) -> std::sync::RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `[offset, offset+len)` of the volume as of snapshot `name`.
    pub fn snapshot_read(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if len > MAX_READ || offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(bad(format!("snapshot read {offset}+{len} is out of bounds (volume {} bytes, at most {MAX_READ} per read)", self.size())));
        }
        let chain = self.export_chain();
        let top = layer_of(&chain, name)?;
        let end = offset + len;
        let mut map = ExtentMap::new();
        for (i, l) in chain.layers[..=top].iter().enumerate() {
            for (s, e) in data_in(&l.file, offset, end).map_err(|e| store::io_err(l, offset, e))? {
                map.insert(s, e, i as u16);
            }
        }
        let mut out = vec![0u8; len as usize];
        for seg in map.lookup(offset, end) {
            if let Some(i) = seg.layer {
                let l = &chain.layers[i as usize];
                let dst = &mut out[(seg.start - offset) as usize..(seg.end - offset) as usize];
                l.file.read_exact_at(dst, seg.start).map_err(|e| store::io_err(l, seg.start, e))?;
            }
        }
        Ok(out)
    }

    /// Where the volume as of `name` may differ from the volume as of `since` (see the
    /// module comment), whole.
    pub fn snapshot_ranges(&self, name: &str, since: Option<&str>) -> io::Result<SnapshotRanges> {
        let mut out = self.snapshot_ranges_page(name, since, 0, usize::MAX)?;
        while let Some(next) = out.next {
            let page = self.snapshot_ranges_page(name, since, next, usize::MAX)?;
            out.ranges.extend(page.ranges);
            out.next = page.next;
        }
        Ok(out)
    }

    /// The ranges of [`Store::snapshot_ranges`] from `start` on, at most `max` of them
    /// (and at most [`MAX_RANGES_PER_REPLY`]); `next` says where to go on.
    pub fn snapshot_ranges_page(&self, name: &str, since: Option<&str>, start: u64, max: usize) -> io::Result<SnapshotRanges> {
        let max = max.clamp(1, MAX_RANGES_PER_REPLY);
        let chain = self.export_chain();
        let top = layer_of(&chain, name)?;
        let base = since.and_then(|s| layer_of(&chain, s).ok()).filter(|&b| b < top);
        let from = base.map(|b| b + 1).unwrap_or(0);
        let layers = &chain.layers[from..=top];
        // Each layer is scanned for at most `per` ranges; the union is exact up to where
        // the first layer that stopped early stopped.
        let per = (4 * max / layers.len()).max(64);
        let mut upto = self.size();
        let mut found = Vec::with_capacity(layers.len());
        for l in layers {
            let (r, more) = store::data_ranges(&l.file, start.min(self.size()), self.size(), per).map_err(|e| store::io_err(l, start, e))?;
            if more {
                upto = upto.min(r.last().map(|x| x.1).unwrap_or(start));
            }
            found.push(r);
        }
        let mut map = ExtentMap::new();
        for (s, e) in found.into_iter().flatten() {
            if s < upto {
                map.insert(s, e.min(upto), 0);
            }
        }
        let mut ranges: Vec<(u64, u64)> = map.iter().map(|(s, e, _)| (s, e)).collect();
        let mut next = (upto < self.size()).then_some(upto);
        if ranges.len() > max {
            ranges.truncate(max);
            next = ranges.last().map(|r| r.1);
        }
        Ok(SnapshotRanges { incremental: base.is_some(), ranges, next })
    }
}

/// Serves `SNAPSHOT_READ` and `SNAPSHOT_RANGES` (called by the protocol server).
pub fn serve(store: &Store, h: &crate::proto::Header, payload: &[u8]) -> io::Result<bytes::Bytes> {
    let r: ExportRequest = serde_json::from_slice(payload)
        .map_err(|e| bad(format!("malformed {:?} request: {e}", h.op)))?;
    if h.op == crate::proto::Op::SnapshotRead {
        store.snapshot_read(&r.snapshot, h.offset, h.count as u64).map(bytes::Bytes::from)
    } else {
        // The header's offset says where the page starts, its count how many ranges at most.
        let max = if h.count == 0 { MAX_RANGES_PER_REPLY } else { h.count as usize };
        let v = store.snapshot_ranges_page(&r.snapshot, r.since.as_deref(), h.offset, max)?;
        serde_json::to_vec(&v).map(bytes::Bytes::from).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path) -> Store {
        Store::create(dir, "v", 16 << 20).expect("create");
        Store::open(dir, Some("v")).expect("open")
    }

    #[test]
    fn reads_as_of_snapshot_and_ranges_since() {
        let t = tempfile::tempdir().expect("tmp");
        let s = store(t.path());
        s.write(0, &vec![1u8; 8192]).expect("w");
        s.write(4 << 20, &vec![2u8; 4096]).expect("w");
        s.snapshot("a", true, "2024-01-01T00:00:00Z", None).expect("snap a");
        s.write(4096, &vec![3u8; 4096]).expect("w");
        s.write_zeroes(4 << 20, 4096).expect("zero over data");
        s.snapshot("b", true, "2024-01-01T00:00:01Z", None).expect("snap b");
        s.write(0, &vec![9u8; 4096]).expect("head write, not in any snapshot");

        let a = s.snapshot_read("a", 0, 8 << 20).expect("read a");
        assert!(a[..8192].iter().all(|&x| x == 1));
        assert!(a[4 << 20..(4 << 20) + 4096].iter().all(|&x| x == 2));
        let b = s.snapshot_read("b", 0, 8 << 20).expect("read b");
        assert!(b[..4096].iter().all(|&x| x == 1), "head writes are not in b");
        assert!(b[4096..8192].iter().all(|&x| x == 3));
        assert!(b[4 << 20..(4 << 20) + 4096].iter().all(|&x| x == 0), "zeros written over data");

        let full = s.snapshot_ranges("b", None).expect("ranges");
        assert!(!full.incremental);
        assert_eq!(full.ranges, vec![(0, 8192), (4 << 20, (4 << 20) + 4096)]);
        let inc = s.snapshot_ranges("b", Some("a")).expect("ranges");
        assert!(inc.incremental);
        assert_eq!(inc.ranges, vec![(4096, 8192), (4 << 20, (4 << 20) + 4096)]);
        // Not an ancestor: full.
        let back = s.snapshot_ranges("a", Some("b")).expect("ranges");
        assert!(!back.incremental);
        assert!(s.snapshot_read("nope", 0, 4096).is_err());
        assert!(s.snapshot_read("a", 16 << 20, 4096).is_err());
    }

    /// A fragmented chain (thousands of extents in each of two layers, interleaved) read
    /// in small pages gives exactly what one unpaged scan gives.
    #[test]
    fn pages_of_ranges_and_extents_add_up_to_the_whole() {
        let t = tempfile::tempdir().expect("tmp");
        let s = store(t.path());
        let blocks = (16 << 20) / 4096u64;
        for b in (0..blocks).step_by(3) {
            s.write(b * 4096, &[1u8; 4096]).expect("w");
        }
        s.snapshot("a", true, "2024-01-01T00:00:00Z", None).expect("snap a");
        for b in (1..blocks).step_by(5) {
            s.write(b * 4096, &[2u8; 4096]).expect("w");
        }
        s.snapshot("b", true, "2024-01-01T00:00:01Z", None).expect("snap b");
        for since in [None, Some("a")] {
            let whole = s.snapshot_ranges("b", since).expect("whole");
            assert!(whole.ranges.len() > 500, "fragmented: {} ranges", whole.ranges.len());
            let mut paged: Vec<(u64, u64)> = Vec::new();
            let (mut at, mut pages) = (0, 0);
            loop {
                let p = s.snapshot_ranges_page("b", since, at, 50).expect("page");
                assert!(p.ranges.len() <= 50);
                pages += 1;
                paged.extend(p.ranges);
                match p.next {
                    Some(n) => {
                        assert!(n > at, "pages move forward");
                        at = n;
                    }
                    None => break,
                }
            }
            assert!(pages > 10, "{pages} pages");
            // Pages may cut a range in two where one page ends: merge adjacent ones.
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for r in paged {
                match merged.last_mut() {
                    Some(l) if l.1 == r.0 => l.1 = r.1,
                    _ => merged.push(r),
                }
            }
            assert_eq!(merged, whole.ranges, "since {since:?}");
        }
        let whole = s.file_extents("volume-snap-a.img", 0, usize::MAX).expect("extents");
        assert_eq!(whole.next, None);
        let mut paged = Vec::new();
        let mut at = 0;
        loop {
            let p = s.file_extents("volume-snap-a.img", at, 7).expect("page");
            paged.extend(p.extents);
            match p.next {
                Some(n) => at = n,
                None => break,
            }
        }
        assert_eq!(paged, whole.extents);
        assert_eq!(whole.extents.len() as u64, blocks.div_ceil(3));
    }
}
