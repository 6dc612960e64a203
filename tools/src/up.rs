//! `longhorn up`: a whole volume on this machine in one command.

use crate::parse_size;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::autorebuild::Replica;

#[derive(Args)]
pub struct UpArgs {
    /// The volume's name.
    #[arg(value_parser = crate::volume_name)]
    pub volume: String,
    /// Volume size (e.g. 10G). An existing volume's size must match.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// How many replicas to run on this host (default 3, or the spec's
    /// numberOfReplicas; 0 with --remote-replica).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// A replica another host runs for this volume (its manager keeps the process
    /// going on a fixed address); repeat for each. The engine uses it like a local one,
    /// and a failed one is added back (rebuilt) once it answers again.
    #[arg(long = "remote-replica", value_name = "ADDR")]
    pub remote_replicas: Vec<String>,
    /// A volume spec: a JSON object of StorageClass parameters (numberOfReplicas,
    /// staleReplicaTimeout, fromBackup, recurringJobs, accessMode). Stored with the volume.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Recurring jobs, a JSON list as in a StorageClass's recurringJobs.
    #[arg(long)]
    pub recurring_jobs: Option<String>,
    /// Where replica directories live: DATA_DIR/VOLUME/replica-N.
    #[arg(long, default_value = "/var/lib/longhorn")]
    pub data_dir: PathBuf,
    /// The NBD export (`unix:PATH` or `tcp:HOST:PORT`). Default: unix:RUN_DIR/VOLUME.nbd
    #[arg(long)]
    pub nbd: Option<String>,
    #[arg(long, default_value = crate::DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
    pub run_dir: PathBuf,
    /// Block device /dev/longhorn/VOLUME: auto (ublk, else nbd, else fuse), ublk, nbd,
    /// fuse, or none (the NBD export only).
    #[arg(long, default_value = "auto")]
    pub frontend: String,
    /// ReadWriteOnce (rwo) or ReadWriteMany (rwx: also run `longhorn share`, serving the
    /// volume's filesystem over NFSv4). Default: the spec's accessMode, else rwo.
    #[arg(long)]
    pub access_mode: Option<String>,
    /// NFS port of the share (ReadWriteMany).
    #[arg(long, default_value_t = 2049)]
    pub share_port: u16,
    /// The address the share listens on (ReadWriteMany): loopback unless other hosts
    /// mount it (the manager gives its host's address).
    #[arg(long, default_value = "127.0.0.1")]
    pub share_bind: String,
    /// Only the IP addresses listed in this file may mount the share (ReadWriteMany;
    /// see `longhorn share --clients`). The manager keeps it: its own host and the
    /// nodes the volume is attached for.
    #[arg(long)]
    pub share_clients: Option<PathBuf>,
    /// Create the volume from this backup (a backup URL, or a name in the configured
    /// backup target) before serving it; ignored when the volume already exists.
    #[arg(long)]
    pub from_backup: Option<String>,
    /// Do not bring failed replicas back by themselves (restart on the same directory
    /// and rebuild online); the operator uses `replica add` instead.
    #[arg(long)]
    pub no_auto_rebuild: bool,
    /// How long a failed replica's directory is worth reusing: minutes as in
    /// Longhorn's staleReplicaTimeout, or with a unit (90s, 5m, 2h). After it the
    /// directory is deleted and the replica rebuilt from scratch. Default: the spec's
    /// staleReplicaTimeout, else 2880 (48 hours, Longhorn's default).
    #[arg(long)]
    pub stale_replica_timeout: Option<String>,
    /// Serve this host's first replica (replica-0) in the engine's own process
    /// (`engine serve --embed-replica`): reads and its share of writes cost a function
    /// call instead of a round trip through a socket. It lives and dies with the
    /// engine; a failed one is added back and rebuilt like any other.
    #[arg(long)]
    pub embedded_replica: bool,
}

pub(crate) struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    /// SIGTERM, then SIGKILL after `wait`. Returns whether the process is gone: one
    /// in uninterruptible sleep (a hung disk) outlives even SIGKILL for a while, and
    /// `up` must not block on it.
    pub fn stop(&mut self, wait: Duration) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < wait {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("longhorn up: {} did not stop in {wait:?}; killing it", self.name);
        let _ = self.child.kill();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("longhorn up: {} (pid {}) does not die even on SIGKILL (stuck in the kernel?)", self.name, self.child.id());
        false
    }
}

/// Starts `cmd` with stdout piped and stderr to `log`, and waits for a stdout line that
/// starts with `word`; returns the rest of that line.
pub(crate) fn spawn_and_wait(name: &str, mut cmd: Command, log: &Path, word: &str) -> Result<(Proc, String)> {
    let logf: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    cmd.stdout(Stdio::piped()).stderr(logf).stdin(Stdio::null());
    // Own process group: a terminal's Ctrl-C reaches only `up`, which stops the
    // engine first (or refuses while its device is mounted) and the replicas last.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("{name}: no stdout"))?;
    let (tx, rx) = mpsc::channel();
    let w = word.to_string();
    std::thread::spawn(move || {
        let mut rd = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match rd.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if let Some(rest) = line.trim().strip_prefix(w.as_str()) {
                        let _ = tx.send(Some(rest.trim().to_string()));
                    }
                }
            }
        }
    });
    let mut p = Proc { name: name.to_string(), child };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(v)) => Ok((p, v)),
        Ok(None) | Err(_) => {
            p.stop(Duration::from_secs(2));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            bail!("{name} did not start: {last} (log {})", log.display())
        }
    }
}

pub fn run(mut a: UpArgs) -> Result<()> {
    // The whole spec is checked before anything is started or written.
    let mut spec = match &a.spec {
        Some(f) => crate::spec::parse(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
            .with_context(|| format!("volume spec {}", f.display()))?,
        None => crate::spec::Spec::default(),
    };
    if let Some(j) = &a.recurring_jobs {
        let v: serde_json::Value = serde_json::from_str(j).map_err(|e| anyhow::anyhow!("--recurring-jobs: not JSON: {e}"))?;
        longhorn_engine::jobs::parse_jobs(&v).map_err(|e| anyhow::anyhow!("--recurring-jobs: {e}"))?;
        spec.recurring_jobs = Some(v);
    }
    let remote = a.remote_replicas.len();
    let replicas = a.replicas.or(spec.number_of_replicas.map(|n| n.saturating_sub(remote))).unwrap_or(if remote > 0 { 0 } else { 3 });
    if replicas + remote == 0 {
        bail!("--replicas must be at least 1 (or give --remote-replica)");
    }
    for r in &a.remote_replicas {
        if r.parse::<std::net::SocketAddr>().is_err() {
            bail!("--remote-replica {r:?}: not an address (IP:PORT)");
        }
    }
    if remote > 0 && (a.from_backup.is_some() || spec.from_backup.as_deref().is_some_and(|b| !b.is_empty())) {
        // A restore is written to this host's replicas; the remote ones would stay blank.
        bail!("--from-backup cannot be used with --remote-replica");
    }
    spec.number_of_replicas = Some(replicas + remote);
    let rwx = match a.access_mode.as_deref().or(spec.access_mode.as_deref()) {
        None | Some("ReadWriteOnce" | "rwo") => false,
        Some("ReadWriteMany" | "rwx") => true,
        Some(m) => bail!("--access-mode: ReadWriteOnce (rwo) or ReadWriteMany (rwx), not {m:?}"),
    };
    if rwx && a.frontend == "none" {
        bail!("ReadWriteMany needs a block device: --frontend none cannot be shared");
    }
    match spec.data_locality.as_deref() {
        Some("strict-local") if replicas != 1 || remote > 0 => {
            bail!("dataLocality strict-local keeps the volume's one replica here, in the engine: numberOfReplicas must be 1, with no --remote-replica")
        }
        Some("best-effort" | "strict-local") if replicas > 0 => a.embedded_replica = true,
        _ => {}
    }
    if a.embedded_replica && replicas == 0 {
        bail!("--embedded-replica serves one of this host's replicas in the engine: --replicas must be at least 1");
    }
    a.replicas = Some(replicas);
    let exe = std::env::current_exe().context("finding the longhorn executable")?;
    let vol_dir = a.data_dir.join(&a.volume);
    // Checked before anything is restored, written or started.
    let stale_after = match &a.stale_replica_timeout {
        Some(t) => crate::autorebuild::parse_timeout(t)?,
        None => {
            let m = spec.stale_replica_timeout.or_else(|| crate::autorebuild::stored_timeout(&vol_dir.join("spec.json"))).unwrap_or(2880);
            Duration::from_secs(m.max(1).saturating_mul(60))
        }
    };
    let log_dir = vol_dir.join("logs");
    if let Some(b) = a.from_backup.clone().or(spec.from_backup.clone()).filter(|b| !b.is_empty()) {
        crate::backup::restore_for_up(&b, &a.data_dir, &a.volume, replicas, a.size)?;
    }
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let jobs_file = vol_dir.join("jobs.json");
    if let Some(j) = &spec.recurring_jobs {
        let data = serde_json::to_vec_pretty(j).context("encoding the jobs")?;
        longhorn_replica::meta::write_atomic(&jobs_file, &data).context("storing the recurring jobs")?;
    }
    if a.spec.is_some() || a.recurring_jobs.is_some() {
        let data = serde_json::to_vec_pretty(&spec.to_json()).context("encoding the spec")?;
        longhorn_replica::meta::write_atomic(&vol_dir.join("spec.json"), &data).context("storing the volume spec")?;
    }
    let size = a.size.to_string();
    // One secret per volume, made on first start and kept with its data: replicas and
    // engine prove it to each other (see longhorn_replica::auth).
    let secret = vol_dir.join("volume.key");
    longhorn_replica::auth::Key::load_or_generate(&secret).map_err(|e| anyhow::anyhow!(e))?;
    // What a manager retired during an earlier run is out of the replica list it
    // passes now (an address may be used again by a new replica).
    let retired = vol_dir.join("retired-replicas");
    let _ = std::fs::remove_file(&retired);
    let cx = crate::autorebuild::Ctx {
        retired: &retired,
        secret: &secret,
        exe: &exe,
        run_dir: &a.run_dir,
        volume: &a.volume,
        size: a.size,
        log_dir: &log_dir,
        stale_after: Some(stale_after),
    };
    let mut reps: Vec<Replica> = Vec::new();
    let mut procs: Vec<Proc> = Vec::new();
    // Engine (and share) first: the engine flushes and closes the replicas; then they go.
    let stop_all = |procs: &mut Vec<Proc>, reps: &mut Vec<Replica>| {
        for p in procs.iter_mut().rev() {
            p.stop(Duration::from_secs(30));
        }
        for r in reps.iter_mut() {
            r.stop(Duration::from_secs(30));
        }
    };
    // The engine's own replica (with --embedded-replica) is not a process of ours.
    let first = usize::from(a.embedded_replica);
    for i in first..replicas {
        let name = format!("replica-{i}");
        let dir = vol_dir.join(&name);
        match crate::autorebuild::start_replica(&cx, &name, &dir) {
            Ok((p, addr)) => reps.push(Replica::new(name, dir, addr, p)),
            Err(e) => {
                stop_all(&mut procs, &mut reps);
                return Err(e);
            }
        }
    }
    for ad in &a.remote_replicas {
        reps.push(Replica::remote(ad.clone()));
    }
    let addrs: Vec<String> = reps.iter().map(|r| r.addr.clone()).collect();
    let mut c = Command::new(&exe);
    c.args(["engine", "serve", "--volume", &a.volume, "--size", &size]).arg("--run-dir").arg(&a.run_dir);
    c.arg("--secret-file").arg(&secret);
    // This supervisor restarts and re-adds replicas itself; what it cannot do is pick
    // which replica to trust when none is healthy: the engine salvages those.
    if !a.no_auto_rebuild {
        c.arg("--auto-salvage");
    }
    c.arg("--jobs-file").arg(&jobs_file);
    for ad in &addrs {
        c.args(["--replica", ad]);
    }
    if a.embedded_replica {
        c.arg("--embed-replica").arg(vol_dir.join("replica-0")).args(["--embed-listen", "127.0.0.1:0"]);
    }
    if let Some(n) = &a.nbd {
        c.args(["--nbd", n]);
    }
    c.args(["--frontend", &a.frontend]);
    let (engine, uri) = match spawn_and_wait("engine", c, &log_dir.join("engine.log"), "ready") {
        Ok(v) => v,
        Err(e) => {
            stop_all(&mut procs, &mut reps);
            return Err(e);
        }
    };
    procs.push(engine);
    if a.embedded_replica {
        // Watched like a remote one: never started or stopped here, added back (and
        // so rebuilt) when the engine drops it. It is the engine's first replica.
        let modes = crate::control_call(&a.run_dir, &a.volume, &serde_json::json!({"cmd": "replica-modes"})).map_err(|e| anyhow::anyhow!(e));
        match modes.and_then(|v| v[0]["address"].as_str().map(String::from).ok_or_else(|| anyhow::anyhow!("the engine lists no replica"))) {
            Ok(addr) => {
                let mut r = Replica::remote(addr);
                r.name = format!("replica-0 (in the engine, {})", r.addr);
                reps.insert(0, r);
            }
            Err(e) => {
                stop_all(&mut procs, &mut reps);
                return Err(e.context("asking the engine for its embedded replica"));
            }
        }
    }
    let addrs: Vec<String> = reps.iter().map(|r| r.addr.clone()).collect();
    println!("volume {} is up: {} replicas, {} bytes", a.volume, replicas + remote, a.size);
    println!("  data:      {}", vol_dir.display());
    println!("  logs:      {}", log_dir.display());
    println!("  replicas:  {}", addrs.join(" "));
    println!("  NBD:       {uri}");
    // The engine says which block device frontend it chose (auto) in its status.
    let mut device = None;
    if let Ok(v) = crate::call(&a.run_dir, &a.volume, "volume-info") {
        let (kind, ep) = (v["frontend"].as_str().unwrap_or(""), v["endpoint"].as_str().unwrap_or(""));
        if !kind.is_empty() && kind != "nbd-export" {
            println!("  device:    {ep} ({kind})");
            device = Some(PathBuf::from(ep));
        }
    }
    // ReadWriteMany: the share manager mounts the device and serves it over NFSv4; it
    // is stopped before the engine.
    let mut share = None;
    if rwx {
        let mut c = Command::new(&exe);
        c.args(["share", &a.volume, "--port", &a.share_port.to_string(), "--bind", &a.share_bind]).arg("--run-dir").arg(&a.run_dir);
        if let Some(f) = &a.share_clients {
            c.arg("--clients").arg(f);
        }
        match spawn_and_wait("share", c, &log_dir.join("share.log"), "ready") {
            Ok((p, ep)) => {
                println!("  share:     {ep} (NFSv4, port {}, ReadWriteMany)", a.share_port);
                share = Some(p);
            }
            Err(e) => {
                stop_all(&mut procs, &mut reps);
                return Err(e);
            }
        }
    }
    println!("try:");
    println!("  nbdinfo '{uri}'");
    println!("  fio --name=t --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=32 --size=1G --runtime=10 --time_based");
    println!("  longhorn volume info -v {}      longhorn replica ls -v {}", a.volume, a.volume);
    if let Some(d) = &device {
        println!("  mkfs.ext4 {0} && mount {0} /mnt", d.display());
    }
    println!("Ctrl-C stops the engine and the replicas cleanly (refused while the device is mounted; twice within 10 s forces).");

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGTERM, stop.clone()).context("signal handler")?;
    signal_hook::flag::register(SIGINT, stop.clone()).context("signal handler")?;
    let auto_rebuild = !a.no_auto_rebuild;
    if auto_rebuild {
        println!("Failed replicas are restarted and rebuilt by themselves (staleReplicaTimeout {}).", human_duration(stale_after));
    }
    let mut sup = crate::autorebuild::Supervisor::new();
    let mut failed = None;
    let mut refused_at: Option<Instant> = None;
    loop {
        if stop.swap(false, Ordering::AcqRel) {
            if let Some(mut p) = share.take() {
                println!("stopping the share of {}", a.volume);
                p.stop(Duration::from_secs(60));
            }
            let mounted = device.as_deref().and_then(mounted_on);
            match (mounted, refused_at) {
                (Some(mp), Some(t)) if t.elapsed() < Duration::from_secs(10) => {
                    eprintln!("longhorn up: forcing the stop although {} is mounted on {mp}", device.as_deref().map(|d| d.display().to_string()).unwrap_or_default());
                    // The engine refuses the first signal while mounted and takes a
                    // second one as force.
                    if let Some(e) = procs.last() {
                        // SAFETY: signalling our own child by pid.
                        unsafe { libc::kill(e.child.id() as libc::pid_t, libc::SIGTERM) };
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    break;
                }
                (Some(mp), _) => {
                    eprintln!(
                        "longhorn up: not stopping: {} is mounted on {mp}; unmount it first (Ctrl-C again within 10 s forces the stop)",
                        device.as_deref().map(|d| d.display().to_string()).unwrap_or_default()
                    );
                    refused_at = Some(Instant::now());
                }
                (None, _) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Some(p) = share.as_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                eprintln!("longhorn up: the share manager exited ({st}); see {}", log_dir.join("share.log").display());
                share = None;
            }
        }
        if let Some(Ok(Some(st))) = procs.last_mut().map(|e| e.child.try_wait()) {
            failed = Some(format!("the engine exited ({st}); see {}", log_dir.join("engine.log").display()));
            break;
        }
        if auto_rebuild {
            sup.tick(&cx, &mut reps);
        } else {
            for r in reps.iter_mut() {
                if let Some(p) = r.proc.as_mut() {
                    if let Ok(Some(st)) = p.child.try_wait() {
                        eprintln!("longhorn up: {} exited ({st}); the volume carries on with the others", p.name);
                        r.proc = None;
                    }
                }
            }
        }
    }
    println!("stopping volume {}", a.volume);
    stop_all(&mut procs, &mut reps);
    match failed {
        Some(f) => bail!(f),
        None => {
            println!("stopped cleanly");
            Ok(())
        }
    }
}

/// Where the block device `dev` is mounted, if anywhere.
fn mounted_on(dev: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).ok()?.rdev();
    longhorn_frontend::device::mounted_at(rdev as libc::dev_t)
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
