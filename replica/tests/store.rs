//! The store against real files: chain reads, zeros over older layers, partial-block
//! writes, reopen, and refusal of damaged directories without touching them.

use bytes::BytesMut;
use longhorn_replica::meta::{DiskMeta, VolumeMeta};
use longhorn_replica::Store;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MB: u64 = 1 << 20;

fn read(s: &Store, off: u64, len: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    s.read_into(off, len, &mut b).expect("read");
    b.to_vec()
}

fn snapshot_of_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).expect("read file"))
        })
        .collect()
}

/// A directory as Longhorn leaves it after one snapshot `s1`: the snapshot holds 'A'
/// over [0, 64 KiB), the head (volume-head-001.img) is empty.
fn longhorn_dir_with_snapshot(dir: &Path, size: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let snap = "volume-snap-s1.img";
    let f = std::fs::File::create(dir.join(snap)).expect("create");
    f.set_len(size).expect("len");
    f.write_all_at(&vec![b'A'; 65536], 0).expect("write");
    let head = "volume-head-001.img";
    std::fs::File::create(dir.join(head)).expect("create").set_len(size).expect("len");
    let m = |name: &str, parent: &str| DiskMeta {
        name: name.into(),
        recorded_name: String::new(),
        parent: parent.into(),
        removed: false,
        user_created: true,
        created: "2022-02-22T07:36:48Z".into(),
        labels: None,
    };
    m(snap, "").store(dir).expect("meta");
    m(head, snap).store(dir).expect("meta");
    std::fs::write(dir.join("revision.counter"), b"7").expect("rev");
    VolumeMeta {
        size,
        head: head.into(),
        dirty: false,
        rebuilding: false,
        error: String::new(),
        parent: snap.into(),
        sector_size: 512,
        backing_file_path: String::new(),
        encrypted: false,
        volume_name: String::new(),
        expanding_from: 0,
    }
    .store(dir)
    .expect("volume.meta");
}

#[test]
fn write_read_reopen_and_dirty_flag() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    Store::create(&dir, "vol1", 16 * MB).expect("create");
    let s = Store::open(&dir, Some("vol1")).expect("open");
    assert!(!s.was_dirty());
    s.write(4096, &[7u8; 8192]).expect("write");
    s.write(MB + 100, b"hello").expect("unaligned write");
    assert_eq!(read(&s, 4096, 8192), vec![7u8; 8192]);
    assert_eq!(&read(&s, MB + 98, 9)[..], b"\0\0hello\0\0");
    assert_eq!(read(&s, 0, 4096), vec![0u8; 4096]);
    assert_eq!(s.revision(), 2);
    s.close().expect("close");
    drop(s);
    let s = Store::open(&dir, Some("vol1")).expect("reopen");
    assert!(!s.was_dirty(), "closed cleanly");
    assert_eq!(s.revision(), 2);
    assert_eq!(read(&s, 4096, 8192), vec![7u8; 8192]);
    assert_eq!(&read(&s, MB + 98, 9)[..], b"\0\0hello\0\0");
    s.write(0, &[1u8; 4096]).expect("write");
    drop(s); // no close: a crash as far as the directory is concerned
    let s = Store::open(&dir, Some("vol1")).expect("reopen after crash");
    assert!(s.was_dirty(), "a replica not closed cleanly says so");
    assert_eq!(s.revision(), 3, "the mmapped counter survives a crash of the process");
    assert!(Store::open(&dir, Some("other")).is_err(), "another volume's engine is refused");
}

#[test]
fn block_status_shows_holes() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    Store::create(&dir, "v", 4 * MB).expect("create");
    let s = Store::open(&dir, Some("v")).expect("open");
    s.write(MB, &[9u8; 65536]).expect("write");
    assert_eq!(
        s.block_status(0, 4 * MB).expect("bs"),
        vec![(MB as u32, true), (65536, false), ((3 * MB - 65536) as u32, true)]
    );
    s.write_zeroes(MB, 65536).expect("zero");
    assert_eq!(s.block_status(0, 4 * MB).expect("bs"), vec![(4 * MB as u32, true)], "zeroing with nothing below punches");
    assert_eq!(read(&s, MB, 65536), vec![0u8; 65536]);
}

#[test]
fn zeros_hide_older_layers_and_trim_never_uncovers_them() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    longhorn_dir_with_snapshot(&dir, 4 * MB);
    let s = Store::open(&dir, Some("vol1")).expect("open a Longhorn directory");
    assert_eq!(s.revision(), 7);
    assert_eq!(read(&s, 0, 65536), vec![b'A'; 65536], "reads fall through to the snapshot");
    s.write_zeroes(0, 8192).expect("zero");
    s.write_zeroes(10000, 100).expect("unaligned zero");
    s.write(20000, b"xyz").expect("unaligned write");
    s.trim(32768, 32768).expect("trim");
    let check = |s: &Store| {
        let got = read(s, 0, 65536);
        let mut want = vec![b'A'; 65536];
        want[..8192].fill(0);
        want[10000..10100].fill(0);
        want[20000..20003].copy_from_slice(b"xyz");
        assert!(got == want, "volume content differs from the model");
    };
    check(&s);
    s.close().expect("close");
    drop(s);
    let s = Store::open(&dir, Some("vol1")).expect("reopen");
    check(&s);
    let snap = std::fs::read(dir.join("volume-snap-s1.img")).expect("read snap");
    assert_eq!(&snap[..65536], &vec![b'A'; 65536][..], "the snapshot never changes");
}

/// A replica directory byte for byte as Longhorn writes one after two snapshots: a
/// snapshot's meta is the meta its file had as the head, so it keeps the head's Name.
fn longhorn_dir_as_longhorn_writes_it(dir: &Path, size: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let layer = |file: &str, fill: Option<u8>| {
        let f = std::fs::File::create(dir.join(file)).expect("create");
        f.set_len(size).expect("len");
        if let Some(b) = fill {
            f.write_all_at(&vec![b; 65536], 0).expect("write");
        }
    };
    layer("volume-snap-s1.img", Some(b'1'));
    layer("volume-snap-s2.img", None);
    layer("volume-head-002.img", None);
    std::fs::File::options()
        .write(true)
        .open(dir.join("volume-snap-s2.img"))
        .expect("open")
        .write_all_at(&[b'2'; 4096], 4096)
        .expect("write");
    let metas = [
        ("volume-snap-s1.img", r#"{"Name":"volume-head-000.img","Parent":"","Removed":false,"UserCreated":true,"Created":"2022-02-22T07:36:48Z","Labels":null}"#),
        ("volume-snap-s2.img", r#"{"Name":"volume-head-001.img","Parent":"volume-snap-s1.img","Removed":false,"UserCreated":true,"Created":"2022-02-22T07:40:00Z","Labels":{"app":"db"}}"#),
        ("volume-head-002.img", r#"{"Name":"volume-head-002.img","Parent":"volume-snap-s2.img","Removed":false,"UserCreated":false,"Created":"2022-02-22T07:40:00Z","Labels":null}"#),
    ];
    for (f, m) in metas {
        std::fs::write(dir.join(format!("{f}.meta")), m).expect("meta");
    }
    std::fs::write(
        dir.join("volume.meta"),
        format!(r#"{{"Size":{size},"Head":"volume-head-002.img","Dirty":false,"Rebuilding":false,"Error":"","Parent":"volume-snap-s2.img","SectorSize":512,"BackingFilePath":"","Encrypted":false}}"#),
    )
    .expect("volume.meta");
    let mut rc = vec![0u8; 4096];
    rc[..2].copy_from_slice(b"42");
    std::fs::write(dir.join("revision.counter"), rc).expect("revision.counter");
}

#[test]
fn a_directory_laid_out_by_longhorn_opens_and_keeps_its_conventions() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    longhorn_dir_as_longhorn_writes_it(&dir, 4 * MB);
    let s = Store::open(&dir, Some("vol1")).expect("a Longhorn replica directory opens");
    assert_eq!(s.revision(), 42);
    let mut want = vec![0u8; 65536];
    want.fill(b'1');
    want[4096..8192].fill(b'2');
    assert_eq!(read(&s, 0, 65536), want, "reads through both snapshots");
    let list = s.list_snapshots().expect("list");
    let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["s1", "s2", "volume-head"]);
    assert_eq!(list[1].labels.get("app").map(|s| s.as_str()), Some("db"));
    // A snapshot we take is written the way Longhorn writes one.
    s.write(8192, &[b'3'; 4096]).expect("write");
    s.snapshot("s3", true, "2026-01-01T00:00:00Z", None).expect("snapshot");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume-snap-s3.img.meta")).expect("meta")).expect("json");
    assert_eq!(m["Name"], "volume-head-002.img", "the snapshot's meta keeps the name it had as the head");
    assert_eq!(m["Parent"], "volume-snap-s2.img");
    // A merge rewrites the child's meta and keeps its recorded Name.
    s.remove_snapshot("s2").expect("merge s2 into s3");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume-snap-s3.img.meta")).expect("meta")).expect("json");
    assert_eq!((m["Name"].as_str(), m["Parent"].as_str()), (Some("volume-head-002.img"), Some("volume-snap-s1.img")));
    want[8192..12288].fill(b'3');
    assert_eq!(read(&s, 0, 65536), want);
    s.close().expect("close");
    drop(s);
    let s = Store::open(&dir, Some("vol1")).expect("reopens after our changes");
    assert_eq!(read(&s, 0, 65536), want);
    let names: Vec<String> = s.list_snapshots().expect("list").into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["s1", "s3", "volume-head"]);
}

type Damage = fn(&Path);

#[test]
fn damaged_directories_are_refused_untouched() {
    let t = tempfile::tempdir().expect("tmp");
    let cases: [(&str, Damage); 7] = [
        ("corrupt volume.meta", |d| std::fs::write(d.join("volume.meta"), b"{\"Size\":12").expect("w")),
        ("empty volume.meta", |d| std::fs::write(d.join("volume.meta"), b"").expect("w")),
        ("missing volume.meta", |d| std::fs::remove_file(d.join("volume.meta")).expect("rm")),
        ("missing head meta", |d| std::fs::remove_file(d.join("volume-head-001.img.meta")).expect("rm")),
        ("corrupt snapshot meta", |d| std::fs::write(d.join("volume-snap-s1.img.meta"), b"\x00\x01").expect("w")),
        ("truncated revision.counter", |d| std::fs::write(d.join("revision.counter"), b"").expect("w")),
        ("snapshot file of the wrong size", |d| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("volume-snap-s1.img"))
                .expect("open")
                .set_len(4096)
                .expect("len")
        }),
    ];
    for (case, damage) in cases {
        let dir = t.path().join(case.replace(' ', "_"));
        longhorn_dir_with_snapshot(&dir, 4 * MB);
        damage(&dir);
        let before = snapshot_of_dir(&dir);
        let err = match Store::open(&dir, Some("vol1")) {
            Ok(_) => panic!("{case}: opened a damaged directory"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&dir.display().to_string()), "{case}: error does not name the file: {err}");
        assert_eq!(snapshot_of_dir(&dir), before, "{case}: opening changed the directory");
    }
}

/// `info` (every handshake) racing `close` (engine stop, SIGTERM) and writes must not
/// deadlock: chain changes hold the chain lock and then the meta lock, so no one may
/// take them the other way round.
#[test]
fn info_close_and_writes_race_without_deadlock() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("r");
    Store::create(&dir, "v", 4 * MB).expect("create");
    let s = std::sync::Arc::new(Store::open(&dir, Some("v")).expect("open"));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        for _ in 0..1800 {
            if d2.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("deadlock: info/close/write did not finish in 90 s (3000 closes, each a few fsyncs: slow disks need tens of seconds)");
        std::process::abort();
    });
    let hs: Vec<_> = (0..3)
        .map(|k| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..3000u64 {
                    match k {
                        0 => drop(s.info("RW")),
                        1 => s.close().expect("close"),
                        _ => s.write((i % 1000) * 4096, &[k as u8; 4096]).expect("write"),
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("thread");
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    watchdog.join().expect("watchdog");
}
