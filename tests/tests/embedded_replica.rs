//! A replica served in the engine's own process (`engine serve --embed-replica`),
//! reached by function call instead of TCP: the same data, the same rules. Checked
//! with real clients (fio verify, nbdcopy, qemu-img) against replicas in processes of
//! their own, through a replica failure, an online rebuild in both directions, a
//! snapshot, a clean stop and a second engine that must be refused.

use longhorn_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A loopback address nothing listens on now, for the embedded replica.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// `c` with its engine serving `dir` itself (as its first replica) on `addr`.
fn embed(c: &mut Cluster, dir: &Path, addr: &str) {
    c.engine_extra = vec!["--embed-replica".into(), dir.display().to_string(), "--embed-listen".into(), addr.into()];
    c.start_engine();
}

fn head_of(dir: &Path) -> PathBuf {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("volume.meta")).expect("volume.meta")).expect("json");
    dir.join(v["Head"].as_str().expect("Head"))
}

fn meta(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("volume.meta")).expect("volume.meta")).expect("json")
}

fn modes(c: &Cluster) -> Vec<(String, String)> {
    let ls = c.cli(&["replica", "ls", "-v", &c.volume, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("replica ls json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| (r["address"].as_str().unwrap_or("").to_string(), r["mode"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn fio_verify(uri: &str, extra: &str) {
    let (ok, errs, out) = fio(&format!(
        "--name=verify --ioengine=nbd --uri='{uri}' --rw=randwrite --bsrange=512-64k --iodepth=32 \
         --numjobs=2 --size=32M --offset_increment=32M --verify=crc32c --verify_fatal=1 --do_verify=1 {extra}"
    ));
    assert!(ok && errs == 0, "fio verify failed:\n{out}");
}

/// Alone, and beside two replicas of their own: fio verify (with FUA writes and
/// flushes), the bytes nbdcopy wrote read back, and after a clean stop every head
/// holds the same bytes and the embedded one is recorded clean.
#[test]
fn embedded_replica_holds_what_the_others_hold() {
    assert!(have("fio") && have("nbdcopy") && have("qemu-img"), "fio, nbdcopy and qemu-img are needed (tests/run installs them)");
    let size = 128 * MB;
    let mut c = Cluster::without_engine("vol1", size, 2);
    let e0 = c.path("e0");
    embed(&mut c, &e0, &free_addr());
    assert_eq!(modes(&c).iter().filter(|(_, m)| m == "RW").count(), 3, "{:?}", modes(&c));
    fio_verify(&c.uri(), "--fsync=7");
    // Snapshots while fio writes: every replica, the embedded one too, rotates its head
    // in the same I/O pause.
    let uri = c.uri();
    let w = std::thread::spawn(move || {
        fio(&format!(
            "--name=s --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=16 --size=64M --verify=crc32c \
             --verify_fatal=1 --do_verify=1 --rate_iops=5000"
        ))
    });
    for s in ["s1", "s2", "s3"] {
        std::thread::sleep(Duration::from_millis(500));
        let o = c.cli(&["snapshot", "create", s, "-v", "vol1"]);
        assert!(o.status.success(), "snapshot {s} under fio: {o:?}\n{}", c.engine_log());
    }
    let (ok, errs, out) = w.join().expect("fio");
    assert!(ok && errs == 0, "fio verify across the snapshots: {out}");
    let img = c.path("image.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", img.display(), c.uri()));
    c.stop_engine();
    assert_eq!(meta(&e0)["Dirty"], false, "a clean stop records the embedded replica clean: {}", meta(&e0));
    for i in 0..2 {
        sh(&format!("cmp '{}' '{}'", head_of(&e0).display(), c.head_file(i).display()));
        for s in ["s1", "s2", "s3"] {
            let f = format!("volume-snap-{s}.img");
            sh(&format!("cmp '{}' '{}'", e0.join(&f).display(), c.replicas[i].dir.join(&f).display()));
        }
    }

    // One replica, the embedded one alone: fio verify again; then the directory serves
    // as any replica's does, in a process of its own, and holds the same bytes.
    let mut solo = Cluster::without_engine("vol1", size, 0);
    let s0 = solo.path("s0");
    embed(&mut solo, &s0, &free_addr());
    fio_verify(&solo.uri(), "--fsync=3");
    sh(&format!("nbdcopy '{}' '{}'", img.display(), solo.uri()));
    let written = solo.path("written.raw");
    sh(&format!("nbdcopy '{}' '{}'", solo.uri(), written.display()));
    solo.stop_engine();
    let (proc, addr) = serve_replica(&s0, "vol1", size, &solo.path("s0-own.log"), &[solo.secret_env()]);
    solo.replicas.push(Replica { proc, addr, dir: s0.clone() });
    solo.engine_extra.clear();
    solo.start_engine();
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", written.display(), solo.uri()));
}

/// A replica of its own dies under fio and is rebuilt from the embedded one; then the
/// embedded one, left behind while the engine ran without it, is rebuilt from the
/// others. Every chain ends up the same, snapshot included.
#[test]
fn rebuilds_to_and_from_the_embedded_replica() {
    assert!(have("fio") && have("nbdcopy"), "fio and nbdcopy are needed (tests/run installs them)");
    let size = 128 * MB;
    let mut c = Cluster::without_engine("vol1", size, 1);
    let e0 = c.path("e0");
    let eaddr = free_addr();
    embed(&mut c, &e0, &eaddr);
    let img = c.path("base.raw");
    random_file(&img, size);
    sh(&format!("nbdcopy '{}' '{}'", img.display(), c.uri()));
    let o = c.cli(&["snapshot", "create", "base", "-v", "vol1"]);
    assert!(o.status.success(), "snapshot: {o:?}");
    assert!(std::fs::read_dir(&e0).expect("e0").any(|f| f.is_ok_and(|f| f.file_name() == "volume-snap-base.img")));

    let uri = c.uri();
    let fio_run = std::thread::spawn(move || {
        fio(&format!(
            "--name=verify --ioengine=nbd --uri='{uri}' --rw=randwrite --bsrange=512-64k --iodepth=16 \
             --numjobs=2 --size=32M --offset_increment=32M --verify=crc32c --verify_fatal=1 --do_verify=1 --rate_iops=3000"
        ))
    });
    std::thread::sleep(Duration::from_millis(1000));
    c.replicas[0].proc.kill9();
    let r1 = c.add_replica("r1");
    let r1_addr = c.replicas[r1].addr.clone();
    let r = c.add_and_wait(&r1_addr);
    assert_eq!(r["mode"], "RW", "{r}");
    let (ok, errs, out) = fio_run.join().expect("fio");
    assert!(ok && errs == 0, "fio saw errors while a replica died and another was rebuilt from the embedded one:\n{out}\nengine log:\n{}", c.engine_log());
    let current = c.path("current.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), current.display()));
    c.stop_engine();
    sh(&format!("cmp '{}' '{}'", head_of(&e0).display(), head_of(&c.replicas[r1].dir).display()));

    // The engine runs on r1 alone for a while: the embedded directory falls behind.
    c.replicas.remove(0);
    c.engine_extra.clear();
    c.start_engine();
    fio_verify(&c.uri(), "");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), current.display()));
    c.stop_engine();

    // Back with it embedded: it is behind, so it is left out until it is rebuilt.
    embed(&mut c, &e0, &eaddr);
    let m = modes(&c);
    assert!(m.iter().any(|(a, mode)| a == &eaddr && mode == "ERR"), "the stale embedded replica must not serve: {m:?}");
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", current.display(), c.uri()));
    let r = c.add_and_wait(&eaddr);
    assert_eq!(r["mode"], "RW", "{r}");
    c.stop_engine();
    sh(&format!("cmp '{}' '{}'", head_of(&e0).display(), head_of(&c.replicas[0].dir).display()));
    sh(&format!("cmp '{}' '{}'", e0.join("volume-snap-base.img").display(), c.replicas[0].dir.join("volume-snap-base.img").display()));
}

/// The embedded replica keeps the lease rules: while its engine runs, a second engine
/// that knows the secret is still refused, and one without it cannot even connect.
#[test]
fn a_second_engine_is_refused_by_the_embedded_replica() {
    let mut c = Cluster::without_engine("vol1", 64 * MB, 0);
    let e0 = c.path("e0");
    let eaddr = free_addr();
    embed(&mut c, &e0, &eaddr);
    let o = std::process::Command::new(bin())
        .args(["engine", "serve", "--volume", "vol1", "--size", &(64 * MB).to_string(), "--replica", &eaddr])
        .args(["--nbd", &format!("unix:{}", c.path("second.nbd").display()), "--run-dir", &c.path("run2").display().to_string()])
        .args(["--secret-file", &c.secret.display().to_string()])
        .output()
        .expect("second engine");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a second engine must not start on a replica the first serves itself:\n{err}");
    assert!(err.contains("another engine"), "the refusal says why:\n{err}");
    // Nor may a replica process serve the same directory meanwhile.
    let o = std::process::Command::new(bin())
        .args(["replica", "serve", "--dir", &e0.display().to_string(), "--volume", "vol1", "--size", &(64 * MB).to_string(), "--listen", "127.0.0.1:0"])
        .output()
        .expect("replica serve");
    assert!(!o.status.success(), "a replica process started on the directory the engine serves:\n{}", String::from_utf8_lossy(&o.stderr));
    // The first engine still serves.
    let (ok, errs, out) = fio(&format!(
        "--name=w --ioengine=nbd --uri='{}' --rw=write --bs=64k --size=8M --verify=crc32c --do_verify=1",
        c.uri()
    ));
    assert!(ok && errs == 0, "{out}");
}

/// The embedded replica fails as any replica does: a sync that fails on its disk (a
/// fault point in the engine's own process) drops it, and the volume goes on with the
/// replica of its own process, with no error for the client; the failure comes back
/// from the replica's sync thread, not from the request's caller.
#[test]
fn a_failing_embedded_replica_is_dropped_without_failing_io() {
    assert!(have("fio"), "fio is needed (tests/run installs it)");
    let mut c = Cluster::without_engine("vol1", 128 * MB, 1);
    c.engine_env = vec![("LONGHORN_FAIL_SYNC".into(), "3".into())];
    let e0 = c.path("e0");
    let eaddr = free_addr();
    embed(&mut c, &e0, &eaddr);
    fio_verify(&c.uri(), "--fsync=16");
    let m = modes(&c);
    assert!(m.iter().any(|(a, mode)| a == &eaddr && mode == "ERR"), "the embedded replica whose sync failed is dropped: {m:?}");
    assert!(m.iter().any(|(a, mode)| a == &c.replicas[0].addr && mode == "RW"), "{m:?}");
    let log = c.engine_log();
    assert!(log.contains("replica failed and was dropped"), "the engine log names the failure:\n{log}");
}

/// `longhorn up --embedded-replica`: replica-0 lives in the engine (no process of its
/// own), the other is a process `up` restarts and rebuilds when it is killed under fio;
/// a clean stop leaves both heads equal and replica-0 recorded clean.
#[test]
fn up_serves_its_first_replica_in_the_engine() {
    assert!(have("fio") && have("pgrep"), "fio and pgrep are needed (tests/run installs them)");
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let (data, run, sock) = (t.path().join("data"), t.path().join("run"), t.path().join("vol1.nbd"));
    let (mut up, _) = spawn(
        &[
            "up", "vol1", "--size", "128M", "--replicas", "2", "--embedded-replica", "--frontend", "none",
            "--nbd", &format!("unix:{}", sock.display()), "--data-dir", data.to_str().expect("utf8"),
            "--run-dir", run.to_str().expect("utf8"),
        ],
        &t.path().join("up.log"),
        "Ctrl-C",
    )
    .expect("up starts");
    let dir = |i: usize| data.join("vol1").join(format!("replica-{i}"));
    let pids = |i: usize| sh(&format!("pgrep -f -- 'replica serve .*--dir {}$' || true", dir(i).display()));
    assert!(pids(0).trim().is_empty(), "replica-0 must not be a process of its own: {}", pids(0));
    let pid1 = pids(1).trim().to_string();
    assert!(!pid1.is_empty(), "replica-1 runs as a process");
    let ls = || -> Vec<(String, String)> {
        let o = std::process::Command::new(bin()).args(["replica", "ls", "-v", "vol1", "--json"]).env("LONGHORN_RUN_DIR", &run).output().expect("cli");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| (r["address"].as_str().unwrap_or("").to_string(), r["mode"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    let before = ls();
    assert_eq!(before.iter().filter(|(_, m)| m == "RW").count(), 2, "{before:?}");

    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let load = std::thread::spawn(move || {
        fio(&format!(
            "--name=v --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=8 --size=64M --verify=crc32c \
             --verify_fatal=1 --rate_iops=4000"
        ))
    });
    std::thread::sleep(Duration::from_secs(1));
    sh(&format!("kill -9 {pid1}"));
    let t0 = std::time::Instant::now();
    loop {
        let now = ls();
        let back = now.len() == 2 && now.iter().all(|(_, m)| m == "RW") && !pids(1).trim().is_empty() && pids(1).trim() != pid1;
        if back {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "replica-1 not rebuilt in 90 s: {now:?}\n{}", up.log_text());
        std::thread::sleep(Duration::from_millis(250));
    }
    let (ok, errs, out) = load.join().expect("fio");
    assert!(ok && errs == 0, "fio verify across the kill: {out}");
    assert!(up.term(), "up stops cleanly; log:\n{}", up.log_text());
    assert_eq!(meta(&dir(0))["Dirty"], false, "{}", meta(&dir(0)));
    sh(&format!("cmp '{}' '{}'", head_of(&dir(0)).display(), head_of(&dir(1)).display()));
}
