//! Test harness: real `longhorn` processes in a temporary directory, and the real tools
//! (nbdinfo, nbdcopy, qemu-img, fio, nbdfuse) pointed at them.
//!
//! The binary under test is `$LONGHORN_BIN`, else `target/release/longhorn`, else
//! `target/debug/longhorn`; `tests/run` builds it before running the suite.

pub mod crash;
pub mod csi;
pub mod manager;
pub mod netns;
pub mod vm;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("LONGHORN_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for prof in ["release", "debug"] {
        let p = root.join("target").join(prof).join("longhorn");
        if p.exists() {
            return p;
        }
    }
    panic!("no longhorn binary: run `cargo build --release` (tests/run does) or set LONGHORN_BIN")
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns whether it exited with status 0.
    pub fn term(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.kill9();
        }
    }
}

/// Spawns `longhorn ARGS`, stderr to `log`, and waits for a stdout line starting with
/// `word`. Returns the process and the rest of the line, or the log on failure.
pub fn spawn(args: &[&str], log: &Path, word: &str) -> Result<(Proc, String), String> {
    spawn_env(args, log, word, &[])
}

/// As [`spawn`], with extra environment variables for the child.
pub fn spawn_env(args: &[&str], log: &Path, word: &str, env: &[(String, String)]) -> Result<(Proc, String), String> {
    let logf = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("spawn {:?}: {e}", bin()))?;
    ready(child, log, word).map_err(|e| format!("{args:?} {e}"))
}

/// Waits (30 s at most) for a line starting with `word` on the child's stdout, which
/// must be piped; the process and the rest of that line. A child that does not say it
/// is killed, and the error carries its log.
pub fn ready(mut child: Child, log: &Path, word: &str) -> Result<(Proc, String), String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let w = word.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(w.as_str()) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let mut p = Proc { child, log: log.to_path_buf() };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(v) => Ok((p, v)),
        Err(_) => {
            p.kill9();
            Err(format!("did not print {word:?}; log:\n{}", p.log_text()))
        }
    }
}

/// `longhorn replica serve` of `volume` on `dir` on a free loopback port, with extra
/// environment (fault points); returns the process and its address.
pub fn serve_replica(dir: &Path, volume: &str, size: u64, log: &Path, env: &[(String, String)]) -> (Proc, String) {
    serve_replica_on(dir, volume, size, log, env, "127.0.0.1:0")
}

/// As [`serve_replica`], listening on `listen` (`HOST:PORT` or `unix:PATH`).
pub fn serve_replica_on(dir: &Path, volume: &str, size: u64, log: &Path, env: &[(String, String)], listen: &str) -> (Proc, String) {
    spawn_env(
        &[
            "replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", volume, "--size", &size.to_string(),
            "--listen", listen,
        ],
        log,
        "listening",
        env,
    )
    .expect("replica starts")
}

pub struct Replica {
    pub proc: Proc,
    pub addr: String,
    pub dir: PathBuf,
}

pub struct Engine {
    pub proc: Proc,
    pub uri: String,
    pub sock: PathBuf,
}

/// A volume: replicas and an engine in one temporary directory.
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    /// The volume's secret file, given to every replica and the engine.
    pub secret: PathBuf,
    pub volume: String,
    pub size: u64,
    pub replicas: Vec<Replica>,
    pub engine: Option<Engine>,
    /// Extra arguments and environment for `engine serve` (set before `start_engine`).
    pub engine_extra: Vec<String>,
    pub engine_env: Vec<(String, String)>,
    /// Replicas started from now on listen on unix sockets (`DIR.sock`), not TCP.
    pub unix: bool,
}

pub const MB: u64 = 1 << 20;

impl Cluster {
    pub fn new(volume: &str, size: u64, n: usize) -> Cluster {
        let mut c = Cluster::without_engine(volume, size, n);
        c.start_engine();
        c
    }

    /// As [`Cluster::new`], the replicas on unix sockets (`replica serve --listen
    /// unix:DIR.sock`).
    pub fn new_unix(volume: &str, size: u64, n: usize) -> Cluster {
        let mut c = Cluster::without_engine(volume, size, 0);
        c.unix = true;
        for i in 0..n {
            c.add_replica(&format!("r{i}"));
        }
        c.start_engine();
        c
    }

    /// Replicas only; the caller sets `engine_extra` and calls `start_engine`.
    pub fn without_engine(volume: &str, size: u64, n: usize) -> Cluster {
        let tmp = tempfile::Builder::new().prefix("lh-test-").tempdir_in(test_root()).expect("tempdir");
        let secret = tmp.path().join("volume.key");
        longhorn_replica::auth::Key::generate(&secret).expect("volume secret");
        let mut c = Cluster { tmp, secret, volume: volume.to_string(), size, replicas: Vec::new(), engine: None, engine_extra: Vec::new(), engine_env: Vec::new(), unix: false };
        for i in 0..n {
            c.add_replica(&format!("r{i}"));
        }
        c
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path("run")
    }

    fn spawn_replica(&self, dir: &Path, log: &str, env: &[(String, String)]) -> Replica {
        let mut env = env.to_vec();
        env.push(self.secret_env());
        let listen = if self.unix { format!("unix:{}.sock", dir.display()) } else { "127.0.0.1:0".to_string() };
        let (proc, addr) = serve_replica_on(dir, &self.volume, self.size, &self.path(log), &env, &listen);
        Replica { proc, addr, dir: dir.to_path_buf() }
    }

    pub fn add_replica(&mut self, name: &str) -> usize {
        self.add_replica_env(name, &[])
    }

    /// A replica started with extra environment (fault points).
    pub fn add_replica_env(&mut self, name: &str, env: &[(String, String)]) -> usize {
        let r = self.spawn_replica(&self.path(name), &format!("{name}.log"), env);
        self.replicas.push(r);
        self.replicas.len() - 1
    }

    /// Restarts replica `i` on its directory (new port).
    pub fn restart_replica(&mut self, i: usize) {
        // The old process first, if it still runs: a replica directory is locked by
        // the process serving it.
        self.replicas[i].proc.kill9();
        let dir = self.replicas[i].dir.clone();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("r").to_string();
        self.replicas[i] = self.spawn_replica(&dir, &format!("{name}-again.log"), &[]);
    }

    pub fn engine_args(&self) -> Vec<String> {
        let sock = self.path("vol.nbd");
        let mut a: Vec<String> = vec![
            "engine".into(), "serve".into(), "--volume".into(), self.volume.clone(),
            "--size".into(), self.size.to_string(), "--nbd".into(), format!("unix:{}", sock.display()),
            "--run-dir".into(), self.run_dir().display().to_string(), "--io-timeout".into(), "4".into(),
            "--secret-file".into(), self.secret.display().to_string(),
        ];
        for r in &self.replicas {
            a.push("--replica".into());
            a.push(r.addr.clone());
        }
        a.extend(self.engine_extra.iter().cloned());
        a
    }

    /// `LONGHORN_SECRET_FILE` for this volume's processes.
    pub fn secret_env(&self) -> (String, String) {
        ("LONGHORN_SECRET_FILE".to_string(), self.secret.display().to_string())
    }

    pub fn start_engine(&mut self) {
        let args = self.engine_args();
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let n = std::fs::read_dir(self.tmp.path()).map(|d| d.count()).unwrap_or(0);
        let (proc, uri) =
            spawn_env(&a, &self.path(&format!("engine-{n}.log")), "ready", &self.engine_env).expect("engine starts");
        self.engine = Some(Engine { proc, uri, sock: self.path("vol.nbd") });
    }

    pub fn stop_engine(&mut self) {
        if let Some(mut e) = self.engine.take() {
            assert!(e.proc.term(), "engine exits cleanly on SIGTERM; log:\n{}", e.proc.log_text());
        }
    }

    pub fn uri(&self) -> String {
        self.engine.as_ref().expect("engine running").uri.clone()
    }

    pub fn engine_log(&self) -> String {
        self.engine.as_ref().map(|e| e.proc.log_text()).unwrap_or_default()
    }

    /// `longhorn ARGS` with this cluster's run dir; returns the output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin()).args(args).env("LONGHORN_RUN_DIR", self.run_dir()).output().expect("run longhorn")
    }

    /// `replica add ADDR --wait` (the test fails with the engine's log if it does);
    /// returns the replica as `replica ls --json` shows it then.
    pub fn add_and_wait(&self, addr: &str) -> serde_json::Value {
        let o = self.cli(&["replica", "add", addr, "-v", &self.volume, "--wait"]);
        assert!(
            o.status.success(),
            "replica add {addr}: {}\n{}\nengine log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.engine_log()
        );
        eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim());
        let ls = self.cli(&["replica", "ls", "-v", &self.volume, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
        v.as_array().expect("array").iter().find(|r| r["address"] == addr).cloned().expect("listed")
    }

    /// The head file of replica `i` (the volume's data when there are no snapshots).
    pub fn head_file(&self, i: usize) -> PathBuf {
        let meta = std::fs::read_to_string(self.replicas[i].dir.join("volume.meta")).expect("volume.meta");
        let v: serde_json::Value = serde_json::from_str(&meta).expect("json");
        self.replicas[i].dir.join(v["Head"].as_str().expect("Head"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut e) = self.engine.take() {
            e.proc.kill9();
        }
        for r in &mut self.replicas {
            r.proc.kill9();
        }
    }
}

/// Where test directories go: on the real disk, not a tmpfs, so sparse files and
/// SEEK_DATA behave as in production.
pub fn test_root() -> PathBuf {
    let p = std::env::var("LONGHORN_TEST_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("e2e")
    });
    std::fs::create_dir_all(&p).expect("test root");
    p
}

/// Recurring-job specs every front door refuses (`longhorn job add`, the CSI driver's
/// StorageClass parameters), each with the field its error must name.
pub const BAD_JOB_SPECS: [(&str, &str); 7] = [
    (r#"[{"name":"ninechars","task":"snapshot","cron":"* * * * *","retain":1}]"#, "name"),
    (r#"[{"name":"a","task":"snapshot","cron":"* * * * *","retain":1},{"name":"a","task":"backup","cron":"* * * * *","retain":1}]"#, "name"),
    (r#"[{"name":"c","task":"clone","cron":"* * * * *","retain":1}]"#, "task"),
    (r#"[{"name":"c","task":"snapshot","cron":"61 * * * *","retain":1}]"#, "cron"),
    (r#"[{"name":"c","task":"snapshot","cron":"* * * *","retain":1}]"#, "cron"),
    (r#"[{"name":"c","task":"snapshot","cron":"* * * * *","retain":0}]"#, "retain"),
    (r#"[{"name":"c","task":"snapshot","cron":"* * * * *","retain":1,"color":"red"}]"#, "color"),
];

pub fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Runs a shell command, panicking with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    if !o.status.success() {
        panic!(
            "command failed ({}): {cmd}\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Runs a shell command and returns (success, stdout+stderr).
pub fn sh_try(cmd: &str) -> (bool, String) {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let mut s = String::from_utf8_lossy(&o.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

/// Runs fio with JSON output; returns the summed error count of all jobs, panicking on
/// a failure to run at all.
pub fn fio(args: &str) -> (bool, u64, String) {
    let (ok, out) = sh_try(&format!("fio --output-format=json --verify_state_save=0 {args}"));
    let errs = out
        .find('{')
        .and_then(|i| serde_json::from_str::<serde_json::Value>(&out[i..]).ok())
        .and_then(|v| v["jobs"].as_array().map(|j| j.iter().map(|x| x["error"].as_u64().unwrap_or(1)).sum()))
        .unwrap_or(u64::MAX);
    (ok, errs, out)
}

/// A file of `len` random bytes.
pub fn random_file(path: &Path, len: u64) {
    sh(&format!("head -c {len} /dev/urandom > '{}'", path.display()));
}

/// nbdsh under Debian's python (the libnbd module is installed for it, not for
/// another python3 that may come first on PATH).
pub const NBDSH: &str = "/usr/bin/python3 -m nbd";

/// A bare replica-protocol client, for driving a replica without an engine.
pub struct ReplicaClient {
    pub s: longhorn_replica::net::Stream,
    next: u64,
}

impl ReplicaClient {
    /// Connects as an engine of the test (no secret: for replicas started without one).
    pub fn connect(addr: &str, volume: &str, size: u64) -> ReplicaClient {
        Self::connect_as(addr, volume, size, &longhorn_replica::auth::Credentials::engine(None, "test-engine"))
            .expect("replica accepts the handshake")
    }

    /// Connects with the given credentials; Err is the handshake's failure.
    pub fn connect_as(
        addr: &str,
        volume: &str,
        size: u64,
        creds: &longhorn_replica::auth::Credentials,
    ) -> Result<ReplicaClient, longhorn_replica::auth::HandshakeError> {
        let mut s = longhorn_replica::net::Stream::connect(addr, Duration::from_secs(5)).expect("connect to replica");
        longhorn_replica::auth::client_handshake(&mut s, volume, size, creds)?;
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        Ok(ReplicaClient { s, next: 1 })
    }

    /// One request; returns (status, payload), or Err when the connection dropped.
    pub fn request(
        &mut self,
        op: longhorn_replica::proto::Op,
        offset: u64,
        count: u32,
        payload: &[u8],
    ) -> Result<(u32, Vec<u8>), String> {
        use longhorn_replica::proto::{self, Header};
        use std::io::Write;
        let id = self.next;
        self.next += 1;
        let mut b = Vec::new();
        proto::put_frame(&mut b, Header::request(op, id, offset, count), payload);
        self.s.write_all(&b).map_err(|e| e.to_string())?;
        let (h, p) = proto::read_frame(&mut self.s).map_err(|e| e.to_string())?;
        Ok((h.status, p.to_vec()))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let (st, p) = self
            .request(longhorn_replica::proto::Op::Write, offset, data.len() as u32, data)
            .expect("write");
        assert_eq!(st, 0, "write failed: {}", String::from_utf8_lossy(&p));
    }
}

/// An independent reader of a layer chain (oldest first): each block comes from the
/// newest file whose allocation covers it, found with SEEK_DATA/SEEK_HOLE.
pub fn read_layers(files: &[PathBuf], size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    for f in files {
        let file = std::fs::File::open(f).expect("open layer");
        let fd = file.as_raw_fd();
        let mut pos: i64 = 0;
        loop {
            // SAFETY: lseek on an fd we own.
            let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if d < 0 || d as u64 >= size {
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
            let (a, b) = (d as usize, (h as u64).min(size) as usize);
            file.read_exact_at(&mut out[a..b], a as u64).expect("read layer");
            pos = h;
        }
    }
    out
}

/// The chain of replica `dir` up to and including snapshot `name`, oldest first.
pub fn chain_to(dir: &Path, name: &str) -> Vec<PathBuf> {
    chain_from(dir, &format!("volume-snap-{name}.img"))
}

/// The live chain of replica `dir` (up to its head), oldest first.
pub fn head_chain(dir: &Path) -> Vec<PathBuf> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("volume.meta")).expect("volume.meta")).expect("json");
    chain_from(dir, m["Head"].as_str().expect("Head"))
}

fn chain_from(dir: &Path, file: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut cur = file.to_string();
    while !cur.is_empty() {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{cur}.meta"))).expect("meta")).expect("json");
        v.push(dir.join(&cur));
        cur = m["Parent"].as_str().unwrap_or("").to_string();
    }
    v.reverse();
    v
}

/// A copy of `path` the test VM can see and that nothing changes while it runs. The VM
/// shares the host's root read-only but mounts fresh tmpfs over /tmp and /run (where a
/// CI clone may live), so copies go to a staging directory under /var/cache.
pub fn stage_for_vm(path: &Path) -> PathBuf {
    let stage = Path::new("/var/cache/longhorn-vm/stage").join(std::process::id().to_string());
    std::fs::create_dir_all(&stage).expect("VM staging directory");
    let dst = stage.join(path.file_name().expect("a file name"));
    std::fs::copy(path, &dst).unwrap_or_else(|e| panic!("staging {} for the VM: {e}", path.display()));
    dst
}

/// One line of /proc/self/mountinfo.
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// This process's mounts, oldest first, read without touching any mount point (a stat
/// of an NFS mount whose server is gone waits for ever).
pub fn mount_table() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let (fstype, source) = (r.next()?, r.next().unwrap_or_default());
            Some(Mount { point: PathBuf::from(point), fstype: fstype.to_string(), source: source.to_string() })
        })
        .collect()
}

/// How many threads of process `pid` have a name starting with `prefix`.
pub fn threads_named(pid: i32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim().starts_with(prefix)))
        .count()
}

/// When dropped during a panic, prints the last lines of every `*.log` under its
/// directory (managers, engines, replicas, share servers) and of the kernel log: a VM
/// scenario's failure is then read from its console alone. Declare it after what
/// starts the processes, so it runs before their teardown removes anything.
pub struct LogsOnPanic(pub PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // Walked by hand, skipping mount points: a stat of an NFS mount whose server
        // is gone would wait for ever (`find` stats every entry).
        let mounts = mount_table();
        let mut logs = Vec::new();
        let mut dirs = vec![self.0.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if mounts.iter().any(|m| m.point == p) {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(p),
                    Ok(t) if t.is_file() && p.extension().is_some_and(|x| x == "log") => logs.push(p),
                    _ => {}
                }
            }
        }
        logs.sort();
        for f in &logs {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            println!("----- {} (last {} of {} lines)", f.display(), lines.len().min(60), lines.len());
            for l in &lines[lines.len().saturating_sub(60)..] {
                println!("{l}");
            }
        }
        println!("----- dmesg (tail)\n{}", sh_try("dmesg | tail -n 40").1);
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}
