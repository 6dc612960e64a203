//! On-disk metadata of a replica directory, in Longhorn's layout.
//!
//! ```text
//! volume.meta                 {"Size":..,"Head":"volume-head-002.img","Dirty":..,"Rebuilding":..,
//!                              "Error":"","Parent":"volume-snap-x.img","SectorSize":512,
//!                              "BackingFilePath":"","Encrypted":false}
//! volume-head-NNN.img(.meta)  the writable layer; its .meta names its parent
//! volume-snap-<name>.img(.meta)  read-only layers, oldest at the bottom
//! revision.counter            ASCII decimal, NUL-padded, one 4096-byte block
//! ```
//!
//! Invariants:
//! - Every JSON file is replaced atomically: written to `X.tmp`, fsynced, renamed over
//!   `X`, and the directory fsynced. So a crash leaves the old or the new file, never
//!   a torn one.
//! - `volume.meta` is the commit point of every chain change: the chain is what its
//!   `Head` names, followed through each `.img.meta`'s `Parent`.
//! - Longhorn's Go decoder ignores unknown fields, so the one field we add
//!   (`VolumeName`, to refuse engines of other volumes) keeps the files readable by it.
//! - Parsing never panics: a missing, truncated or corrupt file is an error naming it.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const VOLUME_META: &str = "volume.meta";
pub const REVISION_COUNTER: &str = "revision.counter";
pub const REVISION_COUNTER_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt metadata: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl MetaError {
    pub fn io(path: &Path, source: std::io::Error) -> MetaError {
        MetaError::Io { path: path.to_path_buf(), source }
    }
    pub fn corrupt(path: &Path, reason: impl Into<String>) -> MetaError {
        MetaError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeMeta {
    #[serde(rename = "Size")]
    pub size: u64,
    #[serde(rename = "Head")]
    pub head: String,
    #[serde(rename = "Dirty")]
    pub dirty: bool,
    #[serde(rename = "Rebuilding")]
    pub rebuilding: bool,
    #[serde(rename = "Error")]
    pub error: String,
    #[serde(rename = "Parent")]
    pub parent: String,
    #[serde(rename = "SectorSize")]
    pub sector_size: u64,
    #[serde(rename = "BackingFilePath")]
    pub backing_file_path: String,
    #[serde(rename = "Encrypted", default)]
    pub encrypted: bool,
    #[serde(rename = "VolumeName", default, skip_serializing_if = "String::is_empty")]
    pub volume_name: String,
    /// Set while an expansion (`store::expand`) is unfinished: `Size` is already the new
    /// size, and a layer file may still have this, the old, length. Only a file of
    /// exactly this length is grown at the next open or expand; any other length that
    /// is not `Size` is damage and refused.
    #[serde(rename = "ExpandingFrom", default, skip_serializing_if = "is_zero")]
    pub expanding_from: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One layer's `.img.meta`. `name` is the layer's file name, the key everywhere (chain
/// links, listings, the wire). `recorded_name` is the `Name` the file itself carries
/// when that differs: Longhorn makes a snapshot's meta from the head's, so
/// `volume-snap-X.img.meta` keeps `"Name":"volume-head-001.img"`; we read that and write
/// our own snapshot metas the same way.
/// On the wire (rebuild) it travels with the file's field names plus `RecordedName`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskMeta {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RecordedName", default, skip_serializing_if = "String::is_empty")]
    pub recorded_name: String,
    #[serde(rename = "Parent")]
    pub parent: String,
    #[serde(rename = "Removed")]
    pub removed: bool,
    #[serde(rename = "UserCreated")]
    pub user_created: bool,
    #[serde(rename = "Created")]
    pub created: String,
    #[serde(rename = "Labels")]
    pub labels: Option<HashMap<String, String>>,
}

/// The bytes of an `.img.meta`, field for field as Longhorn writes them.
#[derive(Serialize, Deserialize)]
struct DiskMetaFile {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Parent")]
    parent: String,
    #[serde(rename = "Removed")]
    removed: bool,
    #[serde(rename = "UserCreated")]
    user_created: bool,
    #[serde(rename = "Created")]
    created: String,
    #[serde(rename = "Labels")]
    labels: Option<HashMap<String, String>>,
}

pub const SNAP_PREFIX: &str = "volume-snap-";
/// Longest snapshot name; keeps every layer file name well under NAME_MAX (255).
pub const MAX_SNAPSHOT_NAME: usize = crate::names::MAX_NAME;

/// `volume-snap-NAME.img`.
pub fn snap_file(name: &str) -> String {
    format!("{SNAP_PREFIX}{name}.img")
}

/// The user-facing name of a snapshot file (`volume-snap-X.img` -> `X`).
pub fn snap_name(file: &str) -> Option<&str> {
    file.strip_prefix(SNAP_PREFIX)?.strip_suffix(".img")
}

/// Snapshot names follow the one rule for names (`names`).
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    crate::names::check("snapshot", name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Head,
    Snapshot,
}

/// The only file names a layer may have: `volume-head-NNN.img` exactly as [`head_name`]
/// writes it, or `volume-snap-<valid snapshot name>.img`. Every name that reaches a path
/// (from a meta file, volume.meta or a peer) passes through here first.
pub fn check_layer_name(file: &str) -> Result<LayerKind, String> {
    if let Some(n) = head_number(file) {
        if head_name(n) == file {
            return Ok(LayerKind::Head);
        }
        return Err(format!("layer name {file:?} is not written as {:?}", head_name(n)));
    }
    match snap_name(file) {
        Some(s) => check_snapshot_name(s).map(|_| LayerKind::Snapshot).map_err(|e| format!("layer name {file:?}: {e}")),
        None => Err(format!("layer name {file:?} is neither volume-head-NNN.img nor volume-snap-NAME.img")),
    }
}

/// A `Parent` field: empty (the bottom of the chain) or a snapshot layer.
pub fn check_parent_name(parent: &str) -> Result<(), String> {
    if parent.is_empty() || check_layer_name(parent) == Ok(LayerKind::Snapshot) {
        Ok(())
    } else {
        Err(format!("Parent {parent:?} is not a snapshot layer name"))
    }
}

/// `volume-head-002.img` for 2.
pub fn head_name(n: u32) -> String {
    format!("volume-head-{n:03}.img")
}

/// The number in a head file name, if it is one.
pub fn head_number(name: &str) -> Option<u32> {
    name.strip_prefix("volume-head-")?.strip_suffix(".img")?.parse().ok()
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Replaces `path` atomically with `data` (tmp + fsync + rename + dir fsync).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), MetaError> {
    let tmp = path.with_file_name(format!(
        "{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("meta")
    ));
    let mut f = File::create(&tmp).map_err(|e| MetaError::io(&tmp, e))?;
    f.write_all(data).map_err(|e| MetaError::io(&tmp, e))?;
    f.sync_all().map_err(|e| MetaError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| MetaError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> Result<(), MetaError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| MetaError::io(dir, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, MetaError> {
    let data = fs::read(path).map_err(|e| MetaError::io(path, e))?;
    if data.is_empty() {
        return Err(MetaError::corrupt(path, "file is empty"));
    }
    serde_json::from_slice(&data).map_err(|e| MetaError::corrupt(path, e.to_string()))
}

impl VolumeMeta {
    pub fn load(dir: &Path) -> Result<VolumeMeta, MetaError> {
        let path = dir.join(VOLUME_META);
        let m: VolumeMeta = read_json(&path)?;
        if m.size == 0 {
            return Err(MetaError::corrupt(&path, "Size is 0"));
        }
        if m.sector_size == 0 || m.size % m.sector_size != 0 {
            return Err(MetaError::corrupt(
                &path,
                format!("Size {} is not a multiple of SectorSize {}", m.size, m.sector_size),
            ));
        }
        if check_layer_name(&m.head) != Ok(LayerKind::Head) {
            return Err(MetaError::corrupt(&path, format!("Head {:?} is not a volume-head-NNN.img name", m.head)));
        }
        check_parent_name(&m.parent).map_err(|e| MetaError::corrupt(&path, e))?;
        if m.expanding_from != 0 && (m.expanding_from >= m.size || m.expanding_from % m.sector_size != 0) {
            return Err(MetaError::corrupt(
                &path,
                format!("ExpandingFrom {} is not a smaller multiple of SectorSize than Size {}", m.expanding_from, m.size),
            ));
        }
        Ok(m)
    }

    pub fn store(&self, dir: &Path) -> Result<(), MetaError> {
        let path = dir.join(VOLUME_META);
        let data = serde_json::to_vec(self).map_err(|e| MetaError::corrupt(&path, e.to_string()))?;
        write_atomic(&path, &data)
    }
}

impl DiskMeta {
    pub fn path(dir: &Path, img: &str) -> PathBuf {
        dir.join(format!("{img}.meta"))
    }

    /// Reads the meta of layer `img`. `img` must be a layer name (so no path can come
    /// of it); a snapshot's meta may carry the head name Longhorn leaves in it.
    pub fn load(dir: &Path, img: &str) -> Result<DiskMeta, MetaError> {
        let kind = check_layer_name(img).map_err(|e| MetaError::corrupt(dir, e))?;
        let path = Self::path(dir, img);
        let m: DiskMetaFile = read_json(&path)?;
        let recorded_name = if m.name == img {
            String::new()
        } else if kind == LayerKind::Snapshot && check_layer_name(&m.name).is_ok() {
            m.name
        } else {
            return Err(MetaError::corrupt(&path, format!("Name {:?} does not match the file name {img:?}", m.name)));
        };
        check_parent_name(&m.parent).map_err(|e| MetaError::corrupt(&path, e))?;
        if m.parent == img {
            return Err(MetaError::corrupt(&path, "the layer is its own Parent"));
        }
        Ok(DiskMeta {
            name: img.to_string(),
            recorded_name,
            parent: m.parent,
            removed: m.removed,
            user_created: m.user_created,
            created: m.created,
            labels: m.labels,
        })
    }

    pub fn store(&self, dir: &Path) -> Result<(), MetaError> {
        check_layer_name(&self.name).map_err(|e| MetaError::corrupt(dir, e))?;
        let path = Self::path(dir, &self.name);
        let f = DiskMetaFile {
            name: if self.recorded_name.is_empty() { self.name.clone() } else { self.recorded_name.clone() },
            parent: self.parent.clone(),
            removed: self.removed,
            user_created: self.user_created,
            created: self.created.clone(),
            labels: self.labels.clone(),
        };
        let data = serde_json::to_vec(&f).map_err(|e| MetaError::corrupt(&path, e.to_string()))?;
        write_atomic(&path, &data)
    }
}

/// Parses `revision.counter`: ASCII decimal followed by NUL padding.
pub fn parse_revision(path: &Path, data: &[u8]) -> Result<u64, MetaError> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = std::str::from_utf8(&data[..end])
        .map_err(|_| MetaError::corrupt(path, "revision counter is not ASCII"))?
        .trim();
    if text.is_empty() {
        return Err(MetaError::corrupt(path, "revision counter is empty"));
    }
    text.parse()
        .map_err(|_| MetaError::corrupt(path, format!("revision counter {text:?} is not a number")))
}

/// The 4096-byte on-disk image of a revision counter value.
pub fn format_revision(v: u64, out: &mut [u8; REVISION_COUNTER_LEN]) {
    out.fill(0);
    let s = v.to_string();
    out[..s.len()].copy_from_slice(s.as_bytes());
}

/// Opens (creating if asked) the revision counter file, at full size.
pub fn open_revision_file(dir: &Path, create: bool) -> Result<File, MetaError> {
    let path = dir.join(REVISION_COUNTER);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .open(&path)
        .map_err(|e| MetaError::io(&path, e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longhorn_volume_meta_parses() {
        let s = r#"{"Size":10737418240,"Head":"volume-head-002.img","Dirty":true,"Rebuilding":false,"Error":"","Parent":"volume-snap-s1.img","SectorSize":512,"BackingFilePath":"","Encrypted":false}"#;
        let m: VolumeMeta = serde_json::from_str(s).expect("parses");
        assert_eq!(m.size, 10737418240);
        assert_eq!(m.head, "volume-head-002.img");
        assert!(m.dirty);
        assert_eq!(m.parent, "volume-snap-s1.img");
        // Our extra field is left out when empty, so the bytes match Longhorn's.
        assert_eq!(serde_json::to_string(&m).expect("encodes"), s);
    }

    #[test]
    fn longhorn_disk_meta_parses() {
        let s = r#"{"Name":"volume-head-001.img","Parent":"volume-snap-5d40.img","Removed":false,"UserCreated":true,"Created":"2022-02-22T07:36:48Z","Labels":null}"#;
        let d = tempfile::tempdir().expect("tmp");
        // As the head's meta, and (Longhorn's way) as the meta of the snapshot it became.
        for img in ["volume-head-001.img", "volume-snap-s2.img"] {
            std::fs::write(DiskMeta::path(d.path(), img), s).expect("write");
            let m = DiskMeta::load(d.path(), img).expect("loads");
            assert_eq!((m.name.as_str(), m.parent.as_str()), (img, "volume-snap-5d40.img"));
            m.store(d.path()).expect("store");
            assert_eq!(std::fs::read_to_string(DiskMeta::path(d.path(), img)).expect("read"), s, "rewritten byte for byte");
        }
    }

    #[test]
    fn revision_counter_format() {
        let mut b = [0u8; REVISION_COUNTER_LEN];
        format_revision(1234, &mut b);
        assert_eq!(&b[..5], b"1234\0");
        assert_eq!(parse_revision(Path::new("x"), &b).expect("parses"), 1234);
        assert!(parse_revision(Path::new("x"), &[0u8; 16]).is_err());
        assert!(parse_revision(Path::new("x"), b"12a\0").is_err());
    }

    #[test]
    fn layer_names_never_leave_the_directory() {
        for bad in [
            "../volume-snap-x.img", "/etc/passwd", "volume-snap-../x.img", "volume-snap-a/b.img", "volume-snap-.img",
            "volume-snap-.hidden.img", "volume-head-1.img", "volume-head-+01.img", "volume-head-001.img/..", "x.img",
            "volume-snap-a\0b.img", "",
        ] {
            assert!(check_layer_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_layer_name("volume-head-007.img"), Ok(LayerKind::Head));
        assert_eq!(check_layer_name("volume-head-1000.img"), Ok(LayerKind::Head));
        assert_eq!(check_layer_name("volume-snap-3b1f877b-24ba.img"), Ok(LayerKind::Snapshot));
        assert!(check_layer_name(&snap_file(&"a".repeat(MAX_SNAPSHOT_NAME + 1))).is_err());
        assert!(check_parent_name("").is_ok());
        assert!(check_parent_name("volume-head-001.img").is_err());
        let d = tempfile::tempdir().expect("tmp");
        let m = |parent: &str| {
            format!(r#"{{"Name":"volume-head-001.img","Parent":"{parent}","Removed":false,"UserCreated":false,"Created":"","Labels":null}}"#)
        };
        std::fs::write(DiskMeta::path(d.path(), "volume-head-001.img"), m("../../etc/shadow")).expect("write");
        assert!(DiskMeta::load(d.path(), "volume-head-001.img").is_err(), "a Parent that is a path is refused");
        std::fs::write(DiskMeta::path(d.path(), "volume-head-001.img"), m("")).expect("write");
        assert!(DiskMeta::load(d.path(), "../volume-head-001.img").is_err());
        // A head's meta must name the head itself.
        std::fs::write(DiskMeta::path(d.path(), "volume-head-002.img"), m("")).expect("write");
        assert!(DiskMeta::load(d.path(), "volume-head-002.img").is_err());
    }

    #[test]
    fn head_names() {
        assert_eq!(head_name(2), "volume-head-002.img");
        assert_eq!(head_number("volume-head-017.img"), Some(17));
        assert_eq!(head_number("volume-snap-x.img"), None);
    }
}
