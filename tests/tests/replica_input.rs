//! Bad input at the replica: damaged frames, engines of other volumes, damaged
//! directories. Each gets a clear error, the replica keeps serving others, and no data
//! file changes.

use longhorn_replica::proto::{self, Header, Op, HEADER_LEN};
use longhorn_tests::*;
use std::io::{Read, Write};
use std::path::Path;
use std::net::TcpStream;
use std::time::Duration;

/// Reads the replica's challenge and sends a Hello without a proof; returns the reply.
fn hello(s: &mut TcpStream, volume: &str, size: u64) -> (Header, Vec<u8>) {
    let (h, _) = proto::read_frame(s).expect("challenge");
    assert!(h.op == Op::Hello && h.is_reply(), "the replica speaks first");
    let mut b = Vec::new();
    let p = serde_json::json!({"volume": volume, "size": size, "role": "engine", "engine": "test-engine"}).to_string();
    proto::put_frame(&mut b, Header::request(Op::Hello, 0, 0, 0), p.as_bytes());
    s.write_all(&b).expect("send hello");
    let (h, p) = proto::read_frame(s).expect("hello reply");
    (h, p.to_vec())
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s
}

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).expect("read")))
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_frames_and_foreign_engines_are_refused() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = t.path().join("r");
    let size = 8 * MB;
    let (mut rp, addr) = serve_replica(&dir, "vol1", size, &t.path().join("r.log"), &[]);

    // An engine of another volume, or of another size, is refused with a reason.
    let mut s = connect(&addr);
    let (h, p) = hello(&mut s, "vol2", size);
    assert_eq!(h.status, libc::EINVAL as u32);
    assert!(String::from_utf8_lossy(&p).contains("vol1"), "reason names the volume: {}", String::from_utf8_lossy(&p));
    let mut s = connect(&addr);
    let (h, _) = hello(&mut s, "vol1", size * 2);
    assert_eq!(h.status, libc::EINVAL as u32);

    let before = files(&dir);
    // A write whose payload does not match its checksum is never applied.
    let mut s = connect(&addr);
    let (h, _) = hello(&mut s, "vol1", size);
    assert_eq!(h.status, 0);
    let mut b = Vec::new();
    proto::put_frame(&mut b, Header::request(Op::Write, 1, 0, 4096), &[0xAB; 4096]);
    b[HEADER_LEN + 10] ^= 1;
    s.write_all(&b).expect("send");
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "no reply to a corrupt frame: the connection is closed");

    // A frame with a bad magic: the connection is closed.
    let mut s = connect(&addr);
    hello(&mut s, "vol1", size);
    let mut b = Vec::new();
    proto::put_frame(&mut b, Header::request(Op::Write, 2, 0, 4096), &[0xCD; 4096]);
    b[0] = b'X';
    s.write_all(&b).expect("send");
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(files(&dir), before, "no data file changed");

    // The replica still serves a well-behaved engine.
    let mut s = connect(&addr);
    hello(&mut s, "vol1", size);
    let mut b = Vec::new();
    proto::put_frame(&mut b, Header::request(Op::Write, 3, 4096, 4096), &[0x11; 4096]);
    proto::put_frame(&mut b, Header::request(Op::Read, 4, 4096, 4096), &[]);
    s.write_all(&b).expect("send");
    let (h, _) = proto::read_frame(&mut s).expect("write reply");
    assert_eq!((h.id, h.status), (3, 0));
    let (h, p) = proto::read_frame(&mut s).expect("read reply");
    assert_eq!((h.id, h.status), (4, 0));
    assert_eq!(&p[..], &[0x11; 4096][..]);
    let log = rp.log_text();
    assert!(log.contains("checksum mismatch"), "log says why:\n{log}");
    assert!(log.contains("bad magic"), "log says why:\n{log}");
    assert!(rp.term(), "replica stops cleanly");
}

#[test]
fn replica_refuses_a_corrupt_volume_meta_without_touching_it() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = t.path().join("r");
    let size = (4 * MB).to_string();
    let args = ["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "vol1", "--size", &size, "--listen", "127.0.0.1:0"];
    let (mut p, _) = spawn(&args, &t.path().join("1.log"), "listening").expect("starts");
    assert!(p.term());
    std::fs::write(dir.join("volume.meta"), b"{\"Size\": 4194304, \"Head\": ").expect("damage");
    let before = std::fs::read(dir.join("volume.meta")).expect("read");
    let out = std::process::Command::new(bin()).args(args).output().expect("run");
    assert!(!out.status.success(), "must refuse to serve a corrupt replica");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volume.meta"), "error names the file: {err}");
    assert_eq!(std::fs::read(dir.join("volume.meta")).expect("read"), before, "file untouched");
    // A replica of another volume.
    let other = std::process::Command::new(bin())
        .args(["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "vol9", "--size", &size])
        .output()
        .expect("run");
    assert!(!other.status.success());
}

/// Two replica processes on one directory would each keep their own head and
/// revision counter over the same files: the second is refused while the first runs,
/// and starts once it is gone (killed -9: the lock goes with the process).
#[test]
fn a_second_replica_on_the_same_directory_is_refused() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = t.path().join("r");
    let size = (4 * MB).to_string();
    let args = ["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "vol1", "--size", &size, "--listen", "127.0.0.1:0"];
    let (mut first, _) = spawn(&args, &t.path().join("1.log"), "listening").expect("starts");
    let before = files(&dir);
    let out = std::process::Command::new(bin()).args(args).output().expect("run");
    assert!(!out.status.success(), "a second replica on the same directory started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another replica process serves"), "{err}");
    assert_eq!(files(&dir), before, "the refused replica touched the files");
    first.kill9();
    let (mut again, _) = spawn(&args, &t.path().join("2.log"), "listening").expect("starts after the first is gone");
    assert!(again.term());
}

/// A peer that answers like a source replica of `volume` would: a Hello reply with its
/// info, one 4 KiB extent for any file, and 0xEE bytes for any read. It serves whatever
/// file names it is asked about, as a hostile one would.
fn fake_source(volume: &str, size: u64) -> String {
    use longhorn_replica::proto::ReplicaInfo;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let info = ReplicaInfo {
        volume: volume.into(),
        size,
        sector_size: 512,
        revision: 0,
        was_dirty: false,
        unsettled: false,
        head: "volume-head-000.img".into(),
        parent: String::new(),
        chain: vec![],
        mode: "RW".into(),
        rebuilding: false,
        progress: None,
        head_has_data: false,
        shared_writes: false,
        mac: String::new(),
    };
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let info = info.clone();
            std::thread::spawn(move || {
                let mut ch = Header::request(Op::Hello, 0, 0, 0);
                ch.flags = proto::FLAG_REPLY;
                let mut b = Vec::new();
                proto::put_frame(&mut b, ch, br#"{"nonce":"00","auth":false}"#);
                if s.write_all(&b).is_err() {
                    return;
                }
                loop {
                let Ok((h, _)) = proto::read_frame(&mut s) else { return };
                let mut r = Header::request(h.op, h.id, h.offset, h.count);
                r.flags = proto::FLAG_REPLY;
                let p: Vec<u8> = match h.op {
                    Op::Hello => serde_json::to_vec(&info).expect("json"),
                    Op::FileExtents => b"[[0,4096]]".to_vec(),
                    Op::FileRead => vec![0xEE; h.count as usize],
                    _ => b"x".to_vec(),
                };
                let mut b = Vec::new();
                proto::put_frame(&mut b, r, &p);
                if s.write_all(&b).is_err() {
                    return;
                }
                }
            });
        }
    });
    addr
}

/// A rebuild takes file names, its snapshot and the source address from whoever
/// connects. Names that are paths must be refused before anything is created.
#[test]
fn rebuild_refuses_names_that_leave_the_replica_directory() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = t.path().join("deep").join("r");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let size = 4 * MB;
    let (mut rp, addr) = serve_replica(&dir, "vol1", size, &t.path().join("r.log"), &[]);
    let src = fake_source("vol1", size);
    let meta = |name: &str, parent: &str| {
        serde_json::json!({"Name": name, "Parent": parent, "Removed": false, "UserCreated": false, "Created": "", "Labels": null})
    };
    let outside = t.path().join("deep").join("escaped.img");
    let absolute = t.path().join("absolute.img");
    let mut c = ReplicaClient::connect(&addr, "vol1", size);

    let b = serde_json::json!({"snapshot": "volume-snap-s1.img", "revision": 0}).to_string();
    let (st, p) = c.request(Op::RebuildBegin, 0, 0, b.as_bytes()).expect("reply");
    assert_eq!(st, 0, "a proper RebuildBegin: {}", String::from_utf8_lossy(&p));

    let cases: Vec<(String, serde_json::Value)> = vec![
        ("relative path".into(), serde_json::json!([meta("../escaped.img", ""), meta("volume-snap-s1.img", "../escaped.img")])),
        ("absolute path".into(), serde_json::json!([meta(absolute.to_str().expect("utf8"), ""), meta("volume-snap-s1.img", absolute.to_str().expect("utf8"))])),
        ("dot-dot inside a snapshot name".into(), serde_json::json!([meta("volume-snap-../../escaped.img", ""), meta("volume-snap-s1.img", "volume-snap-../../escaped.img")])),
        ("the head's own name".into(), serde_json::json!([meta("volume-head-001.img", ""), meta("volume-snap-s1.img", "volume-head-001.img")])),
        ("a chain with a gap".into(), serde_json::json!([meta("volume-snap-a.img", ""), meta("volume-snap-s1.img", "volume-snap-b.img")])),
    ];
    for (what, files) in cases {
        let req = serde_json::json!({"source": src, "files": files}).to_string();
        let (st, p) = c.request(Op::RebuildSync, 0, 0, req.as_bytes()).expect("reply");
        let why = String::from_utf8_lossy(&p);
        assert_ne!(st, 0, "{what}: RebuildSync accepted");
        assert!(why.contains("RebuildSync refused"), "{what}: the reason says what was refused: {why}");
        assert!(!outside.exists() && !absolute.exists(), "{what}: a file was created outside the replica directory");
        assert!(!Path::new("/etc/evil.img").exists());
    }
    for bad_source in ["127.0.0.1:0", "no port", "host name:80", ""] {
        let req = serde_json::json!({"source": bad_source, "files": [meta("volume-snap-s1.img", "")]}).to_string();
        let (st, p) = c.request(Op::RebuildSync, 0, 0, req.as_bytes()).expect("reply");
        assert_ne!(st, 0, "source {bad_source:?} accepted");
        assert!(String::from_utf8_lossy(&p).contains("source address"), "{}", String::from_utf8_lossy(&p));
    }
    // The snapshot a rebuild starts onto becomes a Parent link: it must be a layer name.
    for bad in ["../../etc/evil.img", "/etc/evil.img", "volume-head-001.img"] {
        let b = serde_json::json!({"snapshot": bad, "revision": 0}).to_string();
        let (st, p) = c.request(Op::RebuildBegin, 0, 0, b.as_bytes()).expect("reply");
        assert_ne!(st, 0, "RebuildBegin onto {bad:?} accepted");
        assert!(String::from_utf8_lossy(&p).contains(bad), "reason names {bad:?}: {}", String::from_utf8_lossy(&p));
    }
    let names: Vec<String> = std::fs::read_dir(t.path().join("deep")).expect("ls").map(|e| e.expect("e").file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["r".to_string()], "nothing but the replica directory beside it");
    assert!(rp.alive(), "the replica keeps serving");
    drop(c);
    rp.kill9();
}

fn rss_mib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb / 1024
}

/// A connection whose peer sends requests but never reads the replies must stall only
/// itself: the replica bounds what it queues for it, and FLUSH replies to everyone else
/// keep coming.
#[test]
fn a_peer_that_stops_reading_stalls_only_itself() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = t.path().join("r");
    let size = 64 * MB;
    let (mut rp, addr) = serve_replica(&dir, "vol1", size, &t.path().join("r.log"), &[]);
    let mut greedy = ReplicaClient::connect(&addr, "vol1", size);
    let mut b = Vec::new();
    for i in 0..400u64 {
        proto::put_frame(&mut b, Header::request(Op::Read, 10 + i, (i % 63) * MB, MB as u32), &[]);
        if i == 200 {
            proto::put_frame(&mut b, Header::request(Op::Flush, 1, 0, 0), &[]);
        }
    }
    greedy.s.write_all(&b).expect("send requests");
    std::thread::sleep(Duration::from_secs(1));

    let mut other = ReplicaClient::connect(&addr, "vol1", size);
    other.s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    other.write(0, &[7; 4096]);
    let t0 = std::time::Instant::now();
    let r = other.request(Op::Flush, 0, 0, &[]);
    assert!(matches!(r, Ok((0, _))), "another connection's FLUSH is stalled by a peer that does not read: {r:?}");
    println!("[replica] FLUSH answered in {:?} beside a stuck peer", t0.elapsed());
    let rss = rss_mib(rp.pid());
    println!("[replica] resident memory with 400 MiB of replies unread: {rss} MiB");
    assert!(rss < 200, "the replica queued {rss} MiB of replies for a peer that does not read");
    drop(greedy);
    assert!(rp.alive());
    rp.kill9();
}

/// A malformed `--listen` is refused with the address named, before anything is made:
/// no replica directory is left behind to be mistaken for a replica later. A unix
/// address whose path cannot be a socket address (too long) is refused the same way.
#[test]
fn a_bad_listen_address_is_refused_before_the_replica_directory_is_made() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = (4 * MB).to_string();
    let long = format!("unix:{}/{}", t.path().display(), "s".repeat(120));
    for (i, listen) in ["no-port-here", "127.0.0.1:notaport", "unix:", long.as_str()].iter().enumerate() {
        let dir = t.path().join(format!("r{i}"));
        let out = std::process::Command::new(bin())
            .args(["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "vol1", "--size", &size, "--listen", listen])
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--listen {listen:?} was accepted");
        assert!(err.contains("--listen"), "the error names the flag for {listen:?}: {err}");
        assert!(!dir.exists(), "--listen {listen:?}: the replica directory was made anyway");
    }
}
