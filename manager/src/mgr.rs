//! The manager's volumes: their state on disk, their `longhorn up` processes, and what
//! their engines say (sampled once a second; the API, the event stream and the
//! metrics all read those samples).

use crate::error::{ApiError, ApiResult};
use crate::state::{StateDir, VolumeState};
use crate::{procs, Config};
use anyhow::{anyhow, Context};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// How long one request to an engine's control socket may take before the API answers
/// 502: longer than the control call's own 120 s, so a client is never told "failed"
/// of a snapshot or backup the engine is still making (and retries into a duplicate).
const ENGINE_TIMEOUT: Duration = Duration::from_secs(130);
/// How long one status question of the sampler may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `longhorn up` may take to bring an engine up (replicas first, and a
/// rebuild-free start of each).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(90);

/// What an engine said at one sampling.
#[derive(Clone, Default)]
pub struct Sample {
    pub info: Value,
    pub replicas: Value,
    pub backups: Value,
    pub snapshots: Value,
}

/// Rates over the last sampling interval, from `volume-stats` differences.
#[derive(Clone, Default, Debug)]
pub struct Rates {
    pub read_bps: f64,
    pub write_bps: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_latency_ns: f64,
    pub write_latency_ns: f64,
}

/// The NFS port of a ReadWriteMany volume's share: the one it had while it is free
/// (clients that still mount it find it there again after a restart), else the first
/// of SHARE_PORTS that no other volume holds and nothing listens on. The range sits
/// below the kernel's ephemeral ports, where replicas' listeners land.
fn share_port(ip: std::net::IpAddr, had: u16, held: &[u16]) -> anyhow::Result<u16> {
    let free = |p: u16| std::net::TcpListener::bind((ip, p)).is_ok();
    if had != 0 && free(had) {
        return Ok(had);
    }
    SHARE_PORTS
        .filter(|p| !held.contains(p))
        .find(|&p| free(p))
        .ok_or_else(|| anyhow!("no NFS port free on {ip} for its share (of {SHARE_PORTS:?})"))
}

/// Where ReadWriteMany volumes' NFS shares listen, one port each.
pub const SHARE_PORTS: std::ops::RangeInclusive<u16> = 20490..=20999;

pub struct Entry {
    pub st: VolumeState,
    /// attaching, detaching, deleting while that runs.
    pub transient: Option<&'static str>,
    pub sample: Option<Sample>,
    /// Set when the last sampling of an attached volume failed (its engine did not
    /// answer).
    pub sample_error: String,
    pub rates: Rates,
    prev_stats: Option<(Instant, Value)>,
    /// (blocks done, blocks total) of a running restore.
    pub restore: Option<(u64, u64)>,
    restart_failures: u32,
    next_restart: Option<Instant>,
}

impl Entry {
    pub fn new_pub(st: VolumeState) -> Entry {
        Entry {
            st,
            transient: None,
            sample: None,
            sample_error: String::new(),
            rates: Rates::default(),
            prev_stats: None,
            restore: None,
            restart_failures: 0,
            next_restart: None,
        }
    }
}

pub struct Mgr {
    pub cfg: Config,
    pub exe: PathBuf,
    pub store: StateDir,
    pub vols: Mutex<BTreeMap<String, Entry>>,
    /// Lifecycle changes (create, attach, detach, delete, restart) one at a time: they
    /// start and stop processes and rewrite state files.
    pub ops: tokio::sync::Mutex<()>,
    pub events: broadcast::Sender<String>,
    /// Replicas this host keeps for engines on any host (`replicas.rs`).
    pub reps: Mutex<BTreeMap<String, crate::replicas::Entry>>,
}

pub type Shared = Arc<Mgr>;

/// Runs blocking work (control sockets, process waits, backupstores) off the async
/// threads, on a thread of its own: the backup targets may run a tokio runtime of
/// their own inside, which tokio refuses on its blocking pool's threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("manager-work".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| ApiError::internal(anyhow!("starting a worker thread: {e}")))?;
    rx.await.map_err(|_| ApiError::internal(anyhow!("a worker thread died")))
}

impl Mgr {
    pub fn new(cfg: Config) -> anyhow::Result<Mgr> {
        let exe = std::env::current_exe().context("finding the longhorn executable")?;
        let store = StateDir::open(&cfg.state_dir)?;
        let mut vols = BTreeMap::new();
        for st in store.load_all()? {
            vols.insert(st.name.clone(), Entry::new_pub(st));
        }
        let (events, _) = broadcast::channel(1024);
        let reps = crate::replicas::entries(crate::replicas::load_all(&cfg.state_dir)?);
        Ok(Mgr { cfg, exe, store, vols: Mutex::new(vols), ops: tokio::sync::Mutex::new(()), events, reps: Mutex::new(reps) })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.vols.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn replicas(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, crate::replicas::Entry>> {
        self.reps.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn settings_path(&self) -> PathBuf {
        self.cfg.data_dir.join("settings.json")
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("logs").join(format!("{name}.log"))
    }

    pub fn nbd_uri(&self, name: &str) -> String {
        format!("nbd+unix:///?socket={}", self.cfg.run_dir.join(format!("{name}.nbd")).display())
    }

    pub fn state(&self, name: &str) -> ApiResult<VolumeState> {
        self.lock().get(name).map(|e| e.st.clone()).ok_or_else(|| ApiError::not_found(format!("volume {name:?}")).with_field("name"))
    }

    /// Saves a changed state and updates the in-memory copy.
    pub fn save(&self, st: &VolumeState) -> ApiResult<()> {
        if st.access_mode == "rwx" {
            self.write_share_clients(st).map_err(ApiError::internal)?;
        }
        self.store.save(st).map_err(ApiError::internal)?;
        if let Some(e) = self.lock().get_mut(&st.name) {
            e.st = st.clone();
        }
        Ok(())
    }

    /// The addresses a ReadWriteMany volume's share lets mount: this host's own and
    /// those of the nodes it is attached for.
    pub fn share_clients(&self, st: &VolumeState) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(self.cfg.replica_ip.to_string()).chain(st.attached_from.values().cloned()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Where the share (`longhorn share --clients`) reads them; it reads the file
    /// again every second, so a node attached or detached is let in or shut out at once.
    pub fn share_clients_path(&self, name: &str) -> std::path::PathBuf {
        self.cfg.run_dir.join(format!("{name}.share")).join("clients")
    }

    fn write_share_clients(&self, st: &VolumeState) -> anyhow::Result<()> {
        use anyhow::Context;
        let path = self.share_clients_path(&st.name);
        let dir = path.parent().unwrap_or(&self.cfg.run_dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = format!("# Written by the manager: who may mount the share of {}.\n{}\n", st.name, self.share_clients(st).join("\n"));
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            return Ok(());
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    pub fn set_transient(&self, name: &str, t: Option<&'static str>) {
        if let Some(e) = self.lock().get_mut(name) {
            e.transient = t;
        }
    }

    /// One control request to the volume's engine.
    pub async fn engine(&self, name: &str, req: Value) -> ApiResult<Value> {
        self.engine_within(name, req, ENGINE_TIMEOUT).await
    }

    async fn engine_within(&self, name: &str, req: Value, limit: Duration) -> ApiResult<Value> {
        let run_dir = self.cfg.run_dir.clone();
        let n = name.to_string();
        let call = blocking(move || longhorn_engine::control::call(&run_dir, &n, &req));
        match tokio::time::timeout(limit, call).await {
            Err(_) => Err(ApiError::engine(name, format!("no answer in {limit:?}"))),
            Ok(r) => r?.map_err(|e| classify(name, e)),
        }
    }

    /// The volume must be attached (its engine running) for this action.
    pub fn require_attached(&self, name: &str, action: &str) -> ApiResult<()> {
        let g = self.lock();
        let e = g.get(name).ok_or_else(|| ApiError::not_found(format!("volume {name:?}")).with_field("name"))?;
        let state = volume_state(e);
        if state != "attached" {
            return Err(ApiError::conflict(format!("volume {name:?} is {state}: {action} needs it attached")));
        }
        Ok(())
    }

    /// The credentials of the backup target's secret, as environment variables.
    pub fn backup_env(&self) -> HashMap<String, String> {
        crate::settings::credential_env(self)
    }

    /// Starts the volume's `longhorn up` and waits until its engine answers. Called
    /// with `ops` held.
    pub async fn start_up(self: &Arc<Self>, name: &str) -> ApiResult<()> {
        let mut st = self.state(name)?;
        let ip = self.cfg.replica_ip;
        let held: Vec<u16> = self.lock().values().filter(|e| e.st.name != st.name).map(|e| e.st.share_port).collect();
        let frontend = crate::input::frontend("frontend", &st.frontend, st.disable_frontend)?.to_string();
        let (exe, data_dir, run_dir, log, settings) =
            (self.exe.clone(), self.cfg.data_dir.clone(), self.cfg.run_dir.clone(), self.log_path(name), self.settings_path());
        let env = self.backup_env();
        let st2 = st.clone();
        let clients = self.share_clients_path(name);
        if st.access_mode == "rwx" {
            self.write_share_clients(&st).map_err(ApiError::internal)?;
        }
        let (pid, start, port) = blocking(move || {
            // The engine starts on the replicas with the newest revision among those
            // that answer: one of those known to be current must be among them.
            if !st2.healthy_replicas.is_empty() && !st2.healthy_replicas.iter().any(|a| answers(a)) {
                anyhow::bail!(
                    "none of the replicas that last held its newest data answers ({}); not starting on the others, which may be behind",
                    st2.healthy_replicas.join(", ")
                );
            }
            // What a killed `up` left running would stop the new one from starting.
            procs::stop_leftovers(&st2.name, &data_dir, &run_dir)?;
            // Chosen once what an earlier `up` left (its share among it) is gone.
            let port = if st2.access_mode == "rwx" { share_port(ip, st2.share_port, &held)? } else { 0 };
            procs::spawn_up(&procs::UpArgs {
                exe: &exe,
                volume: &st2.name,
                size: st2.size,
                replicas: st2.local_replicas(),
                remote_replicas: &st2.remote_replicas,
                data_dir: &data_dir,
                run_dir: &run_dir,
                frontend: &frontend,
                stale_minutes: st2.stale_replica_timeout,
                embedded_replica: st2.embedded_replica(),
                recurring_jobs: &st2.recurring_jobs,
                share: (st2.access_mode == "rwx").then(|| (ip.to_string(), port, clients.clone())),
                log: &log,
                settings: &settings,
                env: &env,
            })
            .map(|(pid, start)| (pid, start, port))
        })
        .await?
        // `up` refusing to start (or leftovers that will not stop) is the volume's
        // state, not a failure of the host.
        .map_err(|e| ApiError::conflict(format!("volume {name:?}: {e:#}")))?;
        st.share_port = port;
        st.attached = true;
        st.pid = Some(pid);
        st.start_time = Some(start);
        st.message.clear();
        self.save(&st)?;
        tracing::info!(volume = name, pid, "started longhorn up");
        let t = Instant::now();
        loop {
            if !procs::alive(pid, start) {
                let why = procs::last_log_line(&self.log_path(name));
                return Err(ApiError::conflict(format!("volume {name:?}: longhorn up exited: {why}")));
            }
            if let Ok(v) = self.engine(name, json!({"cmd": "volume-info"})).await {
                tracing::info!(volume = name, state = %v["state"], "engine answers");
                return Ok(());
            }
            if t.elapsed() > ATTACH_TIMEOUT {
                return Err(ApiError::engine(name, format!("the engine did not answer within {ATTACH_TIMEOUT:?} of starting")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the volume's `longhorn up`. Called with `ops` held.
    pub async fn stop_up(&self, name: &str) -> ApiResult<()> {
        let mut st = self.state(name)?;
        // `up` and its engine refuse to stop while the volume's device is mounted; asking
        // anyway would hold this (and every other lifecycle change) for minutes.
        let endpoint = self.lock().get(name).and_then(|e| e.sample.as_ref()).and_then(|s| s.info["endpoint"].as_str().map(String::from));
        let share = self.cfg.run_dir.join(format!("{name}.share"));
        if let Some(mp) = endpoint.as_deref().filter(|e| e.starts_with('/')).and_then(|e| procs::mounted_at(e, &share)) {
            return Err(ApiError::conflict(format!("volume {name:?}: its device is mounted on {mp}; unmount it first")));
        }
        let (v, data_dir, run_dir) = (st.name.clone(), self.cfg.data_dir.clone(), self.cfg.run_dir.clone());
        let (pid, start) = (st.pid, st.start_time);
        blocking(move || -> anyhow::Result<()> {
            let up = match (pid, start) {
                (Some(pid), Some(start)) => procs::stop(pid, start, Duration::from_secs(120)),
                _ => Ok(()),
            };
            // An `up` that was killed (by someone, or by the line above) leaves its
            // engine and replicas behind.
            let rest = procs::stop_leftovers(&v, &data_dir, &run_dir);
            up.and(rest)
        })
        .await?
        .map_err(|e| ApiError::conflict(format!("volume {name:?}: {e:#}")))?;
        st.attached = false;
        st.pid = None;
        st.start_time = None;
        self.save(&st)?;
        if let Some(e) = self.lock().get_mut(name) {
            e.sample = None;
            e.prev_stats = None;
            e.rates = Rates::default();
        }
        Ok(())
    }

    /// At start: a volume meant attached whose `up` still runs is adopted as it is; a
    /// dead one is started again on its data (the supervisor does that at its first
    /// tick). A restore the last manager did not finish is reported as an error.
    pub fn adopt(&self) {
        let mut g = self.lock();
        for e in g.values_mut() {
            if e.st.phase == "creating" {
                e.st.phase = "error".into();
                e.st.message = "the restore was interrupted by a manager stop; delete the volume and restore again".into();
                if let Err(err) = self.store.save(&e.st) {
                    tracing::error!(volume = %e.st.name, "{err:#}");
                }
                continue;
            }
            if !e.st.attached {
                continue;
            }
            match (e.st.pid, e.st.start_time) {
                (Some(pid), Some(s)) if procs::alive(pid, s) => tracing::info!(volume = %e.st.name, pid, "adopted a running volume"),
                _ => tracing::warn!(volume = %e.st.name, "its longhorn up is gone; starting it again"),
            }
        }
    }

    /// Once a second: restart dead volumes meant attached, sample every engine, and
    /// send what changed to the event stream.
    pub async fn tick(self: &Arc<Self>, last_sent: &mut HashMap<String, String>, base: &str) {
        crate::replicas::supervise(self).await;
        // Restarts: a dead `up` of a volume meant attached, backing off 1 s .. 60 s.
        let dead: Vec<String> = {
            let g = self.lock();
            g.values()
                .filter(|e| e.st.attached && e.transient.is_none() && e.st.phase.is_empty())
                .filter(|e| !matches!((e.st.pid, e.st.start_time), (Some(p), Some(s)) if procs::alive(p, s)))
                .filter(|e| e.next_restart.is_none_or(|t| Instant::now() >= t))
                .map(|e| e.st.name.clone())
                .collect()
        };
        for name in dead {
            let Ok(_g) = self.ops.try_lock() else { break };
            // Checked again under the lock: a detach may have run meanwhile.
            match self.state(&name) {
                Ok(st) if st.attached && !matches!((st.pid, st.start_time), (Some(p), Some(s)) if procs::alive(p, s)) => {}
                _ => continue,
            }
            tracing::warn!(volume = %name, "longhorn up is not running; restarting it on its data");
            self.set_transient(&name, Some("attaching"));
            let r = self.start_up(&name).await;
            let mut g = self.lock();
            if let Some(e) = g.get_mut(&name) {
                e.transient = None;
                match r {
                    Ok(()) => {
                        e.restart_failures = 0;
                        e.next_restart = None;
                        e.st.message.clear();
                    }
                    Err(err) => {
                        e.restart_failures += 1;
                        let backoff = Duration::from_secs(1u64 << e.restart_failures.min(6)).min(Duration::from_secs(60));
                        e.next_restart = Some(Instant::now() + backoff);
                        e.st.message = format!("restart failed ({} tries): {}", e.restart_failures, err.message);
                        tracing::error!(volume = %name, "restart failed: {}", err.message);
                    }
                }
            }
        }
        // Samples.
        let names: Vec<String> = {
            let g = self.lock();
            g.values().filter(|e| e.st.attached && e.transient.is_none()).map(|e| e.st.name.clone()).collect()
        };
        // All at once: one engine that does not answer must not hold up the others.
        futures::future::join_all(names.iter().map(|n| self.sample(n))).await;
        // Events: every volume whose JSON changed, and the removed ones.
        let vols: Vec<(String, Value)> = {
            let g = self.lock();
            g.values().map(|e| (e.st.name.clone(), crate::view::volume(self, e, base))).collect()
        };
        let mut seen = std::collections::HashSet::new();
        for (name, v) in vols {
            let text = v.to_string();
            seen.insert(name.clone());
            if last_sent.get(&name) != Some(&text) {
                let _ = self.events.send(json!({"type": "volume", "id": name, "data": v}).to_string());
                last_sent.insert(name, text);
            }
        }
        let gone: Vec<String> = last_sent.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for name in gone {
            last_sent.remove(&name);
            let _ = self.events.send(json!({"type": "removed", "resourceType": "volume", "id": name}).to_string());
        }
    }

    /// Asks the volume's engine for its state now, and keeps the answer.
    pub async fn sample(&self, name: &str) {
        // Status questions answer at once from a live engine (no I/O behind them); a
        // hung one is reported after a few seconds rather than after the long timeout
        // of actions like snapshot-create.
        let q = |cmd: &'static str| self.engine_within(name, json!({"cmd": cmd}), SAMPLE_TIMEOUT);
        let info = q("volume-info").await;
        let info = match info {
            Ok(v) => v,
            Err(e) => {
                if let Some(en) = self.lock().get_mut(name) {
                    en.sample = None;
                    en.sample_error = e.message;
                }
                return;
            }
        };
        let replicas = q("replica-ls").await.unwrap_or(Value::Null);
        let backups = q("backup-status").await.unwrap_or(Value::Null);
        let snapshots = q("snapshot-ls").await.unwrap_or(Value::Null);
        // Until an engine has volume-stats, its figures are zeros.
        let stats = q("volume-stats").await.ok();
        let now = Instant::now();
        let mut g = self.lock();
        let Some(e) = g.get_mut(name) else { return };
        if let Some(s) = stats {
            if let Some((t0, s0)) = &e.prev_stats {
                let dt = now.duration_since(*t0).as_secs_f64().max(0.001);
                let d = |k: &str| s[k].as_u64().unwrap_or(0).saturating_sub(s0[k].as_u64().unwrap_or(0)) as f64;
                let (rops, wops) = (d("read_ops"), d("write_ops"));
                e.rates = Rates {
                    read_bps: d("read_bytes") / dt,
                    write_bps: d("write_bytes") / dt,
                    read_iops: rops / dt,
                    write_iops: wops / dt,
                    read_latency_ns: if rops > 0.0 { d("read_latency_ns") / rops } else { 0.0 },
                    write_latency_ns: if wops > 0.0 { d("write_latency_ns") / wops } else { 0.0 },
                };
            }
            e.prev_stats = Some((now, s));
        }
        // Which of the replicas on other hosts hold the newest data, kept on disk for
        // the next attach (see VolumeState::healthy_replicas).
        if !e.st.remote_replicas.is_empty() {
            let mut rw: Vec<String> = replicas
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["mode"] == "RW")
                .filter_map(|r| r["address"].as_str())
                .filter(|a| e.st.remote_replicas.iter().any(|x| x == a))
                .map(String::from)
                .collect();
            rw.sort();
            if !rw.is_empty() && rw != e.st.healthy_replicas {
                let mut st = e.st.clone();
                st.healthy_replicas = rw;
                match self.store.save(&st) {
                    Ok(()) => e.st = st,
                    Err(err) => tracing::error!(volume = name, "recording its healthy replicas: {err:#}"),
                }
            }
        }
        e.sample = Some(Sample { info, replicas, backups, snapshots });
        e.sample_error.clear();
    }
}

/// Whether something accepts connections at `addr` within a moment.
fn answers(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// An engine's refusal is the client's problem (409/400/404), its silence is 502.
fn classify(name: &str, e: String) -> ApiError {
    use axum::http::StatusCode;
    if e.starts_with("no engine is serving") || e.starts_with("sending to the engine") || e.starts_with("reading the engine") {
        return ApiError::engine(name, e);
    }
    let low = e.to_ascii_lowercase();
    let status = if low.contains("not found") || low.contains("no such") || low.contains("does not exist") || low.contains("unknown snapshot") || low.contains("no snapshot named") {
        StatusCode::NOT_FOUND
    } else if low.contains("busy") || low.contains("already") || low.contains("connected") || low.contains("running") {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, format!("volume {name:?}: {e}"))
}

/// The volume's state in the API's words.
pub fn volume_state(e: &Entry) -> &'static str {
    if let Some(t) = e.transient {
        return t;
    }
    match e.st.phase.as_str() {
        "creating" => return "creating",
        "deleting" => return "deleting",
        "error" => return "error",
        // Handed to another host's manager (which serves it now): never attached here.
        "handedOff" => return "handedOff",
        _ => {}
    }
    if !e.st.attached {
        return "detached";
    }
    if !e.st.message.is_empty() && e.sample.is_none() {
        return "error";
    }
    "attached"
}

/// healthy, degraded, faulted or unknown (detached, or the engine not answering).
pub fn robustness(e: &Entry) -> &'static str {
    let Some(s) = &e.sample else { return "unknown" };
    let Some(reps) = s.replicas.as_array() else {
        return match s.info["state"].as_str() {
            Some("healthy") => "healthy",
            Some("degraded") => "degraded",
            Some("faulted") => "faulted",
            _ => "unknown",
        };
    };
    let rw = reps.iter().filter(|r| r["mode"] == "RW").count();
    if rw == 0 {
        "faulted"
    } else if rw < e.st.number_of_replicas || rw < reps.len() {
        "degraded"
    } else {
        "healthy"
    }
}
