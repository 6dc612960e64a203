//! The `/v1` routes of manager/API.md.

use crate::error::{ApiError, ApiResult};
use crate::input;
use crate::mgr::{blocking, volume_state, Entry, Shared};
use crate::state::VolumeState;
use crate::view;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use longhorn_engine::backup::{self, target};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub type Q = Query<HashMap<String, String>>;

/// `http://HOST` (https with TLS) for links: the client's Host header when it is a
/// plain host[:port], else the address the manager listens on.
pub fn base(m: &Shared, h: &HeaderMap) -> String {
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ok = !host.is_empty() && host.len() < 256 && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    let scheme = if m.cfg.tls.is_some() { "https" } else { "http" };
    if ok {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{}", m.cfg.listen)
    }
}

/// The JSON object of a request body: 413 beyond the limit, 415 when it says it is
/// not JSON, 400 when it does not parse.
pub fn body(h: &HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult<Map<String, Value>> {
    let b = b.map_err(|r| ApiError::new(r.status(), format!("body: {}", r.body_text())))?;
    // Checked even for an empty body: an HTML form on another site posts
    // application/x-www-form-urlencoded with no fields, and must not detach a volume.
    if let Some(ct) = h.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        // The media type itself, parameters aside: `text/plain; x=+json` is a form a
        // browser sends cross-site without asking first.
        let essence = ct.split(';').next().unwrap_or("").trim();
        let (kind, sub) = essence.split_once('/').unwrap_or(("", ""));
        if !(essence == "application/json" || (kind == "application" && sub.ends_with("+json"))) {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("body: content type {ct:?} is not application/json")));
        }
    }
    input::object(&b)
}

fn collection(kind: &str, data: Vec<Value>, self_url: String) -> Value {
    json!({"type": "collection", "resourceType": kind, "data": data, "links": {"self": self_url}})
}

fn with_entry<T>(m: &Shared, name: &str, f: impl FnOnce(&Entry) -> T) -> ApiResult<T> {
    let g = m.lock();
    g.get(name).map(f).ok_or_else(|| ApiError::not_found(format!("volume {name:?}")).with_field("name"))
}

fn volume_json(m: &Shared, name: &str, base: &str) -> ApiResult<Value> {
    with_entry(m, name, |e| view::volume(m, e, base))
}

pub async fn list_volumes(State(m): State<Shared>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let b = base(&m, &h);
    let data: Vec<Value> = m.lock().values().map(|e| view::volume(&m, e, &b)).collect();
    Ok(Json(collection("volume", data, format!("{b}/v1/volumes"))))
}

pub async fn get_volume(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    input::name("name", &name)?;
    let attached = with_entry(&m, &name, |e| e.st.attached && e.transient.is_none())?;
    // A fresh sample, so what an action just did shows at once.
    if attached {
        m.sample(&name).await;
    }
    Ok(Json(volume_json(&m, &name, &base(&m, &h))?))
}

/// StorageClass parameters of a create request, checked by the one spec rule
/// (`longhorn up --spec` uses the same); the error's first word is the field.
fn spec_of(b: &Map<String, Value>) -> ApiResult<crate::spec::Spec> {
    let mut o = Map::new();
    for k in ["numberOfReplicas", "staleReplicaTimeout", "fromBackup", "recurringJobs", "accessMode", "dataLocality"] {
        if let Some(v) = b.get(k).filter(|v| !v.is_null()) {
            o.insert(k.to_string(), v.clone());
        }
    }
    crate::spec::from_value(&Value::Object(o)).map_err(|e| {
        let msg = format!("{e:#}");
        let top = msg.split(':').next().unwrap_or("body").to_string();
        let field = if top == "recurringJobs" { job_field("recurringJobs", &msg) } else { top };
        ApiError::bad(&field, msg)
    })
}

/// The field a job validation error is about, as `LIST[N].FIELD` when the engine's
/// message names them (`recurringJobs[N] ("x"): field "cron" ...`), so a form can put
/// the message next to the right input.
fn job_field(list: &str, msg: &str) -> String {
    let idx = msg
        .find("recurringJobs[")
        .map(|i| &msg[i + "recurringJobs[".len()..])
        .and_then(|r| r.split(']').next())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    let field = msg
        .find("field \"")
        .map(|i| &msg[i + "field \"".len()..])
        .and_then(|r| r.split('"').next())
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric()));
    match (idx, field) {
        (Some(i), Some(f)) => format!("{list}[{i}].{f}"),
        (Some(i), None) => format!("{list}[{i}]"),
        _ => list.to_string(),
    }
}

pub async fn create_volume(State(m): State<Shared>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let b = body(&h, b)?;
    input::only(
        &b,
        &[
            "name", "size", "numberOfReplicas", "staleReplicaTimeout", "fromBackup", "recurringJobs", "accessMode", "dataLocality", "frontend", "disableFrontend",
            "replicaAddresses", "secret", "healthyReplicas", "generation",
        ],
    )?;
    let generation = match b.get("generation").filter(|v| !v.is_null()) {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| ApiError::bad("generation", "generation: a whole number"))?,
    };
    let name = input::req_str(&b, "name")?.to_string();
    input::name("name", &name)?;
    let spec = spec_of(&b)?;
    let stale = spec.stale_replica_timeout.unwrap_or(20);
    if !(1..=5_256_000).contains(&stale) {
        return Err(ApiError::bad("staleReplicaTimeout", format!("staleReplicaTimeout: {stale} minutes: must be 1 to 5256000 (10 years)")));
    }
    let rwx = matches!(spec.access_mode.as_deref(), Some("rwx" | "ReadWriteMany"));
    let disable = input::opt_bool(&b, "disableFrontend")?.unwrap_or(false);
    let frontend = input::opt_str(&b, "frontend")?.unwrap_or("blockdev").to_string();
    input::frontend("frontend", &frontend, disable)?;
    if rwx && disable {
        return Err(ApiError::bad("accessMode", "accessMode: rwx shares a filesystem on the block device; it needs a frontend (disableFrontend: false)"));
    }
    let jobs = spec.recurring_jobs.clone().unwrap_or(json!([]));
    let from_backup = spec.from_backup.clone().unwrap_or_default();
    let size_given = b.get("size").filter(|v| !v.is_null());
    let size = match size_given {
        Some(v) => Some(input::size("size", v)?),
        None if from_backup.is_empty() => return Err(ApiError::bad("size", "size: required")),
        None => None,
    };
    let _ops = m.ops.lock().await;
    if m.lock().contains_key(&name) {
        return Err(ApiError::conflict(format!("volume {name:?} exists already")).with_field("name"));
    }
    if let Some(s) = size {
        input::fits("size", &m.cfg.data_dir, s)?;
    }
    let dir = m.cfg.data_dir.join(&name);
    if dir.exists() {
        return Err(ApiError::conflict(format!("volume {name:?}: {} exists already (a volume this manager does not own)", dir.display())).with_field("name"));
    }
    let remote = remote_replicas(&b)?;
    let secret = match input::opt_str(&b, "secret")? {
        Some(s) => Some(input::secret("secret", s)?),
        None if !remote.is_empty() => return Err(ApiError::bad("secret", "secret: required with replicaAddresses (the replicas hold it)")),
        None => None,
    };
    if !remote.is_empty() && !from_backup.is_empty() {
        return Err(ApiError::bad("fromBackup", "fromBackup: a restore is written to this host's replicas; it cannot be given with replicaAddresses"));
    }
    // Handed over from another host's manager: which of them hold the newest data.
    let healthy = match b.get("healthyReplicas").filter(|v| !v.is_null()) {
        None => Vec::new(),
        Some(v) => {
            let list: Option<Vec<String>> = v.as_array().and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect());
            match list {
                Some(l) if l.iter().all(|a| remote.contains(a)) => l,
                _ => return Err(ApiError::bad("healthyReplicas", "healthyReplicas: a list of addresses from replicaAddresses")),
            }
        }
    };
    let n = spec.number_of_replicas.unwrap_or(if remote.is_empty() { 3 } else { remote.len() });
    if n < remote.len() {
        return Err(ApiError::bad("numberOfReplicas", format!("numberOfReplicas: {n} is fewer than the {} replicaAddresses", remote.len())));
    }
    let locality = spec.data_locality.clone().unwrap_or_else(|| "disabled".into());
    if locality == "strict-local" && (n != 1 || !remote.is_empty()) {
        return Err(ApiError::bad(
            "dataLocality",
            format!("dataLocality: strict-local keeps the volume's one replica on this host, in the engine's process; numberOfReplicas must be 1 and there can be no replicaAddresses (numberOfReplicas {n}, {} replicaAddresses)", remote.len()),
        ));
    }
    let mut st = VolumeState {
        generation,
        data_locality: locality,
        name: name.clone(),
        size: size.unwrap_or(0),
        number_of_replicas: n,
        stale_replica_timeout: stale,
        access_mode: if rwx { "rwx".into() } else { "rwo".into() },
        from_backup: from_backup.clone(),
        frontend: if disable { String::new() } else { frontend },
        disable_frontend: disable,
        recurring_jobs: jobs,
        created: longhorn_replica::meta::now_rfc3339(),
        attached: false,
        phase: String::new(),
        message: String::new(),
        pid: None,
        start_time: None,
        remote_replicas: remote,
        healthy_replicas: healthy,
        share_port: 0,
        attached_by: Vec::new(),
        attached_from: Default::default(),
    };
    let base = base(&m, &h);
    if from_backup.is_empty() {
        let local = st.local_replicas();
        let mk = || -> anyhow::Result<()> {
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            if let Some(k) = &secret {
                k.store_new(&dir.join("volume.key")).map_err(|e| anyhow::anyhow!(e))?;
            }
            for i in 0..local {
                let d = dir.join(format!("replica-{i}"));
                std::fs::create_dir_all(&d).map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
            }
            Ok(())
        };
        if let Err(e) = mk() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ApiError::internal(e));
        }
        if let Err(e) = m.store.save(&st) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ApiError::internal(e));
        }
        m.lock().insert(name.clone(), Entry::new_pub(st));
        tracing::info!(volume = %name, replicas = n, "volume created");
        return Ok((StatusCode::CREATED, Json(volume_json(&m, &name, &base)?)).into_response());
    }
    // Restore: checked against the store before anything is written.
    let (turl, bvol, bname) = backup::parse_backup_url(&from_backup)
        .ok_or_else(|| ApiError::bad("fromBackup", format!("fromBackup: {from_backup:?} is not a backup URL (TARGET?backup=NAME&volume=VOL)")))?;
    let env = m.backup_env();
    let (t2, bv2, bn2) = (turl.clone(), bvol.clone(), bname.clone());
    let env2 = env.clone();
    let found = blocking(move || -> Result<(OffRuntime, Option<u64>), String> {
        let t: Arc<dyn target::BackupTarget> = Arc::from(target::open(&t2, &env2).map_err(|e| e.to_string())?);
        let latest = backup::store::volume_size(t.as_ref(), &bv2);
        let cfg = backup::store::load_backup(t.as_ref(), &bv2, &bn2, latest).map_err(|e| e.to_string())?;
        // The backup's own size, as the restore makes the replicas: volume.cfg has the
        // latest backup's, larger than an older one's when the volume grew in between.
        let size = Some(cfg.volume_size).filter(|&s| s > 0).or(latest);
        Ok((OffRuntime(Some(t)), size))
    })
    .await?;
    let (t, bsize) = found.map_err(|e| ApiError::bad("fromBackup", format!("fromBackup: {e}")))?;
    let bsize = bsize.ok_or_else(|| ApiError::bad("fromBackup", format!("fromBackup: backup volume {bvol:?} has no readable volume.cfg")))?;
    if let Some(s) = size {
        if s != bsize {
            return Err(ApiError::bad("size", format!("size: {s} differs from the backup's volume size {bsize}")));
        }
    }
    st.size = bsize;
    st.phase = "creating".into();
    m.store.save(&st).map_err(ApiError::internal)?;
    let mut e = Entry::new_pub(st.clone());
    e.restore = Some((0, 0));
    m.lock().insert(name.clone(), e);
    let resp = volume_json(&m, &name, &base)?;
    let m2 = m.clone();
    let data_dir = m.cfg.data_dir.clone();
    tokio::spawn(async move {
        let m3 = m2.clone();
        let n2 = name.clone();
        let r = blocking(move || {
            let n3 = n2.clone();
            let progress = move |done: u64, total: u64| {
                if let Some(e) = m3.lock().get_mut(&n3) {
                    e.restore = Some((done, total));
                }
            };
            let mut t = t;
            let t = t.0.take().ok_or_else(|| "the backup target was already closed".to_string())?;
            backup::restore(t, &bvol, &bname, &data_dir, &n2, n, &progress).map_err(|e| e.to_string())
        })
        .await;
        let mut st = st;
        match r {
            Ok(Ok(res)) => {
                tracing::info!(volume = %name, blocks = res.blocks, "restored from {}", res.from);
                st.phase.clear();
            }
            Ok(Err(e)) | Err(ApiError { message: e, .. }) => {
                tracing::error!(volume = %name, "restore failed: {e}");
                st.phase = "error".into();
                st.message = format!("restore from {} failed: {e}", st.from_backup);
            }
        }
        if let Err(e) = m2.store.save(&st) {
            tracing::error!(volume = %name, "{e:#}");
        }
        if let Some(e) = m2.lock().get_mut(&name) {
            e.st = st;
            e.restore = None;
        }
    });
    Ok((StatusCode::CREATED, Json(resp)).into_response())
}

/// `replicaAddresses`: replicas other hosts keep for the volume, `IP:PORT` each.
fn remote_replicas(b: &Map<String, Value>) -> ApiResult<Vec<String>> {
    let Some(v) = b.get("replicaAddresses").filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let list = v.as_array().ok_or_else(|| ApiError::bad("replicaAddresses", "replicaAddresses: a list of IP:PORT"))?;
    let mut out: Vec<String> = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let ok = a.as_str().and_then(|s| s.parse::<std::net::SocketAddr>().ok()).filter(|sa| !sa.ip().is_unspecified() && sa.port() != 0);
        let Some(sa) = ok else {
            return Err(ApiError::bad("replicaAddresses", format!("replicaAddresses[{i}]: {a} is not an address IP:PORT")));
        };
        if out.contains(&sa.to_string()) {
            return Err(ApiError::bad("replicaAddresses", format!("replicaAddresses[{i}]: {sa} is listed twice")));
        }
        out.push(sa.to_string());
    }
    if out.len() > 32 {
        return Err(ApiError::bad("replicaAddresses", "replicaAddresses: at most 32"));
    }
    Ok(out)
}

/// `handOff`: what another host's manager needs to serve this volume (its replicas all
/// live on other hosts, so nothing here moves): the spec, the replicas' addresses and
/// the secret. Only while detached. The caller creates the volume there, then deletes
/// it here (which removes no replica).
///
/// From the answer on the volume is `handedOff` here: it cannot be attached here (two
/// engines on the same replicas), and only deleted, handed off again, or taken back
/// with `{"undo": true}` (the caller found the other host never took it).
async fn hand_off(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["undo"])?;
    let undo = input::opt_bool(b, "undo")?.unwrap_or(false);
    let _ops = m.ops.lock().await;
    let mut st = m.state(name)?;
    let state = volume_state_of(m, name);
    if state != "detached" && state != "handedOff" {
        return Err(ApiError::conflict(format!("volume {name:?} is {state}: it is handed to another host only while detached")));
    }
    if st.remote_replicas.is_empty() || st.local_replicas() > 0 {
        return Err(ApiError::conflict(format!("volume {name:?} keeps replicas on this host: it is served here only")));
    }
    if undo {
        if state == "handedOff" {
            st.phase.clear();
            m.save(&st)?;
            tracing::info!(volume = name, "taken back after a hand-off");
        }
        return Ok(Value::Null);
    }
    if state == "detached" {
        st.phase = "handedOff".into();
        m.save(&st)?;
    }
    let key = m.cfg.data_dir.join(name).join("volume.key");
    let secret = std::fs::read_to_string(&key).map_err(|e| ApiError::internal(anyhow::anyhow!("reading {}: {e}", key.display())))?;
    Ok(json!({
        "type": "volumeHandOff", "name": name, "size": st.size.to_string(), "numberOfReplicas": st.number_of_replicas,
        "staleReplicaTimeout": st.stale_replica_timeout, "accessMode": st.access_mode, "recurringJobs": st.recurring_jobs,
        "dataLocality": st.locality(), "generation": st.generation, "replicaAddresses": st.remote_replicas, "healthyReplicas": st.healthy_replicas, "secret": secret.trim(),
    }))
}

/// `replicaSecret`: the secret a new replica of this volume on another host needs
/// (the one that replaces a lost host's replica). Only for volumes whose replicas live
/// on other hosts; the same secret every one of them already holds.
async fn replica_secret(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &[])?;
    let st = m.state(name)?;
    if st.remote_replicas.is_empty() {
        return Err(ApiError::conflict(format!("volume {name:?} has no replicas on other hosts")));
    }
    let key = m.cfg.data_dir.join(name).join("volume.key");
    let secret = std::fs::read_to_string(&key).map_err(|e| ApiError::internal(anyhow::anyhow!("reading {}: {e}", key.display())))?;
    Ok(json!({"type": "volumeSecret", "name": name, "secret": secret.trim()}))
}

/// `replicaReplace` `{"address": OLD, "newAddress": NEW}`: a replica on another host
/// takes the place of one that is lost. While attached, the engine lets OLD go and
/// rebuilds NEW from a healthy replica; the record names NEW from then on.
async fn replica_replace(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["address", "newAddress"])?;
    let parse = |f: &str| -> ApiResult<String> {
        let v = input::req_str(b, f)?;
        v.parse::<std::net::SocketAddr>()
            .ok()
            .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
            .map(|a| a.to_string())
            .ok_or_else(|| ApiError::bad(f, format!("{f}: {v:?} is not an address IP:PORT")))
    };
    let (old, new) = (parse("address")?, parse("newAddress")?);
    let _ops = m.ops.lock().await;
    let mut st = m.state(name)?;
    let Some(i) = st.remote_replicas.iter().position(|a| *a == old) else {
        return Err(ApiError::not_found(format!("volume {name:?} has no replica on another host at {old}")).with_field("address"));
    };
    if st.remote_replicas.contains(&new) {
        return Err(ApiError::conflict(format!("volume {name:?} has a replica at {new} already")).with_field("newAddress"));
    }
    let state = volume_state_of(m, name);
    if state != "attached" {
        return Err(ApiError::conflict(format!("volume {name:?} is {state}: a replica is rebuilt only while attached")));
    }
    // `up` stops adding OLD back before the engine lets it go.
    let retired = m.cfg.data_dir.join(name).join("retired-replicas");
    let line = format!("{old}\n");
    let appended = std::fs::OpenOptions::new().create(true).append(true).open(&retired).and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    appended.map_err(|e| ApiError::internal(anyhow::anyhow!("{}: {e}", retired.display())))?;
    if let Err(e) = m.engine(name, json!({"cmd": "replica-rm", "address": old})).await {
        if !e.message.contains("no replica") {
            return Err(e);
        }
    }
    // Recorded before the add: the engine may hold NEW from here on, and an attach
    // after a crash must list what the engine may have used.
    st.remote_replicas[i] = new.clone();
    m.save(&st)?;
    m.engine(name, json!({"cmd": "replica-add", "address": new})).await?;
    tracing::info!(volume = name, old, new, "replaced a replica on another host");
    Ok(Value::Null)
}

pub async fn delete_volume(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    input::name("name", &name)?;
    let _ops = m.ops.lock().await;
    let last = volume_json(&m, &name, &base(&m, &h))?;
    let st = m.state(&name)?;
    if st.phase == "creating" {
        return Err(ApiError::conflict(format!("volume {name:?} is being restored; delete it when the restore ends")));
    }
    m.set_transient(&name, Some("deleting"));
    let r = async {
        m.stop_up(&name).await?;
        // Recorded before anything is removed: a manager that dies half-way leaves a
        // volume that says "deleting" (and is never started again), which a second
        // DELETE finishes, not one that looks whole over half its replicas.
        let mut st = m.state(&name)?;
        st.phase = "deleting".into();
        m.save(&st)?;
        let dir = m.cfg.data_dir.join(&name);
        let log = m.log_path(&name);
        blocking(move || -> anyhow::Result<()> {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::anyhow!("removing {}: {e}", dir.display())),
            }
            let _ = std::fs::remove_file(&log);
            Ok(())
        })
        .await?
        .map_err(ApiError::internal)?;
        m.store.remove(&name).map_err(ApiError::internal)
    }
    .await;
    match r {
        Ok(()) => {
            m.lock().remove(&name);
            tracing::info!(volume = %name, "volume deleted");
            Ok(Json(last))
        }
        Err(e) => {
            m.set_transient(&name, None);
            Err(e)
        }
    }
}

/// `POST /v1/volumes/{name}?action=X`.
pub async fn volume_action(
    State(m): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Q,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    input::name("name", &name)?;
    let action = q.get("action").cloned().ok_or_else(|| ApiError::bad("action", "action: required (?action=...)"))?;
    let b = body(&h, b)?;
    let base = base(&m, &h);
    m.state(&name)?;
    let vol_url = view::volume_url(&base, &name);
    let out = match action.as_str() {
        "attach" => attach(&m, &name, &b).await?,
        "detach" => {
            input::only(&b, &["attachedBy"])?;
            let by = input::opt_str(&b, "attachedBy")?.filter(|s| !s.is_empty()).map(String::from);
            let _ops = m.ops.lock().await;
            let mut st = m.state(&name)?;
            if st.phase == "creating" {
                return Err(ApiError::conflict(format!("volume {name:?} is being restored")));
            }
            // One node of a ReadWriteMany volume letting go: the others keep it.
            if let Some(by) = by.filter(|_| st.access_mode == "rwx") {
                st.attached_by.retain(|n| *n != by);
                st.attached_from.remove(&by);
                let others = !st.attached_by.is_empty();
                m.save(&st)?;
                if others {
                    return Ok(Json(volume_json(&m, &name, &base)?).into_response());
                }
            }
            m.set_transient(&name, Some("detaching"));
            let r = m.stop_up(&name).await;
            m.set_transient(&name, None);
            r?;
            let mut st = m.state(&name)?;
            if !st.attached_by.is_empty() || !st.attached_from.is_empty() {
                st.attached_by.clear();
                st.attached_from.clear();
                m.save(&st)?;
            }
            Value::Null
        }
        "snapshotCreate" => {
            input::only(&b, &["name", "labels"])?;
            let sname = input::opt_str(&b, "name")?.filter(|s| !s.is_empty());
            if let Some(s) = sname {
                input::name("name", s)?;
            }
            let labels = input::labels(&b, "labels")?;
            m.require_attached(&name, "snapshotCreate")?;
            let r = m.engine(&name, json!({"cmd": "snapshot-create", "name": sname, "labels": labels})).await?;
            let created = r["name"].as_str().unwrap_or("").to_string();
            let ls = m.engine(&name, json!({"cmd": "snapshot-ls"})).await?;
            view::snapshot_list(&ls, &vol_url)
                .into_iter()
                .find(|s| s["name"] == created.as_str())
                .unwrap_or_else(|| json!({"type": "snapshot", "id": created, "name": created}))
        }
        "snapshotList" => {
            input::only(&b, &[])?;
            m.require_attached(&name, "snapshotList")?;
            let ls = m.engine(&name, json!({"cmd": "snapshot-ls"})).await?;
            return Ok(Json(collection("snapshot", view::snapshot_list(&ls, &vol_url), format!("{vol_url}?action=snapshotList"))).into_response());
        }
        "snapshotGet" => {
            input::only(&b, &["name"])?;
            let sname = q.get("name").map(|s| s.as_str()).or(input::opt_str(&b, "name")?).unwrap_or("").to_string();
            input::name("name", &sname)?;
            m.require_attached(&name, "snapshotGet")?;
            let ls = m.engine(&name, json!({"cmd": "snapshot-ls"})).await?;
            view::snapshot_list(&ls, &vol_url)
                .into_iter()
                .find(|s| s["name"] == sname.as_str())
                .ok_or_else(|| ApiError::not_found(format!("snapshot {sname:?} of volume {name:?}")).with_field("name"))?
        }
        "snapshotDelete" | "snapshotRevert" => {
            input::only(&b, &["name"])?;
            let sname = input::req_str(&b, "name")?;
            input::name("name", sname)?;
            m.require_attached(&name, &action)?;
            let cmd = if action == "snapshotDelete" { "snapshot-rm" } else { "snapshot-revert" };
            m.engine(&name, json!({"cmd": cmd, "name": sname})).await?;
            Value::Null
        }
        "snapshotPurge" => {
            input::only(&b, &[])?;
            m.require_attached(&name, "snapshotPurge")?;
            m.engine(&name, json!({"cmd": "snapshot-purge"})).await?;
            Value::Null
        }
        "snapshotBackup" => {
            input::only(&b, &["name", "labels"])?;
            let sname = input::opt_str(&b, "name")?.filter(|s| !s.is_empty());
            if let Some(s) = sname {
                input::name("name", s)?;
            }
            let labels = input::labels(&b, "labels")?;
            m.require_attached(&name, "snapshotBackup")?;
            let url = crate::settings::get(&m, crate::settings::TARGET)?;
            if url.is_empty() {
                return Err(ApiError::conflict("no backup target is set (PUT /v1/settings/backup-target)"));
            }
            let req = json!({"cmd": "backup-create", "target": url, "env": m.backup_env(), "snapshot": sname, "labels": labels});
            let p = m.engine(&name, req).await?;
            json!({"type": "backupStatus", "backup": p["backup"], "snapshot": p["snapshot"], "url": p["url"], "state": p["state"]})
        }
        // Replicas on other hosts are placed by whoever placed them (and grown by their
        // hosts first: `expand` of such a volume records its new size only).
        "updateReplicaCount" | "replicaRemove" if !m.state(&name)?.remote_replicas.is_empty() => {
            return Err(ApiError::conflict(format!("volume {name:?} has replicas on other hosts: {action} is not done by one host's manager")));
        }
        "updateReplicaCount" => update_replica_count(&m, &name, &b).await?,
        "replicaRemove" => replica_remove(&m, &name, &b).await?,
        "handOff" => hand_off(&m, &name, &b).await?,
        "replicaSecret" => replica_secret(&m, &name, &b).await?,
        "replicaReplace" => replica_replace(&m, &name, &b).await?,
        "recurringJobAdd" => jobs_add(&m, &name, &b).await?,
        "recurringJobDelete" => {
            input::only(&b, &["name"])?;
            let jname = input::req_str(&b, "name")?.to_string();
            let _ops = m.ops.lock().await;
            let mut st = m.state(&name)?;
            if !st.phase.is_empty() {
                return Err(ApiError::conflict(format!("volume {name:?} is {}: its jobs can change once it is restored", st.phase)));
            }
            let mut list = st.recurring_jobs.as_array().cloned().unwrap_or_default();
            let before = list.len();
            list.retain(|j| j["name"] != jname.as_str());
            if list.len() == before {
                return Err(ApiError::not_found(format!("recurring job {jname:?} of volume {name:?}")).with_field("name"));
            }
            if st.attached && volume_state_of(&m, &name) == "attached" {
                m.engine(&name, json!({"cmd": "job-rm", "name": jname})).await?;
            }
            st.recurring_jobs = Value::Array(list);
            m.save(&st)?;
            Value::Null
        }
        "expand" => crate::expand::expand(&m, &name, &b).await?,
        "recurringJobList" => {
            input::only(&b, &[])?;
            let st = m.state(&name)?;
            let live = if st.attached && volume_state_of(&m, &name) == "attached" {
                m.engine(&name, json!({"cmd": "job-ls"})).await.ok()
            } else {
                None
            };
            let data: Vec<Value> = st
                .recurring_jobs
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or(&[])
                .iter()
                .map(|j| {
                    let jn = j["name"].as_str().unwrap_or("");
                    let l = live.as_ref().and_then(|l| l.as_array()).and_then(|l| l.iter().find(|x| x["name"] == jn)).cloned().unwrap_or(Value::Null);
                    let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
                    json!({"type": "recurringJob", "id": jn, "name": jn, "task": j["task"], "cron": j["cron"], "retain": j["retain"],
                           "labels": j.get("labels").cloned().unwrap_or(json!({})),
                           "nextRun": s("next_run"), "lastRun": s("last_run"), "lastResult": s("last_result"),
                           "links": {"self": format!("{vol_url}?action=recurringJobList")},
                           "actions": {"recurringJobDelete": format!("{vol_url}?action=recurringJobDelete")}})
                })
                .collect();
            return Ok(Json(collection("recurringJob", data, format!("{vol_url}?action=recurringJobList"))).into_response());
        }
        other => return Err(ApiError::bad("action", format!("action: unknown volume action {other:?}"))),
    };
    // Actions answer what they made, else the volume as it is now.
    if out.is_null() {
        if with_entry(&m, &name, |e| e.st.attached && e.transient.is_none()).unwrap_or(false) {
            m.sample(&name).await;
        }
        return Ok(Json(volume_json(&m, &name, &base)?).into_response());
    }
    Ok(Json(out).into_response())
}

fn volume_state_of(m: &Shared, name: &str) -> &'static str {
    m.lock().get(name).map(volume_state).unwrap_or("detached")
}

async fn attach(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["frontend", "disableFrontend", "hostId", "attachedBy", "attacherType", "clientAddress"])?;
    let by = input::opt_str(b, "attachedBy")?.filter(|s| !s.is_empty()).map(String::from);
    let from = client_address(b, by.as_deref())?;
    let _ops = m.ops.lock().await;
    let mut st = m.state(name)?;
    let state = volume_state_of(m, name);
    // A ReadWriteMany volume serves every node from here through its share: another
    // node asking is recorded, the volume stays as it is.
    if st.access_mode == "rwx" && state == "attached" && by.is_some() {
        if input::opt_bool(b, "disableFrontend")? == Some(true) {
            return Err(ApiError::bad("disableFrontend", "disableFrontend: an rwx volume needs a frontend"));
        }
        let by = by.unwrap_or_default();
        let changed = !st.attached_by.contains(&by) || from.as_ref() != st.attached_from.get(&by);
        if !st.attached_by.contains(&by) {
            st.attached_by.push(by.clone());
        }
        match from {
            Some(ip) => st.attached_from.insert(by, ip),
            None => st.attached_from.remove(&by),
        };
        if changed {
            m.save(&st)?;
        }
        return Ok(Value::Null);
    }
    if state != "detached" {
        return Err(ApiError::conflict(format!("volume {name:?} is {state}: attach needs it detached")));
    }
    let disable = input::opt_bool(b, "disableFrontend")?.unwrap_or(st.disable_frontend);
    let f = input::opt_str(b, "frontend")?.map(|s| s.to_string()).unwrap_or_else(|| st.frontend.clone());
    input::frontend("frontend", &f, disable)?;
    if st.access_mode == "rwx" && disable {
        return Err(ApiError::bad("disableFrontend", "disableFrontend: an rwx volume needs a frontend"));
    }
    st.frontend = if disable { String::new() } else { f };
    st.disable_frontend = disable;
    st.attached_from.clear();
    if let (Some(by), Some(ip), true) = (by.as_ref(), from, st.access_mode == "rwx") {
        st.attached_from.insert(by.clone(), ip);
    }
    st.attached_by = if st.access_mode == "rwx" { by.into_iter().collect() } else { Vec::new() };
    m.save(&st)?;
    m.set_transient(name, Some("attaching"));
    let r = m.start_up(name).await;
    m.set_transient(name, None);
    if let Err(e) = r {
        // A failed attach leaves the volume detached, not half running.
        if let Err(e2) = m.stop_up(name).await {
            tracing::error!(volume = name, "stopping after a failed attach: {}", e2.message);
        }
        return Err(e);
    }
    m.sample(name).await;
    Ok(Value::Null)
}

/// `clientAddress` of an attach: the IP address the node named by `attachedBy` mounts a
/// ReadWriteMany volume's share from (its address on the hosts' network).
fn client_address(b: &Map<String, Value>, by: Option<&str>) -> ApiResult<Option<String>> {
    let Some(a) = input::opt_str(b, "clientAddress")?.filter(|s| !s.is_empty()) else { return Ok(None) };
    if by.is_none() {
        return Err(ApiError::bad("clientAddress", "clientAddress: given only with attachedBy (the node it is the address of)"));
    }
    let ip: std::net::IpAddr = a.parse().map_err(|_| ApiError::bad("clientAddress", format!("clientAddress: {a:?} is not an IP address")))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(ApiError::bad("clientAddress", format!("clientAddress: {ip} is not the address of one host")));
    }
    Ok(Some(ip.to_string()))
}

/// The address of replica `replica-IDX` in the last sample.
fn replica_address(m: &Shared, name: &str, idx: &str) -> Option<String> {
    with_entry(m, name, |e| view::replicas(m, e))
        .ok()?
        .into_iter()
        .find(|r| r["name"] == format!("{name}-r-{idx}").as_str())
        .and_then(|r| r["address"].as_str().map(|s| s.to_string()))
        .filter(|a| !a.is_empty())
}

/// Removes a replica's directory once no replica process serves it any more (`up`
/// stops a replica the operator removed).
fn remove_replica_dir_when_free(dir: std::path::PathBuf) {
    std::thread::spawn(move || {
        let needle = dir.display().to_string();
        for _ in 0..600 {
            if !dir_in_use(&needle) {
                // Renamed first, in one step: a replica started on the path from now
                // on gets a new, empty directory (and a rebuild), never one half deleted.
                let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
                let leaf = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                let tomb = dir.with_file_name(format!(".{leaf}.removed-{stamp}"));
                if let Err(e) = std::fs::rename(&dir, &tomb) {
                    tracing::error!(dir = %needle, "setting the replica's directory aside: {e}; left in place");
                    return;
                }
                match std::fs::remove_dir_all(&tomb) {
                    Ok(()) => tracing::info!(dir = %needle, "removed the replica's directory"),
                    Err(e) => tracing::error!(dir = %tomb.display(), "removing the replica's directory: {e}"),
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::error!(dir = %needle, "a replica still serves it after 60 s; directory left in place");
    });
}

fn dir_in_use(dir: &str) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    rd.flatten().any(|e| {
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else { return false };
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.windows(2).any(|w| w[0] == b"--dir" && w[1] == dir.as_bytes())
    })
}

async fn replica_remove(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["name"])?;
    let rname = input::req_str(b, "name")?;
    let idx = rname
        .strip_prefix(&format!("{name}-r-"))
        .filter(|i| !i.is_empty() && i.len() < 4 && i.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| ApiError::bad("name", format!("name: {rname:?} is not a replica of {name:?} ({name}-r-N)")))?
        .to_string();
    let _ops = m.ops.lock().await;
    let st = m.state(name)?;
    let dir = m.cfg.data_dir.join(name).join(format!("replica-{idx}"));
    match volume_state_of(m, name) {
        "attached" => {
            m.sample(name).await;
            let addr = replica_address(m, name, &idx)
                .ok_or_else(|| ApiError::not_found(format!("replica {rname:?} of volume {name:?}")).with_field("name"))?;
            m.engine(name, json!({"cmd": "replica-rm", "address": addr})).await?;
            remove_replica_dir_when_free(dir);
        }
        // Detached, nothing says which replica holds the newest data: removing one
        // could leave only a stale copy, or none (as Longhorn, only while attached).
        s => return Err(ApiError::conflict(format!("volume {name:?} is {s}: replicaRemove needs it attached"))),
    }
    let _ = st;
    Ok(Value::Null)
}

async fn update_replica_count(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["replicaCount"])?;
    let n = match b.get("replicaCount") {
        Some(Value::Number(n)) => n.as_u64().filter(|n| (1..=32).contains(n)),
        _ => None,
    }
    .ok_or_else(|| ApiError::bad("replicaCount", "replicaCount: required, a whole number from 1 to 32"))? as usize;
    let _ops = m.ops.lock().await;
    let mut st = m.state(name)?;
    let state = volume_state_of(m, name);
    if state == "attached" && n < st.number_of_replicas {
        // Live: the highest-numbered replicas leave the volume (`up` stops them).
        m.sample(name).await;
        for i in (n..st.number_of_replicas).rev() {
            // Only a replica the engine let go of is removed: one without an address
            // (failed, in up's restart backoff) may be started again on its directory.
            if let Some(addr) = replica_address(m, name, &i.to_string()) {
                m.engine(name, json!({"cmd": "replica-rm", "address": addr})).await?;
                remove_replica_dir_when_free(m.cfg.data_dir.join(name).join(format!("replica-{i}")));
            }
        }
    } else if state != "attached" && state != "detached" {
        return Err(ApiError::conflict(format!("volume {name:?} is {state}")));
    }
    // More replicas on an attached volume take effect at its next attach (API.md,
    // Backend notes): `longhorn up` owns its replica set while it runs.
    st.number_of_replicas = n;
    m.save(&st)?;
    if state == "detached" {
        for i in 0..n {
            let d = m.cfg.data_dir.join(name).join(format!("replica-{i}"));
            std::fs::create_dir_all(&d).map_err(|e| ApiError::internal(anyhow::anyhow!("creating {}: {e}", d.display())))?;
        }
    }
    Ok(Value::Null)
}

async fn jobs_add(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["jobs"])?;
    let new = b.get("jobs").filter(|j| j.is_array()).ok_or_else(|| ApiError::bad("jobs", "jobs: required, a list of recurring jobs"))?;
    // Validated alone first (errors then index the request's own list), then merged.
    longhorn_engine::jobs::parse_jobs(new).map_err(|e| {
        let msg = format!("jobs: {e}");
        ApiError::bad(&job_field("jobs", &msg), msg)
    })?;
    let _ops = m.ops.lock().await;
    let mut st = m.state(name)?;
    if !st.phase.is_empty() {
        return Err(ApiError::conflict(format!("volume {name:?} is {}: its jobs can change once it is restored", st.phase)));
    }
    let new_list = new.as_array().cloned().unwrap_or_default();
    let mut list: Vec<Value> = st.recurring_jobs.as_array().cloned().unwrap_or_default();
    list.retain(|j| !new_list.iter().any(|n| n["name"] == j["name"]));
    list.extend(new_list);
    let merged = Value::Array(list);
    longhorn_engine::jobs::parse_jobs(&merged).map_err(|e| ApiError::bad("jobs", format!("jobs: {e}")))?;
    if st.attached && volume_state_of(m, name) == "attached" {
        m.engine(name, json!({"cmd": "job-add", "jobs": new})).await?;
    }
    st.recurring_jobs = merged;
    m.save(&st)?;
    Ok(Value::Null)
}

// --- backups ---

/// Opens the backup target and runs `f` on it, all on a worker thread: the NFS target
/// drives a tokio runtime of its own (to connect, per operation and on drop), which
/// must never run on one of the manager's async threads. None when no target is set.
async fn with_target<T: Send + 'static>(
    m: &Shared,
    f: impl FnOnce(&Arc<dyn target::BackupTarget>) -> ApiResult<T> + Send + 'static,
) -> ApiResult<Option<T>> {
    let url = crate::settings::get(m, crate::settings::TARGET)?;
    if url.is_empty() {
        return Ok(None);
    }
    let env = m.backup_env();
    blocking(move || {
        let t: Arc<dyn target::BackupTarget> = Arc::from(target::open(&url, &env).map_err(|e| ApiError::conflict(format!("backup target: {e}")))?);
        f(&t).map(Some)
    })
    .await?
}

/// A backup target handed from a worker thread to async code: dropped, it is dropped
/// on a thread of its own (see [`with_target`]).
struct OffRuntime(Option<Arc<dyn target::BackupTarget>>);

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = std::thread::Builder::new().name("target-drop".into()).spawn(move || drop(t));
        }
    }
}

fn bv_json(base: &str, v: &backup::VolumeInfo) -> Value {
    let url = format!("{base}/v1/backupvolumes/{}", v.name);
    json!({"type": "backupVolume", "id": v.name, "name": v.name, "size": v.size.to_string(), "created": v.created_at,
           "lastBackupName": v.last_backup_name, "lastBackupAt": v.last_backup_at, "lastSyncedAt": v.last_synced_at,
           "dataStored": (v.block_count * 2 * 1024 * 1024).to_string(),
           "links": {"self": url},
           "actions": {"backupList": format!("{url}?action=backupList"), "backupGet": format!("{url}?action=backupGet"),
                       "backupDelete": format!("{url}?action=backupDelete")}})
}

fn backup_json(base: &str, b: &backup::BackupInfo) -> Value {
    let url = format!("{base}/v1/backupvolumes/{}", b.volume);
    let state = if b.state == "complete" { "Completed" } else { "InProgress" };
    json!({"type": "backup", "id": b.name, "name": b.name, "volumeName": b.volume, "snapshotName": b.snapshot,
           "snapshotCreated": b.snapshot_created_at, "created": b.created, "size": b.size.to_string(), "state": state,
           "url": b.url, "labels": b.labels, "progress": if state == "Completed" { 100 } else { 0 },
           "links": {"self": format!("{url}?action=backupGet")},
           "actions": {"backupDelete": format!("{url}?action=backupDelete")}})
}

fn be(e: backup::BackupError) -> ApiError {
    match e {
        backup::BackupError::NotFound { .. } => ApiError::not_found(e.to_string()),
        backup::BackupError::Invalid(_) => ApiError::bad("name", e.to_string()),
        backup::BackupError::Busy(_) => ApiError::conflict(e.to_string()),
        other => ApiError::engine("backup target", other),
    }
}

pub async fn list_backup_volumes(State(m): State<Shared>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let b = base(&m, &h);
    let b2 = b.clone();
    let data = with_target(&m, move |t| Ok(backup::list_volumes(t.as_ref()).map_err(be)?.iter().map(|v| bv_json(&b2, v)).collect::<Vec<_>>()))
        .await?
        .unwrap_or_default();
    Ok(Json(collection("backupVolume", data, format!("{b}/v1/backupvolumes"))))
}

/// The backup volume `name` of the target, or 404.
fn find_backup_volume(t: &dyn target::BackupTarget, name: &str) -> ApiResult<backup::VolumeInfo> {
    let all = backup::list_volumes(t).map_err(be)?;
    all.into_iter().find(|v| v.name == name).ok_or_else(|| ApiError::not_found(format!("backup volume {name:?}")).with_field("name"))
}

fn no_target(name: &str) -> ApiError {
    ApiError::not_found(format!("backup volume {name:?} (no backup target is set)")).with_field("name")
}

pub async fn get_backup_volume(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    input::name("name", &name)?;
    let n = name.clone();
    let v = with_target(&m, move |t| find_backup_volume(t.as_ref(), &n)).await?.ok_or_else(|| no_target(&name))?;
    Ok(Json(bv_json(&base(&m, &h), &v)))
}

pub async fn delete_backup_volume(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    input::name("name", &name)?;
    let n = name.clone();
    let v = with_target(&m, move |t| {
        let v = find_backup_volume(t.as_ref(), &n)?;
        for b in backup::list_backups(t.as_ref(), Some(&n)).map_err(be)? {
            backup::delete_backup(t.clone(), &n, &b.name).map_err(be)?;
        }
        Ok(v)
    })
    .await?
    .ok_or_else(|| no_target(&name))?;
    Ok(Json(bv_json(&base(&m, &h), &v)))
}

pub async fn backup_volume_action(
    State(m): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Q,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    input::name("name", &name)?;
    let action = q.get("action").cloned().ok_or_else(|| ApiError::bad("action", "action: required (?action=...)"))?;
    let b = body(&h, b)?;
    let base = base(&m, &h);
    if !matches!(action.as_str(), "backupList" | "backupGet" | "backupDelete") {
        return Err(ApiError::bad("action", format!("action: unknown backup volume action {action:?}")));
    }
    let bname = if action == "backupList" {
        input::only(&b, &[])?;
        None
    } else {
        input::only(&b, &["name"])?;
        let bname = input::req_str(&b, "name")?.to_string();
        input::name("name", &bname)?;
        Some(bname)
    };
    let (n, base2) = (name.clone(), base.clone());
    let out = with_target(&m, move |t| {
        find_backup_volume(t.as_ref(), &n)?;
        let list = backup::list_backups(t.as_ref(), Some(&n)).map_err(be)?;
        let Some(bname) = bname else {
            let data = list.iter().map(|x| backup_json(&base2, x)).collect();
            return Ok(collection("backup", data, format!("{base2}/v1/backupvolumes/{n}?action=backupList")));
        };
        let found = list.iter().find(|x| x.name == bname).ok_or_else(|| ApiError::not_found(format!("backup {bname:?} of {n:?}")).with_field("name"))?;
        let out = backup_json(&base2, found);
        if action == "backupDelete" {
            backup::delete_backup(t.clone(), &n, &bname).map_err(be)?;
        }
        Ok(out)
    })
    .await?
    .ok_or_else(|| no_target(&name))?;
    Ok(Json(out))
}

// --- settings and secrets ---

pub async fn list_settings(State(m): State<Shared>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let b = base(&m, &h);
    let mut data = Vec::new();
    for n in crate::settings::NAMES {
        data.push(crate::settings::setting_json(&b, n, &crate::settings::get(&m, n)?));
    }
    Ok(Json(collection("setting", data, format!("{b}/v1/settings"))))
}

pub async fn get_setting(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let v = crate::settings::get(&m, &name)?;
    Ok(Json(crate::settings::setting_json(&base(&m, &h), &name, &v)))
}

pub async fn put_setting(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>, b: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let b = body(&h, b)?;
    input::only(&b, &["value", "name", "id", "type"])?;
    let v = input::req_str(&b, "value")?.to_string();
    let m2 = m.clone();
    let (n2, v2) = (name.clone(), v.clone());
    // Opening an nfs:// or s3:// target may touch the network.
    blocking(move || crate::settings::put(&m2, &n2, &v2)).await??;
    Ok(Json(crate::settings::setting_json(&base(&m, &h), &name, &v)))
}

pub async fn list_secrets(State(m): State<Shared>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let b = base(&m, &h);
    let data = crate::settings::list_secrets(&m)?.iter().map(|(n, d)| crate::settings::secret_json(&b, n, d)).collect();
    Ok(Json(collection("secret", data, format!("{b}/v1/secrets"))))
}

pub async fn get_secret(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let d = crate::settings::secret_data(&m, &name)?.ok_or_else(|| ApiError::not_found(format!("secret {name:?}")).with_field("name"))?;
    Ok(Json(crate::settings::secret_json(&base(&m, &h), &name, &d)))
}

pub async fn put_secret(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>, b: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let b = body(&h, b)?;
    let d = crate::settings::put_secret(&m, &name, &b)?;
    Ok(Json(crate::settings::secret_json(&base(&m, &h), &name, &d)))
}

pub async fn delete_secret(State(m): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let d = crate::settings::secret_data(&m, &name)?.ok_or_else(|| ApiError::not_found(format!("secret {name:?}")).with_field("name"))?;
    crate::settings::delete_secret(&m, &name)?;
    Ok(Json(crate::settings::secret_json(&base(&m, &h), &name, &d)))
}

/// This host's storage: what the CSI driver's GetCapacity and placement read.
pub async fn get_node(State(m): State<Shared>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let dir = m.cfg.data_dir.clone();
    let (avail, total) = storage_of(&dir).map_err(|e| ApiError::internal(anyhow::anyhow!("statvfs {}: {e}", dir.display())))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    let b = base(&m, &h);
    Ok(Json(json!({
        "type": "node", "id": host, "name": host, "dataDir": dir.display().to_string(),
        "address": m.cfg.replica_ip.to_string(),
        "storageAvailable": avail, "storageMaximum": total,
        "links": {"self": format!("{b}/v1/node")}, "actions": {},
    })))
}

/// Bytes free to an unprivileged writer and the filesystem's size, at `dir`.
fn storage_of(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and s a statvfs the call fills in.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((s.f_bavail as u64 * s.f_frsize as u64, s.f_blocks as u64 * s.f_frsize as u64))
}
