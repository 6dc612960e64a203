//! Backups to a real S3-compatible server on loopback (moto's standalone server,
//! `pip install 'moto[server]'`): the whole story (see backup_common), wrong
//! credentials, an unreachable endpoint.

mod backup_common;

use backup_common::*;
use longhorn_tests::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Starts moto_server; `auth` makes it check credentials from the first request on.
fn moto(c: &Cluster, auth: bool) -> Moto {
    assert!(have("moto_server"), "moto_server is not installed (tests/run installs it: pip install 'moto[server]')");
    let port = free_port();
    let log = std::fs::File::create(c.path(&format!("moto-{port}.log"))).expect("log");
    let mut cmd = Command::new("moto_server");
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(log);
    if auth {
        cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
    }
    let child = cmd.spawn().expect("spawn moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Moto { child, endpoint }
}

struct Bucket {
    /// http://endpoint/bucket
    url: String,
    /// The target's prefix, without slashes.
    prefix: String,
}

/// boto3 (installed with moto) reads and writes the bucket directly, signed as a client would.
const BOTO: &str = r#"
import sys, boto3
ep, bucket, op, key = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=ep, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
if op == "list":
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for o in page.get("Contents", []):
            print(o["Key"])
elif op == "get":
    try:
        sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        sys.exit(3)
else:
    s3.put_object(Bucket=bucket, Key=key, Body=sys.stdin.buffer.read())
"#;

impl Bucket {
    fn boto(&self, op: &str, key: &str, input: Option<&[u8]>) -> std::process::Output {
        let (ep, bucket) = self.url.rsplit_once('/').expect("endpoint/bucket");
        let mut child = Command::new("python3")
            .args(["-c", BOTO, ep, bucket, op, &format!("{}/{key}", self.prefix)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 with boto3");
        if let Some(mut i) = child.stdin.take() {
            use std::io::Write;
            if let Some(d) = input {
                i.write_all(d).expect("stdin");
            }
        }
        child.wait_with_output().expect("boto3")
    }
}

impl Objects for Bucket {
    fn list(&self, prefix: &str) -> Vec<String> {
        let o = self.boto("list", prefix, None);
        assert!(o.status.success(), "boto3 list: {}", String::from_utf8_lossy(&o.stderr));
        let strip = format!("{}/", self.prefix);
        String::from_utf8_lossy(&o.stdout).lines().map(|s| s.strip_prefix(&strip).unwrap_or(s).to_string()).collect()
    }
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        let o = self.boto("get", path, None);
        o.status.success().then_some(o.stdout)
    }
    fn put(&self, path: &str, data: &[u8]) {
        let o = self.boto("put", path, Some(data));
        assert!(o.status.success(), "boto3 put: {}", String::from_utf8_lossy(&o.stderr));
    }
}

fn env_for(c: &Cluster, endpoint: &str) -> Env {
    Env {
        settings: c.path("settings.json"),
        vars: vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_ENDPOINTS".into(), endpoint.into()),
        ],
    }
}

#[test]
fn backup_story_on_s3_target() {
    let mut c = Cluster::new("vol1", 128 * MB, 2);
    let m = moto(&c, false);
    sh(&format!("curl -sf -X PUT '{}/backups'", m.endpoint));
    let env = env_for(&c, &m.endpoint);
    env.ok(&c, &["backup", "target", "s3://backups@us-east-1/lh"]);
    story(&mut c, &env, &Bucket { url: format!("{}/backups", m.endpoint), prefix: "lh".into() }, "s3");
}

#[test]
fn backup_s3_faults() {
    let c = Cluster::new("vol3", 64 * MB, 1);
    // Unreachable endpoint: fails fast, naming the target; no snapshot is taken.
    let env = env_for(&c, &format!("http://127.0.0.1:{}", free_port()));
    env.ok(&c, &["backup", "target", "s3://backups@us-east-1/lh"]);
    let before = env.ok(&c, &["snapshot", "ls", "-v", "vol3"]);
    let t = Instant::now();
    let e = env.err(&c, &["backup", "create", "-v", "vol3"]);
    assert!(e.contains("s3://backups@us-east-1/lh"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(env.err(&c, &["backup", "ls"]).contains("s3://backups@us-east-1/lh"));
    assert_eq!(env.ok(&c, &["snapshot", "ls", "-v", "vol3"]), before);
    // Wrong credentials: a server that checks them refuses, and the error says so.
    let m = moto(&c, true);
    let env = env_for(&c, &m.endpoint);
    let e = env.err(&c, &["backup", "create", "-v", "vol3"]);
    assert!(e.contains("403") && e.contains("AWS_ACCESS_KEY_ID"), "{e}");
    let e = env.err(&c, &["backup", "volumes"]);
    assert!(e.contains("403"), "{e}");
    // A bucket that does not exist.
    let m2 = moto(&c, false);
    let env = env_for(&c, &m2.endpoint);
    let e = env.err(&c, &["backup", "create", "-v", "vol3"]);
    assert!(e.contains("404") || e.contains("NoSuchBucket"), "{e}");
}

#[test]
fn backup_s3_refuses_an_oversized_object() {
    let c = Cluster::new("vol4", 16 * MB, 1);
    let m = moto(&c, false);
    sh(&format!("curl -sf -X PUT '{}/backups'", m.endpoint));
    let env = env_for(&c, &m.endpoint);
    env.ok(&c, &["backup", "target", "s3://backups@us-east-1/lh"]);
    oversized_block_is_refused(&c, &env, &Bucket { url: format!("{}/backups", m.endpoint), prefix: "lh".into() });
}
