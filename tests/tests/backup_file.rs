//! Backups to a file:// target: the whole story (see backup_common), plus bad input.

mod backup_common;

use backup_common::*;
use longhorn_tests::*;

#[test]
fn backup_story_on_file_target() {
    let mut c = Cluster::new("vol1", 128 * MB, 2);
    let store = c.path("store");
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    // Longhorn's vfs:// spelling is accepted too.
    env.ok(&c, &["backup", "target", &format!("vfs://{}", store.display())]);
    assert_eq!(env.ok(&c, &["backup", "target"]).trim(), format!("vfs://{}", store.display()));
    env.ok(&c, &["backup", "target", &format!("file://{}", store.display())]);
    story(&mut c, &env, &Dir(store), "file");
}

#[test]
fn backup_bad_input() {
    let c = Cluster::new("vol2", 64 * MB, 1);
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    assert!(env.err(&c, &["backup", "ls"]).contains("no backup target is set"));
    assert!(env.err(&c, &["backup", "target", "ftp://x/y"]).contains("unsupported scheme"));
    assert!(env.err(&c, &["backup", "target", "file://relative"]).contains("absolute"));
    // A target that cannot be written: the backup fails saying where, no snapshot is left behind.
    env.ok(&c, &["backup", "target", "file:///proc/no-such-dir"]);
    let before = env.ok(&c, &["snapshot", "ls", "-v", "vol2"]);
    let e = env.err(&c, &["backup", "create", "-v", "vol2"]);
    assert!(e.contains("/proc/no-such-dir") || e.contains("backupstore"), "{e}");
    assert_eq!(env.ok(&c, &["snapshot", "ls", "-v", "vol2"]), before);
    env.ok(&c, &["backup", "target", &format!("file://{}", c.path("store").display())]);
    assert!(env.err(&c, &["backup", "create", "-v", "vol2", "--snapshot", "nope"]).contains("no snapshot"));
    assert!(env.err(&c, &["backup", "create", "-v", "vol2", "--compression", "zstd"]).contains("compression"));
    assert!(env.err(&c, &["backup", "restore", "backup-0000", "--to", "x", "--data-dir", c.path("d").to_str().expect("utf8")]).contains("no backup named"));
    assert!(env.err(&c, &["backup", "restore", "--latest", "-v", "vol2", "--to", "x", "--data-dir", c.path("d").to_str().expect("utf8")]).contains("no complete backup"));
    assert!(env.err(&c, &["backup", "rm", "backup-0000", "-v", "vol2"]).contains("no backup"));
    // gzip selectable, and a restore into an existing volume is refused.
    let out = env.ok(&c, &["backup", "create", "-v", "vol2", "--compression", "gzip"]);
    assert!(out.contains("full backup"), "{out}");
    let d = c.path("d");
    std::fs::create_dir_all(d.join("taken")).expect("mkdir");
    let e = env.err(&c, &["backup", "restore", "--latest", "-v", "vol2", "--to", "taken", "--data-dir", d.to_str().expect("utf8")]);
    assert!(e.contains("already there"), "{e}");

    // A new volume from a backup, in one command; a restored volume's data matches.
    qemu_io(&c.uri(), &["write -P 7 4M 2M"]);
    let b = env.json(&c, &["backup", "create", "-v", "vol2"]);
    let url = b["url"].as_str().expect("url").to_string();
    let now = c.path("vol2.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), now.display()));
    std::env::set_var("LONGHORN_SETTINGS", &env.settings);
    let run = c.path("run-up");
    let (mut up, _) = spawn(
        &["up", "fromb", "--size", "64M", "--replicas", "2", "--from-backup", &url, "--data-dir", d.to_str().expect("utf8"),
          "--frontend", "none", "--nbd", &format!("unix:{}", c.path("fromb.nbd").display()), "--run-dir", run.to_str().expect("utf8")],
        &c.path("up.log"),
        "  NBD:",
    )
    .expect("up --from-backup serves the restored volume");
    sh(&format!("qemu-img compare -f raw -F raw '{}' 'nbd+unix:///?socket={}'", now.display(), c.path("fromb.nbd").display()));
    assert!(d.join("fromb/replica-1/volume.meta").exists());
    assert!(up.term(), "up stops cleanly");
}

/// Starts a backup and waits for it by polling (no 250 ms steps), so several fit in one
/// second; returns its name.
fn quick_backup(env: &Env, c: &Cluster) -> String {
    let p = env.json(c, &["backup", "create", "-v", &c.volume, "--no-wait"]);
    let name = p["backup"].as_str().expect("name").to_string();
    let t = std::time::Instant::now();
    loop {
        let s = env.json(c, &["backup", "status", "-v", &c.volume, &name]);
        match s[0]["state"].as_str() {
            Some("complete") => return name,
            Some("in-progress") if t.elapsed() < std::time::Duration::from_secs(60) => {}
            _ => panic!("backup {name}: {s}"),
        }
    }
}

/// The first byte of what `backup restore --latest` gives.
fn latest_byte(env: &Env, c: &Cluster, to: &str) -> u8 {
    let data = c.path("latest");
    env.ok(c, &["backup", "restore", "--latest", "-v", &c.volume, "--to", to, "--data-dir", data.to_str().expect("utf8"), "--replicas", "1"]);
    read_layers(&head_chain(&data.join(to).join("replica-0")), 4096)[0]
}

/// Backups taken back to back share their second-resolution times; the latest is still
/// the last one taken (volume.cfg's LastBackupName), and deleting it makes the one
/// before it the latest.
#[test]
fn latest_backup_within_one_second() {
    let c = Cluster::new("vol5", 8 * MB, 1);
    let store = c.path("store");
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    env.ok(&c, &["backup", "target", &format!("file://{}", store.display())]);
    let vcfg = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(store.join("backupstore/volumes/88/8a/vol5/volume.cfg")).expect("volume.cfg")).expect("json")
    };
    let mut ties = 0;
    for round in 0..8u8 {
        let mut names = Vec::new();
        for k in 1..=3u8 {
            qemu_io(&c.uri(), &[format!("write -P {} 0 2M", round * 3 + k).as_str()]);
            names.push(quick_backup(&env, &c));
            assert_eq!(vcfg()["LastBackupName"], names[names.len() - 1].as_str(), "round {round}");
        }
        let ls = env.json(&c, &["backup", "ls", "vol5"]);
        let created: Vec<&str> = names
            .iter()
            .map(|n| ls.as_array().expect("array").iter().find(|b| b["name"] == n.as_str()).and_then(|b| b["created"].as_str()).expect("listed"))
            .collect();
        if created[1] == created[2] {
            ties += 1;
        }
        let listed: Vec<&str> = ls.as_array().expect("array").iter().filter_map(|b| b["name"].as_str()).collect();
        assert_eq!(&listed[listed.len() - 3..], &[names[0].as_str(), names[1].as_str(), names[2].as_str()], "ls lists in the order taken");
        assert_eq!(latest_byte(&env, &c, &format!("r{round}a")), round * 3 + 3, "round {round}: --latest is the last backup taken ({created:?})");
        env.ok(&c, &["backup", "rm", &names[2], "-v", "vol5"]);
        assert_eq!(vcfg()["LastBackupName"], names[1].as_str(), "round {round}: the one before the deleted latest is the latest ({created:?})");
        assert_eq!(latest_byte(&env, &c, &format!("r{round}b")), round * 3 + 2, "round {round}");
    }
    eprintln!("{ties} of 8 rounds had their last two backups in the same second");
}
