//! What the driver hands to Kubernetes and gets back: volume and snapshot ids, sizes,
//! StorageClass and VolumeSnapshotClass parameters.
//!
//! Invariants:
//! - A volume id is the manager's volume name, the same on every host: a volume lives
//!   on one host, and the controller refuses a name another host already has.
//! - A CSI name maps to a volume name deterministically ([`volume_name`]), so a retried
//!   CreateVolume finds the volume the first try made.
//! - A snapshot name is unique across the driver's volumes as far as the chains of
//!   attached volumes show (a detached volume's chain is not read: that would start
//!   it). Kubernetes names snapshots `snapshot-UUID`, so names do not meet in practice.
//! - Snapshot ids are Longhorn's: `snap://VOLUME/SNAPSHOT` for a snapshot in the
//!   volume's chain, `bak://VOLUME/BACKUP` for a backup on the backup target.

use serde_json::{Map, Value};
use tonic::Status;

/// The manager's name rule (`manager/src/input.rs`): `[a-z0-9][a-z0-9.-]{0,62}`, no `..`.
pub fn valid_name(s: &str) -> bool {
    let first = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && !s.contains("..")
}

/// 32-bit FNV-1a: a short, stable tag for names that had to be changed.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// The volume (or snapshot) name for a CSI name. Kubernetes' names (`pvc-UUID`,
/// `snapshot-UUID`) pass unchanged; any other name is lowered, its other characters
/// made `-`, cut to 54 characters and tagged with a hash of the whole CSI name, so
/// two different names never meet and the same name always maps the same way.
pub fn volume_name(csi: &str) -> Result<String, Status> {
    if csi.is_empty() {
        return Err(Status::invalid_argument("name: must not be empty"));
    }
    if csi.len() > 253 {
        return Err(Status::invalid_argument(format!("name: {} characters, at most 253", csi.len())));
    }
    if valid_name(csi) {
        return Ok(csi.to_string());
    }
    let mut s: String = csi
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_start_matches('-').chars().take(54).collect();
    let s = format!("{}{}{:08x}", s, if s.is_empty() { "v" } else { "-" }, fnv(csi));
    Ok(s)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapId {
    Snap { volume: String, name: String },
    Backup { volume: String, backup: String },
}

impl SnapId {
    pub fn parse(id: &str) -> Option<SnapId> {
        let (kind, rest) = id.split_once("://")?;
        let (volume, name) = rest.split_once('/')?;
        if !valid_name(volume) || !valid_name(name) {
            return None;
        }
        let (volume, name) = (volume.to_string(), name.to_string());
        match kind {
            "snap" => Some(SnapId::Snap { volume, name }),
            "bak" => Some(SnapId::Backup { volume, backup: name }),
            _ => None,
        }
    }

    pub fn volume(&self) -> &str {
        match self {
            SnapId::Snap { volume, .. } | SnapId::Backup { volume, .. } => volume,
        }
    }
}

impl std::fmt::Display for SnapId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapId::Snap { volume, name } => write!(f, "snap://{volume}/{name}"),
            SnapId::Backup { volume, backup } => write!(f, "bak://{volume}/{backup}"),
        }
    }
}

/// Default size of a volume whose request names none (as Longhorn's UI default).
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The manager's largest volume (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

/// The size for a capacity range: the required bytes (or the default, or the limit if
/// that is smaller), rounded up to 1 MiB where the limit allows, else to 4 KiB.
pub fn size(required: i64, limit: i64) -> Result<u64, Status> {
    if required < 0 || limit < 0 {
        return Err(Status::out_of_range("capacity_range: bytes must not be negative"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Status::out_of_range(format!("capacity_range: required_bytes {required} is more than limit_bytes {limit}")));
    }
    let want = if required > 0 {
        required
    } else if limit > 0 {
        limit.min(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    let round = |n: u64, to: u64| n.div_ceil(to) * to;
    let mut s = round(want.max(4096), 1 << 20);
    if limit > 0 && s > limit {
        s = round(want.max(4096), 4096);
    }
    if limit > 0 && s > limit {
        return Err(Status::out_of_range(format!(
            "capacity_range: no multiple of 4096 bytes lies between required_bytes {required} and limit_bytes {limit}"
        )));
    }
    if s > MAX_SIZE {
        return Err(Status::out_of_range(format!("capacity_range: {s} bytes is more than the largest volume, {MAX_SIZE}")));
    }
    Ok(s)
}

/// The filesystems NodeStageVolume makes and mounts.
pub fn fs_type(t: &str) -> Result<&'static str, Status> {
    match t {
        "" | "ext4" => Ok("ext4"),
        "xfs" => Ok("xfs"),
        other => Err(Status::invalid_argument(format!("fs_type: {other:?} is not supported (ext4 or xfs)"))),
    }
}

/// What a StorageClass's parameters ask for, checked before anything is made.
#[derive(Debug, Default)]
pub struct Params {
    /// The parameters the manager's volume spec takes (it checks their values).
    pub spec: Map<String, Value>,
    pub fs_type: Option<&'static str>,
}

pub fn volume_params(p: &std::collections::HashMap<String, String>) -> Result<Params, Status> {
    let mut out = Params::default();
    let mut keys: Vec<&String> = p.keys().collect();
    keys.sort();
    for k in keys {
        let v = &p[k];
        match k.as_str() {
            "numberOfReplicas" | "staleReplicaTimeout" | "recurringJobs" => {
                out.spec.insert(k.clone(), Value::String(v.clone()));
            }
            "fromBackup" => {
                if !v.is_empty() {
                    out.spec.insert(k.clone(), Value::String(v.clone()));
                }
            }
            "fsType" => out.fs_type = Some(fs_type(v).map_err(|_| Status::invalid_argument(format!("fsType: {v:?} is not supported (ext4 or xfs)")))?),
            // Longhorn's default StorageClass carries these; only their default is built.
            "dataLocality" if v == "disabled" => {}
            "dataEngine" if v == "v1" => {}
            "dataLocality" | "dataEngine" => {
                return Err(Status::invalid_argument(format!("{k}: {v:?} is not supported (only {})", if k == "dataLocality" { "disabled" } else { "v1" })))
            }
            // The external-provisioner's own keys (secrets, fstype) reach the driver
            // only when the StorageClass names them; they are not volume parameters.
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => return Err(Status::invalid_argument(format!("{other}: unknown StorageClass parameter"))),
        }
    }
    Ok(out)
}

/// A VolumeSnapshotClass's `type`: `snap` (default) or `bak` (a backup), as Longhorn's.
pub fn snapshot_kind(p: &std::collections::HashMap<String, String>) -> Result<bool, Status> {
    let mut backup = false;
    for (k, v) in p {
        match (k.as_str(), v.as_str()) {
            ("type", "snap" | "") => backup = false,
            ("type", "bak") => backup = true,
            ("type", other) => return Err(Status::invalid_argument(format!("type: {other:?} is not snap or bak"))),
            (k, _) if k.starts_with("csi.storage.k8s.io/") => {}
            (other, _) => return Err(Status::invalid_argument(format!("{other}: unknown VolumeSnapshotClass parameter"))),
        }
    }
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_deterministically_and_validly() {
        assert_eq!(volume_name("pvc-0b8e9f7c-1d2e-4f50-8a6b-7c8d9e0f1a2b").unwrap(), "pvc-0b8e9f7c-1d2e-4f50-8a6b-7c8d9e0f1a2b");
        let a = volume_name("sanity-Node Stage_Volume/1").unwrap();
        assert!(valid_name(&a), "{a}");
        assert_eq!(a, volume_name("sanity-Node Stage_Volume/1").unwrap());
        assert_ne!(a, volume_name("sanity-node-stage-volume-1").unwrap());
        assert!(valid_name(&volume_name(&"X".repeat(200)).unwrap()));
        assert!(valid_name(&volume_name("__").unwrap()));
        assert!(volume_name("").is_err());
    }

    #[test]
    fn snapshot_ids_round_trip_and_reject_junk() {
        for id in ["snap://vol1/s1", "bak://vol1/backup-0123"] {
            assert_eq!(SnapId::parse(id).unwrap().to_string(), id);
        }
        for bad in ["", "snap://vol1", "snap://../x", "x://vol1/s1", "snap://vol1/a/b", "snap://Vol/s"] {
            assert!(SnapId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn sizes_round_within_limits() {
        assert_eq!(size(0, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(size(1, 0).unwrap(), 1 << 20);
        assert_eq!(size(5000, 8192).unwrap(), 8192);
        assert_eq!(size(0, 8192).unwrap(), 8192);
        assert!(size(10, 5).is_err());
        assert!(size(4097, 5000).is_err());
        assert!(size(-1, 0).is_err());
        assert!(size(i64::MAX, 0).is_err());
    }
}
