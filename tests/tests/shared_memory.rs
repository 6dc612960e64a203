//! Big writes and reads between the engine and replicas on its host go through memory
//! the engine shares with them (`longhorn_replica::shm`): the data must arrive exactly
//! as over the socket, on every replica and back, and a replica must refuse memory that
//! is not the pool the engine said, or a descriptor pointing outside it.

use longhorn_replica::proto::Op;
use longhorn_replica::shm::{Attach, Descriptor, Pool};
use longhorn_tests::*;

const SHARED: &str = "the engine shares memory for write payloads";

fn replica_logs(c: &Cluster) -> Vec<String> {
    c.replicas.iter().map(|r| r.proc.log_text()).collect()
}

/// Random data in with large requests and mixed small ones, read back and compared
/// by tools of their own: the volume, and each replica's head file, hold the image.
fn write_and_check(c: &Cluster, size: u64) {
    let img = c.path("image.raw");
    random_file(&img, size);
    // nbdcopy's requests are big enough for the pool; fio then mixes 4k and 1M writes
    // in flight at once over the same connection, verified as it reads back.
    sh(&format!("nbdcopy --requests=8 --request-size=1048576 '{}' '{}'", img.display(), c.uri()));
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", img.display(), c.uri()));
    let (ok, _, out) = fio(&format!(
        "--name=mix --ioengine=nbd --uri='{}' --rw=randwrite --bssplit=4k/30:64k/20:1m/50 --size={size} \
         --iodepth=16 --io_size={} --verify=crc32c --verify_fatal=1 --randrepeat=0",
        c.uri(),
        size / 2
    ));
    assert!(ok, "fio verify failed:\n{out}\nengine log:\n{}", c.engine_log());
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), c.path("back.raw").display()));
    for i in 0..c.replicas.len() {
        sh(&format!("cmp '{}' '{}'", c.path("back.raw").display(), c.head_file(i).display()));
    }
}

#[test]
fn three_replicas_on_this_host_take_big_writes_from_shared_memory() {
    for t in ["nbdcopy", "qemu-img", "fio"] {
        assert!(have(t), "{t} is not installed (tests/run installs it)");
    }
    let c = Cluster::new("vol1", 128 * MB, 3);
    write_and_check(&c, 128 * MB);
    for (i, log) in replica_logs(&c).iter().enumerate() {
        assert!(log.contains(SHARED), "replica {i} never mapped the engine's pool:\n{log}");
        assert!(!log.contains("shared-memory"), "replica {i} complained about a descriptor:\n{log}");
    }
    assert!(!c.engine_log().contains("does not share memory"), "{}", c.engine_log());
    let ls = c.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    assert!(v.as_array().expect("array").iter().all(|r| r["mode"] == "RW"), "{v}");
}

#[test]
fn without_shared_memory_the_same_writes_go_through_the_sockets() {
    let mut c = Cluster::without_engine("vol1", 64 * MB, 2);
    c.engine_extra.push("--no-shared-memory".into());
    c.start_engine();
    write_and_check(&c, 64 * MB);
    for (i, log) in replica_logs(&c).iter().enumerate() {
        assert!(!log.contains(SHARED), "replica {i} was offered memory:\n{log}");
    }
}

/// A replica killed while big writes are in flight through the pool is dropped, the
/// others go on, and it is rebuilt when it comes back (`replica add`).
#[test]
fn a_replica_killed_mid_write_is_dropped_and_rebuilt() {
    let mut c = Cluster::new("vol1", 64 * MB, 3);
    let uri = c.uri();
    let fio_run = std::thread::spawn(move || {
        fio(&format!(
            "--name=big --ioengine=nbd --uri='{uri}' --rw=write --bs=1m --size=64m --iodepth=8 --loops=6 \
             --verify=crc32c --verify_fatal=1"
        ))
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    c.replicas[1].proc.kill9();
    let (ok, _, out) = fio_run.join().expect("fio thread");
    assert!(ok, "fio verify failed with a replica killed:\n{out}\nengine log:\n{}", c.engine_log());
    c.restart_replica(1);
    let addr = c.replicas[1].addr.clone();
    let r = c.add_and_wait(&addr);
    assert_eq!(r["mode"], "RW", "{r}");
    // The rebuild took a snapshot: each replica's data is its whole chain.
    let back = c.path("back.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), back.display()));
    let want = std::fs::read(&back).expect("read back");
    for i in [0, 1, 2] {
        let got = read_layers(&head_chain(&c.replicas[i].dir), 64 * MB);
        assert!(got == want, "replica {i} differs from what the volume reads");
    }
}

/// An engine's client speaking the protocol by hand: a pool the replica cannot verify
/// is refused with a reason and the connection goes on inline; a WRITE_SHARED before any
/// pool, or pointing outside it, or whose data does not match its CRC, ends the
/// connection and nothing is written.
#[test]
fn a_replica_refuses_memory_and_descriptors_it_cannot_trust() {
    let c = Cluster::without_engine("vol1", 16 * MB, 1);
    let creds = longhorn_replica::auth::Credentials::engine(
        Some(std::sync::Arc::new(longhorn_replica::auth::Key::load(&c.secret).expect("key"))),
        "test-engine",
    );
    let addr = c.replicas[0].addr.clone();
    let connect = || ReplicaClient::connect_as(&addr, "vol1", 16 * MB, &creds).expect("handshake");
    let pool = std::sync::Arc::new(Pool::new(1 << 20).expect("pool"));
    let data = vec![0x5Au8; 128 << 10];

    // Before SHARE_MEMORY: the stream is not trusted.
    let mut cl = connect();
    let d = Descriptor { offset: 0, crc: longhorn_replica::proto::checksum(&data) }.encode();
    assert!(cl.request(Op::WriteShared, 0, data.len() as u32, &d).is_err(), "WRITE_SHARED with no pool was answered");

    // A wrong nonce, a wrong pid, garbage: refused, and the connection still serves.
    let mut cl = connect();
    let good = pool.attach();
    let bad = [
        Attach { nonce: "00".repeat(32), ..good.clone() },
        Attach { pid: u32::MAX - 1, ..good.clone() },
        Attach { len: good.len * 2, ..good.clone() },
    ];
    for a in bad {
        let (st, why) = cl.request(Op::ShareMemory, 0, 0, &serde_json::to_vec(&a).expect("json")).expect("answered");
        assert_ne!(st, 0, "a bad pool {a:?} was accepted");
        assert!(!why.is_empty());
    }
    let (st, why) = cl.request(Op::ShareMemory, 0, 0, b"{not json").expect("answered");
    assert_eq!(st, libc::EINVAL as u32, "{}", String::from_utf8_lossy(&why));
    cl.write(0, &[1u8; 4096]);

    // The real pool: accepted once, and a write through it lands.
    let (st, why) = cl.request(Op::ShareMemory, 0, 0, &serde_json::to_vec(&good).expect("json")).expect("answered");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&why));
    let (st, _) = cl.request(Op::ShareMemory, 0, 0, &serde_json::to_vec(&good).expect("json")).expect("answered");
    assert_ne!(st, 0, "a second pool on one connection was accepted");
    let off = pool.put(7, &data, 1).expect("room");
    let d = Descriptor { offset: off, crc: longhorn_replica::proto::checksum(&data) }.encode();
    let (st, why) = cl.request(Op::WriteShared, 1 << 20, data.len() as u32, &d).expect("answered");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&why));
    let (st, back) = cl.request(Op::Read, 1 << 20, data.len() as u32, &[]).expect("read");
    assert_eq!(st, 0);
    assert!(back == data, "the shared write did not land as sent");
    // And back through the pool: the replica reads into the region lent, the reply
    // says where and with what CRC.
    let off = pool.lend(8, data.len(), 1).expect("room");
    let ask = Descriptor { offset: off, crc: 0 }.encode();
    let (st, reply) = cl.request(Op::ReadShared, 1 << 20, data.len() as u32, &ask).expect("answered");
    assert_eq!(st, 0, "{}", String::from_utf8_lossy(&reply));
    let got = pool.take(8, 0, data.len() as u32, &reply).expect("the reply names the region, with the data's CRC");
    assert!(got[..] == data[..], "READ_SHARED put other bytes in the region");
    drop(got);

    // A CRC that does not match the memory: the connection ends, nothing is written.
    let wrong = Descriptor { offset: off, crc: longhorn_replica::proto::checksum(&data) ^ 1 }.encode();
    assert!(cl.request(Op::WriteShared, 4 << 20, data.len() as u32, &wrong).is_err(), "a bad CRC was answered");
    // Outside the pool, on a fresh connection with the pool shared again.
    let mut cl = connect();
    let (st, _) = cl.request(Op::ShareMemory, 0, 0, &serde_json::to_vec(&good).expect("json")).expect("answered");
    assert_eq!(st, 0);
    let outside = Descriptor { offset: (1 << 20) - 4096, crc: 0 }.encode();
    assert!(cl.request(Op::WriteShared, 4 << 20, data.len() as u32, &outside).is_err(), "a region outside the pool was answered");
    let mut cl = connect();
    let (st, back) = cl.request(Op::Read, 4 << 20, data.len() as u32, &[]).expect("read");
    assert_eq!(st, 0);
    assert!(back.iter().all(|&b| b == 0), "a refused shared write left data behind");
    let log = c.replicas[0].proc.log_text();
    assert!(log.contains("checksum mismatch") && log.contains("outside"), "the replica's log does not say why:\n{log}");
    // A READ_SHARED outside the pool ends the connection too.
    let mut cl = connect();
    let (st, _) = cl.request(Op::ShareMemory, 0, 0, &serde_json::to_vec(&good).expect("json")).expect("answered");
    assert_eq!(st, 0);
    assert!(cl.request(Op::ReadShared, 0, 1 << 20, &outside).is_err(), "a read into memory outside the pool was answered");
}
