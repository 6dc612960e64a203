//! Reads the page cache cannot answer stay in flight together, so many are on the disk
//! at once: in the connection's io_uring, or (`--no-io-uring`, or where io_uring is not
//! allowed) in the replica's pool of reader threads. What a client sees must not change
//! either way: every reply carries the bytes of its own request, and a read is never
//! answered with a write sent after it on the same connection.

use longhorn_replica::proto::{self, Header, Op};
use longhorn_tests::*;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;

const BLOCK: u64 = 64 * 1024;
const BLOCKS: u64 = 256;

fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8) ^ (block as u8).wrapping_mul(31) ^ round.wrapping_mul(101)).collect()
}

/// Evicts the replica's files from the page cache (their pages are clean after a FLUSH),
/// so the next reads must wait for the disk.
fn drop_cache(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("replica dir").flatten() {
        if e.file_name().to_string_lossy().ends_with(".img") {
            let f = std::fs::File::open(e.path()).expect("open layer");
            // SAFETY: fadvise on a descriptor we own.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0, "fadvise");
            n += 1;
        }
    }
    n
}

/// Pages of `path` in the page cache (mincore over a mapping).
fn cached_pages(path: &Path) -> usize {
    let f = std::fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len() as usize;
    // SAFETY: a read-only shared mapping of a file we opened, unmapped below; mincore
    // writes one byte per page into `v`, sized for it.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let mut v = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(p, len, v.as_mut_ptr()), 0, "mincore");
        libc::munmap(p, len);
        v.iter().filter(|b| **b & 1 != 0).count()
    }
}

/// Sends `frames` at once and collects every reply by id.
fn pipeline(c: &mut ReplicaClient, frames: &[(Op, u64, u64, Vec<u8>)]) -> HashMap<u64, (u32, Vec<u8>)> {
    let mut b = Vec::new();
    for (op, id, off, payload) in frames {
        let count = if *op == Op::Read { BLOCK as u32 } else { payload.len() as u32 };
        proto::put_frame(&mut b, Header::request(*op, *id, *off, count), payload);
    }
    c.s.write_all(&b).expect("send pipeline");
    let mut got = HashMap::new();
    while got.len() < frames.len() {
        let (h, p) = proto::read_frame(&mut c.s).expect("reply");
        assert!(got.insert(h.id, (h.status, p.to_vec())).is_none(), "two replies to request {}", h.id);
    }
    got
}

/// The replica's threads named `replica-read` (the pool's readers).
fn pool_readers(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the replica's threads")
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "replica-read"))
        .count()
}

#[test]
fn cold_reads_in_io_uring_return_their_own_bytes_and_never_a_later_write() {
    let (readers, log) = cold_reads(&[]);
    if log.contains("io_uring is not available") {
        // The replica said so and used the pool, which the test below checks as well.
        println!("[replica] this host refuses io_uring; the pool served the misses");
        return;
    }
    assert_eq!(readers, 0, "misses went to reader threads, not the connection's io_uring");
}

#[test]
fn cold_reads_in_the_reader_pool_return_their_own_bytes_and_never_a_later_write() {
    let (readers, _) = cold_reads(&[("LONGHORN_NO_IO_URING".to_string(), "1".to_string())]);
    assert!(readers > 0, "with LONGHORN_NO_IO_URING=1 no reader thread served the misses");
}

/// Runs the cold-read checks against a replica started with `env`; returns how many
/// pool readers it had started by the end, and its log.
fn cold_reads(env: &[(String, String)]) -> (usize, String) {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = t.path().join("r");
    let size = BLOCKS * BLOCK;
    let (mut rp, addr) = serve_replica(&dir, "vol1", size, &t.path().join("r.log"), env);
    let mut c = ReplicaClient::connect(&addr, "vol1", size);
    for b in 0..BLOCKS {
        c.write(b * BLOCK, &pattern(b, 0));
    }
    assert_eq!(c.request(Op::Flush, 0, 0, &[]).expect("flush").0, 0);
    assert!(drop_cache(&dir) > 0, "the replica has data files");
    let head = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("volume-head-")))
        .expect("a head file");
    let before = cached_pages(&head);

    // Every block is read and, right behind the read on the same connection, written
    // anew: each read must see the old bytes, each write must land.
    let mut frames = Vec::new();
    for b in 0..BLOCKS {
        frames.push((Op::Read, 1000 + b, b * BLOCK, Vec::new()));
        frames.push((Op::Write, 2000 + b, b * BLOCK, pattern(b, 1)));
    }
    let got = pipeline(&mut c, &frames);
    for b in 0..BLOCKS {
        let (st, p) = &got[&(1000 + b)];
        assert_eq!(*st, 0, "read of block {b} failed: {}", String::from_utf8_lossy(p));
        assert!(*p == pattern(b, 0), "the read of block {b} was answered with bytes of a write sent after it");
        assert_eq!(got[&(2000 + b)].0, 0, "write of block {b}");
    }
    println!("[replica] head pages cached before the cold reads: {before} of {}", size / 4096);
    assert!(before < (size / 4096 / 10) as usize, "the reads were not cold: {before} pages cached");

    // Cold again, all reads at once, in an order the disk does not like: every reply
    // carries its own block's new bytes.
    assert_eq!(c.request(Op::Flush, 0, 0, &[]).expect("flush").0, 0);
    drop_cache(&dir);
    let frames: Vec<_> = (0..BLOCKS).map(|i| (i * 97) % BLOCKS).map(|b| (Op::Read, 5000 + b, b * BLOCK, Vec::new())).collect();
    let got = pipeline(&mut c, &frames);
    for b in 0..BLOCKS {
        let (st, p) = &got[&(5000 + b)];
        assert_eq!(*st, 0, "read of block {b}");
        assert!(*p == pattern(b, 1), "block {b} read back wrong");
    }
    // A control request behind pooled reads waits for them: the snapshot holds the
    // written bytes and the head is empty after it.
    drop_cache(&dir);
    let mut frames: Vec<_> = (0..BLOCKS).map(|b| (Op::Read, 7000 + b, b * BLOCK, Vec::new())).collect();
    let snap = serde_json::json!({"name": "s1", "user_created": true}).to_string().into_bytes();
    frames.push((Op::Snapshot, 9999, 0, snap));
    let got = pipeline(&mut c, &frames);
    assert_eq!(got[&9999].0, 0, "snapshot: {}", String::from_utf8_lossy(&got[&9999].1));
    for b in 0..BLOCKS {
        assert!(got[&(7000 + b)].1 == pattern(b, 1), "block {b} read beside the snapshot");
    }
    drop(c);

    // An engine that goes away with misses in flight: the replica waits for the disk
    // before it lets go of their buffers, stays up, and serves the next engine.
    drop_cache(&dir);
    let mut c = ReplicaClient::connect(&addr, "vol1", size);
    let mut b = Vec::new();
    for blk in 0..BLOCKS {
        proto::put_frame(&mut b, Header::request(Op::Read, 11000 + blk, ((blk * 61) % BLOCKS) * BLOCK, BLOCK as u32), &[]);
    }
    c.s.write_all(&b).expect("send reads");
    drop(c);
    let mut c = ReplicaClient::connect(&addr, "vol1", size);
    let frames: Vec<_> = (0..BLOCKS).map(|b| (Op::Read, 12000 + b, b * BLOCK, Vec::new())).collect();
    let got = pipeline(&mut c, &frames);
    for b in 0..BLOCKS {
        assert!(got[&(12000 + b)].1 == pattern(b, 1), "block {b} read after an engine left with reads in flight");
    }
    drop(c);
    assert!(rp.alive());
    let readers = pool_readers(rp.pid());
    println!("[replica] pool readers started: {readers}");
    rp.kill9();
    (readers, std::fs::read_to_string(t.path().join("r.log")).unwrap_or_default())
}
