//! The backup story, run against one backup target (file://, s3://, nfs://): back up
//! under fio load, restore and compare, incremental and dedup counts, the store layout,
//! deletion, a corrupted block, a backup killed halfway.

#![allow(dead_code)]

use longhorn_tests::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const ZERO_BLOCK: &str = "731859029215873fdac1c9f2f8bd25a334abf0f3a9e1b057cf2cacc2826d86b0";

/// How the test reaches the store's objects directly (to check the layout, corrupt a block).
pub trait Objects {
    fn list(&self, prefix: &str) -> Vec<String>;
    fn get(&self, path: &str) -> Option<Vec<u8>>;
    fn put(&self, path: &str, data: &[u8]);
}

pub struct Dir(pub PathBuf);

impl Objects for Dir {
    fn list(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(d: &Path, rel: &str, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(d) else { return };
            for e in rd.flatten() {
                let n = format!("{rel}{}", e.file_name().to_string_lossy());
                if e.path().is_dir() {
                    walk(&e.path(), &format!("{n}/"), out);
                } else {
                    out.push(n);
                }
            }
        }
        walk(&self.0.join(prefix), &format!("{}/", prefix.trim_end_matches('/')), &mut out);
        out
    }
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        std::fs::read(self.0.join(path)).ok()
    }
    fn put(&self, path: &str, data: &[u8]) {
        std::fs::write(self.0.join(path), data).expect("write object");
    }
}

pub struct Env {
    pub settings: PathBuf,
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn cli(&self, c: &Cluster, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args).env("LONGHORN_RUN_DIR", c.run_dir()).env("LONGHORN_SETTINGS", &self.settings);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("run longhorn")
    }

    pub fn ok(&self, c: &Cluster, args: &[&str]) -> String {
        let o = self.cli(c, args, &[]);
        assert!(o.status.success(), "longhorn {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    pub fn err(&self, c: &Cluster, args: &[&str]) -> String {
        let o = self.cli(c, args, &[]);
        assert!(!o.status.success(), "longhorn {args:?} should have failed: {}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    pub fn json(&self, c: &Cluster, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(c, &a)).expect("json output")
    }
}

/// Serves a restored volume directory (one replica) and returns its NBD URI.
pub fn serve(c: &Cluster, dir: &Path, vol: &str, size: u64) -> (Proc, Proc, String) {
    let tag = dir.file_name().and_then(|n| n.to_str()).unwrap_or("x").to_string();
    let (r, addr) = spawn(
        &["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", vol, "--size", &size.to_string(), "--listen", "127.0.0.1:0"],
        &c.path(&format!("{vol}-{tag}-replica.log")),
        "listening",
    )
    .expect("restored replica serves");
    let sock = c.path(&format!("{vol}.nbd"));
    let run = c.path(&format!("run-{vol}"));
    let (e, uri) = spawn(
        &[
            "engine", "serve", "--volume", vol, "--size", &size.to_string(), "--replica", &addr, "--nbd",
            &format!("unix:{}", sock.display()), "--run-dir", run.to_str().expect("utf8"),
        ],
        &c.path(&format!("{vol}-engine.log")),
        "ready",
    )
    .expect("restored engine serves");
    (r, e, uri)
}

pub fn qemu_io(uri: &str, cmds: &[&str]) {
    let c: Vec<String> = cmds.iter().map(|c| format!("-c '{c}'")).collect();
    sh(&format!("qemu-io -f raw {} '{uri}'", c.join(" ")));
}

fn blocks_of(cfg: &Value) -> Vec<(u64, String)> {
    cfg["Blocks"]
        .as_array()
        .map(|a| a.iter().map(|b| (b["Offset"].as_u64().expect("Offset"), b["BlockChecksum"].as_str().expect("checksum").to_string())).collect())
        .unwrap_or_default()
}

fn blk_files(o: &dyn Objects, vdir: &str) -> HashSet<String> {
    o.list(&format!("{vdir}/blocks/"))
        .into_iter()
        .filter_map(|p| p.rsplit('/').next().and_then(|n| n.strip_suffix(".blk")).map(|s| s.to_string()))
        .collect()
}

fn create(env: &Env, c: &Cluster, args: &[&str]) -> Value {
    let mut a = vec!["backup", "create", "-v", c.volume.as_str(), "--json"];
    a.extend_from_slice(args);
    let o = env.cli(c, &a, &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "backup create failed: {err}");
    assert!(err.contains("100%"), "progress is shown: {err}");
    serde_json::from_str(&String::from_utf8_lossy(&o.stdout)).expect("json")
}

fn restore_and_compare(env: &Env, c: &Cluster, backup: &str, newvol: &str, expected: &Path, size: u64) -> f64 {
    let data = c.path("data");
    let r = env.json(c, &["backup", "restore", backup, "--to", newvol, "--data-dir", data.to_str().expect("utf8"), "--replicas", "1"]);
    let ms = r["elapsed_ms"].as_u64().unwrap_or(1).max(1);
    let (_rp, _ep, uri) = serve(c, &data.join(newvol).join("replica-0"), newvol, size);
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{uri}'", expected.display()));
    size as f64 / (1 << 20) as f64 / (ms as f64 / 1000.0)
}

/// The whole story against `target` (already set in `env`); `o` reads the store.
pub fn story(c: &mut Cluster, env: &Env, o: &dyn Objects, label: &str) {
    for t in ["nbdcopy", "qemu-img", "qemu-io", "fio"] {
        assert!(have(t), "{t} is not installed (tests/run installs it)");
    }
    let size = c.size;
    let vol = c.volume.clone();
    let img = c.path("base.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    // Zeros written as data (a stored zero block), and two identical regions (one block).
    qemu_io(&c.uri(), &["write -P 0 50M 2M", "write -P 171 60M 2M", "write -P 171 70M 2M"]);

    // Empty store: nothing listed.
    assert_eq!(env.json(c, &["backup", "ls"]), Value::Array(vec![]));

    // Snapshot and back up under fio load (fio stays in the first 32 MiB).
    let uri = c.uri();
    let load = std::thread::spawn(move || {
        fio(&format!("--name=load --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=16 --size=32M --time_based --runtime=5"))
    });
    std::thread::sleep(Duration::from_millis(1000));
    env.ok(c, &["snapshot", "create", "s1", "-v", &vol]);
    let copy = c.path("s1-copy");
    std::fs::create_dir_all(&copy).expect("mkdir");
    let layers: Vec<PathBuf> = chain_to(&c.replicas[0].dir, "s1")
        .iter()
        .map(|f| {
            let dst = copy.join(f.file_name().expect("name"));
            sh(&format!("cp --sparse=always '{}' '{}'", f.display(), dst.display()));
            dst
        })
        .collect();
    let s1 = c.path("s1.raw");
    std::fs::write(&s1, read_layers(&layers, size)).expect("write s1");
    let b1 = create(env, c, &["--snapshot", "s1", "--label", "app=db"]);
    let (ok, errs, out) = load.join().expect("fio");
    assert!(ok && errs == 0, "fio under backup: {out}");
    let b1n = b1["backup"].as_str().expect("name").to_string();
    let full_ms = b1["elapsed_ms"].as_u64().unwrap_or(1).max(1);
    eprintln!("[{label}] full backup of {} MiB under fio: {} ms ({:.0} MiB/s), {} blocks uploaded",
        size >> 20, full_ms, (size >> 20) as f64 / (full_ms as f64 / 1000.0), b1["blocks_uploaded"]);
    assert_eq!(b1["incremental"], false);
    assert_eq!(b1["blocks_total"].as_u64(), Some(size / (2 << 20)), "{b1}");
    assert_eq!(b1["blocks_uploaded"].as_u64(), Some(size / (2 << 20) - 1), "two identical regions store one block: {b1}");

    // Layout (SPEC §3).
    let vdir = format!("backupstore/volumes/01/9c/{vol}");
    assert_eq!(vol, "vol1");
    let vcfg: Value = serde_json::from_slice(&o.get(&format!("{vdir}/volume.cfg")).expect("volume.cfg")).expect("volume.cfg is JSON");
    assert_eq!(vcfg["Name"], "vol1");
    assert_eq!(vcfg["Size"], size.to_string());
    assert_eq!(vcfg["BlockCount"], (size / (2 << 20) - 1).to_string());
    assert_eq!(vcfg["LastBackupName"], b1n.as_str());
    assert_eq!(vcfg["CompressionMethod"], "\"lz4\"", "double-encoded as Longhorn writes it");
    let bcfg: Value = serde_json::from_slice(&o.get(&format!("{vdir}/backups/backup_{b1n}.cfg")).expect("backup cfg")).expect("JSON");
    for k in ["Name", "VolumeName", "SnapshotName", "SnapshotCreatedAt", "CreatedTime", "Size", "Labels", "IsIncremental", "CompressionMethod", "Blocks"] {
        assert!(bcfg.get(k).is_some(), "backup cfg has {k}: {bcfg}");
    }
    assert_eq!(bcfg["SnapshotName"], "s1");
    assert_eq!(bcfg["Labels"]["app"], "db");
    assert!(!bcfg["CreatedTime"].as_str().unwrap_or("").is_empty());
    let blocks1 = blocks_of(&bcfg);
    assert_eq!(blocks1.len() as u64, size / (2 << 20));
    let at = |off: u64| blocks1.iter().find(|b| b.0 == off).map(|b| b.1.clone()).expect("block listed");
    assert_eq!(at(50 << 20), ZERO_BLOCK, "a 2 MiB zero block is named by the SPEC test vector");
    assert_eq!(at(60 << 20), at(70 << 20), "identical regions share a block");
    let files = blk_files(o, &vdir);
    assert!(files.contains(ZERO_BLOCK));
    assert!(o.list(&format!("{vdir}/blocks/")).iter().any(|p| p == &format!("{vdir}/blocks/73/18/{ZERO_BLOCK}.blk")));
    assert_eq!(files.len() as u64, size / (2 << 20) - 1);

    // ls and volumes.
    let ls = env.json(c, &["backup", "ls", &vol]);
    assert_eq!(ls.as_array().map(|a| a.len()), Some(1), "{ls}");
    assert_eq!(ls[0]["state"], "complete");
    let table = env.ok(c, &["backup", "volumes"]);
    for col in ["NAME", "CREATEDAT", "LASTBACKUPNAME", "LASTBACKUPAT", "LASTSYNCEDAT"] {
        assert!(table.contains(col), "{table}");
    }
    assert!(table.contains(&b1n));

    // Restore b1 and compare with the copy of s1 taken at backup time.
    let mbps = restore_and_compare(env, c, &b1n, "r1", &s1, size);
    eprintln!("[{label}] restore: {mbps:.0} MiB/s");

    // A baseline after fio, then a few MiB changed: only those blocks are read and uploaded.
    let b2 = create(env, c, &[]);
    assert_eq!(b2["incremental"], true, "{b2}");
    assert!(b2["blocks_total"].as_u64().unwrap_or(99) <= 16, "only the blocks fio touched: {b2}");
    qemu_io(&c.uri(), &["write -P 92 90M 4M"]);
    let b3 = create(env, c, &[]);
    eprintln!("[{label}] incremental after changing 4 MiB: {} blocks read, {} uploaded", b3["blocks_total"], b3["blocks_uploaded"]);
    assert_eq!(b3["incremental"], true);
    assert_eq!(b3["blocks_total"].as_u64(), Some(2), "{b3}");
    assert_eq!(b3["blocks_uploaded"].as_u64(), Some(1), "the two changed blocks are identical: {b3}");
    let b3n = b3["backup"].as_str().expect("name").to_string();
    let now = c.path("b3.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), now.display()));
    restore_and_compare(env, c, &b3n, "r3", &now, size);
    let b3cfg: Value = serde_json::from_slice(&o.get(&format!("{vdir}/backups/backup_{b3n}.cfg")).expect("cfg")).expect("json");
    assert_eq!(blocks_of(&b3cfg).len() as u64, size / (2 << 20), "an incremental backup lists every block");

    // Delete the first backup: what only it used goes, the others still restore.
    let b2n = b2["backup"].as_str().expect("name").to_string();
    let b2cfg: Value = serde_json::from_slice(&o.get(&format!("{vdir}/backups/backup_{b2n}.cfg")).expect("cfg")).expect("json");
    let keep: HashSet<String> = blocks_of(&b2cfg).into_iter().chain(blocks_of(&b3cfg)).map(|b| b.1).collect();
    let only1: Vec<String> = blocks1.iter().map(|b| b.1.clone()).filter(|c| !keep.contains(c)).collect();
    let rm = env.json(c, &["backup", "rm", &b1n]);
    assert_eq!(rm["blocks_removed"].as_u64(), Some(only1.len() as u64), "{rm}");
    let files = blk_files(o, &vdir);
    assert!(only1.iter().all(|c| !files.contains(c)), "blocks only the first backup used are gone");
    assert!(keep.iter().all(|c| files.contains(c)), "blocks the others use stay");
    assert!(o.get(&format!("{vdir}/backups/backup_{b1n}.cfg")).is_none());
    let t = env.target();
    let sep = if t.contains('?') { '&' } else { '?' };
    restore_and_compare(env, c, &format!("{t}{sep}backup={b3n}&volume={vol}"), "r3b", &now, size);

    // A corrupted block: the restore fails naming it, and no volume appears.
    let victim = blocks_of(&b3cfg).into_iter().map(|b| b.1).find(|c| c != ZERO_BLOCK).expect("a block");
    let path = format!("{vdir}/blocks/{}/{}/{victim}.blk", &victim[0..2], &victim[2..4]);
    let mut raw = o.get(&path).expect("block object");
    let n = raw.len();
    raw[n / 2] ^= 0x55;
    raw[n / 3] ^= 0x55;
    o.put(&path, &raw);
    let data = c.path("data");
    let err = env.err(c, &["backup", "restore", &b3n, "--to", "bad", "--data-dir", data.to_str().expect("utf8"), "--replicas", "1"]);
    assert!(err.contains(&victim), "the error names the block: {err}");
    assert!(!data.join("bad").exists() && !data.join(".bad.restoring").exists(), "nothing presented as restored");

    // A backup killed halfway: listed as incomplete, and the next backup works.
    qemu_io(&c.uri(), &["write -P 33 100M 8M"]);
    let o2 = env.cli(c, &["backup", "create", "-v", &vol], &[("LONGHORN_BACKUP_CRASH_AFTER_BLOCKS", "1")]);
    assert!(!o2.status.success(), "the engine died under the backup");
    let ls = env.json(c, &["backup", "ls", &vol]);
    let states: Vec<&str> = ls.as_array().expect("array").iter().filter_map(|b| b["state"].as_str()).collect();
    assert_eq!(states.iter().filter(|s| **s == "incomplete").count(), 1, "{ls}");
    assert_eq!(states.iter().filter(|s| **s == "complete").count(), 2, "{ls}");
    if let Some(mut e) = c.engine.take() {
        e.proc.kill9();
    }
    c.start_engine();
    o.put(&path, &{
        let mut r = raw.clone();
        r[n / 2] ^= 0x55;
        r[n / 3] ^= 0x55;
        r
    });
    let b4 = create(env, c, &[]);
    let b4n = b4["backup"].as_str().expect("name").to_string();
    let now4 = c.path("b4.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), now4.display()));
    restore_and_compare(env, c, &b4n, "r4", &now4, size);
}

impl Env {
    pub fn target(&self) -> String {
        let v: Value = serde_json::from_slice(&std::fs::read(&self.settings).expect("settings")).expect("json");
        v["backup-target"].as_str().expect("target").to_string()
    }
}

/// A block object bigger than any stored block can be (3 MiB for a 2 MiB block): a
/// restore refuses it, naming it, whatever the target. Takes a backup of `c` first.
pub fn oversized_block_is_refused(c: &Cluster, env: &Env, o: &dyn Objects) {
    let vol = c.volume.as_str();
    qemu_io(&c.uri(), &["write -P 9 0 2M"]);
    let b = env.json(c, &["backup", "create", "-v", vol]);
    let name = b["backup"].as_str().expect("name").to_string();
    let h = sh(&format!("printf %s '{vol}' | sha512sum")).chars().take(4).collect::<String>();
    let vdir = format!("backupstore/volumes/{}/{}/{vol}", &h[0..2], &h[2..4]);
    let cfg: Value = serde_json::from_slice(&o.get(&format!("{vdir}/backups/backup_{name}.cfg")).expect("cfg")).expect("json");
    let (_, blk) = blocks_of(&cfg).into_iter().next().expect("a block");
    let path = format!("{vdir}/blocks/{}/{}/{blk}.blk", &blk[0..2], &blk[2..4]);
    o.put(&path, &vec![0x5a; 3 << 20]);
    let data = c.path("data-oversized");
    let err = env.err(c, &["backup", "restore", &name, "--to", "big", "--data-dir", data.to_str().expect("utf8"), "--replicas", "1"]);
    assert!(err.contains(&format!("{blk}.blk")) && err.contains("larger than"), "names the block and the bound: {err}");
}
