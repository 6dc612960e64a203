//! The backupstore format, compatible with Longhorn's (SPEC §3), over any [`BackupTarget`].
//!
//! ```text
//! backupstore/volumes/<h[0:2]>/<h[2:4]>/<volume>/       h = hex(SHA-512(volume))[:64]
//!   volume.cfg                                          VolumeCfg (JSON)
//!   backups/backup_<name>.cfg                           BackupCfg (JSON)
//!   blocks/<c[0:2]>/<c[2:4]>/<c>.blk                    c = hex(SHA-512(block))[:64]
//!   locks/lock-<id>.lck                                 Lock (JSON)
//! ```
//!
//! - Blocks are 2 MiB of the volume at a 2 MiB-aligned offset, named by the checksum of
//!   their uncompressed content and stored compressed (`lz4` frame, `gzip` or `none`,
//!   per the backup's `CompressionMethod`). A block held by no layer of the chain is
//!   not stored and not listed; a block of written zeros is data and is stored (so a
//!   2 MiB zero block is `731859...86b0`).
//! - `BackupCfg.Blocks` lists every stored block of the volume at that snapshot, sorted
//!   by offset; an incremental backup merges the blocks it read with the previous
//!   backup's list. `CreatedTime` is empty while the backup runs: such a backup is not
//!   complete and is never restored.
//! - Quirks kept for Longhorn: `Size` and `BlockCount` are JSON strings, and the
//!   `volume.cfg` fields from `CompressionMethod` on are encoded twice
//!   (`"CompressionMethod":"\"lz4\""`), as Go's `json:",string"` on a string does. The
//!   backup cfg's `CompressionMethod` is encoded twice too, `VolumeSize` is a string.
//! - Order: `CreatedTime` has second resolution, so backups taken back to back tie. The
//!   latest backup is `volume.cfg`'s `LastBackupName` (as Longhorn's UI has it), and
//!   the backups of a volume are ordered by `CreatedTimeUnixNano`, an extra field (Go
//!   ignores it) recording the completion to the nanosecond, kept strictly above the
//!   volume's `LastBackupUnixNano` so a clock stepping back cannot reorder them;
//!   Longhorn's own backups, without it, are placed by `CreatedTime`.
//! - Locks: a backup or restore holds a type-1 lock, a deletion a type-2 lock; locks of
//!   different types exclude each other, the older one wins, and a lock whose object
//!   was not rewritten for 150 s is dead. A holder rewrites its lock every 60 s. Two
//!   type-1 locks do not exclude each other (nor in Longhorn), so every read-modify-
//!   write of `volume.cfg` also holds the volume.cfg lock: type 1 with our extra
//!   `"Exclusive":true`, one holder at a time, rewritten every 5 s, dead after 30 s
//!   ([`StoreLock::acquire_volume_cfg`]). Longhorn's own writers do not take it.
//! - The store is not trusted: every name read from it (a listed volume, backup or
//!   block, a cfg's `Blocks`, `Name` and `LastBackupName`) must pass the format's rule
//!   before it is built into a path, and every object is read with a size bound
//!   ([`MAX_BLOCK_OBJECT`], [`MAX_SMALL_OBJECT`], [`max_backup_cfg`]). What breaks a
//!   rule is [`BackupError::Corrupt`] naming the object; a listing skips it, warning.

use super::target::BackupTarget;
use super::BackupError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha512};
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};

pub const BLOCK_SIZE: u64 = 2 << 20;
pub const BASE: &str = "backupstore";

/// Most bytes a stored block may take. 2 MiB compressed by any method Longhorn uses
/// grows by far less than 1/64 when it does not compress (lz4 frames store such a
/// block raw with a 4-byte header per 64 KiB-4 MiB, gzip 5 bytes per stored block of
/// up to 64 KiB); 1/16 leaves room for any framing.
pub const MAX_BLOCK_OBJECT: u64 = BLOCK_SIZE + BLOCK_SIZE / 16;
/// Most bytes of a `volume.cfg` or a lock: names, times and labels, a few KiB.
pub const MAX_SMALL_OBJECT: u64 = 1 << 20;
/// Bytes a backup cfg may spend per 2 MiB block of its volume: a compact entry
/// (`{"Offset":70368744177664,"BlockChecksum":"<64>"},`) is 109 bytes; 160 leaves room
/// for indentation.
const CFG_BYTES_PER_BLOCK: u64 = 160;
/// The largest volume whose backup cfg we read whole (its bound is then 5 GiB).
const MAX_CFG_VOLUME_SIZE: u64 = 64 << 40;
/// The bound when the volume's size is not known (its `volume.cfg` is unreadable):
/// enough for a volume of about 3 TiB with every block written.
const UNKNOWN_SIZE_CFG_BOUND: u64 = 256 << 20;
/// How deep a block sits under `blocks/` (`<c[0:2]>/<c[2:4]>/<c>.blk`); nothing
/// deeper is walked.
pub const BLOCK_DEPTH: usize = 3;

/// Most bytes a backup cfg of a volume of `volume_size` bytes can need: its fields and
/// labels plus one entry per block. A store can make a reader hold no more than what a
/// real backup of the volume it claims needs; the size comes from `volume.cfg`, itself
/// bounded.
pub fn max_backup_cfg(volume_size: Option<u64>) -> u64 {
    match volume_size {
        Some(s) => MAX_SMALL_OBJECT + s.min(MAX_CFG_VOLUME_SIZE).div_ceil(BLOCK_SIZE) * CFG_BYTES_PER_BLOCK,
        None => UNKNOWN_SIZE_CFG_BOUND,
    }
}

/// A block's name, `hex(SHA-512(block))[:64]`: exactly 64 lowercase hex digits. Only
/// a value of this type is built into a block's path, so a name read from a store
/// cannot steer the path or split a character.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Checksum(String);

impl Checksum {
    pub fn parse(s: &str) -> Result<Checksum, String> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Checksum(s.to_string()))
        } else {
            Err(format!("block checksum {s:?} is not 64 lowercase hex digits"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Checksum {
    type Error = String;
    fn try_from(s: String) -> Result<Checksum, String> {
        Checksum::parse(&s)
    }
}

impl From<Checksum> for String {
    fn from(c: Checksum) -> String {
        c.0
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `hex(SHA-512(data))[:64]`: Longhorn's checksum for volume names and blocks.
pub fn checksum(data: &[u8]) -> Checksum {
    let d = Sha512::digest(data);
    let mut s = String::with_capacity(128);
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s.truncate(64);
    Checksum(s)
}

pub fn volume_path(volume: &str) -> String {
    let h = checksum(volume.as_bytes());
    let h = h.as_str();
    format!("{BASE}/volumes/{}/{}/{volume}", &h[0..2], &h[2..4])
}

pub fn volume_cfg_path(volume: &str) -> String {
    format!("{}/volume.cfg", volume_path(volume))
}

pub fn backups_dir(volume: &str) -> String {
    format!("{}/backups", volume_path(volume))
}

pub fn backup_cfg_path(volume: &str, backup: &str) -> String {
    format!("{}/backup_{backup}.cfg", backups_dir(volume))
}

pub fn blocks_dir(volume: &str) -> String {
    format!("{}/blocks", volume_path(volume))
}

pub fn block_path(volume: &str, c: &Checksum) -> String {
    let c = c.as_str();
    format!("{}/{}/{}/{c}.blk", blocks_dir(volume), &c[0..2], &c[2..4])
}

pub fn locks_dir(volume: &str) -> String {
    format!("{}/locks", volume_path(volume))
}

/// Volume and backup names follow the one rule for names (`longhorn_replica::names`).
pub fn check_name(kind: &str, n: &str) -> Result<(), BackupError> {
    longhorn_replica::names::check(kind, n).map_err(BackupError::Invalid)
}

/// Whether a name found in a listing of `dir` passes `check`; one that does not is
/// skipped, with a warning naming it.
fn listed<T>(t: &dyn BackupTarget, dir: &str, name: &str, check: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
    match check(name) {
        Ok(v) => Some(v),
        Err(why) => {
            warn!(target = t.url(), "skipping {dir}/{name:?}: {why}");
            None
        }
    }
}

fn name_rule(kind: &'static str) -> impl Fn(&str) -> Result<(), String> {
    move |n| check_name(kind, n).map_err(|e| e.to_string())
}

/// `"x"` stored as `"\"x\""` (Go's `json:",string"` on a string field).
mod twice {
    use super::*;
    pub fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&serde_json::to_string(v).map_err(serde::ser::Error::custom)?)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.is_empty() {
            return Ok(raw);
        }
        // Accept the plain form too (older Longhorn wrote some fields once).
        Ok(serde_json::from_str::<String>(&raw).unwrap_or(raw))
    }
}

/// An integer stored as a JSON string (Go's `json:",string"` on an int64).
mod int_str {
    use super::*;
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) if s.is_empty() => Ok(0),
            serde_json::Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| serde::de::Error::custom("not a size")),
            serde_json::Value::Null => Ok(0),
            _ => Err(serde::de::Error::custom("expected a string or a number")),
        }
    }
}

fn null_map<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
    Ok(Option::<HashMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeCfg {
    pub name: String,
    #[serde(with = "int_str", default)]
    pub size: u64,
    #[serde(default, deserialize_with = "null_map")]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub created_time: String,
    #[serde(default)]
    pub last_backup_name: String,
    #[serde(default)]
    pub last_backup_at: String,
    #[serde(with = "int_str", default)]
    pub block_count: u64,
    #[serde(with = "twice", default)]
    pub backing_image_name: String,
    #[serde(with = "twice", default)]
    pub backing_image_checksum: String,
    #[serde(with = "twice", default)]
    pub compression_method: String,
    #[serde(with = "twice", default)]
    pub storage_class_name: String,
    #[serde(with = "twice", default)]
    pub data_engine: String,
    /// Ours: `CreatedTimeUnixNano` of the last backup (see the module comment).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_backup_unix_nano: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "PascalCase")]
pub struct BlockMapping {
    pub offset: u64,
    pub block_checksum: Checksum,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct BackupCfg {
    pub name: String,
    pub volume_name: String,
    #[serde(default)]
    pub snapshot_name: String,
    #[serde(default)]
    pub snapshot_created_at: String,
    /// Empty while the backup is in progress.
    #[serde(default)]
    pub created_time: String,
    #[serde(with = "int_str", default)]
    pub size: u64,
    #[serde(default, deserialize_with = "null_map")]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub is_incremental: bool,
    #[serde(with = "int_str", default)]
    pub volume_size: u64,
    #[serde(default)]
    pub volume_created_at: String,
    #[serde(with = "twice", default)]
    pub compression_method: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_blocks")]
    pub blocks: Vec<BlockMapping>,
    #[serde(with = "int_str", default)]
    pub newly_uploaded_data_size: u64,
    #[serde(with = "int_str", default)]
    pub re_uploaded_data_size: u64,
    /// Ours: when the backup completed, in nanoseconds since the epoch (0 when Longhorn
    /// wrote it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created_time_unix_nano: u64,
}

fn null_blocks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BlockMapping>, D::Error> {
    Ok(Option::<Vec<BlockMapping>>::deserialize(d)?.unwrap_or_default())
}

impl BackupCfg {
    pub fn complete(&self) -> bool {
        !self.created_time.is_empty()
    }

    /// Where this backup stands among its volume's backups, oldest first: by its
    /// completion to the nanosecond when we took it, else by `CreatedTime` (seconds),
    /// then by name. An incomplete backup comes before every complete one.
    pub fn order(&self) -> (u64, &str) {
        let t = match self.created_time_unix_nano {
            0 => chrono::DateTime::parse_from_rfc3339(&self.created_time)
                .ok()
                .and_then(|t| t.timestamp_nanos_opt())
                .map_or(0, |n| n.max(0) as u64),
            n => n,
        };
        (t, &self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    Gzip,
    None,
}

impl Compression {
    pub fn parse(s: &str) -> Result<Compression, BackupError> {
        match s {
            "lz4" | "" => Ok(Compression::Lz4),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            o => Err(BackupError::Invalid(format!("compression {o:?}: use lz4, gzip or none"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    pub fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 2), flate2::Compression::fast());
                e.write_all(data)?;
                e.finish()
            }
            Compression::Lz4 => {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(data.len() / 2));
                e.write_all(data)?;
                e.finish().map_err(std::io::Error::other)
            }
        }
    }

    /// Decompresses `data`, refusing to produce more than `limit` bytes (a small
    /// object may claim to hold any amount).
    pub fn decompress(self, data: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(limit as usize);
        match self {
            Compression::None => out.extend_from_slice(&data[..data.len().min(limit as usize + 1)]),
            Compression::Gzip => {
                flate2::read::GzDecoder::new(data).take(limit + 1).read_to_end(&mut out)?;
            }
            Compression::Lz4 => {
                lz4_flex::frame::FrameDecoder::new(data).take(limit + 1).read_to_end(&mut out)?;
            }
        }
        if out.len() as u64 > limit {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("holds more than {limit} bytes")));
        }
        Ok(out)
    }
}

/// Reads block `c` of `volume`, decompresses it and checks its checksum.
pub fn read_block(t: &dyn BackupTarget, volume: &str, c: &Checksum, comp: Compression) -> Result<Vec<u8>, BackupError> {
    let path = block_path(volume, c);
    let raw = t.get(&path, MAX_BLOCK_OBJECT)?;
    let corrupt = |what: String| BackupError::Corrupt { target: t.url().to_string(), object: path.clone(), what };
    let mut data = comp.decompress(&raw, BLOCK_SIZE).map_err(|e| corrupt(format!("cannot {} decompress: {e}", comp.name())))?;
    if checksum(&data) != *c && comp != Compression::None {
        // Longhorn falls back on the other methods for blocks written by older versions.
        for other in [Compression::Lz4, Compression::Gzip, Compression::None] {
            if let Ok(d) = other.decompress(&raw, BLOCK_SIZE) {
                if checksum(&d) == *c {
                    data = d;
                    break;
                }
            }
        }
    }
    if data.len() as u64 != BLOCK_SIZE {
        return Err(corrupt(format!("holds {} bytes, a block is {BLOCK_SIZE}", data.len())));
    }
    let got = checksum(&data);
    if got != *c {
        return Err(corrupt(format!("content has checksum {got}, not the block's name")));
    }
    Ok(data)
}

pub fn load_json<T: for<'de> Deserialize<'de>>(t: &dyn BackupTarget, path: &str, max: u64) -> Result<T, BackupError> {
    let raw = t.get(path, max)?;
    serde_json::from_slice(&raw).map_err(|e| corrupt(t, path, format!("not a valid config: {e}")))
}

fn corrupt(t: &dyn BackupTarget, object: &str, what: String) -> BackupError {
    BackupError::Corrupt { target: t.url().to_string(), object: object.to_string(), what }
}

/// A cfg's own `Name` must be the one its path gives (Longhorn writes both); an empty
/// one is taken from the path.
fn check_own_name(t: &dyn BackupTarget, path: &str, kind: &str, own: &mut String, want: &str) -> Result<(), BackupError> {
    if own.is_empty() {
        *own = want.to_string();
    }
    if own != want {
        return Err(corrupt(t, path, format!("its Name {own:?} is not the {kind} {want:?} it is stored as")));
    }
    Ok(())
}

pub fn save_json<T: Serialize>(t: &dyn BackupTarget, path: &str, v: &T) -> Result<(), BackupError> {
    let raw = serde_json::to_vec(v).map_err(|e| BackupError::Invalid(format!("encoding {path}: {e}")))?;
    t.put(path, &raw)
}

/// Reads `volume.cfg` of `volume` (`None` when there is none), lets `f` change it, and
/// writes it back if it changed, all under the volume.cfg lock
/// ([`StoreLock::acquire_volume_cfg`]): two writers never lose each other's change.
pub fn with_volume_cfg<R>(
    t: &Arc<dyn BackupTarget>,
    volume: &str,
    f: impl FnOnce(&mut Option<VolumeCfg>) -> Result<R, BackupError>,
) -> Result<R, BackupError> {
    let _lock = StoreLock::acquire_volume_cfg(t.clone(), volume)?;
    let before = match load_volume(&**t, volume) {
        Ok(v) => Some(v),
        Err(BackupError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut cfg = before.clone();
    let r = f(&mut cfg)?;
    if let Some(c) = cfg.as_ref().filter(|_| cfg != before) {
        save_json(&**t, &volume_cfg_path(volume), c)?;
    }
    Ok(r)
}

pub fn load_volume(t: &dyn BackupTarget, volume: &str) -> Result<VolumeCfg, BackupError> {
    let path = volume_cfg_path(volume);
    let mut v: VolumeCfg = load_json(t, &path, MAX_SMALL_OBJECT)?;
    check_own_name(t, &path, "volume", &mut v.name, volume)?;
    if !v.last_backup_name.is_empty() {
        check_name("backup", &v.last_backup_name).map_err(|e| corrupt(t, &path, format!("LastBackupName: {e}")))?;
    }
    Ok(v)
}

/// The size `volume.cfg` gives `volume`, when it can be read: what bounds its backup cfgs.
pub fn volume_size(t: &dyn BackupTarget, volume: &str) -> Option<u64> {
    match load_volume(t, volume) {
        Ok(v) => Some(v.size),
        Err(e) => {
            debug!(volume, "volume size unknown, backup cfgs get the fixed bound: {e}");
            None
        }
    }
}

/// Backup `backup` of `volume`; `volume_size` (see [`volume_size`]) bounds its size.
pub fn load_backup(t: &dyn BackupTarget, volume: &str, backup: &str, volume_size: Option<u64>) -> Result<BackupCfg, BackupError> {
    let path = backup_cfg_path(volume, backup);
    let mut b: BackupCfg = load_json(t, &path, max_backup_cfg(volume_size))?;
    check_own_name(t, &path, "backup", &mut b.name, backup)?;
    Ok(b)
}

/// Every volume in the store, by name.
pub fn list_volumes(t: &dyn BackupTarget) -> Result<Vec<String>, BackupError> {
    let mut out = Vec::new();
    let root = format!("{BASE}/volumes");
    // The two levels above a volume are hash prefixes: two hex digits each.
    let prefix = |n: &str| {
        if n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()) { Ok(()) } else { Err("not a 2-hex-digit level".to_string()) }
    };
    for a in t.list(&root)? {
        if listed(t, &root, &a, prefix).is_none() {
            continue;
        }
        for b in t.list(&format!("{root}/{a}"))? {
            if listed(t, &format!("{root}/{a}"), &b, prefix).is_none() {
                continue;
            }
            let dir = format!("{root}/{a}/{b}");
            for v in t.list(&dir)? {
                let at_home = |v: &str| {
                    name_rule("volume")(v)?;
                    if volume_path(v) == format!("{dir}/{v}") { Ok(()) } else { Err(format!("volume {v} belongs in {}", volume_path(v))) }
                };
                if listed(t, &dir, &v, at_home).is_some() {
                    out.push(v);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The backup names of `volume` (complete or not).
pub fn list_backups(t: &dyn BackupTarget, volume: &str) -> Result<Vec<String>, BackupError> {
    let dir = backups_dir(volume);
    Ok(t
        .list(&dir)?
        .into_iter()
        .filter_map(|n| n.strip_prefix("backup_").and_then(|n| n.strip_suffix(".cfg")).map(|s| s.to_string()))
        .filter(|n| listed(t, &dir, n, name_rule("backup")).is_some())
        .collect())
}

/// Every block stored for `volume`. Objects under `blocks/` that are not named as a
/// block are left alone (not ours to collect), with a warning.
pub fn list_blocks(t: &dyn BackupTarget, volume: &str) -> Result<Vec<Checksum>, BackupError> {
    let dir = blocks_dir(volume);
    Ok(t
        .list_all(&dir, BLOCK_DEPTH)?
        .into_iter()
        .filter_map(|p| {
            let name = p.rsplit('/').next().unwrap_or(&p);
            listed(t, &dir, name, |n| {
                let c = Checksum::parse(n.strip_suffix(".blk").ok_or("not a .blk object")?)?;
                if p == block_path(volume, &c) { Ok(c) } else { Err(format!("block {c} belongs in {}", block_path(volume, &c))) }
            })
        })
        .collect())
}

/// A random name like Longhorn's `util.GenerateName(prefix)`: prefix-<16 hex>.
pub fn generate_name(prefix: &str) -> String {
    let u = crate::snapshot::new_uuid().replace('-', "");
    format!("{prefix}-{}", &u[..16])
}

pub const BACKUP_LOCK: u32 = 1;
pub const DELETION_LOCK: u32 = 2;
const LOCK_DURATION: Duration = Duration::from_secs(150);
const LOCK_REFRESH: Duration = Duration::from_secs(60);
const LOCK_MAX_WAIT: Duration = Duration::from_secs(30);
/// The volume.cfg lock is held for a read and two writes: refreshed often and dead
/// soon, and waited for longer than a dead one stays, so a holder that crashed delays
/// the next commit instead of failing it.
const CFG_LOCK_DURATION: Duration = Duration::from_secs(30);
const CFG_LOCK_REFRESH: Duration = Duration::from_secs(5);
const CFG_LOCK_MAX_WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockFile {
    name: String,
    #[serde(rename = "Type")]
    kind: u32,
    acquired: bool,
    /// Ours: the volume.cfg lock. Longhorn sees a type-1 lock, so its deletions wait
    /// for it as for a backup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    exclusive: bool,
}

/// Another process's lock, as found in `locks/`.
struct OtherLock {
    /// The object's name without `.lck`: what breaks a tie of times.
    stem: String,
    lock: LockFile,
    mtime: SystemTime,
}

impl OtherLock {
    fn dead(&self, after: Duration) -> bool {
        SystemTime::now().duration_since(self.mtime).is_ok_and(|d| d > after)
    }

    /// Whether it comes before a lock of ours written at `my_time` named `me`.
    fn before(&self, my_time: SystemTime, me: &str) -> bool {
        self.lock.acquired || (self.mtime, self.stem.as_str()) < (my_time, me)
    }
}

/// The locks of `volume` other than `me`; one that vanishes or does not parse while
/// they are read is no lock.
fn other_locks(t: &dyn BackupTarget, volume: &str, me: &str) -> Result<Vec<OtherLock>, BackupError> {
    let dir = locks_dir(volume);
    let mut out = Vec::new();
    for n in t.list(&dir)? {
        let Some(stem) = n.strip_suffix(".lck") else { continue };
        if stem == me || listed(t, &dir, stem, name_rule("lock")).is_none() {
            continue;
        }
        let p = format!("{dir}/{n}");
        let Ok(lock) = load_json::<LockFile>(t, &p, MAX_SMALL_OBJECT) else { continue };
        let Ok(Some(mtime)) = t.mtime(&p) else { continue };
        out.push(OtherLock { stem: stem.to_string(), lock, mtime });
    }
    Ok(out)
}

/// A pause of 10 ms and up to `spread_ms` more, so contenders that backed off at once
/// do not meet again at once.
fn jitter(spread_ms: u64) -> Duration {
    Duration::from_millis(10 + super::target::random_u64() % spread_ms.max(1))
}

/// A lock in the store (`locks/`), held until dropped (its object is removed then, on
/// an error while acquiring too); a thread rewrites it while held.
pub struct StoreLock {
    target: Arc<dyn BackupTarget>,
    path: String,
    stop: Arc<AtomicBool>,
}

impl StoreLock {
    /// Writes lock `me` of `volume`; returns it and the time the store gave it.
    fn create(target: &Arc<dyn BackupTarget>, volume: &str, me: &LockFile) -> Result<(StoreLock, SystemTime), BackupError> {
        let path = format!("{}/{}.lck", locks_dir(volume), me.name);
        save_json(&**target, &path, me)?;
        let lock = StoreLock { target: target.clone(), path, stop: Arc::new(AtomicBool::new(false)) };
        let t = lock.save(me)?;
        Ok((lock, t))
    }

    fn save(&self, me: &LockFile) -> Result<SystemTime, BackupError> {
        save_json(&*self.target, &self.path, me)?;
        Ok(self.target.mtime(&self.path)?.unwrap_or_else(SystemTime::now))
    }

    /// Rewrites `me` every `every` until dropped, so others do not take it for dead.
    fn keep_alive(&self, me: LockFile, every: Duration) {
        let (t, p, stop) = (self.target.clone(), self.path.clone(), self.stop.clone());
        let _ = std::thread::Builder::new().name("backup-lock".into()).spawn(move || {
            let mut last = std::time::Instant::now();
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= every {
                    last = std::time::Instant::now();
                    if let Err(e) = save_json(&*t, &p, &me) {
                        warn!("refreshing backupstore lock {p}: {e}");
                    }
                }
            }
        });
    }

    /// Waits (up to 30 s) until no live lock of the other type is older than ours.
    /// Locks of one type do not exclude each other: backups and restores of a volume
    /// run side by side, as in Longhorn.
    pub fn acquire(target: Arc<dyn BackupTarget>, volume: &str, kind: u32) -> Result<StoreLock, BackupError> {
        let mut me = LockFile { name: generate_name("lock"), kind, acquired: false, exclusive: false };
        let (lock, my_time) = StoreLock::create(&target, volume, &me)?;
        let start = std::time::Instant::now();
        loop {
            let blocker = other_locks(&*target, volume, &me.name)?
                .into_iter()
                .find(|o| o.lock.kind != kind && o.before(my_time, &me.name) && !o.dead(LOCK_DURATION));
            let Some(b) = blocker else { break };
            let b = format!("{}.lck ({})", b.stem, if b.lock.kind == DELETION_LOCK { "a deletion" } else { "a backup or restore" });
            if start.elapsed() > LOCK_MAX_WAIT {
                return Err(BackupError::Busy(format!("volume {volume} in {} is locked by {b}; gave up after {LOCK_MAX_WAIT:?}", target.url())));
            }
            debug!(volume, "waiting for lock {b}");
            std::thread::sleep(Duration::from_millis(500));
        }
        me.acquired = true;
        lock.save(&me)?;
        lock.keep_alive(me, LOCK_REFRESH);
        Ok(lock)
    }

    /// The volume.cfg lock of `volume`: one holder at a time, of any process or host.
    /// Backups run side by side (their type-1 locks allow it) but each ends with a
    /// read-modify-write of volume.cfg (`LastBackupName`, `BlockCount`); this makes
    /// those one after the other, so none is lost.
    ///
    /// The store has no compare-and-swap, so: wait until no live volume.cfg lock is
    /// held or older than ours, mark ours held, then look again; whoever then sees
    /// another one held backs off (unmarks, waits a random while) and tries again. Of
    /// two that mark theirs at once, the second to look sees the first's mark (each
    /// marks before it looks), so two never both hold it.
    pub fn acquire_volume_cfg(target: Arc<dyn BackupTarget>, volume: &str) -> Result<StoreLock, BackupError> {
        let mut me = LockFile { name: generate_name("lock"), kind: BACKUP_LOCK, acquired: false, exclusive: true };
        let (lock, mut my_time) = StoreLock::create(&target, volume, &me)?;
        let rivals = |me: &str| -> Result<Vec<OtherLock>, BackupError> {
            Ok(other_locks(&*target, volume, me)?.into_iter().filter(|o| o.lock.exclusive && !o.dead(CFG_LOCK_DURATION)).collect())
        };
        let start = std::time::Instant::now();
        loop {
            if !rivals(&me.name)?.iter().any(|o| o.before(my_time, &me.name)) {
                me.acquired = true;
                lock.save(&me)?;
                if !rivals(&me.name)?.iter().any(|o| o.lock.acquired) {
                    break;
                }
                me.acquired = false;
                my_time = lock.save(&me)?;
            }
            if start.elapsed() > CFG_LOCK_MAX_WAIT {
                return Err(BackupError::Busy(format!(
                    "volume.cfg of {volume} in {} stayed locked by another writer; gave up after {CFG_LOCK_MAX_WAIT:?}",
                    target.url()
                )));
            }
            std::thread::sleep(jitter(50));
        }
        lock.keep_alive(me, CFG_LOCK_REFRESH);
        Ok(lock)
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.target.delete(&self.path) {
            warn!("removing backupstore lock {}: {e}", self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vectors() {
        assert_eq!(checksum(&vec![0u8; BLOCK_SIZE as usize]).as_str(), "731859029215873fdac1c9f2f8bd25a334abf0f3a9e1b057cf2cacc2826d86b0");
        assert!(volume_path("vol1").starts_with("backupstore/volumes/01/9c/vol1"));
    }

    #[test]
    fn volume_cfg_quirks_round_trip() {
        let v = VolumeCfg { name: "vol1".into(), size: 1 << 30, block_count: 3, compression_method: "lz4".into(), ..Default::default() };
        let s = serde_json::to_string(&v).expect("json");
        assert!(s.contains(r#""Size":"1073741824""#), "{s}");
        assert!(s.contains(r#""BlockCount":"3""#), "{s}");
        assert!(s.contains(r#""CompressionMethod":"\"lz4\"""#), "{s}");
        assert!(s.contains(r#""DataEngine":"\"\"""#), "{s}");
        let back: VolumeCfg = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, v);
        // Longhorn's own, with null labels.
        let lh = r#"{"Name":"pvc-1","Size":"2147483648","Labels":null,"CreatedTime":"2024-01-01T00:00:00Z","LastBackupName":"backup-a","LastBackupAt":"2024-01-01T00:00:00Z","BlockCount":"10","BackingImageName":"\"\"","BackingImageChecksum":"\"\"","CompressionMethod":"\"gzip\"","StorageClassName":"\"longhorn\"","DataEngine":"\"v1\""}"#;
        let v: VolumeCfg = serde_json::from_str(lh).expect("parse Longhorn's");
        assert_eq!((v.size, v.block_count, v.compression_method.as_str(), v.storage_class_name.as_str()), (2 << 30, 10, "gzip", "longhorn"));
    }

    #[test]
    fn block_names_are_64_lowercase_hex_digits() {
        let good = "731859029215873fdac1c9f2f8bd25a334abf0f3a9e1b057cf2cacc2826d86b0";
        assert!(Checksum::parse(good).is_ok());
        let non_ascii = format!("aé{}", "0".repeat(61));
        assert_eq!(non_ascii.len(), 64);
        for bad in [non_ascii.as_str(), &good.to_uppercase(), &good[..63], &format!("{good}0"), &format!("0{}", "/..".repeat(21)), ""] {
            assert!(Checksum::parse(bad).is_err(), "{bad:?} accepted");
        }
        // A cfg naming such a block does not parse, and the error says why.
        let cfg = format!(r#"{{"Name":"b","VolumeName":"v","Blocks":[{{"Offset":0,"BlockChecksum":"{non_ascii}"}}]}}"#);
        let e = serde_json::from_str::<BackupCfg>(&cfg).expect_err("bad block name");
        assert!(e.to_string().contains("64 lowercase hex"), "{e}");
    }

    #[test]
    fn decompression_is_bounded() {
        // 64 MiB of zeros compress to a few KiB; reading them back stops at the bound.
        let big = vec![0u8; 64 << 20];
        for c in [Compression::Lz4, Compression::Gzip, Compression::None] {
            let z = c.compress(&big).expect("compress");
            let e = c.decompress(&z, BLOCK_SIZE).expect_err("more than a block");
            assert!(e.to_string().contains("more than"), "{e}");
        }
    }

    #[test]
    fn cfg_bounds_follow_the_volume_size() {
        assert_eq!(max_backup_cfg(Some(16 << 20)), MAX_SMALL_OBJECT + 8 * CFG_BYTES_PER_BLOCK);
        // A compact cfg of a full 1 TiB volume fits its bound.
        let n = (1u64 << 40) / BLOCK_SIZE;
        let entry = serde_json::to_vec(&BlockMapping { offset: (1 << 40) - BLOCK_SIZE, block_checksum: checksum(b"x") }).expect("json");
        assert!(n * (entry.len() as u64 + 1) < max_backup_cfg(Some(1 << 40)));
        // A store claiming an absurd size gets the 64 TiB volume's bound.
        assert_eq!(max_backup_cfg(Some(u64::MAX)), max_backup_cfg(Some(MAX_CFG_VOLUME_SIZE)));
    }

    #[test]
    fn order_is_finer_than_created_time() {
        let b = |name: &str, created: &str, ns: u64| BackupCfg { name: name.into(), created_time: created.into(), created_time_unix_nano: ns, ..Default::default() };
        let same_second = "2026-01-01T00:00:00Z";
        let first = b("backup-ffff", same_second, 1_767_225_600_100_000_000);
        let second = b("backup-0000", same_second, 1_767_225_600_200_000_000);
        assert!(first.order() < second.order(), "the nanoseconds decide, not the name");
        // Longhorn's (no nanoseconds) are placed by CreatedTime; incomplete ones first.
        let longhorn = b("backup-lh", "2026-01-01T00:00:01Z", 0);
        assert!(second.order() < longhorn.order());
        assert!(b("backup-x", "", 0).order() < first.order());
        // Written only when set, and read back.
        let s = serde_json::to_string(&second).expect("json");
        assert!(s.contains(r#""CreatedTimeUnixNano":1767225600200000000"#), "{s}");
        assert!(!serde_json::to_string(&longhorn).expect("json").contains("UnixNano"));
        assert_eq!(serde_json::from_str::<BackupCfg>(&s).expect("parse"), second);
    }

    #[test]
    fn concurrent_volume_cfg_updates_lose_nothing() {
        let s = crate::backup::target::file::tests::Scratch::new("cfg-race");
        let (writers, per) = (3u64, 20u64);
        std::thread::scope(|sc| {
            for w in 0..writers {
                // A target of its own, as another process would have.
                let t: Arc<dyn BackupTarget> = Arc::new(s.target());
                sc.spawn(move || {
                    for i in 0..per {
                        with_volume_cfg(&t, "vol1", |c| {
                            let v = c.get_or_insert_with(|| VolumeCfg { name: "vol1".into(), ..Default::default() });
                            v.block_count += 1;
                            v.last_backup_name = format!("backup-{w}-{i}");
                            Ok(())
                        })
                        .expect("update");
                    }
                });
            }
        });
        let v = load_volume(&s.target(), "vol1").expect("volume.cfg");
        assert_eq!(v.block_count, writers * per, "every update counted");
        assert!(v.last_backup_name.ends_with(&format!("-{}", per - 1)), "the last update of a writer is last: {}", v.last_backup_name);
        assert!(s.target().list(&locks_dir("vol1")).expect("locks").is_empty(), "no lock left");
    }

    #[test]
    fn compression_round_trip_and_corruption() {
        let mut data = vec![0u8; BLOCK_SIZE as usize];
        data[1000..2000].fill(7);
        for c in [Compression::Lz4, Compression::Gzip, Compression::None] {
            let z = c.compress(&data).expect("compress");
            assert_eq!(c.decompress(&z, BLOCK_SIZE).expect("decompress"), data);
        }
        let mut z = Compression::Lz4.compress(&data).expect("compress");
        let n = z.len();
        z[n / 2] ^= 0xff;
        let bad = Compression::Lz4.decompress(&z, BLOCK_SIZE);
        assert!(bad.is_err() || bad.is_ok_and(|d| d != data));
    }
}
