//! Online rebuild under fio verify: a replica dies, a new one is added and rebuilt
//! while writes go on, then the dead one comes back with its old directory and is
//! rebuilt incrementally. Every replica's chain must end up identical, layer by layer.

use longhorn_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn chain(dir: &Path) -> Vec<PathBuf> {
    let vm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("volume.meta")).expect("volume.meta")).expect("json");
    assert_eq!(vm["Rebuilding"], false, "{} is still rebuilding", dir.display());
    let mut v = Vec::new();
    let mut cur = vm["Head"].as_str().expect("Head").to_string();
    while !cur.is_empty() {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{cur}.meta"))).expect("meta")).expect("json");
        v.push(dir.join(&cur));
        cur = m["Parent"].as_str().unwrap_or("").to_string();
    }
    v
}

#[test]
fn rebuild_under_fio_then_incremental_return() {
    rebuild_story(Cluster::new("vol1", 256 * MB, 3));
}

/// The same over unix sockets; the returning replica comes back on the same path (its
/// dead socket file replaced).
#[test]
fn rebuild_under_fio_then_incremental_return_over_unix_sockets() {
    let c = Cluster::new_unix("vol1", 256 * MB, 3);
    assert!(c.replicas.iter().all(|r| r.addr.starts_with("unix:")), "replicas on unix sockets");
    rebuild_story(c);
}

fn rebuild_story(mut c: Cluster) {
    assert!(have("fio") && have("nbdcopy"), "fio and nbdcopy are needed (tests/run installs them)");
    let size = c.size;
    let img = c.path("base.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    let o = c.cli(&["snapshot", "create", "base", "-v", "vol1"]);
    assert!(o.status.success());

    // fio verify (unaligned sizes too) while replica 1 dies and a new one is rebuilt.
    let uri = c.uri();
    let fio_run = std::thread::spawn(move || {
        fio(&format!(
            "--name=verify --ioengine=nbd --uri='{uri}' --rw=randwrite --bsrange=512-64k --iodepth=16 \
             --numjobs=2 --size=64M --offset_increment=64M --verify=crc32c --verify_fatal=1 --do_verify=1"
        ))
    });
    std::thread::sleep(Duration::from_millis(800));
    c.replicas[1].proc.kill9();
    let fresh = c.add_replica("r3");
    let fresh_addr = c.replicas[fresh].addr.clone();
    let r = c.add_and_wait(&fresh_addr);
    assert_eq!(r["mode"], "RW", "{r}");
    let (ok, errs, out) = fio_run.join().expect("fio");
    assert!(ok && errs == 0, "fio saw errors during the rebuild:\n{out}\nengine log:\n{}", c.engine_log());
    let p = &r["progress"];
    eprintln!(
        "full rebuild: {} bytes of chain data in {} ms ({:.0} MB/s), {} bytes sent",
        p["bytes_total"],
        p["elapsed_ms"],
        p["bytes_total"].as_f64().unwrap_or(0.0) / 1e3 / p["elapsed_ms"].as_f64().unwrap_or(1.0).max(1.0),
        p["bytes_sent"]
    );

    // The dead replica comes back with its old directory: only what changed is sent.
    let before = c.replicas[1].addr.clone();
    c.restart_replica(1);
    let back = c.replicas[1].addr.clone();
    if c.unix {
        assert_eq!(back, before, "a replica on a unix socket comes back on its path");
    }
    let r = c.add_and_wait(&back);
    assert_eq!(r["mode"], "RW", "{r}");
    let p = &r["progress"];
    let (total, sent) = (p["bytes_total"].as_u64().unwrap_or(0), p["bytes_sent"].as_u64().unwrap_or(u64::MAX));
    eprintln!("incremental rebuild: {sent} of {total} bytes sent");
    assert!(total >= size, "the chain holds the base snapshot: {p}");
    assert!(sent < total / 2, "a returning replica should get only what changed: {p}");

    // After a clean stop every replica holds the same chain, file by file.
    c.stop_engine();
    let live: Vec<usize> = vec![0, 1, 2, fresh];
    let chains: Vec<Vec<PathBuf>> = live.iter().map(|&i| chain(&c.replicas[i].dir)).collect();
    let names = |ch: &Vec<PathBuf>| -> Vec<String> {
        ch.iter().map(|p| p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string()).collect()
    };
    for k in 1..chains.len() {
        let (a, b) = (names(&chains[0]), names(&chains[k]));
        // Heads may differ in number; snapshots must match by name.
        assert_eq!(a[1..], b[1..], "replica {} has another chain", live[k]);
        for (x, y) in chains[0].iter().zip(&chains[k]) {
            sh(&format!("cmp '{}' '{}'", x.display(), y.display()));
        }
    }
}

/// Runs a Python snippet with libnbd connected to `uri` as `h`; returns what it printed.
fn nbd_py(uri: &str, body: &str) -> String {
    let script = format!("import nbd, errno\nh = nbd.NBD()\nh.connect_uri({uri:?})\n{body}\n");
    let (_, out) = sh_try(&format!("{NBDSH} -c {}", shell_quote(&script)));
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The only RW replica fails while the only other one is still being rebuilt (WO). The
/// WO replica's data is incomplete and never trusted after a restart, so a write or a
/// FLUSH it alone acknowledges would be lost: both must fail with EIO.
#[test]
fn no_write_is_acknowledged_by_a_rebuilding_replica_alone() {
    let mut c = Cluster::without_engine("vol1", 64 * MB, 0);
    // The source's rebuild reads stall, so the new replica stays WO for as long as needed.
    c.add_replica_env("r0", &[("LONGHORN_STALL_AT".into(), "rebuild:file-read".into())]);
    c.start_engine();
    let out = nbd_py(&c.uri(), "h.pwrite(b'\\x11' * 1048576, 0)\nh.flush()\nprint('SETUP-OK')");
    assert!(out.contains("SETUP-OK"), "{out}");
    let fresh = c.add_replica("r1");
    let fresh_addr = c.replicas[fresh].addr.clone();
    let o = c.cli(&["replica", "add", &fresh_addr, "-v", "vol1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = c.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    assert!(v.as_array().expect("array").iter().any(|r| r["address"] == fresh_addr && r["mode"] == "WO"), "{v}");

    // The RW replica hangs: the engine drops it after the I/O timeout (4 s here).
    let pid = c.replicas[0].proc.pid();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let out = nbd_py(
        &c.uri(),
        "for what, f in (('WRITE', lambda: h.pwrite(b'\\x22' * 4096, 0)), ('FLUSH', h.flush)):\n    try:\n        f()\n        print(what, 'ACKED')\n    except nbd.Error as e:\n        print(what, 'ERRNO', e.errnum)",
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let eio = libc::EIO;
    assert!(out.contains(&format!("WRITE ERRNO {eio}")), "a write acknowledged by a rebuilding replica alone:\n{out}\nengine log:\n{}", c.engine_log());
    assert!(out.contains(&format!("FLUSH ERRNO {eio}")), "a FLUSH acknowledged by a rebuilding replica alone:\n{out}");
    let info = c.cli(&["volume", "info", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["state"], "faulted", "{v}");
}
