//! The target side of a rebuild against a real source replica served over TCP in this
//! process: writes that arrive while the chain is copied, and chain length limits.

use bytes::BytesMut;
use longhorn_replica::rebuild::{BeginRebuild, SyncRequest};
use longhorn_replica::{ReplicaServer, Store};
use std::path::Path;
use std::sync::Arc;

const MB: u64 = 1 << 20;

fn read(s: &Store, off: u64, len: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    s.read_into(off, len, &mut b).expect("read");
    b.to_vec()
}

/// A source replica with snapshot `s` holding 0xAA over the first MiB, served on a port.
fn source(dir: &Path, size: u64) -> (Arc<Store>, String) {
    Store::create(dir, "v", size).expect("create source");
    let st = Arc::new(Store::open(dir, Some("v")).expect("open source"));
    st.write(0, &vec![0xAA; MB as usize]).expect("write");
    st.snapshot("s", false, "2026-01-01T00:00:00Z", None).expect("snapshot");
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let srv = ReplicaServer::new(st.clone(), None);
    std::thread::spawn(move || srv.serve(longhorn_replica::net::Listener::Tcp(l)));
    (st, addr)
}

fn target(dir: &Path, size: u64) -> Store {
    Store::create(dir, "v", size).expect("create target");
    let t = Store::open(dir, Some("v")).expect("open target");
    t.begin_rebuild(&BeginRebuild { snapshot: "volume-snap-s.img".into(), revision: 0 }).expect("begin");
    t
}

#[test]
fn a_held_write_straddling_blocks_never_overwrites_a_newer_whole_block() {
    let tmp = tempfile::tempdir().expect("tmp");
    let size = 4 * MB;
    let (src, addr) = source(&tmp.path().join("src"), size);
    let t = target(&tmp.path().join("dst"), size);
    // Covers the end of block 0 and the start of block 1, no whole block: held.
    t.write(4000, &[1u8; 200]).expect("partial write");
    // Then block 0 is written whole: newer than the held bytes in it.
    t.write(0, &[2u8; 4096]).expect("whole block");
    let files = src.chain_files().expect("files");
    t.sync_from(&SyncRequest { source: addr, files }, None).expect("sync");
    let got = read(&t, 0, 8192);
    assert!(got[..4096].iter().all(|&b| b == 2), "the newer whole-block write was overwritten by an older held piece");
    assert!(got[4096..4200].iter().all(|&b| b == 1), "the held piece's part in block 1 is kept");
    assert!(got[4200..].iter().all(|&b| b == 0xAA), "the rest of block 1 comes from the snapshot");
}

#[test]
fn partial_writes_superseded_by_whole_blocks_do_not_fill_the_held_budget() {
    let tmp = tempfile::tempdir().expect("tmp");
    let size = 4 * MB;
    let (src, addr) = source(&tmp.path().join("src"), size);
    let t = target(&tmp.path().join("dst"), size);
    // 300 MiB of partial writes in all, each superseded at once: more than the 256 MiB a
    // rebuild may hold, but nothing needs holding for long.
    let piece = vec![3u8; 2048];
    let block = vec![4u8; 4096];
    for i in 0..(300 * MB / 2048) {
        let off = (i % 512) * 4096;
        t.write(off + 1024, &piece).expect("partial write during the rebuild");
        t.write(off, &block).expect("whole block over it");
    }
    let files = src.chain_files().expect("files");
    t.sync_from(&SyncRequest { source: addr, files }, None).expect("sync after many superseded partial writes");
    assert!(read(&t, 0, 512 * 4096).iter().all(|&b| b == 4));
}

#[test]
fn snapshots_stop_before_the_chain_could_not_be_opened_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("r");
    Store::create(&dir, "v", MB).expect("create");
    let s = Store::open(&dir, Some("v")).expect("open");
    let mut taken = 0;
    let refusal = loop {
        match s.snapshot(&format!("s{taken}"), true, "2026-01-01T00:00:00Z", None) {
            Ok(()) => taken += 1,
            Err(e) => break e.to_string(),
        }
        assert!(taken <= longhorn_replica::store::MAX_LAYERS, "snapshots never refused");
    };
    assert_eq!(taken, longhorn_replica::store::MAX_LAYERS - 1, "{refusal}");
    assert!(refusal.contains("remove snapshots"), "the refusal says what to do: {refusal}");
    s.close().expect("close");
    drop(s);
    let s = Store::open(&dir, Some("v")).expect("the longest chain that could be made opens again");
    assert_eq!(s.info("RW").chain.len(), longhorn_replica::store::MAX_LAYERS);
    s.remove_snapshot("s5").expect("remove one");
    s.snapshot("again", true, "2026-01-01T00:00:00Z", None).expect("room for one more");
}
