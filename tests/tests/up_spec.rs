//! `longhorn up` with a StorageClass-like spec: checked whole before anything starts,
//! applied (replica count, recurring jobs), stored with the volume.

use longhorn_tests::*;
use std::process::Command;

#[test]
fn up_applies_a_valid_spec_and_refuses_a_bad_one_untouched() {
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let data = t.path().join("data");
    let run = t.path().join("run");
    let bad = t.path().join("bad.json");
    std::fs::write(&bad, r#"{"numberOfReplicas":"2","recurringJobs":"[{\"name\":\"toolongname\",\"task\":\"snapshot\",\"cron\":\"* * * * *\",\"retain\":1}]"}"#).expect("w");
    let o = Command::new(bin())
        .args(["up", "vol1", "--size", "16M", "--frontend", "none", "--spec"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(&data)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("name") && err.contains("recurringJobs"), "{err}");
    assert!(!data.exists(), "a rejected spec must not create anything");
    let o = Command::new(bin())
        .args(["up", "vol1", "--size", "16M", "--frontend", "none", "--stale-replica-timeout", "5d", "--data-dir"])
        .arg(&data)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stale replica timeout") && err.contains("unit"), "{err}");
    assert!(!data.exists(), "a rejected timeout must not create anything");

    let good = t.path().join("good.json");
    std::fs::write(&good, r#"{"numberOfReplicas":"2","staleReplicaTimeout":"30","recurringJobs":"[{\"name\":\"snap\",\"task\":\"snapshot\",\"cron\":\"*/1 * * * *\",\"retain\":1},{\"name\":\"backup\",\"task\":\"backup\",\"cron\":\"*/2 * * * *\",\"retain\":1}]"}"#).expect("w");
    let (mut up, _) = spawn(
        &[
            "up", "vol1", "--size", "16M", "--frontend", "none", "--spec", good.to_str().expect("utf8"),
            "--data-dir", data.to_str().expect("utf8"), "--run-dir", run.to_str().expect("utf8"),
        ],
        &t.path().join("up.log"),
        "Ctrl-C",
    )
    .expect("up starts");
    let cli = |args: &[&str]| Command::new(bin()).args(args).env("LONGHORN_RUN_DIR", &run).output().expect("cli");
    let v: serde_json::Value = serde_json::from_slice(&cli(&["volume", "info", "-v", "vol1", "--json"]).stdout).expect("json");
    assert_eq!(v["replicas_total"], 2, "{v}");
    let jobs = String::from_utf8_lossy(&cli(&["job", "ls", "-v", "vol1", "--json"]).stdout).to_string();
    assert!(jobs.contains("\"snap\"") && jobs.contains("\"backup\""), "{jobs}");
    assert!(data.join("vol1/spec.json").exists() && data.join("vol1/jobs.json").exists());
    assert!(up.term(), "up stops cleanly on SIGTERM:\n{}", up.log_text());
}
