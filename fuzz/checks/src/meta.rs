//! A replica directory's metadata files, read through the loaders a replica opens its
//! directory with: `volume.meta`, `<image>.img.meta`, `revision.counter`.

use longhorn_replica::meta::{
    format_revision, head_number, parse_revision, DiskMeta, VolumeMeta, REVISION_COUNTER_LEN, VOLUME_META,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A scratch directory of this process, on tmpfs when there is one (a file is written
/// per input).
fn scratch() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let d = base.join(format!("longhorn-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the scratch directory");
        d
    })
}

/// The image name the `.img.meta` input is stored for (its `Name` must match it).
const IMAGE: &str = "volume-snap-s1.img";

/// `volume.meta`: what loads satisfies the loader's checks and survives a JSON round trip.
pub fn volume_meta(data: &[u8]) {
    let dir = scratch();
    std::fs::write(dir.join(VOLUME_META), data).expect("write volume.meta");
    let Ok(m) = VolumeMeta::load(dir) else { return };
    assert!(m.size > 0 && m.sector_size > 0 && m.size % m.sector_size == 0);
    assert!(head_number(&m.head).is_some());
    let enc = serde_json::to_vec(&m).expect("encodes");
    let back: VolumeMeta = serde_json::from_slice(&enc).expect("decodes");
    assert_eq!(back, m);
}

/// `volume-snap-s1.img.meta`.
pub fn disk_meta(data: &[u8]) {
    let dir = scratch();
    std::fs::write(DiskMeta::path(dir, IMAGE), data).expect("write the .img.meta");
    let Ok(m) = DiskMeta::load(dir, IMAGE) else { return };
    assert_eq!(m.name, IMAGE);
    let enc = serde_json::to_vec(&m).expect("encodes");
    let back: DiskMeta = serde_json::from_slice(&enc).expect("decodes");
    assert_eq!(back, m);
}

/// `revision.counter`, of which the store reads the first 4096 bytes.
pub fn revision_counter(data: &[u8]) {
    let data = &data[..data.len().min(REVISION_COUNTER_LEN)];
    let path = Path::new("revision.counter");
    let Ok(v) = parse_revision(path, data) else { return };
    let mut img = [0u8; REVISION_COUNTER_LEN];
    format_revision(v, &mut img);
    assert_eq!(parse_revision(path, &img).expect("our own format parses"), v);
}
