//! What a FLUSH promises, checked from outside the replica: after an acknowledged
//! FLUSH, the pages of every write acknowledged before it are clean in the page cache
//! (written to the disk), as the kernel's own accounting (`cachestat(2)`) reports them.

use longhorn_replica::proto::{self, Header, Op};
use longhorn_tests::*;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Dirty and under-writeback pages of `[off, off+len)` of `file`.
fn unsynced_pages(file: &Path, off: u64, len: u64) -> u64 {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(file).expect("open layer");
    let r = Range { off, len };
    let mut st = Stat::default();
    // SAFETY: cachestat(2) reads `r` and fills `st`, both live for the call.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, f.as_raw_fd(), &r as *const Range, &mut st as *mut Stat, 0u32) };
    assert_eq!(rc, 0, "cachestat(2) failed: {}", std::io::Error::last_os_error());
    st.nr_dirty + st.nr_writeback
}

fn replica(t: &Path, size: u64, env: &[(String, String)]) -> (Proc, String, std::path::PathBuf) {
    let dir = t.join("r");
    let (p, addr) = serve_replica(&dir, "vol1", size, &t.join("r.log"), env);
    (p, addr, dir)
}

fn send(c: &mut ReplicaClient, op: Op, id: u64, offset: u64, payload: &[u8], count: u32) {
    let mut b = Vec::new();
    proto::put_frame(&mut b, Header::request(op, id, offset, count), payload);
    c.s.write_all(&b).expect("send");
}

fn reply(c: &mut ReplicaClient, id: u64) {
    let (h, p) = proto::read_frame(&mut c.s).expect("reply");
    assert_eq!(h.id, id, "replies in order here");
    assert_eq!(h.status, 0, "request {id} failed: {}", String::from_utf8_lossy(&p));
}

/// A write that is on its way to the file while another connection's FLUSH runs must
/// still be synced by the next FLUSH after it is acknowledged.
#[test]
fn a_flush_after_an_acked_write_syncs_it_even_if_an_earlier_flush_raced_it() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = 8 * MB;
    let slow_at = MB;
    let (mut rp, addr, dir) = replica(t.path(), size, &[("LONGHORN_SLOW_WRITE".into(), format!("{slow_at}:400"))]);
    let head = dir.join("volume-head-000.img");
    let mut a = ReplicaClient::connect(&addr, "vol1", size);
    let mut b = ReplicaClient::connect(&addr, "vol1", size);
    send(&mut a, Op::Write, 1, slow_at, &[0x5A; 4096], 4096);
    // B's FLUSH runs while A's write waits to reach the file.
    std::thread::sleep(Duration::from_millis(100));
    send(&mut b, Op::Flush, 1, 0, &[], 0);
    reply(&mut b, 1);
    reply(&mut a, 1);
    send(&mut a, Op::Flush, 2, 0, &[], 0);
    reply(&mut a, 2);
    let left = unsynced_pages(&head, slow_at, 4096);
    assert_eq!(left, 0, "FLUSH acknowledged with the acknowledged write's page still not on disk");
    rp.kill9();
}

/// Many connections pipelining writes and flushes: after each acknowledged FLUSH, every
/// write that connection had acknowledged before it is on disk.
#[test]
fn every_acked_flush_covers_every_write_acked_before_it() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = 64 * MB;
    let conns = 4u64;
    let region = size / conns;
    let (mut rp, addr, dir) = replica(t.path(), size, &[]);
    let head = dir.join("volume-head-000.img");
    let mut checked = 0u64;
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..conns)
            .map(|k| {
                let (addr, head) = (addr.clone(), head.clone());
                sc.spawn(move || {
                    let mut c = ReplicaClient::connect(&addr, "vol1", size);
                    let mut x: u64 = 0x9E37_79B9 ^ k;
                    let mut id = 0;
                    let mut n = 0;
                    for round in 0..150u64 {
                        let mut offs = Vec::new();
                        for _ in 0..8 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let off = k * region + (x % (region / 4096)) * 4096;
                            id += 1;
                            send(&mut c, Op::Write, id, off, &[(round as u8) ^ 0xA5; 4096], 4096);
                            offs.push(off);
                        }
                        for i in id - 7..=id {
                            reply(&mut c, i);
                        }
                        id += 1;
                        send(&mut c, Op::Flush, id, 0, &[], 0);
                        reply(&mut c, id);
                        for off in offs {
                            assert_eq!(unsynced_pages(&head, off, 4096), 0, "connection {k} round {round}: block at {off} not on disk after an acked FLUSH");
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        for h in hs {
            checked += h.join().expect("writer");
        }
    });
    println!("[durability] {checked} acknowledged writes checked on disk after their FLUSH");
    rp.kill9();
}

/// Removing a snapshot whose child is the head punches the blocks the head hides out of
/// the snapshot. If the head's blocks were not on disk first, a power loss would bring
/// back the hole in the head and the punched snapshot below it: older data.
#[test]
fn removing_a_snapshot_under_the_head_makes_the_head_durable_before_punching() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = 32 * MB;
    let (mut rp, addr, dir) = replica(t.path(), size, &[]);
    let mut c = ReplicaClient::connect(&addr, "vol1", size);
    c.write(0, &[b'A'; 65536]);
    let (st, p) = c.request(Op::Flush, 0, 0, &[]).expect("flush");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&p));
    let snap = serde_json::json!({"name": "s1", "user_created": true}).to_string();
    let (st, p) = c.request(Op::Snapshot, 0, 0, snap.as_bytes()).expect("snapshot");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&p));
    // A client that flushes often has its writes written behind (store.rs,
    // WRITE_BEHIND_MAX: 16 MiB); past that much since the last flush they stay in the
    // page cache, as this test needs.
    for i in 0..17u64 {
        c.write(MB + i * MB, &vec![b'C'; MB as usize]);
    }
    c.write(0, &[b'B'; 65536]);
    let head = dir.join("volume-head-001.img");
    assert!(unsynced_pages(&head, 0, 65536) > 0, "the head's new data is still in the page cache");
    let rm = serde_json::json!({"name": "s1"}).to_string();
    let (st, p) = c.request(Op::SnapshotRemove, 0, 0, rm.as_bytes()).expect("remove");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&p));
    assert!(String::from_utf8_lossy(&p).contains("returned"), "the hidden blocks were punched: {}", String::from_utf8_lossy(&p));
    assert_eq!(unsynced_pages(&head, 0, 65536), 0, "blocks punched out of s1 while the head's copy was not on disk");
    let (st, data) = c.request(Op::Read, 0, 65536, &[]).expect("read");
    assert_eq!(st, 0);
    assert!(data.iter().all(|&b| b == b'B'));
    rp.kill9();
}

/// The status of the reply to request `id` (0 = success) and its text.
fn status_of(c: &mut ReplicaClient, id: u64) -> (u32, String) {
    let (h, p) = proto::read_frame(&mut c.s).expect("reply");
    assert_eq!(h.id, id, "replies in order here");
    (h.status, String::from_utf8_lossy(&p).to_string())
}

/// A sync that failed (here the first, by LONGHORN_FAIL_SYNC; on a real disk a
/// writeback error, which Linux reports once and then forgets) sticks: the FLUSH fails,
/// and so does every later one, though a retried fdatasync would "succeed"; a clean
/// stop does not record the replica clean; volume.meta says Rebuilding, so an engine
/// started later does not take it as a source (the replica says so when asked).
#[test]
fn a_failed_sync_sticks_until_the_replica_is_rebuilt() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = 8 * MB;
    let (mut rp, addr, dir) = replica(t.path(), size, &[("LONGHORN_FAIL_SYNC".into(), "1".into())]);
    let mut c = ReplicaClient::connect(&addr, "vol1", size);
    send(&mut c, Op::Write, 1, 0, &[0x5A; 4096], 4096);
    reply(&mut c, 1);
    send(&mut c, Op::Flush, 2, 0, &[], 0);
    let (st, why) = status_of(&mut c, 2);
    assert_eq!(st, libc::EIO as u32, "the failed sync's FLUSH: {why}");
    // The same data again, and a FLUSH: the disk would take this one, the replica must not.
    send(&mut c, Op::Write, 3, 0, &[0x5A; 4096], 4096);
    reply(&mut c, 3);
    send(&mut c, Op::Flush, 4, 0, &[], 0);
    let (st, why) = status_of(&mut c, 4);
    assert_ne!(st, 0, "a FLUSH after a failed sync was acknowledged");
    assert!(why.contains("earlier sync failed"), "{why}");
    let meta = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("volume.meta")).expect("volume.meta")).expect("json")
    };
    assert_eq!(meta()["Rebuilding"], true, "{}", meta());
    drop(c);
    // A clean stop (SIGTERM: flush and record Dirty:false) must not clear it.
    rp.term();
    assert_eq!((meta()["Dirty"].clone(), meta()["Rebuilding"].clone()), (serde_json::json!(true), serde_json::json!(true)), "{}", meta());
    // Served again (no fault now): it tells an engine it must be rebuilt.
    let (mut rp, addr2) = serve_replica(&dir, "vol1", size, &t.path().join("r2.log"), &[]);
    let mut st = longhorn_replica::net::Stream::connect(&addr2, std::time::Duration::from_secs(5)).expect("connect");
    let creds = longhorn_replica::auth::Credentials::engine(None, "test-engine");
    let info = longhorn_replica::auth::client_handshake(&mut st, "vol1", size, &creds).expect("handshake");
    assert!(info.rebuilding, "the replica whose sync failed offers itself as current: {info:?}");
    rp.kill9();
}

/// A client that flushes often (a database, a journaling filesystem) has each write's
/// writeback started as it is made, so the next FLUSH waits for less: the pages turn
/// clean with no FLUSH at all, long before the kernel's own writeback (30 s) would.
#[test]
fn writes_between_frequent_flushes_are_written_behind() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = 8 * MB;
    let (mut rp, addr, dir) = replica(t.path(), size, &[]);
    let mut c = ReplicaClient::connect(&addr, "vol1", size);
    c.write(0, &[b'A'; 4096]);
    let (st, p) = c.request(Op::Flush, 0, 0, &[]).expect("flush");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&p));
    c.write(MB, &[b'B'; 65536]);
    let head = dir.join("volume-head-000.img");
    let t0 = std::time::Instant::now();
    while unsynced_pages(&head, MB, 65536) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "a write after a FLUSH still not written back after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("[durability] written behind in {:?}", t0.elapsed());
    rp.kill9();
}

/// Through the engine, two NBD connections: a FLUSH sent on one while an earlier FLUSH
/// of it is still syncing must cover a write the other connection had acknowledged
/// in between (the engine lets a FLUSH join one in flight only when no write completed
/// since that one was sent). The earlier FLUSH is made slow by 17 MiB of dirty pages,
/// more than a replica writes behind between flushes, so the small write after it stays
/// dirty unless a sync that began after it covers it.
#[test]
fn a_flush_joins_an_earlier_one_only_if_no_write_completed_since() {
    let size = 64 * MB;
    let c = Cluster::new("vol1", size, 2);
    let heads: Vec<String> = (0..2).map(|i| format!("{:?}", c.head_file(i).display().to_string())).collect();
    let script = format!(
        r#"
import ctypes, nbd, os
libc = ctypes.CDLL(None, use_errno=True)
class Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]
class Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]
def unsynced(fd, off, n):
    r, s = Range(off, n), Stat()
    if libc.syscall(451, fd, ctypes.byref(r), ctypes.byref(s), 0) != 0:
        raise OSError(ctypes.get_errno(), "cachestat")
    return s.dirty + s.writeback
heads = [os.open(p, os.O_RDONLY) for p in [{heads}]]
a = nbd.NBD(); a.connect_uri({uri:?})
b = nbd.NBD(); b.connect_uri({uri:?})
bulk = bytearray(b"\x5a" * (17 << 20))
small_at = 32 << 20
overlapped = 0
for rnd in range(24):
    bulk[0] = rnd
    a.pwrite(bulk, 0)
    f1 = b.aio_flush()
    off = small_at + rnd * 4096
    a.pwrite(bytes([rnd]) * 4096, off)
    b.poll(0)
    overlapped += b.aio_in_flight() > 0
    f2 = b.aio_flush()
    while not b.aio_command_completed(f2):
        b.poll(-1)
    for i, fd in enumerate(heads):
        left = unsynced(fd, off, 4096)
        if left:
            print(f"FAIL round {{rnd}}: the write at {{off}} acknowledged before the FLUSH is not on disk on replica {{i}} ({{left}} pages)")
            raise SystemExit(1)
    while not b.aio_command_completed(f1):
        b.poll(-1)
print(f"OK rounds=24 overlapped={{overlapped}}")
"#,
        heads = heads.join(", "),
        uri = c.uri()
    );
    let out = std::process::Command::new("/usr/bin/python3").args(["-c", &script]).output().expect("python3 with libnbd");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("OK rounds=24"), "{text}\nengine log:\n{}", c.engine_log());
    println!("[durability] {}", text.trim());
    // Without overlap the rule was never put to the test.
    let overlapped: u32 = text.split("overlapped=").nth(1).and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    assert!(overlapped >= 12, "the first FLUSH was still in flight in only {overlapped} of 24 rounds: {text}");
}
