//! Offline expansion of a replica directory against real files: every layer grows
//! (the chain and a snapshot a revert left on a branch), the data stays, the new range
//! reads as zeros and takes writes; the same size is a no-op, a smaller one and a
//! served directory are refused untouched; an expansion cut short is finished by the
//! next open, and a file of any other length is still refused.
//! Crashes at each step of the real command: tests/tests/replica_expand.rs.

use bytes::BytesMut;
use longhorn_replica::expand::expand;
use longhorn_replica::meta::VolumeMeta;
use longhorn_replica::store::lock_dir;
use longhorn_replica::{Store, StoreError};
use std::path::Path;

const MB: u64 = 1 << 20;
const OLD: u64 = 4 * MB;
const NEW: u64 = 12 * MB;

fn read(s: &Store, off: u64, len: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    s.read_into(off, len as usize, &mut b).expect("read");
    b.to_vec()
}

fn lengths(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().expect("metadata").len()))
        .filter(|(n, _)| n.ends_with(".img"))
        .collect();
    out.sort();
    out
}

/// s1 holds 0xA1 over the first MiB; s2 (0xB2 over the second) is left on a branch by
/// a revert to s1; the head holds 0xC3 over the last MiB. Closed cleanly.
fn replica_with_branch(dir: &Path) -> Vec<u8> {
    Store::create(dir, "v", OLD).expect("create");
    let s = Store::open(dir, Some("v")).expect("open");
    let mut model = vec![0u8; OLD as usize];
    s.write(0, &vec![0xA1; MB as usize]).expect("write");
    model[..MB as usize].fill(0xA1);
    s.snapshot("s1", true, "2026-01-01T00:00:00Z", None).expect("s1");
    s.write(MB, &vec![0xB2; MB as usize]).expect("write");
    s.snapshot("s2", true, "2026-01-01T00:00:01Z", None).expect("s2");
    s.revert("s1", "2026-01-01T00:00:02Z").expect("revert to s1");
    s.write(OLD - MB, &vec![0xC3; MB as usize]).expect("write");
    model[(OLD - MB) as usize..].fill(0xC3);
    s.close().expect("close");
    model
}

#[test]
fn every_layer_grows_the_data_stays_and_the_new_range_reads_as_zeros() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    let model = replica_with_branch(&dir);
    let files = lengths(&dir);
    assert!(files.iter().any(|(n, _)| n == "volume-snap-s2.img"), "s2 stays on a branch: {files:?}");
    let revision = Store::open(&dir, Some("v")).map(|s| {
        let r = s.revision();
        s.close().expect("close");
        r
    });
    let revision = revision.expect("reopen");

    assert_eq!(expand(&dir, NEW).expect("expand"), OLD);
    for (n, len) in lengths(&dir) {
        assert_eq!(len, NEW, "{n} was not grown");
    }
    let vm = VolumeMeta::load(&dir).expect("volume.meta");
    assert_eq!((vm.size, vm.expanding_from), (NEW, 0));
    let raw = std::fs::read_to_string(dir.join("volume.meta")).expect("read volume.meta");
    assert!(!raw.contains("ExpandingFrom"), "a finished expansion leaves volume.meta as Longhorn writes it: {raw}");

    let s = Store::open(&dir, Some("v")).expect("opens at the new size");
    assert_eq!(s.size(), NEW);
    assert_eq!(s.revision(), revision, "the revision counter is the volume's history, not touched by a resize");
    assert!(read(&s, 0, OLD) == model, "the old range changed");
    assert!(read(&s, OLD, NEW - OLD).iter().all(|&b| b == 0), "the new range does not read as zeros");
    assert_eq!(s.block_status(OLD, NEW - OLD).expect("block status"), vec![((NEW - OLD) as u32, true)], "the new range is a hole");
    s.write(NEW - 8192, &[0x5A; 8192]).expect("write at the new end");
    assert_eq!(read(&s, NEW - 8192, 8192), vec![0x5A; 8192]);
    assert!(s.write(NEW - 4096, &[0; 8192]).is_err(), "a write past the new end is refused");
    // The branch snapshot grew too: a revert to it opens a chain of one size.
    s.revert("s2", "2026-01-01T00:00:03Z").expect("revert to s2");
    assert_eq!(read(&s, MB, MB), vec![0xB2; MB as usize]);
    s.close().expect("close");
    let s = Store::open(&dir, Some("v")).expect("reopens after the revert");
    assert_eq!(read(&s, MB, MB), vec![0xB2; MB as usize]);
    s.close().expect("close");
}

#[test]
fn the_same_size_is_a_no_op_and_smaller_or_unaligned_sizes_are_refused_untouched() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    replica_with_branch(&dir);
    let before = std::fs::read(dir.join("volume.meta")).expect("read");
    let files = lengths(&dir);
    assert_eq!(expand(&dir, OLD).expect("the same size"), OLD);
    let e = expand(&dir, OLD - MB).expect_err("smaller");
    assert!(matches!(e, StoreError::Shrink { size: OLD, requested, .. } if requested == OLD - MB), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&OLD.to_string()) && msg.contains(&(OLD - MB).to_string()), "the error names both sizes: {msg}");
    for bad in [OLD + 512, 0] {
        let e = expand(&dir, bad).expect_err("unaligned");
        assert!(e.to_string().contains(&bad.to_string()), "{e}");
    }
    // More than the filesystem holds in a file (ext4: 16 TiB - 4 KiB) is found out
    // before the commit, not half-way.
    let huge: u64 = 20 << 40;
    if std::fs::File::create(t.path().join("probe")).and_then(|f| f.set_len(huge)).is_err() {
        let e = expand(&dir, huge).expect_err("too large for the filesystem");
        assert!(matches!(e, StoreError::TooLarge { requested, .. } if requested == huge), "{e}");
    }
    assert_eq!(std::fs::read(dir.join("volume.meta")).expect("read"), before, "volume.meta changed");
    assert_eq!(lengths(&dir), files);
}

#[test]
fn a_directory_a_replica_holds_is_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    replica_with_branch(&dir);
    let lock = lock_dir(&dir).expect("the replica process's lock");
    let e = expand(&dir, NEW).expect_err("refused while held");
    assert!(matches!(e, StoreError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("another replica process serves"), "{e}");
    assert_eq!(VolumeMeta::load(&dir).expect("meta").size, OLD);
    drop(lock);
    expand(&dir, NEW).expect("expands once the lock is free");
}

/// volume.meta committed, some files still at the old size: the state a crash between
/// the steps leaves (made here by hand; the real crashes are in the tests crate).
#[test]
fn open_finishes_a_cut_short_expansion_and_still_refuses_other_lengths() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    let model = replica_with_branch(&dir);
    let mut vm = VolumeMeta::load(&dir).expect("meta");
    vm.size = NEW;
    vm.expanding_from = OLD;
    vm.store(&dir).expect("store");
    let head = dir.join(&vm.head);
    std::fs::OpenOptions::new().write(true).open(&head).and_then(|f| f.set_len(NEW)).expect("grow the head only");

    // Another length is damage, whatever volume.meta says: refused, nothing written.
    let snap = dir.join("volume-snap-s1.img");
    std::fs::OpenOptions::new().write(true).open(&snap).and_then(|f| f.set_len(OLD - 4096)).expect("truncate s1");
    let before = lengths(&dir);
    let e = Store::open(&dir, Some("v")).err().expect("a truncated layer is refused");
    assert!(e.to_string().contains(&(OLD - 4096).to_string()), "{e}");
    assert!(expand(&dir, NEW).is_err(), "expand refuses it too");
    assert_eq!(lengths(&dir), before);
    std::fs::OpenOptions::new().write(true).open(&snap).and_then(|f| f.set_len(OLD)).expect("restore s1's length");

    let s = Store::open(&dir, Some("v")).expect("opens, finishing the expansion");
    assert_eq!(s.size(), NEW);
    assert!(read(&s, 0, OLD) == model, "the old range changed");
    assert!(read(&s, OLD, NEW - OLD).iter().all(|&b| b == 0), "the new range does not read as zeros");
    s.close().expect("close");
    for (n, len) in lengths(&dir) {
        assert_eq!(len, NEW, "{n} was not grown by the open");
    }
    assert_eq!(VolumeMeta::load(&dir).expect("meta").expanding_from, 0);
}
