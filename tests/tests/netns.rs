//! The engine and three replicas on hosts of their own: network namespaces joined by
//! veth pairs to a bridge, with addresses the test makes (10.201.0.0/24, nothing leaves
//! the namespaces). Under fio verify: a replica partitioned past the I/O timeout comes
//! back by itself after the heal and is rebuilt incrementally; a lossy, slow link to
//! one replica (1 % of packets dropped by nftables; 20 ms +- 10 ms added by a proxy on
//! the replica's host, as this kernel has no sch_netem) costs latency, never an error; the engine cut off from every replica
//! fails I/O with EIO within the timeout and recovers after the heal (salvage) with no
//! acknowledged write lost; a second engine on another host is refused. Salvage takes
//! back only the replica that was RW last: two replicas cut off (and dropped) before
//! the third saw a write acknowledged are not salvaged when they answer again while the
//! third is still away.

use longhorn_tests::netns::{spawn_on, Net};
use longhorn_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Setup {
    net: Net,
    /// The delaying proxy in front of replica 1 (this kernel has no sch_netem).
    delay: Option<Proc>,
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
    replicas: Vec<(Proc, String)>,
    engine: Option<Proc>,
    uri: String,
}

const SIZE: u64 = 256 * MB;

impl Setup {
    fn run_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("run")
    }

    fn engine_args(&self, nbd: &str, run: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "engine".into(), "serve".into(), "--volume".into(), "vol1".into(), "--size".into(), SIZE.to_string(),
            "--nbd".into(), format!("unix:{nbd}"), "--run-dir".into(), run.display().to_string(),
            "--io-timeout".into(), "4".into(), "--secret-file".into(), self.key.display().to_string(),
            "--auto-rebuild".into(), "--auto-salvage".into(),
        ];
        for (_, addr) in &self.replicas {
            a.push("--replica".into());
            a.push(addr.clone());
        }
        a
    }

    fn cli(&self, args: &[&str]) -> Value {
        let o = Command::new(bin()).args(args).env("LONGHORN_RUN_DIR", self.run_dir()).output().expect("cli");
        assert!(o.status.success(), "longhorn {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    fn modes(&self) -> Vec<(String, String)> {
        let v = self.cli(&["replica", "ls", "-v", "vol1", "--json"]);
        v.as_array()
            .map(|a| a.iter().map(|r| (r["address"].as_str().unwrap_or("").to_string(), r["mode"].as_str().unwrap_or("").to_string())).collect())
            .unwrap_or_default()
    }

    fn mode_of(&self, addr: &str) -> String {
        self.modes().into_iter().find(|(a, _)| a == addr).map(|(_, m)| m).unwrap_or_default()
    }

    fn kill_all(&mut self) {
        if let Some(mut e) = self.engine.take() {
            e.kill9();
        }
        if let Some(mut d) = self.delay.take() {
            d.kill9();
        }
        for (p, _) in &mut self.replicas {
            p.kill9();
        }
    }

    fn engine_log(&self) -> String {
        self.engine.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

fn setup() -> Setup {
    let net = Net::new(&["engine", "r0", "r1", "r2", "engine2"]);
    let dir = tempfile::Builder::new().prefix("lh-netns-").tempdir_in(test_root()).expect("tmp");
    let key = dir.path().join("volume.key");
    longhorn_replica::auth::Key::generate(&key).expect("secret");
    let mut s = Setup { net, delay: None, key, replicas: Vec::new(), engine: None, uri: String::new(), dir };
    for h in ["r0", "r1", "r2"] {
        let d = s.dir.path().join(h);
        let listen = format!("{}:9502", s.net.addr(h));
        let (p, addr) = spawn_on(
            &s.net,
            h,
            &["replica", "serve", "--dir", d.to_str().expect("utf8"), "--volume", "vol1", "--size", &SIZE.to_string(), "--listen", &listen, "--secret-file", s.key.to_str().expect("utf8")],
            &s.dir.path().join(format!("{h}.log")),
            "listening",
        )
        .expect("replica starts on its host");
        // Replica 1 is reached through a proxy on its host that can delay its traffic.
        let addr = if h == "r1" {
            let front = format!("{}:9600", s.net.addr(h));
            let (ip_, port) = front.rsplit_once(':').expect("host:port");
            let (to, to_port) = addr.rsplit_once(':').expect("host:port");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("netns").join("delay.py");
            let mut child = Command::new("ip")
                .args(["netns", "exec", &s.net.ns(h), "/usr/bin/python3"])
                .arg(&script)
                .args([ip_, port, to, to_port])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("delay proxy");
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut line).expect("read");
            assert_eq!(line.trim(), "listening", "the delay proxy starts");
            s.delay = Some(Proc { child, log: s.dir.path().join("delay.log") });
            front
        } else {
            addr
        };
        s.replicas.push((p, addr));
    }
    let nbd = s.dir.path().join("vol.nbd");
    let args = s.engine_args(nbd.to_str().expect("utf8"), &s.run_dir());
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    let (p, uri) = spawn_on(&s.net, "engine", &a, &s.dir.path().join("engine.log"), "ready").expect("engine starts on its host");
    s.engine = Some(p);
    s.uri = uri;
    s
}

fn fio_verify(uri: &str, secs: u64) -> std::thread::JoinHandle<(bool, u64, String)> {
    let uri = uri.to_string();
    std::thread::spawn(move || {
        fio(&format!(
            "--name=verify --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=16 --size=64M \
             --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_backlog=512 --time_based --runtime={secs}"
        ))
    })
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    t.elapsed()
}

fn fio_latency_us(out: &str) -> f64 {
    let v: Value = out.find('{').and_then(|i| serde_json::from_str(&out[i..]).ok()).unwrap_or(Value::Null);
    v["jobs"][0]["write"]["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0
}

#[test]
fn replicas_on_other_hosts_partitions_loss_and_split_brain() {
    assert!(have("fio") && have("tc"), "fio and tc (iproute2) are needed; tests/run installs them");
    let mut s = setup();
    let r2 = s.replicas[2].1.clone();

    // 1. One replica cut off past the I/O timeout: I/O goes on; after the heal the engine
    //    adds it back by itself and it is rebuilt with only what changed.
    // Data fio never touches (above its 64 MiB): a returning replica must not be sent it.
    let img = s.dir.path().join("base.raw");
    random_file(&img, 128 * MB);
    let script = format!(
        "f = open({:?}, \"rb\")\nfor i in range(32):\n    h.pwrite(f.read(4194304), 134217728 + i * 4194304)\nh.flush()",
        img.display().to_string()
    );
    sh(&format!("{NBDSH} -u '{}' -c '{script}'", s.uri));
    let load = fio_verify(&s.uri, 25);
    std::thread::sleep(Duration::from_secs(3));
    // Replicas on other hosts are each received on a thread of their own (one thread
    // receiving for all of them puts the network's receive work on one CPU): fio's one
    // connection, three replicas.
    let pid = s.engine.as_ref().expect("engine").pid();
    let collectors = threads_named(pid, "replica-replies");
    assert_eq!(collectors, 3, "reply collector threads for one connection to three replicas on other hosts");
    s.net.cut("r2");
    let dropped = wait_for("the cut-off replica is dropped", Duration::from_secs(15), || s.mode_of(&r2) == "ERR");
    assert!(!load.is_finished(), "the partition must land while fio runs");
    std::thread::sleep(Duration::from_secs(4));
    s.net.heal("r2");
    let back = wait_for("the healed replica is RW again", Duration::from_secs(90), || s.mode_of(&r2) == "RW");
    let (ok, errs, out) = load.join().expect("fio");
    assert!(ok && errs == 0, "fio saw errors across a replica partition:\n{out}\n{}", s.engine_log());
    let ls = s.cli(&["replica", "ls", "-v", "vol1", "--json"]);
    let p = ls.as_array().and_then(|a| a.iter().find(|r| r["address"] == r2.as_str()).cloned()).expect("listed")["progress"].clone();
    let (total, sent) = (p["bytes_total"].as_u64().unwrap_or(0), p["bytes_sent"].as_u64().unwrap_or(u64::MAX));
    println!("[netns] replica partitioned: dropped after {dropped:?}, RW again {back:?} after the heal, rebuild sent {sent} of {total} bytes");
    let r2_log = std::fs::read_to_string(s.dir.path().join("r2.log")).unwrap_or_default();
    assert!(r2_log.contains("rebuild starts from the old head"), "the returning replica did not reuse its old head:\n{r2_log}");
    assert!(total > 0 && sent < total, "the returning replica was rebuilt from scratch: {p}");

    // 2. A slow, lossy link to one replica: no error, and what latency the volume shows.
    let base = fio(&format!("--name=lat --ioengine=nbd --uri='{}' --rw=randwrite --bs=4k --iodepth=16 --size=64M --time_based --runtime=6", s.uri));
    let proxy = s.delay.as_ref().expect("proxy").pid();
    // SAFETY: signalling our own child: delay on.
    unsafe { libc::kill(proxy, libc::SIGUSR1) };
    s.net.lose("r1", 1);
    let slow = fio(&format!(
        "--name=lat --ioengine=nbd --uri='{}' --rw=randwrite --bs=4k --iodepth=16 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 --time_based --runtime=10",
        s.uri
    ));
    s.net.no_loss("r1");
    // SAFETY: as above: delay off.
    unsafe { libc::kill(proxy, libc::SIGUSR2) };
    assert!(slow.0 && slow.1 == 0, "errors with a lossy link:\n{}", slow.2);
    assert!(s.modes().iter().all(|(_, m)| m == "RW"), "a slow replica was dropped: {:?}", s.modes());
    println!(
        "[netns] 4k randwrite QD16 mean completion latency: {:.0} us on clean links, {:.0} us with 20 ms +- 10 ms delay and 1% loss to one replica",
        fio_latency_us(&base.2),
        fio_latency_us(&slow.2)
    );

    // 3. The engine cut off from every replica: I/O fails with EIO within the timeout,
    //    and after the heal the volume comes back with every acknowledged write.
    let acked = sh(&format!(
        "{NBDSH} -u '{}' -c 'import os; d = os.urandom(65536); h.pwrite(d, 1048576, nbd.CMD_FLAG_FUA); print(d.hex())'",
        s.uri
    ));
    // The client is connected first; the link goes down while it waits, then it writes.
    let script = format!(
        "timeout 60 {NBDSH} -u '{}' -c 'import time\ntime.sleep(2)\nt = time.time()\ntry:\n    h.pwrite(b\"x\" * 4096, 0)\n    h.flush()\n    print(\"ACKED\")\nexcept nbd.Error as e:\n    print(\"ERRNO\", e.errnum)\nprint(\"SECONDS\", time.time() - t)'",
        s.uri
    );
    let client = std::thread::spawn(move || sh_try(&script).1);
    std::thread::sleep(Duration::from_millis(800));
    s.net.cut("engine");
    let out = client.join().expect("client");
    let failed_in: f64 = out.lines().find_map(|l| l.strip_prefix("SECONDS ")).and_then(|v| v.trim().parse().ok()).unwrap_or(f64::MAX);
    println!("[netns] engine cut off from every replica: the write failed after {failed_in:.1} s: {}", out.trim().replace('\n', "; "));
    assert!(out.contains(&format!("ERRNO {}", libc::EIO)), "{out}\n{}", s.engine_log());
    assert!(failed_in < 10.0, "I/O hung past the 4 s I/O timeout: {failed_in} s");
    s.net.heal("engine");
    let rec = wait_for("the volume recovers after the heal", Duration::from_secs(60), || {
        s.cli(&["volume", "info", "-v", "vol1", "--json"])["state"] == "healthy"
    });
    let back = sh(&format!("{NBDSH} -u '{}' -c 'print(h.pread(65536, 1048576).hex())'", s.uri));
    assert_eq!(back.trim(), acked.trim(), "an acknowledged (FUA) write was lost across the partition");
    sh(&format!("{NBDSH} -u '{}' -c 'h.pwrite(b\"y\" * 4096, 0); h.flush()'", s.uri));
    println!("[netns] engine partition healed: healthy again {rec:?} after the heal, the FUA write read back");

    // 4. Split brain: a second engine on another host, on the same replicas, is refused.
    let nbd2 = s.dir.path().join("vol2.nbd");
    let args = s.engine_args(nbd2.to_str().expect("utf8"), &s.dir.path().join("run2"));
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    match spawn_on(&s.net, "engine2", &a, &s.dir.path().join("engine2.log"), "ready") {
        Ok((mut p, _)) => {
            p.kill9();
            panic!("a second engine started on replicas in use");
        }
        Err(log) => {
            assert!(log.contains("another engine"), "refused, saying why: {log}");
            println!("[netns] a second engine on another host was refused: the replicas' lease is held by the first");
        }
    }
    s.kill_all();
}

/// Two replicas cut off and dropped, a FUA write acknowledged by the third alone, then
/// the third cut off too (the volume faults). The first two answering again must not be
/// salvaged (they lack the write): the volume stays faulted until the third is back,
/// and then every read returns the acknowledged write, before and after the two others
/// are rebuilt from it.
#[test]
fn salvage_waits_for_the_replica_that_was_rw_last() {
    let mut s = setup();
    let (r0, r1, r2) = (s.replicas[0].1.clone(), s.replicas[1].1.clone(), s.replicas[2].1.clone());
    // 64 KiB of random bytes at 1 MiB with FUA; returns them as hex.
    let write_fua = || {
        sh(&format!(
            "timeout 60 {NBDSH} -u '{}' -c 'import os; d = os.urandom(65536); h.pwrite(d, 1048576, nbd.CMD_FLAG_FUA); print(d.hex())'",
            s.uri
        ))
        .trim()
        .to_string()
    };
    let read = || sh_try(&format!("timeout 60 {NBDSH} -u '{}' -c 'print(h.pread(65536, 1048576).hex())' 2>&1", s.uri));
    let first = write_fua(); // on all three

    s.net.cut("r0");
    s.net.cut("r1");
    // Stalls until the two are dropped (I/O timeout 4 s), then r2 alone acknowledges it.
    let acked = write_fua();
    assert_ne!(acked, first);
    assert_eq!((s.mode_of(&r0).as_str(), s.mode_of(&r1).as_str(), s.mode_of(&r2).as_str()), ("ERR", "ERR", "RW"), "{}", s.engine_log());

    s.net.cut("r2");
    let (ok, out) = sh_try(&format!("timeout 60 {NBDSH} -u '{}' -c 'h.pwrite(b\"z\" * 4096, 0); h.flush()' 2>&1", s.uri));
    assert!(!ok, "a write with every replica cut off was acknowledged: {out}");
    wait_for("r2 dropped", Duration::from_secs(20), || s.mode_of(&r2) == "ERR");

    // The two stale replicas answer again; r2 does not. 30 s: an engine without the
    // rule took r0 back 13 s after the heal here (the reconnects back off).
    s.net.heal("r0");
    s.net.heal("r1");
    std::thread::sleep(Duration::from_secs(30));
    let modes = s.modes();
    assert!(modes.iter().all(|(_, m)| m != "RW"), "a replica that lacks an acknowledged write was salvaged: {modes:?}\n{}", s.engine_log());
    let (ok, out) = read();
    assert!(!ok || out.trim() != first, "the volume served the data from before the acknowledged write: {out}");
    assert!(!ok, "the faulted volume answered a read: {out}");
    println!("[netns] r0 and r1 back, r2 still away: not salvaged, reads fail ({})", out.trim().lines().last().unwrap_or(""));

    s.net.heal("r2");
    wait_for("r2 salvaged", Duration::from_secs(60), || s.mode_of(&r2) == "RW");
    let (ok, out) = read();
    assert!(ok && out.trim() == acked, "after salvage, not the acknowledged write: {out}");
    wait_for("r0 and r1 rebuilt", Duration::from_secs(120), || s.cli(&["volume", "info", "-v", "vol1", "--json"])["state"] == "healthy");
    let (ok, out) = read();
    assert!(ok && out.trim() == acked, "after the rebuild, not the acknowledged write: {out}");
    println!("[netns] r2 back: salvaged, r0 and r1 rebuilt from it, the acknowledged write read back");
    s.kill_all();
}
