//! Settings and secrets. The backup target lives in `DATA_DIR/settings.json`, the file
//! `longhorn backup target` writes and the engines' recurring backups read
//! (LONGHORN_SETTINGS), so the CLI, the engines and the manager agree on one target.
//! Secrets (S3 credentials) are files of mode 0600 under `STATE_DIR/secrets/`; their
//! values are never returned.

use crate::error::{ApiError, ApiResult};
use crate::mgr::Mgr;
use anyhow::Context;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const TARGET: &str = "backup-target";
pub const CREDENTIAL: &str = "backup-target-credential-secret";
pub const NAMES: [&str; 2] = [TARGET, CREDENTIAL];

/// The keys a secret may hold: what the backup targets read from their environment.
pub const SECRET_KEYS: [&str; 7] =
    ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINTS", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_CERT", "VIRTUAL_HOSTED_STYLE"];

fn read_settings(path: &Path) -> ApiResult<Map<String, Value>> {
    match std::fs::read(path) {
        Ok(raw) => match serde_json::from_slice::<Value>(&raw) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(ApiError::internal(anyhow::anyhow!("{} is not a JSON object", path.display()))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Map::new()),
        Err(e) => Err(ApiError::internal(anyhow::Error::from(e).context(format!("reading {}", path.display())))),
    }
}

pub fn get(m: &Mgr, name: &str) -> ApiResult<String> {
    if !NAMES.contains(&name) {
        return Err(ApiError::not_found(format!("setting {name:?}")).with_field("name"));
    }
    Ok(read_settings(&m.settings_path())?.get(name).and_then(|v| v.as_str()).unwrap_or("").to_string())
}

pub fn setting_json(base: &str, name: &str, value: &str) -> Value {
    let url = format!("{base}/v1/settings/{name}");
    json!({"type": "setting", "id": name, "name": name, "value": value, "links": {"self": url}, "actions": {}})
}

/// Validates and stores a setting. The backup target must be one the engine can open
/// (file://, vfs://, nfs://, s3://); "" unsets it.
pub fn put(m: &Mgr, name: &str, value: &str) -> ApiResult<()> {
    match name {
        TARGET if !value.is_empty() => {
            let ok = ["file://", "vfs://", "nfs://", "s3://"].iter().any(|p| value.starts_with(p));
            if !ok {
                return Err(ApiError::bad("value", format!("value: backup target {value:?} must start with file://, vfs://, nfs:// or s3://")));
            }
            longhorn_engine::backup::target::open(value, &m.backup_env()).map_err(|e| ApiError::bad("value", format!("value: {e}")))?;
        }
        CREDENTIAL if !value.is_empty() => {
            crate::input::name("value", value)?;
        }
        TARGET | CREDENTIAL => {}
        _ => return Err(ApiError::not_found(format!("setting {name:?}")).with_field("name")),
    }
    let path = m.settings_path();
    let mut s = read_settings(&path)?;
    s.insert(name.to_string(), json!(value));
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display())).map_err(ApiError::internal)?;
    }
    let data = serde_json::to_vec_pretty(&Value::Object(s)).context("encoding settings").map_err(ApiError::internal)?;
    longhorn_replica::meta::write_atomic(&path, &data).with_context(|| format!("writing {}", path.display())).map_err(ApiError::internal)
}

fn secrets_dir(m: &Mgr) -> PathBuf {
    m.cfg.state_dir.join("secrets")
}

pub fn secret_data(m: &Mgr, name: &str) -> ApiResult<Option<HashMap<String, String>>> {
    crate::input::name("name", name)?;
    let p = secrets_dir(m).join(format!("{name}.json"));
    match std::fs::read(&p) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::internal(anyhow::Error::from(e).context(format!("reading {}", p.display())))),
    }
}

pub fn secret_json(base: &str, name: &str, data: &HashMap<String, String>) -> Value {
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    json!({"type": "secret", "id": name, "name": name, "keys": keys, "links": {"self": format!("{base}/v1/secrets/{name}")}, "actions": {}})
}

pub fn list_secrets(m: &Mgr) -> ApiResult<Vec<(String, HashMap<String, String>)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(secrets_dir(m)) else { return Ok(out) };
    for e in rd.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        if let Some(n) = f.strip_suffix(".json") {
            if crate::input::name("name", n).is_ok() {
                if let Some(d) = secret_data(m, n)? {
                    out.push((n.to_string(), d));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub fn put_secret(m: &Mgr, name: &str, body: &Map<String, Value>) -> ApiResult<HashMap<String, String>> {
    crate::input::name("name", name)?;
    crate::input::only(body, &["data", "name", "type", "id"])?;
    let data = body.get("data").and_then(|d| d.as_object()).ok_or_else(|| ApiError::bad("data", "data: required, a map of strings"))?;
    let mut out = HashMap::new();
    for (k, v) in data {
        if !SECRET_KEYS.contains(&k.as_str()) {
            return Err(ApiError::bad("data", format!("data: unknown key {k:?} (one of {})", SECRET_KEYS.join(", "))));
        }
        let v = v.as_str().ok_or_else(|| ApiError::bad("data", format!("data: {k} must be a string")))?;
        if v.len() > 16384 {
            return Err(ApiError::bad("data", format!("data: {k} is longer than 16384 bytes")));
        }
        out.insert(k.clone(), v.to_string());
    }
    let dir = secrets_dir(m);
    let write = || -> anyhow::Result<()> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = dir.join(format!("{name}.json"));
        let tmp = dir.join(format!("{name}.json.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(&out)?).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
        longhorn_replica::meta::sync_dir(&dir)?;
        Ok(())
    };
    write().map_err(ApiError::internal)?;
    Ok(out)
}

pub fn delete_secret(m: &Mgr, name: &str) -> ApiResult<()> {
    crate::input::name("name", name)?;
    let p = secrets_dir(m).join(format!("{name}.json"));
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::not_found(format!("secret {name:?}")).with_field("name")),
        Err(e) => Err(ApiError::internal(anyhow::Error::from(e).context(format!("removing {}", p.display())))),
    }
}

/// The credential secret's values as environment variables for the backup targets
/// (empty when none is set).
pub fn credential_env(m: &Mgr) -> HashMap<String, String> {
    let name = get(m, CREDENTIAL).unwrap_or_default();
    if name.is_empty() {
        return HashMap::new();
    }
    secret_data(m, &name).ok().flatten().unwrap_or_default()
}
