//! Crash safety of chain changes: a replica process is aborted right after each named
//! step of rotation, merge, punch and revert (LONGHORN_CRASH_AT), and the directory
//! must reopen to the old chain or the new one, with the same data.

use bytes::BytesMut;
use longhorn_replica::proto::{Op, SnapshotRequest};
use longhorn_replica::Store;
use longhorn_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 4 * MB;

fn start(dir: &Path, crash_at: Option<&str>) -> (std::process::Child, String) {
    let mut c = Command::new(bin());
    c.args(["replica", "serve", "--volume", "vol1", "--size", &SIZE.to_string(), "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(s) = crash_at {
        c.env("LONGHORN_CRASH_AT", s);
    }
    let mut child = c.spawn().expect("spawn replica");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("read");
    let addr = line.trim().strip_prefix("listening ").expect("listening line").to_string();
    (child, addr)
}

fn wait_exit(child: &mut std::process::Child) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(st)) = child.try_wait() {
            return !st.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    false
}

fn volume_bytes(dir: &Path) -> (Vec<u8>, Vec<String>) {
    let s = Store::open(dir, Some("vol1")).expect("reopens after the crash");
    let mut b = BytesMut::new();
    s.read_into(0, SIZE as usize, &mut b).expect("read");
    let chain = s.info("RW").chain;
    s.close().expect("close");
    (b.to_vec(), chain)
}

fn req(name: &str) -> Vec<u8> {
    serde_json::to_vec(&SnapshotRequest {
        name: name.into(),
        user_created: true,
        created: "2026-01-01T00:00:00Z".into(),
        labels: None,
        prepare: false,
    })
        .expect("json")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i / 4096) as u8)).collect()
}

/// Builds a replica holding snapshots s0, s1 (zeros over s0's data) and s2, and some
/// head data; returns the expected volume content, now and as of s1.
fn prepare(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let (mut p, addr) = start(dir, None);
    let mut c = ReplicaClient::connect(&addr, "vol1", SIZE);
    let mut model = vec![0u8; SIZE as usize];
    let put = |c: &mut ReplicaClient, model: &mut Vec<u8>, off: usize, data: Vec<u8>| {
        c.write(off as u64, &data);
        model[off..off + data.len()].copy_from_slice(&data);
    };
    put(&mut c, &mut model, 0, pattern(1, 1 << 20));
    assert_eq!(c.request(Op::Snapshot, 0, 0, &req("s0")).expect("s0").0, 0);
    // Zeros over s0's data: a merge must carry them as data, never as holes.
    assert_eq!(c.request(Op::WriteZeroes, 0, 64 << 10, b"").expect("zero").0, 0);
    model[..64 << 10].fill(0);
    assert_eq!(c.request(Op::Snapshot, 0, 0, &req("s1")).expect("s1").0, 0);
    let at_s1 = model.clone();
    put(&mut c, &mut model, 512 << 10, pattern(2, 1 << 20));
    put(&mut c, &mut model, 3 << 20, vec![0u8; 64 << 10]);
    assert_eq!(c.request(Op::Snapshot, 0, 0, &req("s2")).expect("s2").0, 0);
    put(&mut c, &mut model, 256 << 10, pattern(3, 128 << 10));
    assert_eq!(c.request(Op::Flush, 0, 0, b"").expect("flush").0, 0);
    let _ = p.kill();
    let _ = p.wait();
    (model, at_s1)
}

#[test]
fn crash_at_every_step_reopens_old_or_new_chain_with_same_data() {
    let root = tempfile::tempdir_in(test_root()).expect("tmp");
    let cases: &[(&str, Op, &str)] = &[
        ("snapshot:synced", Op::Snapshot, "s3"),
        ("snapshot:new-head", Op::Snapshot, "s3"),
        ("snapshot:snap-meta", Op::Snapshot, "s3"),
        ("snapshot:linked", Op::Snapshot, "s3"),
        ("snapshot:committed", Op::Snapshot, "s3"),
        ("snapshot:cleaned", Op::Snapshot, "s3"),
        ("remove:marked", Op::SnapshotRemove, "s1"),
        ("remove:copied", Op::SnapshotRemove, "s1"),
        ("remove:committed", Op::SnapshotRemove, "s1"),
        ("remove:cleaned", Op::SnapshotRemove, "s1"),
        ("remove:marked", Op::SnapshotRemove, "s2"),
        ("remove:head-synced", Op::SnapshotRemove, "s2"),
        ("remove:punched", Op::SnapshotRemove, "s2"),
        ("revert:new-head", Op::SnapshotRevert, "s1"),
        ("revert:committed", Op::SnapshotRevert, "s1"),
    ];
    for (i, &(step, op, target)) in cases.iter().enumerate() {
        let dir = root.path().join(format!("case{i}"));
        let (model, at_s1) = prepare(&dir);
        let (before_data, before_chain) = volume_bytes(&dir);
        assert!(before_data == model, "{step}: data differs from the model before the crash");
        // For revert, the data after is the volume as of s1.
        let after_revert = if op == Op::SnapshotRevert { Some(at_s1.clone()) } else { None };
        let (mut p, addr) = start(&dir, Some(step));
        let mut c = ReplicaClient::connect(&addr, "vol1", SIZE);
        let r = c.request(op, 0, 0, &req(target));
        assert!(r.is_err(), "{step}: the replica should have crashed, got {r:?}");
        assert!(wait_exit(&mut p), "{step}: replica did not abort");
        let (data, chain) = volume_bytes(&dir);
        match &after_revert {
            Some(s1) if chain != before_chain => {
                assert!(data == *s1, "{step}: reverted volume does not read as s1");
            }
            _ => assert!(data == model, "{step}: data changed across the crash (chain {chain:?})"),
        }
        // Old or new chain, nothing else.
        let new_ok = match op {
            Op::Snapshot => chain.len() == before_chain.len() + 1 && chain[1] == "volume-snap-s3.img",
            Op::SnapshotRemove if target == "s1" => chain.len() == before_chain.len() - 1 && !chain.contains(&"volume-snap-s1.img".to_string()),
            Op::SnapshotRemove => chain == before_chain,
            _ => chain.len() == 3 && chain[1] == "volume-snap-s1.img",
        };
        assert!(chain == before_chain || new_ok, "{step}: chain {chain:?} is neither {before_chain:?} nor the new one");
        // No leftovers: every .img in the directory is in the chain (reverts keep s2 on a branch).
        let imgs: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".img"))
            .collect();
        for n in &imgs {
            let branch = op == Op::SnapshotRevert && n == "volume-snap-s2.img" && chain != before_chain;
            assert!(chain.contains(n) || branch, "{step}: leftover {n} after reopen (chain {chain:?})");
        }
        // The operation can be retried (or was done) after the restart.
        let (mut p, addr) = start(&dir, None);
        let mut c = ReplicaClient::connect(&addr, "vol1", SIZE);
        let (st, msg) = c.request(op, 0, 0, &req(target)).expect("retry");
        let msg = String::from_utf8_lossy(&msg).to_string();
        let fine = st == 0 || msg.contains("already exists") || msg.contains("no snapshot named");
        assert!(fine, "{step}: retry failed: {msg}");
        let _ = p.kill();
        let _ = p.wait();
        let (data, _) = volume_bytes(&dir);
        if after_revert.is_none() {
            assert!(data == model, "{step}: data changed after the retry");
        }
    }
}
