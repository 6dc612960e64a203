//! The backupstore's objects as a restore or a listing reads them from a target that
//! someone else may have written: `volume.cfg`, `backup_<name>.cfg`, and `.blk` blocks
//! (lz4 frame, gzip or raw, named by the checksum of their content).

use longhorn_engine::backup::store::{
    block_path, checksum, read_block, BackupCfg, Checksum, Compression, VolumeCfg, BLOCK_SIZE,
};
use longhorn_engine::backup::target::BackupTarget;
use longhorn_engine::backup::BackupError;
use std::sync::OnceLock;
use std::time::SystemTime;

/// `volume.cfg`: decode(encode(x)) == x, with Longhorn's quirks (numbers as strings,
/// strings encoded twice).
pub fn backup_volume_cfg(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<VolumeCfg>(data) else { return };
    let enc = serde_json::to_vec(&v).expect("encodes");
    let back: VolumeCfg = serde_json::from_slice(&enc).expect("what we write we read");
    assert_eq!(back, v);
}

/// `backup_<name>.cfg`: the round trip, then what a restore does with it before it
/// reads a block: its checks, then each block's path in the store.
pub fn backup_cfg(data: &[u8]) {
    let Ok(cfg) = serde_json::from_slice::<BackupCfg>(data) else { return };
    let enc = serde_json::to_vec(&cfg).expect("encodes");
    let back: BackupCfg = serde_json::from_slice(&enc).expect("what we write we read");
    assert_eq!(back, cfg);
    if Compression::parse(&cfg.compression_method).is_err() {
        return;
    }
    let size = cfg.volume_size;
    if size == 0 || size % BLOCK_SIZE != 0 {
        return;
    }
    // The restore's own check of the block list (engine/src/backup/mod.rs, restore).
    if cfg.blocks.iter().any(|b| b.offset % BLOCK_SIZE != 0 || b.offset >= size) {
        return;
    }
    // Every checksum that decoded is 64 lowercase hex digits (the type says so).
    for b in &cfg.blocks {
        let c = b.block_checksum.as_str();
        assert!(c.len() == 64 && c.bytes().all(|x| x.is_ascii_hexdigit() && !x.is_ascii_uppercase()), "{c:?}");
        let p = block_path("vol", &b.block_checksum);
        assert!(p.ends_with(".blk"));
    }
}

/// A target holding one object.
struct One {
    path: String,
    data: Vec<u8>,
}

impl BackupTarget for One {
    fn url(&self) -> &str {
        "mem://fuzz"
    }
    fn put(&self, _: &str, _: &[u8]) -> Result<(), BackupError> {
        Err(BackupError::Invalid("read-only".into()))
    }
    fn get(&self, path: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        if path == self.path {
            if self.data.len() as u64 > max {
                return Err(BackupError::Corrupt { target: self.url().into(), object: path.into(), what: "too big".into() });
            }
            Ok(self.data.clone())
        } else {
            Err(BackupError::NotFound { target: self.url().into(), object: path.into() })
        }
    }
    fn exists(&self, path: &str) -> Result<bool, BackupError> {
        Ok(path == self.path)
    }
    fn list(&self, _: &str) -> Result<Vec<String>, BackupError> {
        Ok(Vec::new())
    }
    fn list_all(&self, _: &str, _: usize) -> Result<Vec<String>, BackupError> {
        Ok(Vec::new())
    }
    fn delete(&self, _: &str) -> Result<(), BackupError> {
        Err(BackupError::Invalid("read-only".into()))
    }
    fn mtime(&self, _: &str) -> Result<Option<SystemTime>, BackupError> {
        Ok(None)
    }
    fn check(&self) -> Result<(), BackupError> {
        Ok(())
    }
}

fn zero_block_name() -> &'static Checksum {
    static N: OnceLock<Checksum> = OnceLock::new();
    N.get_or_init(|| checksum(&vec![0u8; BLOCK_SIZE as usize]))
}

/// `.blk`: byte 0 picks the volume's compression method, byte 1 the block's name
/// (0: the 2 MiB zero block's, else 64 bytes of the input, as a `.cfg` may name any),
/// the rest is the object. A block that reads is 2 MiB with the checksum of its
/// name; and any data compresses and decompresses back to itself.
pub fn backup_blk(data: &[u8]) {
    let [sel, name_mode, rest @ ..] = data else { return };
    let comp = [Compression::Lz4, Compression::Gzip, Compression::None][*sel as usize % 3];
    let (name, raw) = if name_mode % 2 == 0 {
        (zero_block_name().clone(), rest)
    } else {
        let Some(n) = rest.get(..64).and_then(|n| std::str::from_utf8(n).ok()) else { return };
        // A name that is not 64 lowercase hex digits never reaches a path.
        let Ok(c) = Checksum::parse(n) else { return };
        (c, &rest[64..])
    };
    let t = One { path: block_path("vol", &name), data: raw.to_vec() };
    if let Ok(block) = read_block(&t, "vol", &name, comp) {
        assert_eq!(block.len() as u64, BLOCK_SIZE);
        assert_eq!(checksum(&block), name);
    }
    // The round trip with the limit at the data's own length (the decompressors'
    // buffers are sized by the limit; 2 MiB each would make every input slow).
    let limit = raw.len() as u64;
    for c in [Compression::Lz4, Compression::Gzip, Compression::None] {
        let z = c.compress(raw).expect("compress");
        assert_eq!(c.decompress(&z, limit).expect("decompress"), raw, "{} round trip", c.name());
        if let Ok(d) = c.decompress(raw, limit) {
            assert!(c == Compression::None || d.len() as u64 <= limit + 1, "decompression past its limit");
        }
    }
}
