//! The core data path, end to end: replicas + engine as real processes, driven by real
//! NBD clients (nbdinfo, nbdcopy, qemu-img, fio, nbdfuse).

use longhorn_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn require(tools: &[&str]) {
    for t in tools {
        assert!(have(t), "{t} is not installed (tests/run installs it)");
    }
}

#[test]
fn nbdinfo_shows_size_and_flags() {
    require(&["nbdinfo"]);
    let c = Cluster::new("vol1", 64 * MB, 3);
    let out = sh(&format!("nbdinfo --json '{}'", c.uri()));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(64 * MB), "{out}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[flag].as_bool(), Some(true), "{flag} in {out}");
    }
    assert_eq!(e["is_read_only"].as_bool(), Some(false));
    // The allocation map: everything is a hole on a fresh volume.
    let map = sh(&format!("nbdinfo --map '{}'", c.uri()));
    assert!(map.contains("hole"), "fresh volume should map as a hole: {map}");
    let vi = c.cli(&["volume", "info", "-v", "vol1", "--json"]);
    assert!(vi.status.success(), "{vi:?}");
    let v: serde_json::Value = serde_json::from_slice(&vi.stdout).expect("json");
    assert_eq!(v["replicas_rw"].as_u64(), Some(3));
    assert_eq!(v["state"].as_str(), Some("healthy"));
}

/// `volume stats` counts exactly the reads and writes a client made (what the manager's
/// throughput, IOPS and latency metrics are computed from); zeroing is not counted.
#[test]
fn volume_stats_count_the_requests_a_client_made() {
    require(&["nbdsh"]);
    let c = Cluster::new("vol1", 64 * MB, 2);
    let stats = || {
        let o = c.cli(&["volume", "stats", "-v", "vol1", "--json"]);
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let before = stats();
    assert_eq!(before["write_ops"].as_u64(), Some(0), "{before}");
    // Three writes of 64 KiB, two reads of 4 KiB, one write-zeroes and a flush.
    sh(&format!(
        "{NBDSH} -u '{}' -c 'for i in range(3): h.pwrite(b\"x\" * 65536, i * 65536)' \
         -c 'h.pread(4096, 0); h.pread(4096, 8192); h.zero(1 << 20, 4 << 20); h.flush()'",
        c.uri()
    ));
    let after = stats();
    let n = |k: &str| after[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!((n("write_ops"), n("write_bytes")), (3, 3 * 65536), "{after}");
    assert_eq!((n("read_ops"), n("read_bytes")), (2, 8192), "{after}");
    assert!(n("write_latency_ns") > 0 && n("read_latency_ns") > 0, "{after}");
    let text = c.cli(&["volume", "stats", "-v", "vol1"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("write") && text.contains("196608 bytes"), "{text}");
}

#[test]
fn nbdcopy_round_trip_and_qemu_img_compare() {
    require(&["nbdcopy", "qemu-img", "nbdinfo"]);
    let size = 256 * MB;
    let c = Cluster::new("vol1", size, 3);
    let img = c.path("image.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    let back = c.path("back.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), back.display()));
    sh(&format!("cmp '{}' '{}'", img.display(), back.display()));
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", img.display(), c.uri()));
    // Every replica holds the same bytes as the image.
    for i in 0..3 {
        sh(&format!("cmp '{}' '{}'", img.display(), c.head_file(i).display()));
    }
    let map = sh(&format!("nbdinfo --map '{}'", c.uri()));
    assert!(map.contains("data"), "written volume maps as data: {map}");
}

fn fio_verify(uri: &str, jobs: u32, size_mb: u64, extra: &str) -> (bool, u64, String) {
    fio(&format!(
        "--name=verify --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=16 \
         --numjobs={jobs} --size={size_mb}M --offset_increment={size_mb}M --verify=crc32c \
         --verify_fatal=1 --do_verify=1 --group_reporting=0 {extra}"
    ))
}

#[test]
fn fio_verify_one_replica() {
    require(&["fio"]);
    let c = Cluster::new("vol1", 128 * MB, 1);
    let (ok, errs, out) = fio_verify(&c.uri(), 2, 32, "");
    assert!(ok && errs == 0, "fio failed:\n{out}\nengine log:\n{}", c.engine_log());
}

#[test]
fn fio_verify_three_replicas_and_replicas_identical() {
    require(&["fio"]);
    let mut c = Cluster::new("vol1", 128 * MB, 3);
    let (ok, errs, out) = fio_verify(&c.uri(), 3, 32, "--bsrange=512-64k");
    assert!(ok && errs == 0, "fio failed:\n{out}\nengine log:\n{}", c.engine_log());
    c.stop_engine();
    for i in 1..3 {
        sh(&format!("cmp '{}' '{}'", c.head_file(0).display(), c.head_file(i).display()));
    }
}

#[test]
fn kill_one_of_three_replicas_during_fio() {
    require(&["fio"]);
    let mut c = Cluster::new("vol1", 256 * MB, 3);
    let uri = c.uri();
    // Rate-limited so the kill lands mid-run on any machine (about 5 s of writes).
    let fio_thread = std::thread::spawn(move || fio_verify(&uri, 2, 96, "--rate_iops=5000"));
    std::thread::sleep(Duration::from_millis(1500));
    // Each NBD connection's replies from all three replicas are read by one thread,
    // which must also notice the kill below and drop the replica.
    let pid = c.engine.as_ref().expect("engine").proc.pid();
    assert_eq!(
        (threads_named(pid, "replica-replies"), threads_named(pid, "replica-reply-")),
        (2, 0),
        "one reply collector per fio job's connection, none per replica"
    );
    c.replicas[1].proc.kill9();
    let (ok, errs, out) = fio_thread.join().expect("fio thread");
    assert!(ok && errs == 0, "fio saw errors after a replica died:\n{out}\nengine log:\n{}", c.engine_log());
    let ls = c.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    let modes: Vec<&str> = v.as_array().expect("array").iter().map(|r| r["mode"].as_str().unwrap_or("")).collect();
    assert_eq!(modes, vec!["RW", "ERR", "RW"], "replica ls: {v}");
    let log = c.engine_log();
    assert!(log.contains("replica failed and was dropped"), "engine log names the failure:\n{log}");
    c.stop_engine();
    sh(&format!("cmp '{}' '{}'", c.head_file(0).display(), c.head_file(2).display()));
}

#[test]
fn engine_restart_keeps_data_and_stale_replica_is_left_out() {
    require(&["nbdcopy"]);
    let size = 64 * MB;
    let mut c = Cluster::new("vol1", size, 2);
    let img = c.path("image.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    c.stop_engine();
    for r in &c.replicas {
        let m = std::fs::read_to_string(r.dir.join("volume.meta")).expect("meta");
        assert!(m.contains("\"Dirty\":false"), "a clean engine stop leaves replicas clean: {m}");
    }
    c.start_engine();
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", img.display(), c.uri()));
    // Replica 1 misses writes while it is down; at the next start it is behind and left out.
    c.replicas[1].proc.kill9();
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    c.stop_engine();
    c.restart_replica(1);
    c.start_engine();
    let ls = c.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    assert_eq!(v[0]["mode"].as_str(), Some("RW"), "{v}");
    assert_eq!(v[1]["mode"].as_str(), Some("ERR"), "stale replica must not serve: {v}");
    assert!(v[1]["error"].as_str().unwrap_or("").contains("behind"), "{v}");
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", img.display(), c.uri()));
}

#[test]
fn ext4_through_nbdfuse_and_loop() {
    require(&["nbdfuse", "losetup", "mkfs.ext4", "e2fsck"]);
    if !std::path::Path::new("/dev/fuse").exists() || !std::path::Path::new("/dev/loop-control").exists() {
        panic!("this test needs /dev/fuse and loop devices (root on the host)");
    }
    let c = Cluster::new("vol1", 256 * MB, 3);
    let fuse_dir = c.path("fuse");
    let mnt = c.path("mnt");
    std::fs::create_dir_all(&fuse_dir).expect("mkdir");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    // nbdfuse serves the export as FUSE_DIR/nbd until unmounted.
    let mut fuse = std::process::Command::new("nbdfuse")
        .arg(&fuse_dir)
        .arg(c.uri())
        .spawn()
        .expect("nbdfuse");
    let file = fuse_dir.join("nbd");
    for _ in 0..100 {
        if file.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = std::panic::catch_unwind(|| {
        let loopdev = sh(&format!("losetup --direct-io=on -f --show '{}'", file.display())).trim().to_string();
        let r = std::panic::catch_unwind(|| {
            sh(&format!("mkfs.ext4 -q -F {loopdev}"));
            sh(&format!("mount {loopdev} '{}'", mnt.display()));
            sh(&format!(
                "cd '{m}' && for i in 1 2 3 4 5; do head -c 3M /dev/urandom > f$i; done && sha256sum f* > ../sums && sync",
                m = mnt.display()
            ));
            sh(&format!("umount '{}'", mnt.display()));
            sh(&format!("e2fsck -fn {loopdev}"));
            sh(&format!("mount {loopdev} '{}'", mnt.display()));
            sh(&format!("cd '{}' && sha256sum -c ../sums", mnt.display()));
            sh(&format!("umount '{}'", mnt.display()));
        });
        let _ = sh_try(&format!("umount '{}' 2>/dev/null", mnt.display()));
        let _ = sh_try(&format!("losetup -d {loopdev}"));
        r
    });
    let _ = sh_try(&format!("fusermount3 -u '{}' || umount '{}'", fuse_dir.display(), fuse_dir.display()));
    let _ = fuse.wait();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => std::panic::resume_unwind(e),
    }
}

#[test]
fn bad_nbd_clients_do_not_disturb_others() {
    require(&["nbdinfo", "nbdsh"]);
    let c = Cluster::new("vol1", 16 * MB, 2);
    let sock = c.engine.as_ref().expect("engine").sock.clone();
    // Garbage instead of a handshake.
    {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).expect("server greeting");
        assert_eq!(&greet[..8], b"NBDMAGIC");
        let _ = s.write_all(&[0xde; 64]);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the server hangs up rather than hanging
    }
    // Out of range reads/writes get an error, and the connection keeps working.
    // Strict mode off, so libnbd sends the bad requests instead of refusing them itself.
    let script = "
import errno
h.set_strict_mode(0)
h.connect_uri(URI)
try:
    h.pread(4096, 16*1024*1024)
    raise SystemExit('read past the end succeeded')
except nbd.Error as e:
    assert e.errnum in (errno.EINVAL, errno.ENOSPC, errno.EIO), e
try:
    h.pwrite(b'x'*4096, 16*1024*1024 - 1024)
    raise SystemExit('write past the end succeeded')
except nbd.Error as e:
    pass
h.pwrite(b'y'*4096, 0)
assert h.pread(4096, 0) == b'y'*4096
print('ok')
";
    let script = script.replace("URI", &format!("'{}'", c.uri()));
    let out = sh(&format!("{NBDSH} -c \"{}\"", script.replace('"', "\\\"")));
    assert!(out.contains("ok"), "{out}");
    // A write whose payload never arrives: the connection is dropped, nothing is written.
    {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).expect("greeting");
        s.write_all(&1u32.to_be_bytes()).expect("client flags: fixed newstyle");
        // NBD_OPT_EXPORT_NAME ""
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&opt).expect("opt");
        let mut info = [0u8; 10 + 124];
        s.read_exact(&mut info[..10]).expect("export info");
        let _ = s.read(&mut info[10..]);
        // NBD_CMD_WRITE of 4096 bytes at offset 8192, with only 100 bytes of payload.
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes());
        req.extend_from_slice(&7u64.to_be_bytes());
        req.extend_from_slice(&8192u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        req.extend_from_slice(&[b'Z'; 100]);
        s.write_all(&req).expect("short write");
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = sh(&format!(
        "{NBDSH} -u '{}' -c \"assert h.pread(4096, 8192) == bytes(4096); print('clean')\"",
        c.uri()
    ));
    assert!(out.contains("clean"), "a truncated write must not reach the volume: {out}");
    sh(&format!("nbdinfo '{}' >/dev/null", c.uri()));
}

#[test]
fn hung_replica_is_dropped_after_the_io_timeout() {
    require(&["fio"]);
    let c = Cluster::new("vol1", 128 * MB, 3);
    let uri = c.uri();
    let t = std::time::Instant::now();
    let fio_thread = std::thread::spawn(move || fio_verify(&uri, 1, 48, "--rate_iops=3000"));
    std::thread::sleep(Duration::from_millis(1000));
    // A replica that stops answering in the middle of the writes, without closing its sockets.
    let pid = c.replicas[2].proc.pid();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (ok, errs, out) = fio_thread.join().expect("fio thread");
    eprintln!("fio with a hung replica took {:?} (I/O timeout 4 s)", t.elapsed());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(ok && errs == 0, "fio saw errors with a hung replica:\n{out}\nengine log:\n{}", c.engine_log());
    let ls = c.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    assert_eq!(v[2]["mode"].as_str(), Some("ERR"), "{v}");
    assert!(v[2]["error"].as_str().unwrap_or("").contains("timeout"), "{v}");
}

/// A zeroing of a whole large volume on slow disks: passed whole, it kept every replica
/// busy past the I/O timeout at once, all were dropped and the volume faulted. The
/// engine sends it in pieces, each answered well within the timeout.
#[test]
fn a_long_write_zeroes_on_slow_disks_does_not_fault_the_volume() {
    let size = 1024 * MB;
    let slow = [("LONGHORN_SLOW_ZERO".to_string(), "6".to_string())];
    let mut c = Cluster::without_engine("vol1", size, 0);
    c.add_replica_env("r0", &slow);
    c.add_replica_env("r1", &slow);
    c.start_engine();
    sh(&format!("{NBDSH} -u '{}' -c 'h.pwrite(b\"\\x77\" * 65536, 0); h.flush()'", c.uri()));
    let t = std::time::Instant::now();
    // 1 GiB at 6 ms per MiB is 6 s per replica, against an I/O timeout of 4 s.
    let (ok, out) = sh_try(&format!("{NBDSH} -u '{}' -c 'h.zero({size}, 0); print(h.pread(65536, 0) == bytes(65536))'", c.uri()));
    eprintln!("1 GiB WRITE_ZEROES took {:?}", t.elapsed());
    assert!(ok && out.trim() == "True", "zeroing failed or did not read back as zeros: {out}\nengine log:\n{}", c.engine_log());
    let info = c.cli(&["volume", "info", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["state"], "healthy", "replicas were dropped by a long zeroing: {v}\nengine log:\n{}", c.engine_log());
}

/// Forwards connections from `listen` to `to`; in the replica-to-engine direction the
/// first READ reply carrying data after `armed` is set has one payload byte flipped (a
/// replica, or a path, that damages what it sends). Returns how many were damaged.
fn damaging_proxy(to: String, armed: std::sync::Arc<std::sync::atomic::AtomicBool>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use longhorn_replica::proto::{Header, Op, HEADER_LEN};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let l = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
    let addr = l.local_addr().expect("proxy address").to_string();
    let damaged = Arc::new(AtomicUsize::new(0));
    let count = damaged.clone();
    std::thread::spawn(move || {
        for engine in l.incoming().flatten() {
            let Ok(replica) = TcpStream::connect(&to) else { continue };
            let _ = (engine.set_nodelay(true), replica.set_nodelay(true));
            let (mut e_rd, mut r_wr) = (engine.try_clone().expect("clone"), replica.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut e_rd, &mut r_wr);
                let _ = r_wr.shutdown(std::net::Shutdown::Write);
            });
            let (armed, count) = (armed.clone(), count.clone());
            let (mut r_rd, mut e_wr) = (replica, engine);
            std::thread::spawn(move || {
                let mut hb = [0u8; HEADER_LEN];
                while r_rd.read_exact(&mut hb).is_ok() {
                    let Ok(h) = Header::decode(&hb) else { break };
                    let mut p = vec![0u8; h.payload_len as usize];
                    if r_rd.read_exact(&mut p).is_err() {
                        break;
                    }
                    if h.op == Op::Read && h.is_reply() && !p.is_empty() && armed.swap(false, Ordering::AcqRel) {
                        p[0] ^= 0x01;
                        count.fetch_add(1, Ordering::AcqRel);
                    }
                    if e_wr.write_all(&hb).and_then(|()| e_wr.write_all(&p)).is_err() {
                        break;
                    }
                }
                let _ = e_wr.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, damaged)
}

/// A replica whose reply arrives damaged (its checksum does not match) is dropped, and
/// the read it answered is served by another replica: the client sees right data and
/// no error.
#[test]
fn a_damaged_reply_drops_its_replica_and_the_read_is_served_by_another() {
    require(&["fio"]);
    let mut c = Cluster::without_engine("vol1", 64 * MB, 3);
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (proxy, damaged) = damaging_proxy(c.replicas[1].addr.clone(), armed.clone());
    c.replicas[1].addr = proxy;
    c.start_engine();
    let uri = c.uri();
    // Written through all three, then read back: each MiB is read from one replica, so
    // replica 1 answers a third of the reads. 16 KiB requests stay below the size whose
    // data would go through shared memory instead of the socket.
    let (ok, _, out) = fio(&format!("--name=w --ioengine=nbd --uri='{uri}' --rw=write --bs=16k --size=24M --verify=crc32c --do_verify=0"));
    assert!(ok, "fio write failed:\n{out}\nengine log:\n{}", c.engine_log());
    armed.store(true, std::sync::atomic::Ordering::Release);
    let (ok, errs, out) = fio(&format!(
        "--name=w --ioengine=nbd --uri='{uri}' --rw=write --bs=16k --size=24M --verify=crc32c \
         --verify_only=1 --verify_fatal=1 --iodepth=8"
    ));
    let log = c.engine_log();
    assert!(ok && errs == 0, "fio saw wrong data or errors after a damaged reply:\n{out}\nengine log:\n{log}");
    assert_eq!(damaged.load(std::sync::atomic::Ordering::Acquire), 1, "the proxy damaged one reply");
    assert!(log.contains("payload checksum mismatch"), "the engine names the damage:\n{log}");
    let ls = c.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    let modes: Vec<&str> = v.as_array().expect("array").iter().map(|r| r["mode"].as_str().unwrap_or("")).collect();
    assert_eq!(modes, vec!["RW", "ERR", "RW"], "replica ls: {v}");
}
