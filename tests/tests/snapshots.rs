//! Snapshots of a live 3-replica volume through the CLI, checked with qemu-img and
//! against the replica files themselves.

use longhorn_tests::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn cli_ok(c: &Cluster, args: &[&str]) -> String {
    let o = c.cli(args);
    assert!(o.status.success(), "longhorn {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn cli_err(c: &Cluster, args: &[&str]) -> String {
    let o = c.cli(args);
    assert!(!o.status.success(), "longhorn {args:?} should have failed");
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn snap_ls(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&cli_ok(c, &["snapshot", "ls", "-v", &c.volume, "--json"])).expect("json")
}

fn dump(c: &Cluster, name: &str) -> PathBuf {
    let p = c.path(name);
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), p.display()));
    p
}

fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir).expect("dir").filter_map(|e| e.ok()).map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0)).sum()
}

#[test]
fn snapshot_under_load_revert_remove_and_layout() {
    require_tools();
    let size = 128 * MB;
    let mut c = Cluster::new("vol1", size, 3);
    let img = c.path("base.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));

    // Snapshot under fio load; copy the snapshot's layers the moment it exists.
    let uri = c.uri();
    let load = std::thread::spawn(move || {
        fio(&format!(
            "--name=load --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=32 --size=128M \
             --time_based --runtime=4"
        ))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let out = cli_ok(&c, &["snapshot", "create", "s1", "--label", "app=db", "-v", "vol1", "--json"]);
    let created: serde_json::Value = serde_json::from_str(&out).expect("json");
    eprintln!("snapshot under load paused I/O for {} us", created["pause_us"]);
    let copy_dir = c.path("s1-copy");
    std::fs::create_dir_all(&copy_dir).expect("mkdir");
    let layers: Vec<PathBuf> = chain_to(&c.replicas[0].dir, "s1")
        .iter()
        .map(|f| {
            let dst = copy_dir.join(f.file_name().expect("name"));
            sh(&format!("cp --sparse=always '{}' '{}'", f.display(), dst.display()));
            dst
        })
        .collect();
    let (ok, errs, out) = load.join().expect("fio");
    assert!(ok && errs == 0, "fio under snapshot: {out}");
    let s1_expected = c.path("s1-expected.raw");
    std::fs::write(&s1_expected, read_layers(&layers, size)).expect("write");

    // Every replica holds the same snapshot file.
    let snap = |i: usize| c.replicas[i].dir.join("volume-snap-s1.img");
    sh(&format!("cmp '{}' '{}' && cmp '{}' '{}'", snap(0).display(), snap(1).display(), snap(0).display(), snap(2).display()));

    // The replica directory looks like SPEC §1.
    let mut names: Vec<String> = std::fs::read_dir(&c.replicas[0].dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "revision.counter", "volume-head-001.img", "volume-head-001.img.meta", "volume-snap-s1.img",
            "volume-snap-s1.img.meta", "volume.meta"
        ],
        "replica directory layout"
    );
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(c.replicas[0].dir.join("volume-snap-s1.img.meta")).expect("meta")).expect("json");
    assert_eq!(m["UserCreated"], true);
    assert_eq!(m["Labels"]["app"], "db");
    assert!(m["Created"].as_str().unwrap_or("").ends_with('Z'));
    let hm: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(c.replicas[0].dir.join("volume-head-001.img.meta")).expect("meta")).expect("json");
    assert_eq!(hm["Parent"], "volume-snap-s1.img");

    // Two more snapshots over overlapping writes, then the current content.
    sh(&format!("head -c 16M /dev/urandom > '{}'", c.path("w2").display()));
    sh(&format!("nbdcopy '{}' '{}'", c.path("w2").display(), c.uri()));
    cli_ok(&c, &["snapshot", "create", "s2", "-v", "vol1"]);
    sh(&format!("head -c 16M /dev/urandom > '{}'", c.path("w3").display()));
    sh(&format!("nbdcopy '{}' '{}'", c.path("w3").display(), c.uri()));
    cli_ok(&c, &["snapshot", "create", "s3", "-v", "vol1"]);
    let now = dump(&c, "now.raw");
    let ls = snap_ls(&c);
    let names: Vec<&str> = ls.as_array().expect("array").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, vec!["s1", "s2", "s3", "volume-head"], "{ls}");
    assert_eq!(ls[1]["children"][0], "s3");

    // Bad input changes nothing.
    let before = snap_ls(&c);
    assert!(cli_err(&c, &["snapshot", "create", "a/b", "-v", "vol1"]).contains("'/'"));
    assert!(cli_err(&c, &["snapshot", "create", "", "-v", "vol1"]).contains("empty"));
    assert!(cli_err(&c, &["snapshot", "create", "s2", "-v", "vol1"]).contains("already exists"));
    assert!(cli_err(&c, &["snapshot", "rm", "volume-head", "-v", "vol1"]).contains("head"));
    assert!(cli_err(&c, &["snapshot", "rm", "nope", "-v", "vol1"]).contains("no snapshot"));
    assert_eq!(snap_ls(&c), before, "failed commands changed the snapshot list");

    // Remove a middle snapshot (merged into its child) and the one under the head.
    let alloc_before: u64 = (0..3).map(|i| allocated(&c.replicas[i].dir)).sum();
    cli_ok(&c, &["snapshot", "rm", "s2", "-v", "vol1"]);
    cli_ok(&c, &["snapshot", "rm", "s3", "-v", "vol1"]);
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", now.display(), c.uri()));
    let alloc_after: u64 = (0..3).map(|i| allocated(&c.replicas[i].dir)).sum();
    assert!(alloc_after < alloc_before, "removing snapshots returned no space ({alloc_before} -> {alloc_after})");
    let ls = snap_ls(&c);
    let s3 = ls.as_array().expect("array").iter().find(|s| s["name"] == "s3").expect("s3 stays, removed, under the head");
    assert_eq!(s3["removed"], true);
    assert!(cli_err(&c, &["snapshot", "revert", "s3", "-v", "vol1"]).contains("removed"));

    // Revert to s1: the volume reads as s1 did when it was taken.
    cli_ok(&c, &["snapshot", "revert", "s1", "-v", "vol1"]);
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", s1_expected.display(), c.uri()));
    // Across an engine restart too.
    c.stop_engine();
    c.start_engine();
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", s1_expected.display(), c.uri()));
    let ls = snap_ls(&c);
    assert!(ls.as_array().expect("array").iter().any(|s| s["name"] == "s3"), "later snapshots stay listed: {ls}");
    let _ = now;
}

fn require_tools() {
    for t in ["nbdcopy", "qemu-img", "fio"] {
        assert!(have(t), "{t} is not installed (tests/run installs it)");
    }
}

/// A replica that hangs while it commits a rotation is waited for no longer than the
/// I/O timeout: the pause ends, the snapshot is taken on the others, and the hung
/// replica is dropped, as the I/O path would drop it.
#[test]
fn a_replica_hung_in_the_commit_is_dropped_within_the_io_timeout() {
    let mut c = Cluster::without_engine("vol1", 16 * MB, 2);
    c.add_replica_env("r2", &[("LONGHORN_STALL_AT".into(), "snapshot:synced".into())]);
    c.start_engine();
    let hung = c.replicas[2].addr.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (bin, run) = (bin(), c.run_dir());
    std::thread::spawn(move || {
        let o = std::process::Command::new(bin)
            .args(["snapshot", "create", "s1", "-v", "vol1", "--json"])
            .env("LONGHORN_RUN_DIR", run)
            .output();
        let _ = tx.send(o);
    });
    let o = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("snapshot create still waits on a hung replica after 30 s (the I/O timeout is 4 s)")
        .expect("run longhorn");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let pause = created["pause_us"].as_u64().expect("pause_us");
    eprintln!("snapshot with a hung replica paused I/O for {pause} us");
    assert!(pause < 6_000_000, "I/O was held for {pause} us");
    assert_eq!(created["replicas"], 2, "{created}");
    let ls: serde_json::Value = serde_json::from_str(&cli_ok(&c, &["replica", "ls", "-v", "vol1", "--json"])).expect("json");
    let r = ls.as_array().expect("array").iter().find(|r| r["address"] == hung.as_str()).cloned().expect("listed");
    assert_eq!(r["mode"], "ERR", "{r}");
    assert!(snap_ls(&c).as_array().expect("array").iter().any(|s| s["name"] == "s1"));
    sh(&format!("{NBDSH} -u '{}' -c 'h.pwrite(b\"x\" * 4096, 0); h.flush()'", c.uri()));
}
