//! `longhorn share VOL`: ReadWriteMany. The share manager puts the volume's filesystem
//! on the network over NFSv4, the way Longhorn's share-manager does:
//!
//! 1. find the volume's block device (`/dev/longhorn/VOL`) through the engine's control
//!    socket; with no engine running and `--size` given, start the volume itself
//!    (`longhorn up VOL --frontend auto`, a child it stops at the end);
//! 2. probe it with `blkid -p`; run `mkfs.ext4` only when it holds nothing at all (a
//!    partition table or an unknown signature is refused, never formatted over);
//! 3. mount it on `RUN_DIR/VOL.share/export`;
//! 4. write a config for NFS-Ganesha (NFSv4 only, FSAL VFS, numeric owners, graceless,
//!    its own recovery directory; no rpcbind, kernel nfsd or dbus needed) and run
//!    `ganesha.nfsd -F` as a child;
//! 5. check it every second (the process, and an RPC NULL call to NFS v4 over TCP) and
//!    restart it when it died or stopped answering;
//! 6. with `--clients FILE`, let only the addresses listed there mount (NFS `sec=sys`
//!    trusts whatever user a client names, so the addresses are the only gate): the file
//!    is read again every second, and a change is given to the running server by
//!    SIGHUP (Ganesha updates the export in place; mounts of clients still listed go on
//!    undisturbed, where a restart without a grace period would fail their open files);
//! 7. on SIGTERM/SIGINT: stop ganesha, unmount, and detach (stop the volume) only if it
//!    started the volume itself.
//!
//! The state (serving/restarting/stopped, address, pids) is kept in
//! `RUN_DIR/VOL.share/state.json`, which `longhorn volume info`/`ls` read.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

#[derive(Args)]
pub struct ShareArgs {
    /// The volume to share.
    #[arg(value_parser = crate::volume_name)]
    pub volume: String,
    /// Address the NFS server listens on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
    /// NFS port; 0 picks a free one.
    #[arg(long, default_value_t = 2049)]
    pub port: u16,
    /// Start the volume (`longhorn up VOL --frontend auto`) when no engine serves it,
    /// with this size; without it, a running engine with a block device is required.
    #[arg(long, value_parser = crate::parse_size)]
    pub size: Option<u64>,
    /// Replicas, when the share manager starts the volume itself.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Data directory, when the share manager starts the volume itself.
    #[arg(long, default_value = "/var/lib/longhorn")]
    pub data_dir: PathBuf,
    /// The NFS-Ganesha server binary.
    #[arg(long, default_value = "ganesha.nfsd")]
    pub ganesha: PathBuf,
    #[arg(long, default_value = crate::DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
    pub run_dir: PathBuf,
    /// Only the IP addresses listed in this file (one per line, `#` starts a comment)
    /// may mount the share; a missing or empty file lets no one. Read again every
    /// second. Without it, any host that reaches the bind address may mount.
    #[arg(long)]
    pub clients: Option<PathBuf>,
}

/// The addresses a `--clients` file lists. A missing file lists none (the share is
/// closed, never open by accident); a line that is not an IP address is an error
/// naming it.
pub fn read_clients(path: &Path) -> Result<Vec<IpAddr>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading the share's clients from {}", path.display())),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let ip: IpAddr = line.parse().map_err(|_| anyhow!("{} line {}: {line:?} is not an IP address", path.display(), i + 1))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out.sort();
    Ok(out)
}

/// How often the NFS server is checked, and how many failed NULL calls in a row make
/// the share manager restart a server that is still running.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
const PING_FAILURES: u32 = 3;
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The share manager's directory for a volume: config, logs, state, mount point.
pub fn share_dir(run_dir: &Path, volume: &str) -> PathBuf {
    run_dir.join(format!("{volume}.share"))
}

fn state_path(run_dir: &Path, volume: &str) -> PathBuf {
    share_dir(run_dir, volume).join("state.json")
}

/// Adds the access mode, share state and export address to a `volume-info` answer.
/// A state file whose share manager is gone reads as `stopped` (or `dead` when it did
/// not stop cleanly).
pub fn annotate(run_dir: &Path, v: &mut Value) {
    let Some(name) = v.get("name").and_then(|n| n.as_str()).map(str::to_string) else { return };
    let st: Option<Value> = std::fs::read_to_string(state_path(run_dir, &name)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let (mode, state, endpoint) = match st {
        None => ("ReadWriteOnce".to_string(), Value::Null, Value::Null),
        Some(st) => {
            let alive = st["pid"].as_i64().is_some_and(|p| pid_alive(p as i32));
            let s = st["state"].as_str().unwrap_or("unknown").to_string();
            let state = if alive || s == "stopped" { s } else { "dead".to_string() };
            let ep = if state == "stopped" || state == "dead" { Value::Null } else { st["endpoint"].clone() };
            (st["access_mode"].as_str().unwrap_or("ReadWriteMany").to_string(), Value::String(state), ep)
        }
    };
    if let Value::Object(m) = v {
        m.insert("access_mode".into(), Value::String(mode));
        m.insert("share_state".into(), state);
        m.insert("share_endpoint".into(), endpoint);
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The share's state file, rewritten atomically on every change.
struct State {
    path: PathBuf,
    v: Value,
}

impl State {
    fn set(&mut self, k: &str, val: Value) {
        self.v[k] = val;
        if let Err(e) = self.save() {
            warn!("writing {}: {e:#}", self.path.display());
        }
    }

    fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.v)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))?;
        Ok(())
    }
}

/// What has been set up so far, undone in reverse order by `teardown`.
struct Share {
    volume: String,
    dir: PathBuf,
    /// `longhorn up` started by the share manager (it owns the attachment then).
    up: Option<Child>,
    device: Option<PathBuf>,
    mount: Option<PathBuf>,
    ganesha: Option<Child>,
    /// Who may mount (`--clients`), as the server was last configured.
    clients: Option<Vec<IpAddr>>,
}

pub fn run(a: ShareArgs) -> Result<()> {
    if a.volume.is_empty() || !a.volume.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        bail!("volume name {:?}: use letters, digits, '.', '_' and '-' only (it becomes the NFS path /{})", a.volume, a.volume);
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGTERM, stop.clone()).context("signal handler")?;
    signal_hook::flag::register(SIGINT, stop.clone()).context("signal handler")?;

    let dir = share_dir(&a.run_dir, &a.volume);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))?;
    let sp = state_path(&a.run_dir, &a.volume);
    if let Some(old) = std::fs::read_to_string(&sp).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
        if let Some(pid) = old["pid"].as_i64().filter(|p| pid_alive(*p as i32) && *p as u32 != std::process::id()) {
            bail!("volume {} is already shared by share manager pid {pid} ({})", a.volume, old["endpoint"].as_str().unwrap_or("?"));
        }
    }
    let port = if a.port == 0 { free_port(&a.bind)? } else { a.port };
    let endpoint = format!("{}:/{}", a.bind, a.volume);
    let mut state = State {
        path: sp,
        v: json!({
            "volume": a.volume, "access_mode": "ReadWriteMany", "state": "starting", "pid": std::process::id(),
            "endpoint": endpoint, "port": port, "restarts": 0,
        }),
    };
    state.save()?;

    let clients = a.clients.as_deref().map(read_clients).transpose()?;
    if let Some(c) = &clients {
        state.set("clients", json!(c));
    }
    let mut sh = Share { volume: a.volume.clone(), dir: dir.clone(), up: None, device: None, mount: None, ganesha: None, clients };
    let res = start(&a, &mut sh, &mut state, port, &stop).and_then(|()| {
        println!("share {endpoint} (NFSv4, port {port})");
        println!("  clients:  mount -t nfs4 -o vers=4.0,port={port} {endpoint} /mnt");
        println!("            nfs-ls 'nfs://{}/{}?version=4&nfsport={port}'", a.bind, a.volume);
        println!("  files:    {}", sh.mount.as_deref().map(|m| m.display().to_string()).unwrap_or_default());
        println!("  server:   {} (log {})", a.ganesha.display(), dir.join("ganesha.log").display());
        println!("ready {endpoint}");
        std::io::stdout().flush().ok();
        serve(&a, &mut sh, &mut state, port, &stop)
    });
    state.set("state", json!("stopping"));
    let down = teardown(&mut sh);
    match (&res, &down) {
        (Ok(()), Ok(())) => {
            state.set("state", json!("stopped"));
            info!(volume = %a.volume, "share stopped: server stopped, filesystem unmounted");
            println!("share stopped cleanly");
        }
        _ => state.set("state", json!("failed")),
    }
    res.and(down)
}

/// Attach, probe, format if empty, mount, configure and start the server.
fn start(a: &ShareArgs, sh: &mut Share, state: &mut State, port: u16, stop: &AtomicBool) -> Result<()> {
    let dev = find_or_start_device(a, sh)?;
    state.set("device", json!(dev.display().to_string()));
    let meta = std::fs::metadata(&dev).with_context(|| format!("{}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        bail!("{} is not a block device", dev.display());
    }
    {
        use std::os::unix::fs::MetadataExt;
        if let Some(mp) = longhorn_frontend::device::mounted_at(meta.rdev() as libc::dev_t) {
            bail!("{} is already mounted on {mp}; a shared volume must be mounted by its share manager only", dev.display());
        }
    }
    let fstype = match probe_fs(&dev)? {
        Probe::Filesystem(t) => {
            info!(volume = %a.volume, device = %dev.display(), fstype = %t, "the volume holds a filesystem; not formatting it");
            state.set("formatted", json!(false));
            t
        }
        Probe::Empty => {
            info!(volume = %a.volume, device = %dev.display(), "no filesystem on the volume: mkfs.ext4");
            // Clients' root is squashed to the anonymous user: let it write at the top.
            let owner = format!("root_owner={ANON_ID}:{ANON_ID}");
            run_tool(Command::new("mkfs.ext4").args(["-q", "-F", "-E", &owner, "-L"]).arg(label(&a.volume)).arg(&dev), "mkfs.ext4")?;
            state.set("formatted", json!(true));
            "ext4".to_string()
        }
        Probe::Other(what) => bail!("{} holds {what}, not a filesystem; refusing to format over it", dev.display()),
    };
    if stop.load(Ordering::Acquire) {
        bail!("stopped before the filesystem was mounted");
    }
    let mnt = sh.dir.join("export");
    std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
    // Ganesha wants a plain absolute path (no `..`, no symlinks) for the export.
    let mnt = std::fs::canonicalize(&mnt).with_context(|| format!("resolving {}", mnt.display()))?;
    mount(&dev, &mnt, &fstype)?;
    sh.mount = Some(mnt.clone());
    info!(volume = %a.volume, device = %dev.display(), mount = %mnt.display(), fstype = %fstype, "filesystem mounted");
    state.set("export_dir", json!(mnt.display().to_string()));

    let conf = sh.dir.join("ganesha.conf");
    std::fs::create_dir_all(sh.dir.join("recovery")).context("creating the NFS recovery directory")?;
    write_config(a, sh, port)?;
    let addr = sock_addr(&a.bind, port)?;
    let child = start_ganesha(a, sh, &conf, addr, stop)?;
    state.set("server_pid", json!(child.id()));
    sh.ganesha = Some(child);
    state.set("state", json!("serving"));
    Ok(())
}

/// Writes the server's configuration for the share as it is now.
fn write_config(a: &ShareArgs, sh: &Share, port: u16) -> Result<()> {
    let conf = sh.dir.join("ganesha.conf");
    let mnt = sh.mount.as_deref().ok_or_else(|| anyhow!("the volume's filesystem is not mounted"))?;
    let text = ganesha_config(&a.volume, mnt, &sh.dir.join("recovery"), &a.bind, port, sh.clients.as_deref());
    let tmp = conf.with_extension("conf.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &conf).with_context(|| format!("renaming {} to {}", tmp.display(), conf.display()))
}

/// Reads `--clients` again; when the list changed, rewrites the configuration and has
/// the running server reload it (SIGHUP: Ganesha updates the export's clients in place).
fn update_clients(a: &ShareArgs, sh: &mut Share, state: &mut State, port: u16) -> Result<()> {
    let Some(path) = a.clients.as_deref() else { return Ok(()) };
    let now = read_clients(path)?;
    if sh.clients.as_ref() == Some(&now) {
        return Ok(());
    }
    // Recorded only once the server has the new list: a failed write or signal is
    // tried again at the next check, not taken for done (a node taken off must go).
    let before = std::mem::replace(&mut sh.clients, Some(now.clone()));
    let applied = write_config(a, sh, port).and_then(|()| match sh.ganesha.as_ref() {
        // SAFETY: signalling our own child by pid.
        Some(g) if unsafe { libc::kill(g.id() as libc::pid_t, libc::SIGHUP) } != 0 => {
            bail!("telling the NFS server (pid {}) of its new clients: {}", g.id(), std::io::Error::last_os_error())
        }
        _ => Ok(()),
    });
    if let Err(e) = applied {
        sh.clients = before;
        // The configuration on disk may hold either list: write the one in force
        // back, so a restarted server does not take up a list it was never given.
        if let Err(e2) = write_config(a, sh, port) {
            warn!(volume = %a.volume, "restoring the NFS configuration: {e2:#}");
        }
        return Err(e);
    }
    info!(volume = %a.volume, ?before, clients = ?now, "the share's clients changed; NFS server reloaded");
    state.set("clients", json!(now));
    Ok(())
}

/// Keeps the server alive until a stop signal.
fn serve(a: &ShareArgs, sh: &mut Share, state: &mut State, port: u16, stop: &AtomicBool) -> Result<()> {
    let addr = sock_addr(&a.bind, port)?;
    let conf = sh.dir.join("ganesha.conf");
    let mut last_check = Instant::now();
    let mut failures = 0u32;
    let mut restarts = 0u64;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        if last_check.elapsed() < CHECK_EVERY {
            continue;
        }
        last_check = Instant::now();
        if let Err(e) = update_clients(a, sh, state, port) {
            // The list the server has stays in force: a bad edit closes nothing new.
            error!(volume = %a.volume, "the share's clients: {e:#}; the server keeps {:?} (tried again in {CHECK_EVERY:?})", sh.clients);
        }
        if let Some(up) = sh.up.as_mut() {
            if let Ok(Some(st)) = up.try_wait() {
                sh.up = None;
                bail!("volume {}: `longhorn up` exited ({st}); the share has lost its disk", a.volume);
            }
        }
        let why = match sh.ganesha.as_mut().map(|g| g.try_wait()) {
            Some(Ok(Some(st))) => Some(format!("the NFS server exited ({st})")),
            Some(Err(e)) => Some(format!("cannot check the NFS server: {e}")),
            None => Some("no NFS server".to_string()),
            Some(Ok(None)) => match nfs_null(addr, PING_TIMEOUT) {
                Ok(()) => {
                    failures = 0;
                    None
                }
                Err(e) => {
                    failures += 1;
                    warn!(volume = %a.volume, failures, "NFS server did not answer a NULL call: {e:#}");
                    (failures >= PING_FAILURES).then(|| format!("the NFS server did not answer {failures} checks in a row"))
                }
            },
        };
        let Some(why) = why else { continue };
        error!(volume = %a.volume, "{why}; restarting it (see {})", sh.dir.join("ganesha.log").display());
        state.set("state", json!("restarting"));
        if let Some(mut g) = sh.ganesha.take() {
            stop_child(&mut g, "ganesha.nfsd", Duration::from_secs(5));
        }
        failures = 0;
        match start_ganesha(a, sh, &conf, addr, stop) {
            Ok(child) => {
                restarts += 1;
                info!(volume = %a.volume, pid = child.id(), restarts, "NFS server restarted");
                state.set("server_pid", json!(child.id()));
                state.set("restarts", json!(restarts));
                state.set("state", json!("serving"));
                sh.ganesha = Some(child);
            }
            Err(e) => error!(volume = %a.volume, "restarting the NFS server: {e:#}; trying again in {CHECK_EVERY:?}"),
        }
    }
    info!(volume = %a.volume, "stop requested");
    Ok(())
}

/// Stop serving, unmount, detach: in that order, each step only if the one before it
/// succeeded (a filesystem still in use is never pulled from under its server).
fn teardown(sh: &mut Share) -> Result<()> {
    if let Some(mut g) = sh.ganesha.take() {
        stop_child(&mut g, "ganesha.nfsd", Duration::from_secs(20));
        info!(volume = %sh.volume, "NFS server stopped");
    }
    if let Some(m) = sh.mount.take() {
        umount(&m).with_context(|| format!("volume {}: the filesystem stays mounted on {}", sh.volume, m.display()))?;
        info!(volume = %sh.volume, mount = %m.display(), "filesystem unmounted");
    }
    if let Some(mut up) = sh.up.take() {
        // The share manager attached the volume itself: `longhorn up` stops the engine
        // (which flushes and detaches the device) and then the replicas.
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(up.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            match up.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => bail!("volume {}: `longhorn up` did not stop cleanly ({st})", sh.volume),
                _ if t.elapsed() > Duration::from_secs(90) => {
                    let _ = up.kill();
                    let _ = up.wait();
                    bail!("volume {}: `longhorn up` did not stop in 90 s; killed", sh.volume)
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        info!(volume = %sh.volume, device = ?sh.device, "volume detached and stopped");
    }
    Ok(())
}

/// The volume's block device from its engine; or, with `--size` and no engine, start
/// the volume with `longhorn up --frontend auto`.
fn find_or_start_device(a: &ShareArgs, sh: &mut Share) -> Result<PathBuf> {
    let info = match crate::call(&a.run_dir, &a.volume, "volume-info") {
        Ok(v) => v,
        Err(e) => {
            let Some(size) = a.size else {
                return Err(e.context(format!(
                    "no engine serves volume {} (start it with `longhorn up {} --size S --frontend auto`, or give --size to let the share manager start it)",
                    a.volume, a.volume
                )));
            };
            info!(volume = %a.volume, "no engine serves the volume; starting it (longhorn up --frontend auto)");
            let exe = std::env::current_exe().context("finding the longhorn executable")?;
            let log = sh.dir.join("up.log");
            let logf = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let mut c = Command::new(exe);
            c.args(["up", &a.volume, "--size", &size.to_string(), "--replicas", &a.replicas.to_string(), "--frontend", "auto"])
                .arg("--data-dir")
                .arg(&a.data_dir)
                .arg("--run-dir")
                .arg(&a.run_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(logf)
                .process_group(0);
            let mut child = c.spawn().context("starting `longhorn up`")?;
            let out = child.stdout.take().ok_or_else(|| anyhow!("`longhorn up`: no stdout"))?;
            sh.up = Some(child);
            // `up` prints its summary and ends it with the Ctrl-C hint once the engine is ready.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with("Ctrl-C") {
                        let _ = tx.send(());
                    }
                }
            });
            if rx.recv_timeout(Duration::from_secs(120)).is_err() {
                bail!("`longhorn up {}` did not come up; see {}", a.volume, log.display());
            }
            crate::call(&a.run_dir, &a.volume, "volume-info")?
        }
    };
    let kind = info["frontend"].as_str().unwrap_or("");
    let ep = info["endpoint"].as_str().unwrap_or("");
    if kind.is_empty() || kind == "nbd-export" || !ep.starts_with('/') {
        bail!(
            "volume {} has no block device (frontend {kind:?}); restart its engine with `--frontend auto` (or fuse/nbd)",
            a.volume
        );
    }
    info!(volume = %a.volume, frontend = kind, device = ep, "using the volume's block device");
    let dev = PathBuf::from(ep);
    sh.device = Some(dev.clone());
    Ok(dev)
}

enum Probe {
    Empty,
    Filesystem(String),
    Other(String),
}

/// `blkid -p` (low-level probe, no cache): exit 2 means no signature at all.
fn probe_fs(dev: &Path) -> Result<Probe> {
    let o = Command::new("blkid").args(["-p", "-o", "export"]).arg(dev).output().context("running blkid (util-linux)")?;
    match o.status.code() {
        Some(2) => return Ok(Probe::Empty),
        Some(0) => {}
        _ => bail!("blkid -p {}: {} {}", dev.display(), o.status, String::from_utf8_lossy(&o.stderr).trim()),
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')).map(str::to_string));
    match (field("TYPE"), field("USAGE")) {
        (Some(t), Some(u)) if u == "filesystem" => Ok(Probe::Filesystem(t)),
        (Some(t), u) => Ok(Probe::Other(format!("a {t} signature (usage {})", u.unwrap_or_else(|| "unknown".into())))),
        (None, _) => match field("PTTYPE") {
            Some(p) => Ok(Probe::Other(format!("a {p} partition table"))),
            None => Ok(Probe::Other(format!("an unknown signature ({})", text.trim().replace('\n', " ")))),
        },
    }
}

/// An ext4 label (at most 16 bytes) from the volume name.
fn label(volume: &str) -> String {
    volume.chars().take(16).collect()
}

fn run_tool(cmd: &mut Command, name: &str) -> Result<()> {
    let o = cmd.output().with_context(|| format!("running {name}"))?;
    if !o.status.success() {
        bail!("{name} failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("{}: path has a NUL byte", p.display()))
}

fn mount(dev: &Path, mnt: &Path, fstype: &str) -> Result<()> {
    let (d, m) = (cstr(dev)?, cstr(mnt)?);
    let t = CString::new(fstype).map_err(|_| anyhow!("bad filesystem type {fstype:?}"))?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    // nosuid, nodev: what NFS clients write there must never run as root or reach a
    // device on the share manager's host.
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    let r = unsafe { libc::mount(d.as_ptr(), m.as_ptr(), t.as_ptr(), flags, std::ptr::null()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        bail!("mounting {} ({fstype}) on {}: {e}", dev.display(), mnt.display());
    }
    Ok(())
}

/// Unmounts, retrying while busy (the server's last file handles closing) for 15 s.
fn umount(mnt: &Path) -> Result<()> {
    let m = cstr(mnt)?;
    let t = Instant::now();
    loop {
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(m.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) || t.elapsed() > Duration::from_secs(15) {
            bail!("unmounting {}: {e}", mnt.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn free_port(bind: &str) -> Result<u16> {
    let l = TcpListener::bind((bind, 0)).with_context(|| format!("finding a free port on {bind}"))?;
    Ok(l.local_addr()?.port())
}

fn sock_addr(bind: &str, port: u16) -> Result<SocketAddr> {
    let host = if bind == "0.0.0.0" { "127.0.0.1" } else if bind == "::" { "::1" } else { bind };
    (host, port).to_socket_addrs().with_context(|| format!("address {host}:{port}"))?.next().ok_or_else(|| anyhow!("no address for {host}"))
}

/// The anonymous user and group clients' root is squashed to ("nobody").
const ANON_ID: u32 = 65534;

/// NFS-Ganesha's configuration: NFSv4 only (minor versions 0-2), one export of the
/// mounted filesystem at pseudo path /VOL, read-write, root squashed to nobody, clients
/// only from privileged ports (`sec=sys` believes the user a client names: an
/// unprivileged process of a client host must not speak for its users), numeric
/// owners (no idmapd), graceless (clients reconnect at once after a restart), its
/// recovery records in the share's own directory, no NLM/RQUOTA/UDP.
///
/// With a client list, the export itself grants nothing and one CLIENT block grants
/// read-write to exactly those addresses (none listed: no block, no access).
fn ganesha_config(volume: &str, mnt: &Path, recovery: &Path, bind: &str, port: u16, clients: Option<&[IpAddr]>) -> String {
    let (access, client_block) = match clients {
        None => ("RW", String::new()),
        Some([]) => ("None", String::new()),
        Some(list) => {
            let l: Vec<String> = list.iter().map(|ip| ip.to_string()).collect();
            ("None", format!("    CLIENT {{\n        Clients = {};\n        Protocols = 4;\n        Transports = TCP;\n        Access_Type = RW;\n    }}\n", l.join(", ")))
        }
    };
    format!(
        r#"# Written by `longhorn share {volume}`; rewritten at every start.
NFS_CORE_PARAM {{
    Protocols = 4;
    NFS_Port = {port};
    Bind_addr = {bind};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{
    Graceless = true;
    Minor_Versions = 0, 1, 2;
    RecoveryBackend = fs;
    RecoveryRoot = "{recovery}";
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}}
EXPORT_DEFAULTS {{
    Protocols = 4;
    Transports = TCP;
}}
EXPORT {{
    Export_Id = 1;
    Path = "{mnt}";
    Pseudo = "/{volume}";
    Protocols = 4;
    Transports = TCP;
    Access_Type = {access};
    Squash = Root_Squash;
    PrivilegedPort = true;
    Anonymous_Uid = {ANON_ID};
    Anonymous_Gid = {ANON_ID};
    SecType = sys;
    FSAL {{
        Name = VFS;
    }}
{client_block}}}
"#,
        recovery = recovery.display(),
        mnt = mnt.display(),
    )
}

/// Starts `ganesha.nfsd -F` (own process group, killed if the share manager dies) and
/// waits until it answers an NFS NULL call.
fn start_ganesha(a: &ShareArgs, sh: &Share, conf: &Path, addr: SocketAddr, stop: &AtomicBool) -> Result<Child> {
    let log = sh.dir.join("ganesha.log");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone().context("log file handle")?;
    let mut c = Command::new(&a.ganesha);
    c.arg("-F").arg("-f").arg(conf).arg("-L").arg(&log).arg("-p").arg(sh.dir.join("ganesha.pid")).args(["-N", "NIV_EVENT"]);
    c.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the
    // server when the share manager dies, so no server outlives its manager.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().with_context(|| format!("starting {} (Debian: nfs-ganesha, nfs-ganesha-vfs)", a.ganesha.display()))?;
    let t = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{} exited at start ({st}): {}", a.ganesha.display(), log_tail(&log, 5));
        }
        match nfs_null(addr, Duration::from_millis(500)) {
            Ok(()) => {
                info!(volume = %a.volume, pid = child.id(), %addr, ms = t.elapsed().as_millis() as u64, "NFS server answers");
                return Ok(child);
            }
            Err(e) if t.elapsed() > START_TIMEOUT || stop.load(Ordering::Acquire) => {
                stop_child(&mut child, "ganesha.nfsd", Duration::from_secs(5));
                bail!("the NFS server did not answer on {addr} within {START_TIMEOUT:?} ({e:#}): {}", log_tail(&log, 5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn log_tail(log: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// SIGTERM, wait up to `wait`, then SIGKILL.
fn stop_child(c: &mut Child, name: &str, wait: Duration) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < wait {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    warn!("{name} (pid {}) did not stop in {wait:?}; killing it", c.id());
    let _ = c.kill();
    let _ = c.wait();
}

/// One ONC RPC call of procedure 0 (NULL) of NFS version 4 over TCP (RFC 5531 record
/// marking, AUTH_NONE), and its reply checked: accepted, SUCCESS.
pub fn nfs_null(addr: SocketAddr, timeout: Duration) -> Result<()> {
    const NFS_PROGRAM: u32 = 100003;
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let xid = nanos ^ std::process::id();
    // xid, CALL, rpcvers 2, program, version 4, procedure NULL, cred AUTH_NONE, verf AUTH_NONE
    let words = [xid, 0, 2, NFS_PROGRAM, 4, 0, 0, 0, 0, 0];
    let mut msg = Vec::with_capacity(44);
    msg.extend_from_slice(&(0x8000_0000u32 | (words.len() as u32 * 4)).to_be_bytes());
    for w in words {
        msg.extend_from_slice(&w.to_be_bytes());
    }
    s.write_all(&msg).context("sending an NFS NULL call")?;
    let mut mark = [0u8; 4];
    s.read_exact(&mut mark).context("reading the NULL reply")?;
    let len = (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize;
    if !(24..=4096).contains(&len) {
        bail!("NULL reply of {len} bytes");
    }
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).context("reading the NULL reply")?;
    let w = |i: usize| u32::from_be_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    if w(0) != xid || w(1) != 1 {
        bail!("not a reply to our call (xid {:#x}, type {})", w(0), w(1));
    }
    if w(2) != 0 {
        bail!("call denied (reply_stat {})", w(2));
    }
    let verf_len = w(4) as usize;
    let at = 5 + verf_len.div_ceil(4);
    if b.len() < (at + 1) * 4 {
        bail!("short NULL reply");
    }
    match w(at) {
        0 => Ok(()),
        st => bail!("NULL call not accepted (accept_stat {st})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_export() {
        let c = ganesha_config("vol1", Path::new("/run/longhorn/vol1.share/export"), Path::new("/r"), "127.0.0.1", 2049, None);
        assert!(c.contains("Pseudo = \"/vol1\";"));
        assert!(c.contains("Access_Type = RW;") && !c.contains("CLIENT"));
        assert!(c.contains("NFS_Port = 2049;"));
        assert!(c.contains("Protocols = 4;"));
        assert!(c.contains("Name = VFS;"));
    }

    #[test]
    fn config_with_clients_grants_only_them() {
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().expect("ip"), "fd00::2".parse().expect("ip")];
        let c = ganesha_config("v", Path::new("/e"), Path::new("/r"), "10.0.0.9", 20490, Some(&ips));
        assert!(c.contains("Access_Type = None;"), "{c}");
        assert!(c.contains("Clients = 10.0.0.1, fd00::2;"), "{c}");
        let none = ganesha_config("v", Path::new("/e"), Path::new("/r"), "10.0.0.9", 20490, Some(&[]));
        assert!(none.contains("Access_Type = None;") && !none.contains("CLIENT") && !none.contains("Access_Type = RW"), "{none}");
    }

    #[test]
    fn clients_file_is_checked() {
        let d = std::env::temp_dir().join(format!("lh-share-clients-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let f = d.join("list");
        assert_eq!(read_clients(&f).expect("missing file"), Vec::<IpAddr>::new());
        std::fs::write(&f, "# nodes\n10.0.0.2\n\n10.0.0.1 # node a\n10.0.0.2\n").expect("write");
        let want: Vec<IpAddr> = vec!["10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip")];
        assert_eq!(read_clients(&f).expect("good file"), want);
        std::fs::write(&f, "10.0.0.1\nnode-b\n").expect("write");
        let e = format!("{:#}", read_clients(&f).expect_err("a name is not an address"));
        assert!(e.contains("line 2") && e.contains("node-b"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn annotate_without_share_is_rwo() {
        let d = tempdir();
        let mut v = json!({"name": "v"});
        annotate(&d, &mut v);
        assert_eq!(v["access_mode"], "ReadWriteOnce");
        assert!(v["share_state"].is_null());
        std::fs::create_dir_all(share_dir(&d, "v")).expect("dir");
        std::fs::write(state_path(&d, "v"), r#"{"state":"serving","pid":999999999,"endpoint":"127.0.0.1:/v"}"#).expect("write");
        annotate(&d, &mut v);
        assert_eq!(v["access_mode"], "ReadWriteMany");
        assert_eq!(v["share_state"], "dead");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("lh-share-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("tempdir");
        d
    }
}
