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

/// Directory-changing system calls of a strace log (`strace -f -y`), in the order they
/// completed, with lexically normalised paths: (call, path). A sync names the
/// directory it synced; a rename, the new name.
fn dir_events(log: &str) -> Vec<(String, String)> {
    fn norm(p: &str) -> String {
        let mut out: Vec<&str> = Vec::new();
        for c in p.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        format!("/{}", out.join("/"))
    }
    fn quoted(s: &str) -> Vec<&str> {
        s.split('"').skip(1).step_by(2).collect()
    }
    let mut pending: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in log.lines() {
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        let full = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid, head.to_string());
            continue;
        } else if rest.starts_with("<... ") {
            let tail = rest.split_once("resumed>").map(|x| x.1).unwrap_or("");
            format!("{}{tail}", pending.remove(pid).unwrap_or_default())
        } else {
            rest.to_string()
        };
        if !full.trim_end().ends_with("= 0") {
            continue;
        }
        let call = full.split('(').next().unwrap_or("").to_string();
        let q = quoted(&full);
        let path = match call.as_str() {
            "mkdir" | "mkdirat" | "unlink" | "unlinkat" => q.first().map(|p| norm(p)),
            "rename" | "renameat" | "renameat2" => q.get(1).map(|p| norm(p)),
            "fsync" | "fdatasync" => full.split_once('<').and_then(|(_, r)| r.split_once('>')).map(|(p, _)| norm(p)),
            _ => None,
        };
        if let Some(p) = path {
            let call = match call.as_str() {
                "fsync" | "fdatasync" => "sync",
                c => c.trim_end_matches("at").trim_end_matches("at2"),
            };
            out.push((call.to_string(), p));
        }
    }
    out
}

/// Runs `longhorn ARGS` under strace; its directory events.
fn traced(env: &Env, c: &Cluster, tag: &str, args: &[&str]) -> Vec<(String, String)> {
    let log = c.path(&format!("strace-{tag}.log"));
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-y", "-e", "trace=mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,fsync,fdatasync", "-o"]).arg(&log).arg(bin());
    cmd.args(args).env("LONGHORN_SETTINGS", &env.settings).env("LONGHORN_RUN_DIR", c.run_dir());
    let o = cmd.output().expect("strace");
    assert!(o.status.success(), "longhorn {args:?} under strace: {}", String::from_utf8_lossy(&o.stderr));
    dir_events(&std::fs::read_to_string(&log).expect("strace log"))
}

/// Every new directory entry under `roots` (a made directory, a renamed-in object, a
/// removed .cfg) is followed by a sync of the directory that holds it.
fn assert_entries_synced(ev: &[(String, String)], roots: &[String], what: &str) {
    let mut checked = 0;
    for (i, (call, p)) in ev.iter().enumerate() {
        let needs = match call.as_str() {
            "mkdir" | "rename" => true,
            "unlink" => p.ends_with(".cfg"),
            _ => false,
        };
        if !needs || !roots.iter().any(|r| p.starts_with(r.as_str())) {
            continue;
        }
        let parent = p.rsplit_once('/').map(|x| x.0).unwrap_or("/");
        assert!(
            ev[i + 1..].iter().any(|(c, q)| c == "sync" && q == parent),
            "{what}: {call} {p} is not followed by a sync of {parent}; events:\n{ev:#?}"
        );
        checked += 1;
    }
    assert!(checked > 0, "{what}: nothing checked; events:\n{ev:#?}");
}

/// A crash right after a command returns keeps what it reported done: the file target
/// syncs the directory of every object it renames in and of every directory it makes,
/// and restore syncs the directories it makes and renames.
#[test]
fn file_target_and_restore_sync_their_directories() {
    if !have("strace") {
        eprintln!("SKIPPED: strace is not installed (apt-get install strace)");
        return;
    }
    let c = Cluster::new("vol6", 8 * MB, 1);
    let store = c.path("store");
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    env.ok(&c, &["backup", "target", &format!("file://{}", store.display())]);
    qemu_io(&c.uri(), &["write -P 1 0 2M"]);
    let b1 = env.json(&c, &["backup", "create", "-v", "vol6"])["backup"].as_str().expect("name").to_string();
    qemu_io(&c.uri(), &["write -P 2 2M 2M"]);
    let b2 = env.json(&c, &["backup", "create", "-v", "vol6"])["backup"].as_str().expect("name").to_string();
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).expect("canonical").display().to_string();
    let store_c = canon(&store);
    // A data dir that does not exist yet, two levels down.
    let data = c.path("restore-root/data");
    let ev = traced(&env, &c, "restore", &["backup", "restore", &b1, "--to", "r1", "--data-dir", data.to_str().expect("utf8"), "--replicas", "2"]);
    let root_c = canon(&c.path("restore-root"));
    assert_entries_synced(&ev, &[root_c.clone(), store_c.clone()], "restore");
    assert!(ev.iter().any(|(call, p)| call == "rename" && p == &format!("{root_c}/data/r1")), "restore renames into place: {ev:#?}");
    let ev = traced(&env, &c, "rm", &["backup", "rm", &b2, "-v", "vol6"]);
    assert_entries_synced(&ev, &[store_c.clone()], "rm");
    assert!(ev.iter().any(|(call, p)| call == "rename" && p.ends_with("/volume.cfg")), "rm rewrites volume.cfg: {ev:#?}");
}

/// Two engines serving volumes of one name back up to one store at the same time, as
/// two nodes (or a node and a job elsewhere) may: both backups complete, and
/// volume.cfg loses neither's update (BlockCount adds up, LastBackupName is one of
/// them).
#[test]
fn two_engines_back_up_one_volume_at_once() {
    let a = Cluster::new("vol7", 8 * MB, 1);
    let b = Cluster::new("vol7", 8 * MB, 1);
    let store = a.path("store");
    let envs: Vec<Env> = [&a, &b].iter().map(|c| Env { settings: c.path("settings.json"), vars: vec![] }).collect();
    for (c, env) in [&a, &b].iter().zip(&envs) {
        env.ok(c, &["backup", "target", &format!("file://{}", store.display())]);
    }
    let vcfg = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(store.join("backupstore/volumes/6f/1e/vol7/volume.cfg")).expect("volume.cfg")).expect("json")
    };
    let mut uploaded = 0;
    let mut all = Vec::new();
    for round in 0..6u8 {
        qemu_io(&a.uri(), &[format!("write -P {} 0 4M", 2 * round + 1).as_str()]);
        qemu_io(&b.uri(), &[format!("write -P {} 0 4M", 2 * round + 2).as_str()]);
        let done: Vec<serde_json::Value> = std::thread::scope(|sc| {
            let h: Vec<_> = [&a, &b].into_iter().zip(&envs).map(|(c, env)| sc.spawn(move || env.json(c, &["backup", "create", "-v", "vol7"]))).collect();
            h.into_iter().map(|h| h.join().expect("backup thread")).collect()
        });
        let names: Vec<&str> = done.iter().map(|d| d["backup"].as_str().expect("name")).collect();
        uploaded += done.iter().map(|d| d["blocks_uploaded"].as_u64().expect("uploaded")).sum::<u64>();
        all.extend(names.iter().map(|n| n.to_string()));
        let v = vcfg();
        assert_eq!(v["BlockCount"], uploaded.to_string(), "round {round}: BlockCount counts both backups' blocks: {v}");
        assert!(names.contains(&v["LastBackupName"].as_str().unwrap_or("")), "round {round}: LastBackupName is one of {names:?}: {v}");
    }
    let ls = envs[0].json(&a, &["backup", "ls", "vol7"]);
    let complete: Vec<&str> = ls.as_array().expect("array").iter().filter(|x| x["state"] == "complete").filter_map(|x| x["name"].as_str()).collect();
    assert!(all.iter().all(|n| complete.contains(&n.as_str())), "every backup is complete: {ls}");
    assert!(std::fs::read_dir(store.join("backupstore/volumes/6f/1e/vol7/locks")).map(|d| d.count()).unwrap_or(0) == 0, "no lock left behind");
}

/// An engine takes one backup at a time: of two requests at once, one starts and the
/// other is refused, whatever the timing.
#[test]
fn one_backup_at_a_time_in_an_engine() {
    let c = Cluster::new("vol8", 8 * MB, 1);
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    env.ok(&c, &["backup", "target", &format!("file://{}", c.path("store").display())]);
    for round in 0..5u8 {
        qemu_io(&c.uri(), &[format!("write -P {} 0 4M", round + 1).as_str()]);
        let outs: Vec<std::process::Output> = std::thread::scope(|sc| {
            let h: Vec<_> = (0..2).map(|_| sc.spawn(|| env.cli(&c, &["backup", "create", "-v", "vol8", "--no-wait", "--json"], &[]))).collect();
            h.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let started: Vec<&std::process::Output> = outs.iter().filter(|o| o.status.success()).collect();
        assert_eq!(started.len(), 1, "round {round}: exactly one starts: {:?}", outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).to_string()).collect::<Vec<_>>());
        let refused = outs.iter().find(|o| !o.status.success()).expect("one refused");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("already running"), "{}", String::from_utf8_lossy(&refused.stderr));
        let name = serde_json::from_slice::<serde_json::Value>(&started[0].stdout).expect("json")["backup"].as_str().expect("name").to_string();
        let t = std::time::Instant::now();
        while env.json(&c, &["backup", "status", "-v", "vol8", &name])[0]["state"] == "in-progress" {
            assert!(t.elapsed() < std::time::Duration::from_secs(60), "backup {name} did not finish");
        }
    }
}
