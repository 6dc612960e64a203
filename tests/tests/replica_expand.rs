//! `longhorn replica expand`, the real command: aborted right after each named step
//! (LONGHORN_CRASH_AT), the directory opens at the old or the new size with the same
//! data (the new range zeros) and the command run again finishes it; a directory a
//! running `replica serve` holds is refused and left as it was.

use bytes::BytesMut;
use longhorn_replica::meta::VolumeMeta;
use longhorn_replica::Store;
use longhorn_tests::*;
use std::path::Path;
use std::process::{Command, Output};

const OLD: u64 = 4 * MB;
const NEW: u64 = 8 * MB;

fn expand_cmd(dir: &Path, size: u64, crash_at: Option<&str>) -> Output {
    let mut c = Command::new(bin());
    c.args(["replica", "expand", "--size", &size.to_string(), "--dir"]).arg(dir);
    if let Some(s) = crash_at {
        c.env("LONGHORN_CRASH_AT", s);
    }
    c.output().expect("run longhorn replica expand")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn img_lengths(dir: &Path) -> Vec<u64> {
    let rd = std::fs::read_dir(dir).expect("read_dir");
    rd.map(|e| e.expect("entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .map(|e| e.metadata().expect("metadata").len())
        .collect()
}

/// Two snapshots and head data, so the chain has three files; closed cleanly.
fn prepare(dir: &Path) -> Vec<u8> {
    Store::create(dir, "vol1", OLD).expect("create");
    let s = Store::open(dir, Some("vol1")).expect("open");
    let mut model = vec![0u8; OLD as usize];
    for (i, off) in [0, MB, OLD - MB].into_iter().enumerate() {
        let data: Vec<u8> = (0..MB as usize).map(|j| (i as u8 + 1).wrapping_mul(37).wrapping_add((j / 4096) as u8)).collect();
        s.write(off, &data).expect("write");
        model[off as usize..(off + MB) as usize].copy_from_slice(&data);
        if i < 2 {
            s.snapshot(&format!("s{i}"), true, "2026-01-01T00:00:00Z", None).expect("snapshot");
        }
    }
    s.close().expect("close");
    model
}

/// The volume as it opens now: (size, content).
fn volume(dir: &Path) -> (u64, Vec<u8>) {
    let s = Store::open(dir, Some("vol1")).expect("opens");
    let mut b = BytesMut::new();
    s.read_into(0, s.size() as usize, &mut b).expect("read");
    let size = s.size();
    s.close().expect("close");
    (size, b.to_vec())
}

#[test]
fn a_crash_at_every_step_opens_at_the_old_or_new_size_and_a_retry_finishes() {
    let root = tempfile::tempdir_in(test_root()).expect("tmp");
    // Which files each step leaves grown: none, some, all.
    for (i, step) in ["expand:committed", "expand:grew-one", "expand:grown"].into_iter().enumerate() {
        let dir = root.path().join(format!("case{i}"));
        let model = prepare(&dir);
        let o = expand_cmd(&dir, NEW, Some(step));
        assert!(!o.status.success(), "{step}: the command should have aborted: {}", text(&o));
        assert!(text(&o).contains(&format!("LONGHORN_CRASH_AT={step}")), "{step}: did not reach the step: {}", text(&o));
        let lens = img_lengths(&dir);
        let grown = lens.iter().filter(|&&l| l == NEW).count();
        let want = match i {
            0 => 0,
            1 => 1,
            _ => lens.len(),
        };
        assert_eq!((grown, lens.len()), (want, 3), "{step}: file lengths {lens:?}");
        assert_eq!(VolumeMeta::load(&dir).expect("meta").expanding_from, OLD, "{step}: the expansion is still marked unfinished");

        let (size, data) = volume(&dir);
        assert!(size == OLD || size == NEW, "{step}: opens at {size} bytes");
        assert!(data[..OLD as usize] == model[..], "{step}: the data changed across the crash");
        assert!(data[OLD as usize..].iter().all(|&b| b == 0), "{step}: the new range does not read as zeros");
        assert!(img_lengths(&dir).iter().all(|&l| l == size), "{step}: the open left files of other lengths: {:?}", img_lengths(&dir));

        let o = expand_cmd(&dir, NEW, None);
        assert!(o.status.success(), "{step}: the retry failed: {}", text(&o));
        let (size, data) = volume(&dir);
        assert_eq!(size, NEW, "{step}: after the retry");
        assert!(data[..OLD as usize] == model[..] && data[OLD as usize..].iter().all(|&b| b == 0), "{step}: data after the retry");
    }
}

/// The retry alone (no open in between) finishes an expansion cut short.
#[test]
fn expand_again_finishes_what_a_crash_left() {
    let root = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = root.path().join("r");
    let model = prepare(&dir);
    assert!(!expand_cmd(&dir, NEW, Some("expand:grew-one")).status.success());
    let o = expand_cmd(&dir, NEW, None);
    assert!(o.status.success() && text(&o).contains("already"), "{}", text(&o));
    assert!(img_lengths(&dir).iter().all(|&l| l == NEW), "{:?}", img_lengths(&dir));
    let vm = VolumeMeta::load(&dir).expect("meta");
    assert_eq!((vm.size, vm.expanding_from), (NEW, 0));
    let (_, data) = volume(&dir);
    assert!(data[..OLD as usize] == model[..]);
}

#[test]
fn a_served_directory_is_refused_and_left_as_it_was() {
    let root = tempfile::tempdir_in(test_root()).expect("tmp");
    let dir = root.path().join("r");
    let (mut p, addr) = serve_replica(&dir, "vol1", OLD, &root.path().join("replica.log"), &[]);
    let mut c = ReplicaClient::connect(&addr, "vol1", OLD);
    c.write(0, &vec![0x77; 65536]);
    let o = expand_cmd(&dir, NEW, None);
    assert!(!o.status.success(), "expanding a served directory succeeded: {}", text(&o));
    assert!(text(&o).contains("another replica process serves"), "{}", text(&o));
    assert!(img_lengths(&dir).iter().all(|&l| l == OLD), "{:?}", img_lengths(&dir));
    drop(c);
    assert!(p.term(), "the replica did not stop cleanly");
    let o = expand_cmd(&dir, NEW, None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("expanded from {OLD} to {NEW}")), "{}", text(&o));
    // A replica started with the old size refuses, naming both; the new size serves.
    let log = root.path().join("replica2.log");
    let r = spawn(&["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "vol1", "--size", &OLD.to_string(), "--listen", "127.0.0.1:0"], &log, "listening");
    let err = r.err().expect("the old size is refused");
    assert!(err.contains(&NEW.to_string()) && err.contains(&OLD.to_string()), "{err}");
    let (mut p, addr) = serve_replica(&dir, "vol1", NEW, &root.path().join("replica3.log"), &[]);
    let mut c = ReplicaClient::connect(&addr, "vol1", NEW);
    c.write(NEW - 65536, &vec![0x78; 65536]);
    drop(c);
    assert!(p.term());
    let (_, data) = volume(&dir);
    assert!(data[..65536].iter().all(|&b| b == 0x77) && data[(NEW - 65536) as usize..].iter().all(|&b| b == 0x78));
}
