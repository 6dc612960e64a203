//! Bad input at the replica: damaged frames, engines of other volumes, damaged
//! directories. Each gets a clear error, the replica keeps serving others, and no data
//! file changes.

use longhorn_replica::proto::{self, Header, Hello, Op, HEADER_LEN};
use longhorn_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn hello(s: &mut TcpStream, volume: &str, size: u64) -> (Header, Vec<u8>) {
    let mut b = Vec::new();
    let p = serde_json::to_vec(&Hello { volume: volume.into(), size }).expect("json");
    proto::put_frame(&mut b, Header::request(Op::Hello, 0, 0, 0), &p);
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
    let (mut rp, addr) = spawn(
        &["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "vol1", "--size", &size.to_string(), "--listen", "127.0.0.1:0"],
        &t.path().join("r.log"),
        "listening",
    )
    .expect("replica starts");

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
