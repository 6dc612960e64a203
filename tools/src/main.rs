//! `longhorn`: one program for replicas, engines and the operator's commands.

mod autorebuild;
mod csi;
mod job;
mod api_cli;
mod manager;
mod share;
mod backup;
mod snapshot;
mod spec;
mod table;
mod up;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use longhorn_engine::{control, BlockBackend, Volume, VolumeHandle, VolumeOptions};
use longhorn_replica::{ReplicaServer, Store};
use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

pub const DEFAULT_RUN_DIR: &str = "/run/longhorn";

#[derive(Parser)]
#[command(name = "longhorn", version, about = "Replicated block storage: replicas, engines and their operations")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N replicas and an engine for VOLUME on this machine, serve it over NBD, and
    /// stop everything cleanly on Ctrl-C.
    Up(up::UpArgs),
    /// Replica processes and the engine's replica set.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// The engine process.
    #[command(subcommand)]
    Engine(EngineCmd),
    /// Volumes served by engines on this machine.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots of a running volume.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Backups to a Longhorn-compatible backupstore (file://, s3://, nfs://) and restores.
    Backup(backup::BackupCmd),
    /// Share a volume's filesystem over NFSv4 (ReadWriteMany): attach, mkfs.ext4 if
    /// empty, mount, serve with NFS-Ganesha until Ctrl-C.
    Share(share::ShareArgs),
    /// Recurring snapshot and backup jobs of a running volume.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// The host's volume manager (REST API, web UI, metrics), and the operator CLI
    /// over its API.
    Manager(manager::ManagerArgs),
    /// The Kubernetes CSI driver driver.longhorn.io (gRPC on a unix socket): volumes,
    /// snapshots, staging and publishing, over the hosts' managers.
    Csi(csi::CsiArgs),
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// Serve a replica directory (created when empty) over the replica protocol.
    Serve(ReplicaServeArgs),
    /// List the replicas of a running volume, with their mode, revision and rebuild progress.
    Ls(VolumeRef),
    /// Add a replica (started with `replica serve`) to a running volume and rebuild it online.
    Add(ReplicaAddrArgs),
    /// Take a replica out of a running volume.
    Rm(ReplicaAddrArgs),
    /// Grow a replica directory that no process serves to a larger size (the new range
    /// reads as zeros). The same size again does nothing, so it can be retried.
    Expand(ReplicaExpandArgs),
}

#[derive(Args)]
pub struct ReplicaExpandArgs {
    /// The replica directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The new volume size (e.g. 20G), at least the current one.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
}

#[derive(Args)]
struct ReplicaAddrArgs {
    /// The replica's address (HOST:PORT).
    address: String,
    /// Wait until the rebuild finishes (add only).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    vol: VolumeRef,
}

#[derive(Subcommand)]
enum EngineCmd {
    /// Serve a volume from its replicas, exported over NBD.
    Serve(EngineServeArgs),
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Show a running volume's state.
    Info(VolumeRef),
    /// List the volumes served on this machine.
    Ls(RunDirArg),
    /// Requests completed since the engine started: reads and writes (count, bytes,
    /// summed latency). Write-zeroes, trims and flushes are not counted.
    Stats(VolumeRef),
}

#[derive(Args)]
pub struct RunDirArg {
    /// Where engines keep their control sockets.
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
    pub run_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VolumeRef {
    /// The volume's name.
    #[arg(long, short = 'v', value_parser = volume_name)]
    pub volume: String,
    #[command(flatten)]
    pub common: RunDirArg,
}

#[derive(Args)]
pub struct ReplicaServeArgs {
    /// The replica directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The volume this replica belongs to (engines of other volumes are refused).
    #[arg(long, value_parser = volume_name)]
    pub volume: String,
    /// Volume size (e.g. 10G, 512M, bytes); needed to create a new replica and must
    /// match an existing one.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Address to listen on: HOST:PORT (port 0 picks a free port), or unix:PATH for
    /// engines on this host (a socket only root can use; cheaper than TCP loopback).
    /// The address is printed on stdout as `listening ADDR`.
    #[arg(long, default_value = "127.0.0.1:9502")]
    pub listen: String,
    /// The volume's secret (64 hex digits, mode 0600): engines and rebuild peers must
    /// prove it. Required to listen on anything but loopback.
    #[arg(long, env = "LONGHORN_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Read what the page cache misses with a pool of threads instead of io_uring (which
    /// is also what happens where io_uring is not allowed). From the environment too.
    #[arg(long, env = "LONGHORN_NO_IO_URING", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub no_io_uring: bool,
}

#[derive(Args)]
pub struct EngineServeArgs {
    #[arg(long, value_parser = volume_name)]
    pub volume: String,
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// A replica address (HOST:PORT, or unix:PATH for one on this host); repeat for each replica.
    #[arg(long = "replica")]
    pub replicas: Vec<String>,
    /// Serve this replica directory (created when empty) in the engine's own process,
    /// as the volume's first replica: the engine reaches it by function call, with no
    /// socket or thread hand-off (the co-located replica of Longhorn's data locality).
    /// It listens on --embed-listen for rebuild peers and control calls as any replica
    /// does. It lives and dies with this process.
    #[arg(long)]
    pub embed_replica: Option<PathBuf>,
    /// Where the embedded replica listens (HOST:PORT; port 0 picks one, printed as
    /// `embedded replica ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub embed_listen: String,
    /// The NBD export: `unix:PATH` or `tcp:HOST:PORT`. Default: unix:RUN_DIR/VOLUME.nbd
    #[arg(long)]
    pub nbd: Option<String>,
    /// Block device frontend: `auto` (ublk, else nbd, else fuse), `ublk`, `nbd`,
    /// `fuse` (FUSE file + loop device) or `none` (the NBD export only). The device
    /// appears as /dev/longhorn/VOLUME.
    #[arg(long, default_value = "none")]
    pub frontend: String,
    /// Drop a replica that leaves a request unanswered this many seconds.
    #[arg(long, default_value_t = 8)]
    pub io_timeout: u64,
    /// The volume's secret, proven to every replica (as given to them).
    #[arg(long, env = "LONGHORN_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Add back and rebuild, by itself, a failed replica that answers again (for
    /// replicas on other hosts; `longhorn up` restarts its own replicas instead).
    #[arg(long)]
    pub auto_rebuild: bool,
    /// When no replica is healthy, take back RW the ones with the newest data as soon as
    /// they answer again (after a network partition of the engine, say).
    #[arg(long)]
    pub auto_salvage: bool,
    /// Send every payload through the replicas' sockets, even to a replica on this host
    /// that could read big writes from memory shared with the engine.
    #[arg(long)]
    pub no_shared_memory: bool,
    /// Keep the engine's threads under the default scheduling policy (SCHED_OTHER)
    /// instead of SCHED_BATCH (see `batch_scheduling`). From the environment too, so
    /// engines that `longhorn up` or the manager start can be told.
    #[arg(long, env = "LONGHORN_NORMAL_SCHEDULING", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub normal_scheduling: bool,
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
    pub run_dir: PathBuf,
    /// The volume's recurring jobs (a JSON list as in a StorageClass's recurringJobs);
    /// `job add`/`job rm` rewrite it, so the jobs survive an engine restart.
    #[arg(long)]
    pub jobs_file: Option<PathBuf>,
    /// Run recurring jobs on a manual clock starting at this RFC 3339 time, advanced
    /// with `longhorn job clock --advance` (for tests).
    #[arg(long)]
    pub manual_clock: Option<String>,
}

/// A volume name, checked by the one rule for names before it reaches any path.
pub fn volume_name(s: &str) -> std::result::Result<String, String> {
    longhorn_replica::names::check("volume", s).map(|_| s.to_string())
}

/// Parses sizes like `10G`, `512M`, `4096`, `1.5T` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size"))?;
    if !(v > 0.0) {
        return Err(format!("size {s:?} must be positive"));
    }
    let bytes = (v * mult as f64) as u64;
    if bytes % 4096 != 0 {
        return Err(format!("size {s:?} ({bytes} bytes) must be a multiple of 4096"));
    }
    Ok(bytes)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let r = match cli.cmd {
        Cmd::Up(a) => up::run(a),
        Cmd::Replica(ReplicaCmd::Serve(a)) => replica_serve(a),
        Cmd::Replica(ReplicaCmd::Ls(a)) => replica_ls(a),
        Cmd::Replica(ReplicaCmd::Add(a)) => replica_add(a),
        Cmd::Replica(ReplicaCmd::Rm(a)) => replica_rm(a),
        Cmd::Replica(ReplicaCmd::Expand(a)) => replica_expand(a),
        Cmd::Engine(EngineCmd::Serve(a)) => engine_serve(a),
        Cmd::Volume(VolumeCmd::Info(a)) => volume_info(a),
        Cmd::Volume(VolumeCmd::Ls(a)) => volume_ls(a),
        Cmd::Volume(VolumeCmd::Stats(a)) => volume_stats(a),
        Cmd::Snapshot(c) => snapshot::run(c),
        Cmd::Backup(c) => backup::run(c),
        Cmd::Share(a) => share::run(a),
        Cmd::Job(c) => job::run(c),
        Cmd::Manager(c) => manager::run(c),
        Cmd::Csi(c) => csi::run(c),
    };
    if let Err(e) = r {
        eprintln!("longhorn: {e:#}");
        std::process::exit(1);
    }
}

/// Takes over SIGTERM and SIGINT. Installed before a process says it is ready, so a
/// stop request right after start is a clean stop, not a kill.
fn stop_signals() -> Result<signal_hook::iterator::Signals> {
    signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_signal(mut sigs: signal_hook::iterator::Signals) -> Result<i32> {
    Ok(sigs.forever().next().unwrap_or(SIGTERM))
}

fn replica_expand(a: ReplicaExpandArgs) -> Result<()> {
    let old = longhorn_replica::expand::expand(&a.dir, a.size)?;
    if old == a.size {
        println!("replica {} is already {} bytes", a.dir.display(), a.size);
    } else {
        println!("replica {} expanded from {old} to {} bytes", a.dir.display(), a.size);
    }
    Ok(())
}

fn replica_serve(a: ReplicaServeArgs) -> Result<()> {
    let sigs = stop_signals()?;
    let key = match &a.secret_file {
        Some(p) => Some(Arc::new(longhorn_replica::auth::Key::load(p).map_err(|e| anyhow!(e))?)),
        None => None,
    };
    let (server, addr) = start_replica_server(&a.dir, &a.volume, a.size, &a.listen, key, "--listen", !a.no_io_uring)?;
    println!("listening {addr}");
    std::io::stdout().flush().ok();
    let sig = wait_for_signal(sigs)?;
    info!(signal = sig, "stopping replica");
    server.shutdown().context("closing the replica cleanly")?;
    info!("replica closed cleanly");
    Ok(())
}

/// Opens the replica in `dir` (created when the directory is empty), serves it on
/// `listen` in threads of this process and returns it with the address it listens on.
/// The directory's lock is held until the process ends. `flag` names the listen
/// address in errors; without `io_uring`, cache misses go to reader threads.
fn start_replica_server(
    dir: &Path,
    volume: &str,
    size: u64,
    listen: &str,
    key: Option<Arc<longhorn_replica::auth::Key>>,
    flag: &str,
    io_uring: bool,
) -> Result<(Arc<ReplicaServer>, String)> {
    // A malformed address is refused before the replica directory is made. It is bound
    // only once the store is open: a connection accepted into the backlog meanwhile
    // would look like a ready replica to whoever waits for one (the manager does).
    match longhorn_replica::net::unix_path(listen) {
        Some(p) => longhorn_replica::net::check_unix_path(p),
        None => std::net::ToSocketAddrs::to_socket_addrs(listen).map(|_| ()),
    }
    .with_context(|| format!("{flag} {listen}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Before anything is written in it: the volume's data is for root's eyes only.
    longhorn_replica::store::restrict_dir(dir).with_context(|| format!("making {} private (0700)", dir.display()))?;
    // Held until the process ends (see `lock_dir`): no other process serves it meanwhile.
    let lock = longhorn_replica::store::lock_dir(dir)?;
    std::mem::forget(lock);
    let meta = dir.join(longhorn_replica::meta::VOLUME_META);
    if !meta.exists() {
        let busy = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
        if busy {
            bail!("{}: directory is not empty but has no volume.meta; refusing to create a replica over it", dir.display());
        }
        Store::create(dir, volume, size).with_context(|| format!("creating replica in {}", dir.display()))?;
        info!(dir = %dir.display(), "created a new replica");
    }
    let store = Store::open(dir, Some(volume)).with_context(|| format!("opening replica {}", dir.display()))?;
    if store.size() != size {
        bail!("{}: the replica holds {} bytes, but --size says {size}", dir.display(), store.size());
    }
    if store.was_dirty() {
        info!(dir = %dir.display(), "replica was not closed cleanly last time (Dirty)");
    }
    let listener = longhorn_replica::net::Listener::bind(listen).with_context(|| format!("{flag} {listen}: listening"))?;
    let addr = listener.local_addr().context("local address")?;
    if key.is_none() && !listener.is_host_local() {
        bail!("{flag} {addr}: without --secret-file anyone who reaches this address could act as the volume's engine; give the volume's secret to listen beyond loopback");
    }
    if key.is_none() {
        warn!(%addr, "no --secret-file: any local process can connect as an engine");
    }
    let server = ReplicaServer::new(Arc::new(store), key);
    if !io_uring {
        server.read_misses_with_threads();
    }
    info!(dir = %dir.display(), %volume, %addr, revision = server.store().revision(), "replica serving");
    let s2 = server.clone();
    std::thread::Builder::new().name("accept".into()).spawn(move || s2.serve(listener))?;
    Ok((server, addr))
}

/// Puts this thread, and so every thread it starts afterwards, under SCHED_BATCH: the
/// same share of the CPU, but when one of them is woken it does not preempt the thread
/// running on that CPU. The
/// engine's threads hand requests to each other, to replicas and to clients all the
/// time; woken straight onto the CPU, each takes one or two requests and sleeps again.
/// Two NBD connections of 4 KiB random reads here: 32-40k IOPS at 36-41 us of CPU per
/// request under SCHED_OTHER, 128-146k at 7 us under SCHED_BATCH (one connection and
/// QD1 latency level). Fairness and nice levels are unchanged, and no privilege is
/// needed. What it costs: a woken engine thread can wait up to one scheduler slice
/// (a few ms) for a busy CPU instead of taking it at once.
fn batch_scheduling() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the policy of the calling thread (pid 0) from a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) } != 0 {
        warn!("cannot switch the engine to SCHED_BATCH ({}): its threads keep the default policy", std::io::Error::last_os_error());
    }
}

fn engine_serve(a: EngineServeArgs) -> Result<()> {
    use longhorn_frontend::device::{Device, DeviceConfig, DeviceError, FrontendKind};
    // First: threads inherit the policy of the thread that starts them.
    if !a.normal_scheduling {
        batch_scheduling();
    }
    let sigs = stop_signals()?;
    let kind: FrontendKind = a.frontend.parse().map_err(|e: String| anyhow!("--frontend: {e}"))?;
    let secret = match &a.secret_file {
        Some(p) => Some(Arc::new(longhorn_replica::auth::Key::load(p).map_err(|e| anyhow!(e))?)),
        None => None,
    };
    let mut replicas = a.replicas.clone();
    let embedded = match &a.embed_replica {
        None => None,
        Some(dir) => {
            let (server, addr) = start_replica_server(dir, &a.volume, a.size, &a.embed_listen, secret.clone(), "--embed-listen", true)?;
            let addr = addr.to_string();
            println!("embedded replica {addr}");
            replicas.insert(0, addr.clone());
            Some(longhorn_engine::Embedded { addr, server })
        }
    };
    if replicas.is_empty() {
        bail!("no replica: give --replica ADDR (repeat for each) or --embed-replica DIR");
    }
    let opts = VolumeOptions {
        io_timeout: Duration::from_secs(a.io_timeout.max(1)),
        secret,
        auto_rebuild: a.auto_rebuild,
        auto_salvage: a.auto_salvage,
        embedded: embedded.clone(),
        shared_memory: !a.no_shared_memory,
    };
    let volume = Volume::start(&a.volume, a.size, &replicas, opts).context("starting the volume")?;
    let nbd_listen = a.nbd.clone().unwrap_or_else(|| format!("unix:{}", a.run_dir.join(format!("{}.nbd", a.volume)).display()));
    if let Some(hp) = nbd_listen.strip_prefix("tcp:") {
        // NBD has no authentication of its own: the export is the whole volume to
        // anyone who reaches it. Beyond loopback that is every host on the network.
        let addrs: Vec<std::net::SocketAddr> =
            std::net::ToSocketAddrs::to_socket_addrs(hp).with_context(|| format!("--nbd {nbd_listen}: expected tcp:HOST:PORT"))?.collect();
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!("--nbd {nbd_listen}: {a} is beyond loopback, and NBD has no authentication: anyone who reaches it could read and write the whole volume; use unix:PATH (mode 0600) or a loopback address");
        }
        warn!(%nbd_listen, "the NBD export on TCP loopback has no authentication: any local process can read and write the volume (unix:PATH is private to root)");
    }
    if let Some(p) = nbd_listen.strip_prefix("unix:") {
        if let Some(d) = Path::new(p).parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
    }
    let backend: Arc<dyn BlockBackend> = Arc::new(VolumeHandle(volume.clone()));
    let server = longhorn_frontend::NbdServer::bind(&nbd_listen, backend.clone()).with_context(|| format!("NBD export on {nbd_listen}"))?;
    let uri = server.uri();
    volume.set_frontend("nbd-export", &uri);
    let v2 = volume.clone();
    let clock = match &a.manual_clock {
        None => longhorn_engine::jobs::Clock::System,
        Some(t) => {
            let t = chrono::DateTime::parse_from_rfc3339(t).with_context(|| format!("--manual-clock {t:?}"))?;
            longhorn_engine::jobs::Clock::Manual(std::sync::Mutex::new(t.with_timezone(&chrono::Utc)))
        }
    };
    let sched = longhorn_engine::jobs::Scheduler::start(&volume, a.jobs_file.clone(), clock).map_err(|e| anyhow!(e))?;
    job::wire_backups(&sched);
    let handler: control::Handler = Arc::new(move |req: &Value| match req.get("cmd").and_then(|c| c.as_str()) {
        Some(c) if c.starts_with("job-") => job::control(&sched, c, req),
        _ => control_request(&v2, req),
    });
    let _ctl = control::ControlServer::start(&control::socket_path(&a.run_dir, &a.volume), handler)?;
    let handle = server.spawn().context("starting the NBD server")?;
    // The block device comes after the NBD export: the kernel NBD frontend connects
    // to it, and udev may read the new device at once.
    let mut device = None;
    if kind != FrontendKind::None {
        let cfg = DeviceConfig { volume: a.volume.clone(), backend, nbd_listen: nbd_listen.clone(), run_dir: a.run_dir.clone() };
        let d = match Device::attach(kind, &cfg) {
            Ok(d) => d,
            Err(e) => {
                handle.shutdown();
                volume.close();
                return Err(anyhow!(e).context(format!("--frontend {kind}")));
            }
        };
        let path = d.path();
        volume.set_frontend(&d.kind().to_string(), &path.display().to_string());
        info!(volume = %a.volume, device = %path.display(), kernel = %d.kernel_path().display(), frontend = %d.kind(), "block device ready");
        println!("device {} ({})", path.display(), d.kind());
        device = Some(d);
    }
    info!(volume = %a.volume, %uri, "engine serving");
    println!("ready {uri}");
    std::io::stdout().flush().ok();
    // Stop on SIGTERM/SIGINT. While the device is mounted a stop is refused (the
    // filesystem would lose its disk); a second signal within 10 s of a refusal forces
    // it, as a double Ctrl-C does.
    let mut sigs = sigs;
    let mut refused_at: Option<std::time::Instant> = None;
    let mut force = false;
    for sig in sigs.forever() {
        if let Some(d) = &device {
            if let Some(mp) = d.mounted_at() {
                if refused_at.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
                    force = true;
                } else {
                    refused_at = Some(std::time::Instant::now());
                    error!(volume = %a.volume, signal = sig, "refusing to stop: {} is mounted on {mp}; unmount it first (a second signal within 10 s forces the stop)", d.path().display());
                    continue;
                }
            }
        }
        info!(signal = sig, force, "stopping engine");
        break;
    }
    let mut detach_err = None;
    if let Some(d) = device.take() {
        let path = d.path();
        match d.detach(force) {
            Ok(()) => info!(volume = %a.volume, device = %path.display(), "block device flushed, detached and removed"),
            Err(e) => {
                error!(volume = %a.volume, "detaching {}: {e}", path.display());
                detach_err = Some(e);
            }
        }
    }
    handle.shutdown();
    volume.close();
    if let Some(e) = &embedded {
        // Closed cleanly by `close` above when it was in use; stopped here either way.
        if let Err(err) = e.server.shutdown() {
            error!(replica = %e.addr, "closing the embedded replica: {err}");
        }
    }
    info!("engine stopped");
    match detach_err {
        // A forced stop of a mounted device is expected to leave it deferred (Busy).
        Some(DeviceError::Busy(_)) if force => Ok(()),
        Some(e) => Err(anyhow!(e).context(format!("volume {}: the block device did not detach cleanly", a.volume))),
        None => Ok(()),
    }
}

fn control_request(v: &Arc<Volume>, req: &Value) -> std::result::Result<Value, String> {
    match req.get("cmd").and_then(|c| c.as_str()).unwrap_or("") {
        "volume-info" => serde_json::to_value(v.status()).map_err(|e| e.to_string()),
        "replica-ls" => serde_json::to_value(v.replica_status()).map_err(|e| e.to_string()),
        // Request counters since the engine started, for the manager's metrics.
        "volume-stats" => serde_json::to_value(v.stats()).map_err(|e| e.to_string()),
        // What the engine already knows, without asking the replicas (no side effects).
        "replica-modes" => serde_json::to_value(v.replica_modes()).map_err(|e| e.to_string()),
        c if c.starts_with("snapshot-") => snapshot::control(v, c, req),
        c if c.starts_with("backup-") => backup::control(v, c, req),
        "replica-add" | "replica-rm" => {
            let addr = req.get("address").and_then(|a| a.as_str()).ok_or("request has no \"address\"")?;
            if req["cmd"] == "replica-add" {
                v.add_replica(addr).map(Value::String)
            } else {
                v.remove_replica(addr).map(|_| Value::Null)
            }
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// One request to the engine serving `volume`.
pub(crate) fn control_call(run_dir: &Path, volume: &str, req: &Value) -> std::result::Result<Value, String> {
    control::call(run_dir, volume, req)
}

fn call(run_dir: &Path, volume: &str, cmd: &str) -> Result<Value> {
    control::call(run_dir, volume, &json!({"cmd": cmd})).map_err(|e| anyhow!(e))
}

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn volume_info(a: VolumeRef) -> Result<()> {
    let mut v = call(&a.common.run_dir, &a.volume, "volume-info")?;
    share::annotate(&a.common.run_dir, &mut v);
    if a.common.json {
        print_json(&v);
    } else {
        table::volumes(&[v]);
    }
    Ok(())
}

fn volume_stats(a: VolumeRef) -> Result<()> {
    let v = call(&a.common.run_dir, &a.volume, "volume-stats")?;
    if a.common.json {
        print_json(&v);
        return Ok(());
    }
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    for dir in ["read", "write"] {
        let ops = n(&format!("{dir}_ops"));
        let mean_us = n(&format!("{dir}_latency_ns")).checked_div(ops).unwrap_or(0) as f64 / 1000.0;
        println!("{dir:5} {ops:>12} requests {:>16} bytes   mean latency {mean_us:.1} us", n(&format!("{dir}_bytes")));
    }
    Ok(())
}

fn volume_ls(a: RunDirArg) -> Result<()> {
    let mut vols = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&a.run_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(vol) = name.strip_suffix(".sock") {
                match call(&a.run_dir, vol, "volume-info") {
                    Ok(mut v) => {
                        share::annotate(&a.run_dir, &mut v);
                        vols.push(v)
                    }
                    Err(err) => error!(volume = vol, "not answering: {err:#}"),
                }
            }
        }
    }
    if a.json {
        print_json(&Value::Array(vols));
    } else {
        table::volumes(&vols);
    }
    Ok(())
}

fn replica_add(a: ReplicaAddrArgs) -> Result<()> {
    let r = control::call(&a.vol.common.run_dir, &a.vol.volume, &json!({"cmd": "replica-add", "address": a.address}))
        .map_err(|e| anyhow!(e))?;
    println!("{}", r.as_str().unwrap_or(""));
    if !a.wait {
        return Ok(());
    }
    let t = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let ls = call(&a.vol.common.run_dir, &a.vol.volume, "replica-ls")?;
        let me = ls.as_array().and_then(|l| l.iter().find(|r| r["address"] == a.address.as_str()).cloned());
        let Some(me) = me else { bail!("replica {} disappeared from the volume", a.address) };
        match me["mode"].as_str() {
            Some("RW") => {
                let p = &me["progress"];
                println!(
                    "rebuilt: {} bytes in chain, {} sent, {:.1} s",
                    p["bytes_total"], p["bytes_sent"], p["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                );
                return Ok(());
            }
            Some("ERR") => bail!("rebuild of {} failed: {}", a.address, me["error"].as_str().unwrap_or("")),
            _ if t.elapsed() > Duration::from_secs(3600) => bail!("rebuild of {} did not finish in an hour", a.address),
            _ => {}
        }
    }
}

fn replica_rm(a: ReplicaAddrArgs) -> Result<()> {
    control::call(&a.vol.common.run_dir, &a.vol.volume, &json!({"cmd": "replica-rm", "address": a.address}))
        .map_err(|e| anyhow!(e))?;
    println!("replica {} removed from {}", a.address, a.vol.volume);
    Ok(())
}

fn replica_ls(a: VolumeRef) -> Result<()> {
    let v = call(&a.common.run_dir, &a.volume, "replica-ls")?;
    if a.common.json {
        print_json(&v);
    } else {
        table::replicas(v.as_array().map(|a| a.as_slice()).unwrap_or(&[]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1000").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("abc").is_err());
    }
}
