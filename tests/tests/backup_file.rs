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
