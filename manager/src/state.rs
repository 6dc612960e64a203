//! What the manager keeps on disk: one JSON file per volume under
//! `STATE_DIR/volumes/NAME.json`, written atomically (temp file, fsync, rename, fsync
//! of the directory), so a manager killed at any instant leaves the old or the new
//! state, never a torn one. The data itself (replica directories) lives under
//! `DATA_DIR/NAME/` where `longhorn up` keeps it.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The volume as the operator asked for it, plus the `longhorn up` process serving it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeState {
    pub name: String,
    pub size: u64,
    pub number_of_replicas: usize,
    /// Minutes, as Longhorn's staleReplicaTimeout.
    pub stale_replica_timeout: u64,
    /// `rwo` or `rwx`.
    pub access_mode: String,
    pub from_backup: String,
    /// The API's value: blockdev, ublk, nbd, fuse, or "" (disableFrontend).
    pub frontend: String,
    pub disable_frontend: bool,
    /// A StorageClass-style list, validated by `longhorn_engine::jobs::parse_jobs`.
    pub recurring_jobs: Value,
    pub created: String,
    /// Whether the volume should be running: the manager restarts a dead `up` of a
    /// volume meant attached, and adopts a live one.
    pub attached: bool,
    /// `creating` while a restore runs, `error` when it failed, else "".
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub message: String,
    /// The `longhorn up` process: its pid and its start time in clock ticks since boot
    /// (/proc/PID/stat field 22), which tells it apart from a later process that got
    /// the same pid.
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub start_time: Option<u64>,
    /// Replicas other hosts keep for this volume (`IP:PORT`, see `replicas.rs`); they
    /// count in `number_of_replicas`, the rest are this host's `replica-N`.
    #[serde(default)]
    pub remote_replicas: Vec<String>,
    /// Of those, the ones the engine last had healthy (RW): they hold the newest data.
    /// An attach needs one of them to answer, else the engine could start on replicas
    /// that fell behind and rebuild the others from them, losing acknowledged writes.
    #[serde(default)]
    pub healthy_replicas: Vec<String>,
    /// Which incarnation of a volume whose replicas live on other hosts this record
    /// is: each move of its engine to another host, and each take-over from a lost
    /// host, records it one higher. Of two records of one volume the higher is the
    /// volume; the other is a lost host's, returned.
    #[serde(default)]
    pub generation: u64,
    /// Longhorn's dataLocality (`disabled`, `best-effort`, `strict-local`); "" is
    /// disabled (volumes recorded before it existed).
    #[serde(default)]
    pub data_locality: String,
    /// ReadWriteMany: the NFS port of its share on this host's address, chosen at the
    /// first attach and kept, so clients' mounts find it again after a restart.
    #[serde(default)]
    pub share_port: u16,
    /// ReadWriteMany: the nodes that asked for it (attach with `attachedBy`); a
    /// detach naming one detaches the volume only once no other is left.
    #[serde(default)]
    pub attached_by: Vec<String>,
    /// ReadWriteMany: the address each of those nodes mounts the share from (attach
    /// with `clientAddress`). With this host's own address they are the only hosts the
    /// share lets mount.
    #[serde(default)]
    pub attached_from: std::collections::BTreeMap<String, String>,
}

impl VolumeState {
    /// How many replicas run on this host, under `longhorn up`.
    pub fn local_replicas(&self) -> usize {
        self.number_of_replicas.saturating_sub(self.remote_replicas.len())
    }

    pub fn locality(&self) -> &str {
        if self.data_locality.is_empty() {
            "disabled"
        } else {
            &self.data_locality
        }
    }

    /// Whether `up` serves replica-0 in the engine's process: the volume asks for a
    /// replica on the engine's host and this host keeps one.
    pub fn embedded_replica(&self) -> bool {
        self.locality() != "disabled" && self.local_replicas() > 0
    }
}

pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn open(state_dir: &Path) -> Result<StateDir> {
        let dir = state_dir.join("volumes");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(StateDir { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    pub fn save(&self, st: &VolumeState) -> Result<()> {
        let data = serde_json::to_vec_pretty(st).context("encoding the volume state")?;
        let p = self.path(&st.name);
        longhorn_replica::meta::write_atomic(&p, &data).with_context(|| format!("writing {}", p.display()))
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let p = self.path(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
        longhorn_replica::meta::sync_dir(&self.dir).with_context(|| format!("syncing {}", self.dir.display()))
    }

    /// Every volume state; a file that does not parse is skipped with an error in the
    /// log (the manager must still serve the others).
    pub fn load_all(&self) -> Result<Vec<VolumeState>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))? {
            let e = e.with_context(|| format!("reading {}", self.dir.display()))?;
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&p)
                .map_err(anyhow::Error::from)
                .and_then(|d| serde_json::from_slice::<VolumeState>(&d).map_err(anyhow::Error::from));
            match parsed {
                Ok(st) => out.push(st),
                Err(e) => tracing::error!(file = %p.display(), "skipping an unreadable volume state: {e:#}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
