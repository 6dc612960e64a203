//! `POST /v1/volumes/{name}?action=expand` `{"size":"..."}`: grows a detached volume.
//!
//! Offline only, as Longhorn v1 was for a long time: a running engine, its replicas
//! and the kernel's device all have the size built in. Every replica directory is
//! grown first (`longhorn_replica::expand`, crash-safe and idempotent per directory),
//! then the new size is recorded in the volume's state, so the next attach starts
//! `longhorn up` with it. A manager that dies in between leaves the state at the old
//! size and some replicas at the new one: the volume does not attach (the replicas
//! refuse the old size, naming both), and calling expand again with the new size
//! finishes the job.

use crate::error::{ApiError, ApiResult};
use crate::input;
use crate::mgr::{blocking, volume_state, Shared};
use longhorn_replica::StoreError;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub async fn expand(m: &Shared, name: &str, b: &Map<String, Value>) -> ApiResult<Value> {
    input::only(b, &["size"])?;
    let size = input::size("size", b.get("size").ok_or_else(|| ApiError::bad("size", "size: required"))?)?;
    let _ops = m.ops.lock().await;
    let mut st = m.state(name)?;
    let state = m.lock().get(name).map(volume_state).unwrap_or("detached");
    if state != "detached" {
        return Err(ApiError::conflict(format!("volume {name:?} is {state}: expand needs it detached; detach it first")));
    }
    if size < st.size {
        return Err(ApiError::bad("size", format!("size: {size} bytes is smaller than the volume's {} bytes; a volume cannot shrink", st.size)));
    }
    if size == st.size {
        return Ok(Value::Null);
    }
    let vol_dir = m.cfg.data_dir.join(name);
    let (n, from) = (name.to_string(), st.size);
    blocking(move || grow_replicas(&n, &vol_dir, size)).await??;
    st.size = size;
    m.save(&st)?;
    tracing::info!(volume = name, from, to = size, "volume expanded");
    Ok(Value::Null)
}

/// Grows every replica directory of the volume that holds a replica. A directory
/// without `volume.meta` (never started, or emptied for a full rebuild) is made at the
/// state's size when `longhorn up` starts it, so there is nothing to grow.
fn grow_replicas(name: &str, vol_dir: &Path, size: u64) -> ApiResult<()> {
    for dir in replica_dirs(vol_dir)? {
        if !dir.join(longhorn_replica::meta::VOLUME_META).exists() {
            continue;
        }
        match longhorn_replica::expand::expand(&dir, size) {
            Ok(old) if old != size => tracing::info!(volume = name, dir = %dir.display(), from = old, to = size, "replica expanded"),
            Ok(_) => {}
            Err(e @ StoreError::TooLarge { .. }) => return Err(ApiError::bad("size", format!("size: {e}"))),
            Err(e @ StoreError::Busy { .. }) => {
                return Err(ApiError::conflict(format!("volume {name:?}: {e}")));
            }
            // A replica already larger than asked: an earlier expand to a larger size
            // was interrupted; only that size can finish it.
            Err(e @ StoreError::Shrink { .. }) => {
                return Err(ApiError::conflict(format!("volume {name:?}: {e}; expand to that size to finish the earlier expand")));
            }
            Err(e) => return Err(ApiError::internal(anyhow::anyhow!("volume {name:?}: expanding {}: {e}", dir.display()))),
        }
    }
    Ok(())
}

/// `replica-N` directories under the volume's directory, in order. Those beyond
/// `numberOfReplicas` are grown too: a larger count later starts them again.
fn replica_dirs(vol_dir: &Path) -> ApiResult<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(vol_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ApiError::internal(anyhow::anyhow!("reading {}: {e}", vol_dir.display()))),
    };
    let mut out: Vec<(u32, PathBuf)> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| ApiError::internal(anyhow::anyhow!("reading {}: {e}", vol_dir.display())))?;
        let file_name = e.file_name();
        let idx = file_name.to_str().and_then(|n| n.strip_prefix("replica-")).and_then(|i| i.parse::<u32>().ok());
        if let Some(i) = idx {
            out.push((i, e.path()));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}
