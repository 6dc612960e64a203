//! A hostile (or broken) backupstore on a file:// target: names that are not what the
//! format allows, objects too big to be what they claim, a directory tree too deep to
//! be a store. Every command fails with a clear error naming the object, or skips it
//! with a warning when it only lists; none of them aborts the process.

mod backup_common;

use backup_common::*;
use longhorn_tests::*;
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;

const VDIR: &str = "backupstore/volumes/01/9c/vol1";
/// 64 bytes, but 'é' is two of them: slicing it at byte 2 is not a char boundary.
fn non_ascii_name() -> String {
    let n = format!("aé{}", "0".repeat(61));
    assert_eq!(n.len(), 64);
    n
}

/// vol1 (16 MiB) with two backups (full, then incremental) in a file:// store.
struct Base {
    c: Cluster,
    env: Env,
    store: PathBuf,
    b1: String,
    b2: String,
}

fn base() -> Base {
    let c = Cluster::new("vol1", 16 * MB, 1);
    let store = c.path("store");
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    env.ok(&c, &["backup", "target", &format!("file://{}", store.display())]);
    qemu_io(&c.uri(), &["write -P 1 0 2M", "write -P 2 4M 2M"]);
    let b1 = env.json(&c, &["backup", "create", "-v", "vol1"])["backup"].as_str().expect("name").to_string();
    qemu_io(&c.uri(), &["write -P 3 8M 2M"]);
    let b2 = env.json(&c, &["backup", "create", "-v", "vol1"])["backup"].as_str().expect("name").to_string();
    Base { c, env, store, b1, b2 }
}

impl Base {
    /// A copy of the store to spoil, and the `--target` arguments that name it.
    fn copy(&self, tag: &str) -> (PathBuf, String) {
        let dst = self.c.path(tag);
        sh(&format!("cp -a '{}' '{}'", self.store.display(), dst.display()));
        let url = format!("file://{}", dst.display());
        (dst, url)
    }

    fn run(&self, target: &str, args: &[&str]) -> Output {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--target", target]);
        self.env.cli(&self.c, &a, &[])
    }

    fn data(&self) -> String {
        self.c.path("restored").display().to_string()
    }
}

/// Asserts `o` is a failure the program reported itself (an exit code, no signal), and
/// returns its stderr.
fn failed(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.signal().is_none(), "{what}: killed by signal {:?} (a panic aborts): {err}", o.status.signal());
    assert!(!o.status.success(), "{what}: should have failed: {}", String::from_utf8_lossy(&o.stdout));
    err
}

fn succeeded(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.signal().is_none(), "{what}: killed by signal {:?} (a panic aborts): {err}", o.status.signal());
    assert!(o.status.success(), "{what}: failed: {err}");
    err
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).expect("read cfg")).expect("cfg is JSON");
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).expect("json")).expect("write cfg");
}

fn backup_cfg(store: &Path, b: &str) -> PathBuf {
    store.join(format!("{VDIR}/backups/backup_{b}.cfg"))
}

fn first_block(store: &Path, b: &str) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(backup_cfg(store, b)).expect("cfg")).expect("json");
    v["Blocks"][0]["BlockChecksum"].as_str().expect("a block").to_string()
}

fn blk(store: &Path, c: &str) -> PathBuf {
    store.join(format!("{VDIR}/blocks/{}/{}/{c}.blk", &c[0..2], &c[2..4]))
}

/// A Blocks entry of 64 bytes that are not 64 hex digits: restore refuses the cfg.
#[test]
fn a_cfg_naming_bad_blocks_is_refused() {
    let b = base();
    for (tag, bad) in [("nonascii", non_ascii_name()), ("slashes", format!("0{}", "/..".repeat(21)))] {
        let (store, url) = b.copy(tag);
        edit_json(&backup_cfg(&store, &b.b1), |v| v["Blocks"][0]["BlockChecksum"] = Value::String(bad.clone()));
        let o = b.run(&url, &["backup", "restore", &b.b1, "--to", tag, "--data-dir", &b.data(), "--replicas", "1"]);
        let err = failed(&o, "restore of a cfg with a bad block name");
        assert!(err.contains(&format!("backup_{}.cfg", b.b1)) && err.contains("hex"), "names the cfg and the rule: {err}");
        assert!(!Path::new(&b.data()).join(tag).exists(), "nothing restored");
        // Listing skips it with a warning; the other backup is still there.
        let o = b.run(&url, &["backup", "ls", "vol1", "--json"]);
        let err = succeeded(&o, "ls");
        let ls: Value = serde_json::from_slice(&o.stdout).expect("json");
        let names: Vec<&str> = ls.as_array().expect("array").iter().filter_map(|x| x["name"].as_str()).collect();
        assert_eq!(names, vec![b.b2.as_str()], "{ls}");
        assert!(err.contains("WARN") && err.contains(&b.b1), "a warning names the skipped backup: {err}");
    }
}

/// Listed .blk names that are not block names: a deletion leaves them alone, warning.
#[test]
fn odd_block_objects_are_left_alone() {
    let b = base();
    let (store, url) = b.copy("blocknames");
    let odd = [non_ascii_name(), "0".repeat(65), "A".repeat(64), "g".repeat(64)];
    let dir = store.join(format!("{VDIR}/blocks/aa/bb"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    for n in &odd {
        std::fs::write(dir.join(format!("{n}.blk")), b"x").expect("write");
    }
    let o = b.run(&url, &["backup", "rm", &b.b1, "-v", "vol1"]);
    let err = succeeded(&o, "rm with odd block names in the store");
    for n in &odd {
        assert!(dir.join(format!("{n}.blk")).exists(), "{n}.blk is not ours to delete");
        assert!(err.contains(n.as_str()), "a warning names {n}: {err}");
    }
}

/// Listed backup and volume names that break the name rule are skipped, warning.
#[test]
fn odd_listed_names_are_skipped() {
    let b = base();
    let (store, url) = b.copy("listnames");
    let bdir = store.join(format!("{VDIR}/backups"));
    for n in ["bé", "..x", "x y"] {
        std::fs::copy(backup_cfg(&store, &b.b2), bdir.join(format!("backup_{n}.cfg"))).expect("copy");
        edit_json(&bdir.join(format!("backup_{n}.cfg")), |v| v["Name"] = Value::String(n.into()));
    }
    let long = "v".repeat(230);
    let vdir = store.join(format!("backupstore/volumes/01/9c/{long}"));
    std::fs::create_dir_all(&vdir).expect("mkdir");
    std::fs::copy(store.join(format!("{VDIR}/volume.cfg")), vdir.join("volume.cfg")).expect("copy");
    let o = b.run(&url, &["backup", "ls", "--json"]);
    let err = succeeded(&o, "ls with odd names");
    let ls: Value = serde_json::from_slice(&o.stdout).expect("json");
    let mut names: Vec<&str> = ls.as_array().expect("array").iter().filter_map(|x| x["name"].as_str()).collect();
    names.sort();
    let mut want = vec![b.b1.as_str(), b.b2.as_str()];
    want.sort();
    assert_eq!(names, want, "{ls}");
    for n in ["bé", "..x", "x y", long.as_str()] {
        assert!(err.contains(n), "a warning names {n:?}: {err}");
    }
}

/// volume.cfg naming a last backup outside the store: refused naming volume.cfg.
#[test]
fn a_last_backup_name_outside_the_store_is_refused() {
    let b = base();
    let (store, url) = b.copy("lastname");
    edit_json(&store.join(format!("{VDIR}/volume.cfg")), |v| v["LastBackupName"] = Value::String("../../../../x".into()));
    let o = b.run(&url, &["backup", "volumes", "--json"]);
    let err = succeeded(&o, "volumes");
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).expect("json"), Value::Array(vec![]));
    assert!(err.contains("volume.cfg") && err.contains("../../../../x"), "{err}");
    // --latest follows LastBackupName, so it refuses rather than guessing.
    let o = b.run(&url, &["backup", "restore", "--latest", "-v", "vol1", "--to", "lastname", "--data-dir", &b.data(), "--replicas", "1"]);
    let err = failed(&o, "restore --latest");
    assert!(err.contains("volume.cfg") && err.contains("../../../../x"), "{err}");
}

/// A 4 GiB block object, restored under a 1.5 GiB address-space limit: refused before
/// it is read, not read until memory runs out.
#[test]
fn an_oversized_block_is_refused() {
    let b = base();
    let (store, url) = b.copy("bigblk");
    let c = first_block(&store, &b.b1);
    sh(&format!("truncate -s 4G '{}'", blk(&store, &c).display()));
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--as={}", 3u64 << 29)).arg(bin());
    cmd.args(["backup", "restore", &b.b1, "--to", "bigblk", "--data-dir", &b.data(), "--replicas", "1", "--target", &url]);
    let o = cmd.output().expect("prlimit");
    let err = failed(&o, "restore of a 4 GiB block");
    assert!(err.contains(&format!("{c}.blk")) && err.contains("larger than"), "names the block and the bound: {err}");
}

/// A backup cfg far bigger than the volume's block list can be (valid JSON, padded),
/// and a padded volume.cfg: refused, or skipped with a warning by a listing.
#[test]
fn oversized_cfgs_are_refused() {
    let b = base();
    let (store, url) = b.copy("bigcfg");
    let p = backup_cfg(&store, &b.b1);
    let mut raw = vec![b' '; 4 << 20];
    raw.extend_from_slice(&std::fs::read(&p).expect("cfg"));
    std::fs::write(&p, raw).expect("write");
    let o = b.run(&url, &["backup", "restore", &b.b1, "--to", "bigcfg", "--data-dir", &b.data(), "--replicas", "1"]);
    let err = failed(&o, "restore of a padded cfg");
    assert!(err.contains(&format!("backup_{}.cfg", b.b1)) && err.contains("larger than"), "{err}");

    let (store, url) = b.copy("bigvol");
    let p = store.join(format!("{VDIR}/volume.cfg"));
    let mut raw = vec![b' '; 2 << 20];
    raw.extend_from_slice(&std::fs::read(&p).expect("cfg"));
    std::fs::write(&p, raw).expect("write");
    let o = b.run(&url, &["backup", "volumes", "--json"]);
    let err = succeeded(&o, "volumes");
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).expect("json"), Value::Array(vec![]));
    assert!(err.contains("volume.cfg") && err.contains("larger than"), "{err}");
}

/// `levels` nested directories `name` under `top`, made relative to each other (the
/// whole path is too long for one system call).
fn deep_tree(top: &Path, levels: usize, name: &str) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let n = CString::new(name).expect("name");
    let t = CString::new(top.as_os_str().as_bytes()).expect("path");
    // SAFETY: plain syscalls on fds this function owns and closes.
    unsafe {
        let mut fd = libc::open(t.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
        assert!(fd >= 0, "open {}", top.display());
        for _ in 0..levels {
            assert_eq!(libc::mkdirat(fd, n.as_ptr(), 0o755), 0, "mkdirat");
            let next = libc::openat(fd, n.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
            assert!(next >= 0, "openat");
            libc::close(fd);
            fd = next;
        }
        let f = CString::new("x.blk").expect("name");
        let file = libc::openat(fd, f.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
        assert!(file >= 0, "create x.blk");
        libc::close(file);
        libc::close(fd);
    }
}

#[test]
fn a_deep_tree_under_blocks_is_not_walked() {
    let b = base();
    let (store, url) = b.copy("deep");
    // 100 levels of 50-character names: deeper than any path the kernel takes whole.
    let top = store.join(format!("{VDIR}/blocks/00"));
    std::fs::create_dir_all(&top).expect("mkdir");
    deep_tree(&top, 100, &"d".repeat(50));
    let o = b.run(&url, &["backup", "rm", &b.b1, "-v", "vol1"]);
    let err = succeeded(&o, "rm with a deep tree under blocks/");
    assert!(err.contains("WARN") && err.contains("deeper"), "the walk says what it skipped: {err}");
    assert!(top.join("d".repeat(50)).exists(), "the tree is left alone");
    // The blocks only b1 used are gone all the same, and b2 still restores.
    let o = b.run(&url, &["backup", "restore", &b.b2, "--to", "deep", "--data-dir", &b.data(), "--replicas", "1"]);
    succeeded(&o, "restore after rm");
}

#[test]
fn retention_survives_a_hostile_block_name() {
    let mut c = Cluster::without_engine("vol1", 16 * MB, 1);
    let settings = c.path("settings.json");
    let store = c.path("store");
    // Planted before the first backup: a .blk whose 64-byte name is not hex.
    let dir = store.join(format!("{VDIR}/blocks/aa/bb"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let planted = dir.join(format!("{}.blk", non_ascii_name()));
    std::fs::write(&planted, b"x").expect("write");
    std::fs::write(&settings, format!("{{\"backup-target\":\"file://{}\"}}", store.display())).expect("settings");
    c.engine_env = vec![("LONGHORN_SETTINGS".into(), settings.display().to_string())];
    let jobs = c.path("jobs.json").display().to_string();
    c.engine_extra = vec!["--jobs-file".into(), jobs, "--manual-clock".into(), "2026-01-01T00:00:30Z".into()];
    c.start_engine();
    let env = Env { settings, vars: vec![] };
    env.ok(&c, &["job", "add", r#"[{"name":"bk","task":"backup","cron":"*/1 * * * *","retain":1}]"#, "-v", "vol1"]);
    for round in 1..=2u8 {
        qemu_io(&c.uri(), &[format!("write -P {round} 0 2M").as_str()]);
        env.ok(&c, &["job", "clock", "--advance", "60", "-v", "vol1"]);
        let e = c.engine.as_mut().expect("engine");
        assert!(e.proc.alive(), "round {round}: the engine died under retention:\n{}", e.proc.log_text());
    }
    let ls = env.json(&c, &["job", "ls", "-v", "vol1"]);
    let res = ls[0]["last_result"].as_str().unwrap_or("").to_string();
    assert!(res.contains("created") && res.contains("removed"), "retention ran: {ls}");
    assert!(planted.exists(), "the planted object is not ours to delete");
    assert!(c.engine_log().contains(&non_ascii_name()), "a warning names it:\n{}", c.engine_log());
}
