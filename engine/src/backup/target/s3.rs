//! `s3://bucket@region/prefix` through the `rust-s3` crate (blocking client, rustls).
//!
//! Credentials and endpoint come from Longhorn's variables: AWS_ACCESS_KEY_ID,
//! AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_ENDPOINTS (an S3-compatible server;
//! path-style requests unless VIRTUAL_HOSTED_STYLE=true). Without AWS_ENDPOINTS the
//! bucket is on AWS in `region`, virtual-hosted style.

use super::{env_get, too_deep, too_large, BackupTarget};
use crate::backup::BackupError;
use s3::creds::Credentials;
use s3::{Bucket, Region};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

pub struct S3Target {
    url: String,
    prefix: String,
    bucket: Box<Bucket>,
}

impl S3Target {
    pub fn new(url: &str, env: &HashMap<String, String>) -> Result<S3Target, BackupError> {
        let invalid = |w: &str| BackupError::Invalid(format!("backup target {url:?}: {w}"));
        let rest = url.strip_prefix("s3://").ok_or_else(|| invalid("not an s3:// URL"))?;
        let (br, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let (bucket, region) = br.split_once('@').ok_or_else(|| invalid("expected s3://bucket@region/prefix"))?;
        if bucket.is_empty() || region.is_empty() {
            return Err(invalid("expected s3://bucket@region/prefix"));
        }
        let key = env_get(env, "AWS_ACCESS_KEY_ID");
        let secret = env_get(env, "AWS_SECRET_ACCESS_KEY");
        let token = env_get(env, "AWS_SESSION_TOKEN");
        let creds = Credentials::new(key.as_deref(), secret.as_deref(), None, token.as_deref(), None)
            .map_err(|e| invalid(&format!("credentials: {e}")))?;
        let endpoint = env_get(env, "AWS_ENDPOINTS");
        let reg = match &endpoint {
            Some(e) => Region::Custom { region: region.to_string(), endpoint: e.trim_end_matches('/').to_string() },
            None => region.parse().map_err(|e| invalid(&format!("region: {e}")))?,
        };
        let mut b = Bucket::new(bucket, reg, creds).map_err(|e| invalid(&e.to_string()))?;
        let virtual_hosted = env_get(env, "VIRTUAL_HOSTED_STYLE").is_some_and(|v| v == "true");
        if endpoint.is_some() && !virtual_hosted {
            b.set_path_style();
        }
        b.set_request_timeout(Some(Duration::from_secs(30)));
        let prefix = prefix.trim_matches('/').to_string();
        Ok(S3Target { url: url.to_string(), prefix, bucket: b })
    }

    fn key(&self, p: &str) -> String {
        let p = p.trim_start_matches('/');
        if self.prefix.is_empty() { p.to_string() } else { format!("{}/{p}", self.prefix) }
    }

    fn err(&self, object: &str, what: impl std::fmt::Display) -> BackupError {
        BackupError::Target { target: self.url.clone(), object: object.to_string(), what: what.to_string() }
    }

    fn status_err(&self, object: &str, op: &str, code: u16, body: &[u8]) -> BackupError {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).replace('\n', " ");
        let hint = match code {
            403 => " (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            404 if text.contains("NoSuchBucket") => " (no such bucket)",
            _ => "",
        };
        self.err(object, format!("{op} answered HTTP {code}{hint}: {text}"))
    }

    /// Keys under `dir/` (full keys), with the common prefixes when `delim`.
    fn list_keys(&self, dir: &str, delim: bool) -> Result<(Vec<(String, String)>, Vec<String>), BackupError> {
        let mut prefix = self.key(dir);
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let pages = self
            .bucket
            .list(prefix.clone(), if delim { Some("/".to_string()) } else { None })
            .map_err(|e| self.explain(dir, "listing", e))?;
        let mut objs = Vec::new();
        let mut dirs = Vec::new();
        for p in pages {
            for o in p.contents {
                objs.push((o.key, o.last_modified));
            }
            for c in p.common_prefixes.unwrap_or_default() {
                dirs.push(c.prefix);
            }
        }
        Ok((objs, dirs))
    }

    /// A failed call whose reply did not parse (an error document): ask for an object
    /// that does not exist, whose reply says what is wrong (credentials, bucket).
    fn explain(&self, object: &str, op: &str, e: impl std::fmt::Display) -> BackupError {
        if let Ok(r) = self.bucket.get_object(self.key(".longhorn-probe")) {
            let body = String::from_utf8_lossy(r.as_slice());
            let c = r.status_code();
            if c == 403 || (c == 404 && body.contains("NoSuchBucket")) || c >= 500 {
                return self.status_err(object, op, c, r.as_slice());
            }
        }
        self.err(object, format!("{op}: {e}"))
    }

    fn rel(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_string() } else { key.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(key).to_string() }
    }
}

/// Collects a response body, failing the write once it would pass `max` bytes so a
/// GET of a huge object stops there instead of buffering it whole.
struct Bounded {
    buf: Vec<u8>,
    max: u64,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if (self.buf.len() + b.len()) as u64 > self.max {
            self.over = true;
            return Err(std::io::Error::other("object larger than the bound"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc3339(s).or_else(|_| chrono::DateTime::parse_from_rfc2822(s)).ok()?;
    let secs = t.timestamp();
    (secs >= 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_nanos(t.timestamp_subsec_nanos() as u64))
}

impl BackupTarget for S3Target {
    fn url(&self) -> &str {
        &self.url
    }

    fn put(&self, p: &str, data: &[u8]) -> Result<(), BackupError> {
        let r = self.bucket.put_object(self.key(p), data).map_err(|e| self.err(p, e))?;
        match r.status_code() {
            200..=299 => Ok(()),
            c => Err(self.status_err(p, "PUT", c, r.as_slice())),
        }
    }

    fn get(&self, p: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        // An error document is small; the bound holds for it too.
        let mut body = Bounded { buf: Vec::new(), max, over: false };
        let r = self.bucket.get_object_to_writer(self.key(p), &mut body);
        if body.over {
            return Err(too_large(&self.url, p, max, None));
        }
        let code = r.map_err(|e| self.err(p, e))?;
        let body = body.buf;
        match code {
            200..=299 => Ok(body),
            404 if !String::from_utf8_lossy(&body).contains("NoSuchBucket") => {
                Err(BackupError::NotFound { target: self.url.clone(), object: p.to_string() })
            }
            c => Err(self.status_err(p, "GET", c, &body)),
        }
    }

    fn exists(&self, p: &str) -> Result<bool, BackupError> {
        let (_, code) = self.bucket.head_object(self.key(p)).map_err(|e| self.err(p, e))?;
        match code {
            200..=299 => Ok(true),
            404 => Ok(false),
            c => Err(self.status_err(p, "HEAD", c, b"")),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        let (objs, dirs) = self.list_keys(dir, true)?;
        let mut v: Vec<String> = objs
            .into_iter()
            .map(|(k, _)| k)
            .chain(dirs)
            .filter_map(|k| k.trim_end_matches('/').rsplit('/').next().map(|s| s.to_string()))
            .filter(|s| !s.is_empty())
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    fn list_all(&self, dir: &str, max_depth: usize) -> Result<Vec<String>, BackupError> {
        // A flat listing cannot loop, but a key deeper than asked is no object of ours.
        let (objs, _) = self.list_keys(dir, false)?;
        let base = format!("{}/", dir.trim_end_matches('/'));
        let mut v = Vec::new();
        let mut deep = 0usize;
        for (k, _) in objs {
            let rel = self.rel(&k);
            if rel.strip_prefix(&base).is_some_and(|r| r.split('/').count() > max_depth) {
                deep += 1;
            } else {
                v.push(rel);
            }
        }
        if deep > 0 {
            too_deep(&self.url, &format!("{deep} keys under {dir}"), max_depth);
        }
        v.sort();
        Ok(v)
    }

    fn delete(&self, p: &str) -> Result<(), BackupError> {
        let r = self.bucket.delete_object(self.key(p)).map_err(|e| self.err(p, e))?;
        match r.status_code() {
            200..=299 | 404 => Ok(()),
            c => Err(self.status_err(p, "DELETE", c, r.as_slice())),
        }
    }

    fn mtime(&self, p: &str) -> Result<Option<SystemTime>, BackupError> {
        let (h, code) = self.bucket.head_object(self.key(p)).map_err(|e| self.err(p, e))?;
        match code {
            200..=299 => Ok(h.last_modified.as_deref().and_then(parse_time)),
            404 => Ok(None),
            c => Err(self.status_err(p, "HEAD", c, b"")),
        }
    }

    fn check(&self) -> Result<(), BackupError> {
        let probe = format!("{}/volumes/.probe-{}", crate::backup::store::BASE, std::process::id());
        self.put(&probe, b"")?;
        self.delete(&probe)
    }
}
