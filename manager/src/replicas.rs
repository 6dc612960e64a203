//! Replicas this host keeps for volumes whose engine runs on another host (Longhorn's
//! replicas on other nodes): a `longhorn replica serve` per replica, listening on a
//! fixed address of this host so the engine that has it in its list finds it again
//! after a restart, kept running by the manager's supervisor whether or not an engine
//! uses it, as an instance manager keeps them in Longhorn.
//!
//! Layout: the data in `DATA_DIR/.replicas/VOLUME/data/NAME/` (a volume name starts
//! with a letter or digit, so `.replicas` is never a volume's directory), the process's
//! log in `DATA_DIR/.replicas/VOLUME/logs/NAME.log`, the volume's secret in
//! `DATA_DIR/.replicas/VOLUME/volume.key` (mode 0600; no replica name can meet it), and
//! the record (address, pid and start time) in `STATE_DIR/replicas/VOLUME/NAME.json`,
//! written atomically.
//!
//! Invariants:
//! - One process per replica directory (the replica itself takes a lock on it).
//! - A replica's address never changes: it is chosen once, at creation.
//! - A process counts as ours only if its start time and command line match the
//!   record (a pid reused after a reboot is never adopted or signalled).

use crate::error::{ApiError, ApiResult};
use crate::mgr::{blocking, Shared};
use crate::{input, procs};
use anyhow::{anyhow, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaState {
    pub volume: String,
    pub name: String,
    pub size: u64,
    pub address: String,
    pub created: String,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub start_time: Option<u64>,
    /// A copy of the volume's record as its owner (the manager of the host serving
    /// it) last had it, kept here by the CSI controller: if that host is lost, the
    /// controller serves the volume elsewhere from this copy (see `check_record`).
    #[serde(default)]
    pub record: Option<Value>,
}

/// The manager's bookkeeping of one replica: its record and when to try a restart.
pub struct Entry {
    pub st: ReplicaState,
    failures: u32,
    next_restart: Option<Instant>,
}

pub fn key(volume: &str, name: &str) -> String {
    format!("{volume}/{name}")
}

fn vol_dir(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join(".replicas").join(volume)
}

pub fn data_path(data_dir: &Path, volume: &str, name: &str) -> PathBuf {
    vol_dir(data_dir, volume).join("data").join(name)
}

fn log_path(data_dir: &Path, volume: &str, name: &str) -> PathBuf {
    vol_dir(data_dir, volume).join("logs").join(format!("{name}.log"))
}

fn record_path(state_dir: &Path, volume: &str, name: &str) -> PathBuf {
    state_dir.join("replicas").join(volume).join(format!("{name}.json"))
}

/// Every record under `STATE_DIR/replicas`; a record that does not parse is named in
/// the error (the manager refuses to start rather than forget a replica).
pub fn load_all(state_dir: &Path) -> Result<Vec<ReplicaState>> {
    let mut out = Vec::new();
    let top = state_dir.join("replicas");
    let Ok(vols) = std::fs::read_dir(&top) else { return Ok(out) };
    for v in vols {
        let v = v.with_context(|| format!("reading {}", top.display()))?;
        for f in std::fs::read_dir(v.path()).with_context(|| format!("reading {}", v.path().display()))? {
            let p = f.with_context(|| format!("reading {}", v.path().display()))?.path();
            if p.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            out.push(serde_json::from_str(&text).with_context(|| format!("{}: not a replica record", p.display()))?);
        }
    }
    Ok(out)
}

fn save(state_dir: &Path, st: &ReplicaState) -> Result<()> {
    let p = record_path(state_dir, &st.volume, &st.name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let data = serde_json::to_vec_pretty(st).context("encoding a replica record")?;
    longhorn_replica::meta::write_atomic(&p, &data).map_err(|e| anyhow!("{e}"))
}

/// Whether `pid` (started at `start`) is still our `longhorn replica serve`.
fn alive(st: &ReplicaState) -> bool {
    let (Some(pid), Some(start)) = (st.pid, st.start_time) else { return false };
    if procs::start_time(pid) != Some(start) {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.get(1) == Some(&b"replica".as_slice()) && args.get(2) == Some(&b"serve".as_slice())
}

/// Writes the volume's secret where the replicas of this host read it; a different
/// secret already there is refused (another volume's replicas by that name).
fn write_key(data_dir: &Path, volume: &str, secret: &longhorn_replica::auth::Key) -> Result<PathBuf, String> {
    let dir = vol_dir(data_dir, volume);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join("volume.key");
    if let Ok(have) = std::fs::read_to_string(&path) {
        if longhorn_replica::auth::Key::parse(&have).map(|k| k.to_hex()) != Some(secret.to_hex()) {
            return Err(format!("this host holds replicas of another volume {volume:?} (its secret differs)"));
        }
        return Ok(path);
    }
    // Made aside and renamed: a crash never leaves a half-written key in its place.
    let tmp = dir.join(".volume.key.tmp");
    let _ = std::fs::remove_file(&tmp);
    secret.store_new(&tmp)?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// A `longhorn replica serve` already running on `dir` (started by a manager that was
/// killed before it could record it): (pid, start time).
fn running_on(dir: &Path) -> Option<(i32, u64)> {
    let want = dir.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let serves = args.get(1).map(String::as_str) == Some("replica") && args.get(2).map(String::as_str) == Some("serve");
        if serves && args.windows(2).any(|w| w[0] == "--dir" && w[1] == want) {
            return procs::start_time(pid).map(|st| (pid, st));
        }
    }
    None
}

/// Starts the replica's process on its fixed address and waits until it accepts
/// connections; (pid, start time). One already serving its directory is adopted.
fn spawn(exe: &Path, data_dir: &Path, st: &ReplicaState, first: bool) -> Result<(i32, u64)> {
    let (pid, start) = launch(exe, data_dir, st, first)?;
    wait_ready(data_dir, st, pid, start)?;
    Ok((pid, start))
}

/// Starts the replica's process (or adopts the one serving its directory) without
/// waiting for it to listen; (pid, start time).
fn launch(exe: &Path, data_dir: &Path, st: &ReplicaState, first: bool) -> Result<(i32, u64)> {
    let dir = data_path(data_dir, &st.volume, &st.name);
    if first {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    } else if !dir.join("volume.meta").exists() {
        // A replica that ran before has its data here; without it (the data directory
        // not mounted, or moved) a new empty replica must not answer at its address.
        return Err(anyhow!("{} holds no replica (no volume.meta): not starting an empty one in its place", dir.display()));
    }
    if let Some(found) = running_on(&dir) {
        tracing::info!(replica = %key(&st.volume, &st.name), pid = found.0, "adopted the replica's running process");
        return Ok(found);
    }
    let log_path = log_path(data_dir, &st.volume, &st.name);
    if let Some(d) = log_path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let log2 = log.try_clone().with_context(|| format!("opening {}", log_path.display()))?;
    let mut c = Command::new(exe);
    c.args(["replica", "serve", "--volume", &st.volume, "--size", &st.size.to_string(), "--listen", &st.address])
        .arg("--dir")
        .arg(&dir)
        .arg("--secret-file")
        .arg(vol_dir(data_dir, &st.volume).join("volume.key"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    procs::spawn_session(c, &format!("replica {}/{}", st.volume, st.name), &log_path)
}

/// Waits until the process `pid` (started at `start`) accepts connections on the
/// replica's address; one that exits, or does not listen within 20 s (then stopped),
/// is an error naming why.
fn wait_ready(data_dir: &Path, st: &ReplicaState, pid: i32, start: u64) -> Result<()> {
    let log_path = log_path(data_dir, &st.volume, &st.name);
    let addr: std::net::SocketAddr = st.address.parse().with_context(|| format!("replica address {:?}", st.address))?;
    let t = Instant::now();
    loop {
        // Ready when it answers and is still the process started here (not another one
        // on the address while this one fails on its directory's lock).
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            std::thread::sleep(Duration::from_millis(100));
            if procs::start_time(pid) == Some(start) {
                return Ok(());
            }
        }
        if procs::start_time(pid) != Some(start) {
            return Err(anyhow!("replica {}/{} exited: {}", st.volume, st.name, procs::last_log_line(&log_path)));
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = procs::stop_as(pid, start, Duration::from_secs(5), "replica");
            return Err(anyhow!("replica {}/{} does not listen on {} after 20 s", st.volume, st.name, st.address));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free TCP port on `ip` now (the replica takes it for good at its first start).
fn free_address(ip: std::net::IpAddr) -> Result<String> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("finding a free port on {ip}"))?;
    Ok(l.local_addr().context("the free port")?.to_string())
}

fn json_of(m: &Shared, e: &Entry) -> Value {
    let st = &e.st;
    json!({
        "type": "replicaInstance", "id": key(&st.volume, &st.name), "volume": st.volume, "name": st.name,
        "size": st.size.to_string(), "address": st.address, "running": alive(st), "created": st.created,
        "dataPath": data_path(&m.cfg.data_dir, &st.volume, &st.name).display().to_string(), "record": st.record,
        "links": {"self": format!("/v1/replicas/{}/{}", st.volume, st.name)}, "actions": {},
    })
}

fn list_json(m: &Shared) -> Vec<Value> {
    let g = m.replicas();
    g.values().map(|e| json_of(m, e)).collect()
}

pub async fn list(State(m): State<Shared>, _h: HeaderMap) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"type": "collection", "resourceType": "replicaInstance", "data": list_json(&m), "links": {"self": "/v1/replicas"}})))
}

pub async fn get(State(m): State<Shared>, UrlPath((volume, name)): UrlPath<(String, String)>) -> ApiResult<Json<Value>> {
    input::name("volume", &volume)?;
    input::name("name", &name)?;
    let g = m.replicas();
    let e = g.get(&key(&volume, &name)).ok_or_else(|| ApiError::not_found(format!("replica {volume}/{name}")))?;
    Ok(Json(json_of(&m, e)))
}

/// `POST /v1/replicas` `{"volume","name","size","secret"}`: makes (or, the same again,
/// finds) a replica of `volume` on this host and starts it.
pub async fn create(State(m): State<Shared>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let b = crate::api::body(&h, b)?;
    input::only(&b, &["volume", "name", "size", "secret"])?;
    let volume = input::req_str(&b, "volume")?.to_string();
    input::name("volume", &volume)?;
    let name = input::req_str(&b, "name")?.to_string();
    input::name("name", &name)?;
    let size = input::size("size", b.get("size").unwrap_or(&Value::Null))?;
    let secret = input::secret("secret", input::req_str(&b, "secret")?)?;
    if m.cfg.replica_ip.is_loopback() && !m.cfg.listen.ip().is_loopback() {
        // Engines on other hosts could not reach it, and one on this host would use
        // this copy alone.
        return Err(ApiError::conflict(
            "this manager's replicas for other hosts would listen on a loopback address: start it with --replica-address HOST_IP",
        ));
    }
    let _ops = m.ops.lock().await;
    if let Some(e) = m.replicas().get(&key(&volume, &name)) {
        // The same request again (a retry) answers what the first one made.
        if e.st.size != size {
            return Err(ApiError::conflict(format!("replica {volume}/{name} exists with {} bytes, not {size}", e.st.size)).with_field("size"));
        }
        return Ok((StatusCode::OK, Json(json_of(&m, e))).into_response());
    }
    let (data_dir, state_dir, ip) = (m.cfg.data_dir.clone(), m.cfg.state_dir.clone(), m.cfg.replica_ip);
    let (k, v2, n2) = (key(&volume, &name), volume.clone(), name.clone());
    let st = blocking(move || -> Result<ReplicaState, ApiError> {
        input::fits("size", &data_dir, size)?;
        write_key(&data_dir, &v2, &secret).map_err(|e| ApiError::conflict(e).with_field("secret"))?;
        let st = ReplicaState {
            address: free_address(ip).map_err(ApiError::internal)?,
            volume: v2,
            name: n2,
            size,
            created: longhorn_replica::meta::now_rfc3339(),
            pid: None,
            start_time: None,
            record: None,
        };
        // The record first: a manager killed before the process starts knows of it,
        // lists it and can delete it.
        save(&state_dir, &st).map_err(ApiError::internal)?;
        Ok(st)
    })
    .await??;
    // Listed from here on, whatever happens to the start: a failed one is deleted or
    // started again like any other.
    m.replicas().insert(k.clone(), Entry { st: st.clone(), failures: 0, next_restart: Some(Instant::now() + Duration::from_secs(3600)) });
    let (data_dir, state_dir, exe) = (m.cfg.data_dir.clone(), m.cfg.state_dir.clone(), m.exe.clone());
    let st = blocking(move || -> Result<ReplicaState, ApiError> {
        let mut st = st;
        let (pid, start) = spawn(&exe, &data_dir, &st, true).map_err(|e| ApiError::conflict(format!("{e:#}")))?;
        st.pid = Some(pid);
        st.start_time = Some(start);
        save(&state_dir, &st).map_err(ApiError::internal)?;
        Ok(st)
    })
    .await?;
    let st = match st {
        Ok(st) => st,
        Err(e) => {
            if let Some(e) = m.replicas().get_mut(&k) {
                e.next_restart = None;
            }
            return Err(e);
        }
    };
    tracing::info!(replica = %k, address = st.address, "replica created");
    let e = Entry { st, failures: 0, next_restart: None };
    let out = json_of(&m, &e);
    m.replicas().insert(k, e);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `POST /v1/replicas/{volume}/{name}?action=expand` `{"size": ...}`: grows the replica
/// (its process stopped for it, then started again on the same address), as each host
/// does for its replicas of a volume the controller expands offline. Idempotent.
pub async fn action(
    State(m): State<Shared>,
    h: HeaderMap,
    UrlPath((volume, name)): UrlPath<(String, String)>,
    axum::extract::Query(q): crate::api::Q,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    input::name("volume", &volume)?;
    input::name("name", &name)?;
    let b = crate::api::body(&h, b)?;
    match q.get("action").map(String::as_str) {
        Some("expand") => {}
        Some("record") => return keep_record(&m, &volume, &name, &b).await.map(Json),
        Some("secret") => return secret_of(&m, &volume, &name, &b).await.map(Json),
        Some(other) => return Err(ApiError::bad("action", format!("action: unknown replica action {other:?} (expand, record, secret)"))),
        None => return Err(ApiError::bad("action", "action: required (?action=expand, record or secret)")),
    }
    input::only(&b, &["size"])?;
    let size = input::size("size", b.get("size").ok_or_else(|| ApiError::bad("size", "size: required"))?)?;
    let _ops = m.ops.lock().await;
    let k = key(&volume, &name);
    let st = m.replicas().get(&k).map(|e| e.st.clone()).ok_or_else(|| ApiError::not_found(format!("replica {k}")))?;
    if size < st.size {
        return Err(ApiError::bad("size", format!("size: {size} bytes is smaller than the replica's {} bytes; a volume cannot shrink", st.size)));
    }
    if size > st.size {
        let (exe, data_dir, state_dir) = (m.exe.clone(), m.cfg.data_dir.clone(), m.cfg.state_dir.clone());
        let grown = blocking(move || -> ApiResult<ReplicaState> {
            let dir = data_path(&data_dir, &st.volume, &st.name);
            if let (Some(pid), Some(start), true) = (st.pid, st.start_time, alive(&st)) {
                procs::stop_as(pid, start, Duration::from_secs(30), "replica").map_err(|e| ApiError::conflict(format!("stopping replica {k}: {e:#}")))?;
            }
            use longhorn_replica::StoreError;
            match longhorn_replica::expand::expand(&dir, size) {
                Ok(_) => {}
                Err(e @ StoreError::TooLarge { .. }) => return Err(ApiError::bad("size", format!("size: {e}"))),
                Err(e @ (StoreError::Shrink { .. } | StoreError::Busy { .. })) => return Err(ApiError::conflict(format!("replica {k}: {e}"))),
                Err(e) => return Err(ApiError::internal(anyhow!("replica {k}: {e}"))),
            }
            let mut st = st;
            st.size = size;
            st.pid = None;
            st.start_time = None;
            save(&state_dir, &st).map_err(ApiError::internal)?;
            // Started again at once; if that fails the supervisor keeps trying.
            match spawn(&exe, &data_dir, &st, false) {
                Ok((pid, start)) => {
                    st.pid = Some(pid);
                    st.start_time = Some(start);
                    save(&state_dir, &st).map_err(ApiError::internal)?;
                }
                Err(e) => tracing::error!(replica = %k, "starting the replica after its expansion: {e:#}"),
            }
            Ok(st)
        })
        .await??;
        tracing::info!(replica = %key(&volume, &name), size, "replica expanded");
        if let Some(e) = m.replicas().get_mut(&key(&volume, &name)) {
            e.st = grown;
        }
    }
    let g = m.replicas();
    let e = g.get(&key(&volume, &name)).ok_or_else(|| ApiError::not_found(format!("replica {volume}/{name}")))?;
    Ok(Json(json_of(&m, e)))
}

/// The fields of a volume record copy (`record` action), as the owner's volume JSON
/// names them, with the owner's host name and the record's generation.
const RECORD_FIELDS: [&str; 9] =
    ["owner", "generation", "size", "numberOfReplicas", "staleReplicaTimeout", "accessMode", "recurringJobs", "replicaAddresses", "healthyReplicas"];

/// Checks a record copy before it is kept: a copy is what a take-over would serve the
/// volume from, so nothing in it may be malformed.
fn check_record(r: &Value) -> ApiResult<()> {
    let o = r.as_object().ok_or_else(|| ApiError::bad("record", "record: an object"))?;
    if let Some(k) = o.keys().find(|k| !RECORD_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad("record", format!("record: unknown field {k:?} ({})", RECORD_FIELDS.join(", "))));
    }
    let bad = |f: &str, why: &str| ApiError::bad("record", format!("record.{f}: {why}"));
    let owner = o.get("owner").and_then(Value::as_str).ok_or_else(|| bad("owner", "the owner's host name, required"))?;
    if owner.is_empty() || owner.len() > 253 {
        return Err(bad("owner", "1 to 253 characters"));
    }
    o.get("generation").and_then(Value::as_u64).ok_or_else(|| bad("generation", "a whole number, required"))?;
    let size = o.get("size").ok_or_else(|| bad("size", "required"))?;
    input::size("record.size", size)?;
    let n = o.get("numberOfReplicas").and_then(Value::as_u64).filter(|n| (1..=32).contains(n));
    n.ok_or_else(|| bad("numberOfReplicas", "1 to 32, required"))?;
    o.get("staleReplicaTimeout").and_then(Value::as_u64).filter(|n| *n >= 1).ok_or_else(|| bad("staleReplicaTimeout", "minutes, at least 1, required"))?;
    if !matches!(o.get("accessMode").and_then(Value::as_str), Some("rwo" | "rwx")) {
        return Err(bad("accessMode", "rwo or rwx, required"));
    }
    let jobs = o.get("recurringJobs").ok_or_else(|| bad("recurringJobs", "required"))?;
    longhorn_engine::jobs::parse_jobs(jobs).map_err(|e| bad("recurringJobs", &e.to_string()))?;
    for f in ["replicaAddresses", "healthyReplicas"] {
        let list = o.get(f).and_then(Value::as_array).ok_or_else(|| bad(f, "a list of addresses IP:PORT, required"))?;
        if list.len() > 32 || !list.iter().all(|a| a.as_str().is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok())) {
            return Err(bad(f, "a list of at most 32 addresses IP:PORT"));
        }
    }
    Ok(())
}

/// `record` `{"record": {...}}`: keeps the CSI controller's copy of the volume's record
/// with this replica (see `ReplicaState::record`). Idempotent.
async fn keep_record(m: &Shared, volume: &str, name: &str, b: &serde_json::Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["record"])?;
    let rec = b.get("record").ok_or_else(|| ApiError::bad("record", "record: required"))?;
    check_record(rec)?;
    let _ops = m.ops.lock().await;
    let k = key(volume, name);
    let mut st = m.replicas().get(&k).map(|e| e.st.clone()).ok_or_else(|| ApiError::not_found(format!("replica {k}")))?;
    if st.record.as_ref() != Some(rec) {
        st.record = Some(rec.clone());
        let (state_dir, st2) = (m.cfg.state_dir.clone(), st.clone());
        blocking(move || save(&state_dir, &st2).map_err(ApiError::internal)).await??;
        if let Some(e) = m.replicas().get_mut(&k) {
            e.st.record = st.record.clone();
        }
    }
    let g = m.replicas();
    let e = g.get(&k).ok_or_else(|| ApiError::not_found(format!("replica {k}")))?;
    Ok(json_of(m, e))
}

/// `secret` `{}`: the volume's secret this replica holds, for the controller serving
/// the volume from a lost host's record copy (the same secret the lost host held).
async fn secret_of(m: &Shared, volume: &str, name: &str, b: &serde_json::Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &[])?;
    let k = key(volume, name);
    if m.replicas().get(&k).is_none() {
        return Err(ApiError::not_found(format!("replica {k}")));
    }
    let path = vol_dir(&m.cfg.data_dir, volume).join("volume.key");
    let secret = std::fs::read_to_string(&path).map_err(|e| ApiError::internal(anyhow!("reading {}: {e}", path.display())))?;
    Ok(json!({"type": "volumeSecret", "name": volume, "secret": secret.trim()}))
}

/// `DELETE /v1/replicas/{volume}/{name}`: stops the replica and deletes its data. The
/// engine that used it must have let it go (it is the controller's call).
pub async fn delete(State(m): State<Shared>, UrlPath((volume, name)): UrlPath<(String, String)>) -> ApiResult<Json<Value>> {
    input::name("volume", &volume)?;
    input::name("name", &name)?;
    let _ops = m.ops.lock().await;
    let st = m.replicas().get(&key(&volume, &name)).map(|e| e.st.clone()).ok_or_else(|| ApiError::not_found(format!("replica {volume}/{name}")))?;
    let (data_dir, state_dir) = (m.cfg.data_dir.clone(), m.cfg.state_dir.clone());
    let st2 = st.clone();
    blocking(move || -> Result<()> {
        let dir = data_path(&data_dir, &st2.volume, &st2.name);
        if let (Some(pid), Some(start), true) = (st2.pid, st2.start_time, alive(&st2)) {
            procs::stop_as(pid, start, Duration::from_secs(30), "replica")?;
        }
        // One the record does not name (its manager died before recording it).
        if let Some((pid, start)) = running_on(&dir) {
            procs::stop_as(pid, start, Duration::from_secs(30), "replica")?;
        }
        // Renamed aside in one step, so a half-deleted directory is never served; what
        // a killed delete left aside goes first.
        let aside = vol_dir(&data_dir, &st2.volume).join(format!(".deleting-{}", st2.name));
        if aside.exists() {
            std::fs::remove_dir_all(&aside).with_context(|| format!("deleting {}", aside.display()))?;
        }
        if dir.exists() {
            std::fs::rename(&dir, &aside).with_context(|| format!("moving {} aside", dir.display()))?;
            std::fs::remove_dir_all(&aside).with_context(|| format!("deleting {}", aside.display()))?;
        }
        let _ = std::fs::remove_file(log_path(&data_dir, &st2.volume, &st2.name));
        let rec = record_path(&state_dir, &st2.volume, &st2.name);
        std::fs::remove_file(&rec).with_context(|| format!("removing {}", rec.display()))?;
        // The volume's last replica here takes its secret with it.
        if let Some(d) = rec.parent() {
            if std::fs::remove_dir(d).is_ok() {
                let _ = std::fs::remove_dir_all(vol_dir(&data_dir, &st2.volume));
            }
        }
        Ok(())
    })
    .await?
    .map_err(|e| ApiError::conflict(format!("replica {volume}/{name}: {e:#}")))?;
    let e = m.replicas().remove(&key(&volume, &name));
    tracing::info!(replica = %key(&volume, &name), "replica deleted");
    Ok(Json(e.map(|e| json_of(&m, &e)).unwrap_or(Value::Null)))
}

/// Follows a restarted replica until it listens: then its failures are forgotten;
/// otherwise (it exited, or was stopped after 20 s of silence) the next try backs off.
async fn watch_start(m: Shared, st: ReplicaState) {
    let (Some(pid), Some(start)) = (st.pid, st.start_time) else { return };
    let data_dir = m.cfg.data_dir.clone();
    let st2 = st.clone();
    let r = blocking(move || wait_ready(&data_dir, &st2, pid, start)).await;
    let k = key(&st.volume, &st.name);
    let mut g = m.replicas();
    // Deleted, expanded or restarted meanwhile: not this start's to judge.
    let Some(e) = g.get_mut(&k).filter(|e| e.st.pid == Some(pid) && e.st.start_time == Some(start)) else { return };
    let why = match r {
        Ok(Ok(())) => {
            e.failures = 0;
            e.next_restart = None;
            tracing::info!(replica = %k, pid, "the replica is serving again");
            return;
        }
        Ok(Err(err)) => format!("{err:#}"),
        Err(err) => err.message,
    };
    e.failures += 1;
    let wait = Duration::from_secs(1u64 << e.failures.min(6)).min(Duration::from_secs(60));
    e.next_restart = Some(Instant::now() + wait);
    tracing::error!(replica = %k, "restarting the replica failed: {why}; next try in {wait:?}");
}

pub fn entries(list: Vec<ReplicaState>) -> std::collections::BTreeMap<String, Entry> {
    list.into_iter().map(|st| (key(&st.volume, &st.name), Entry { st, failures: 0, next_restart: None })).collect()
}

/// The supervisor's round: a replica whose process is gone is started again on its
/// directory and address, backing off 1 s .. 60 s while that fails. Only the start
/// itself holds the lifecycle lock: the wait for it to listen (up to 20 s) runs in a
/// task of its own, so a replica that never comes up stalls neither the manager's
/// round nor the API's calls on other volumes. Its pid is recorded before the lock is
/// let go, so a delete or expand meanwhile stops it as it stops any.
pub async fn supervise(m: &Shared) {
    let dead: Vec<ReplicaState> = {
        let g = m.replicas();
        g.values().filter(|e| !alive(&e.st) && e.next_restart.is_none_or(|t| Instant::now() >= t)).map(|e| e.st.clone()).collect()
    };
    for st in dead {
        let Ok(_g) = m.ops.try_lock() else { return };
        let k = key(&st.volume, &st.name);
        if !m.replicas().contains_key(&k) {
            continue;
        }
        tracing::warn!(replica = %k, address = st.address, "the replica is not running; starting it again on its data");
        let (exe, data_dir, state_dir) = (m.exe.clone(), m.cfg.data_dir.clone(), m.cfg.state_dir.clone());
        let st2 = st.clone();
        let r = blocking(move || -> Result<ReplicaState> {
            let (pid, start) = launch(&exe, &data_dir, &st2, false)?;
            let mut st2 = st2;
            st2.pid = Some(pid);
            st2.start_time = Some(start);
            save(&state_dir, &st2)?;
            Ok(st2)
        })
        .await;
        let mut g = m.replicas();
        let Some(e) = g.get_mut(&k) else { continue };
        let why = match r {
            Ok(Ok(new)) => {
                e.st = new.clone();
                // Not tried again while `watch_start` follows this start (it sets the
                // next try if the start fails).
                e.next_restart = Some(Instant::now() + Duration::from_secs(30));
                tokio::spawn(watch_start(m.clone(), new));
                continue;
            }
            Ok(Err(err)) => format!("{err:#}"),
            Err(err) => err.message,
        };
        e.failures += 1;
        let wait = Duration::from_secs(1u64 << e.failures.min(6)).min(Duration::from_secs(60));
        e.next_restart = Some(Instant::now() + wait);
        tracing::error!(replica = %k, "restarting the replica failed: {why}; next try in {wait:?}");
    }
}
