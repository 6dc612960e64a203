//! Backup target URLs (file://, nfs://, s3://) and backup URLs
//! (`TARGET?backup=NAME&volume=VOL`), parsed without any I/O.

use longhorn_engine::backup::target::{nfs, open};
use longhorn_engine::backup::{backup_url, parse_backup_url};
use std::collections::HashMap;

/// Opens a target the way `target::open` does, minus what would reach the network:
/// an nfs:// URL is only parsed (opening starts the NFS client's runtime), and an
/// s3:// one always gets static credentials (without them the S3 client asks the
/// instance metadata service).
pub(crate) fn open_target(url: &str, env: &HashMap<String, String>) {
    if url.starts_with("nfs://") {
        if let Ok(u) = nfs::parse_url(url) {
            assert!(!u.host.is_empty());
            assert!(u.port != 0);
            assert!(u.path.starts_with('/'));
            assert!(!u.path.split('/').any(|c| c == ".."), "path {:?} climbs out of the export", u.path);
            assert!(["4.1,4.0", "4.0", "4.1", "4.2"].contains(&u.versions.as_str()));
        }
        return;
    }
    let mut env = env.clone();
    env.insert("AWS_ACCESS_KEY_ID".into(), "fuzz".into());
    env.insert("AWS_SECRET_ACCESS_KEY".into(), "fuzz".into());
    let _ = open(url, &env);
}

/// Line 1: a target or backup URL; line 2 (optional): `AWS_ENDPOINTS`.
pub fn target_url(data: &[u8]) {
    let Some(text) = crate::text(data) else { return };
    let (url, endpoint) = text.split_once('\n').unwrap_or((text, ""));
    let mut env = HashMap::new();
    if !endpoint.is_empty() {
        env.insert("AWS_ENDPOINTS".to_string(), endpoint.to_string());
    }
    open_target(url, &env);
    if let Some((t, v, b)) = parse_backup_url(url) {
        open_target(&t, &env);
        let again = parse_backup_url(&backup_url(&t, &v, &b));
        assert_eq!(again, Some((t, v, b)), "parse(backup_url(parse(url))) differs");
    }
}
