//! Recurring jobs on a manual clock: validation, schedule, retention, idle volumes,
//! and jobs surviving an engine restart.

use longhorn_tests::*;

const SEED: &str = r#"[{"name":"snap","task":"snapshot","cron":"*/1 * * * *","retain":1},
 {"name":"backup","task":"backup","cron":"*/2 * * * *","retain":1}]"#;

fn cli(c: &Cluster, args: &[&str]) -> (bool, String) {
    let o = c.cli(args);
    let mut s = String::from_utf8_lossy(&o.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

fn jobs_cluster() -> Cluster {
    let mut c = Cluster::without_engine("vol1", 32 * MB, 2);
    let jobs = c.path("jobs.json").display().to_string();
    c.engine_extra = vec!["--jobs-file".into(), jobs, "--manual-clock".into(), "2026-01-01T00:00:30Z".into()];
    c.start_engine();
    c
}

fn write_some(c: &Cluster, seed: u8) {
    let f = c.path(&format!("w{seed}"));
    std::fs::write(&f, vec![seed; 1 << 20]).expect("write");
    sh(&format!("nbdcopy --destination-is-zero '{}' '{}' 2>/dev/null || nbdcopy '{}' '{}'", f.display(), c.uri(), f.display(), c.uri()));
}

fn snapshots(c: &Cluster) -> Vec<serde_json::Value> {
    let (ok, out) = cli(c, &["snapshot", "ls", "-v", "vol1", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v.as_array().expect("array").clone()
}

fn job_snapshots(c: &Cluster, job: &str) -> Vec<String> {
    snapshots(c)
        .iter()
        .filter(|s| s["labels"]["RecurringJob"] == job && s["removed"] == false)
        .map(|s| s["name"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn bad_specs_are_rejected_naming_the_field_and_nothing_is_applied() {
    let c = jobs_cluster();
    let (ok, out) = cli(&c, &["job", "add", SEED, "-v", "vol1"]);
    assert!(ok, "the seed's example spec is accepted: {out}");
    let before = cli(&c, &["job", "ls", "-v", "vol1", "--json"]).1;
    for (spec, field) in BAD_JOB_SPECS {
        let want = format!("\"{field}\"");
        let (ok, out) = cli(&c, &["job", "add", spec, "-v", "vol1"]);
        assert!(!ok, "accepted a bad spec: {spec}");
        assert!(out.contains(&want), "error for {spec} does not name {want}: {out}");
    }
    assert_eq!(cli(&c, &["job", "ls", "-v", "vol1", "--json"]).1, before, "a rejected spec changed the jobs");
}

#[test]
fn snapshot_job_keeps_its_newest_and_touches_nothing_else() {
    assert!(have("nbdcopy"));
    let mut c = jobs_cluster();
    let (ok, out) = cli(&c, &["job", "add", r#"[{"name":"snap","task":"snapshot","cron":"*/1 * * * *","retain":2,"labels":{"tier":"gold"}}]"#, "-v", "vol1"]);
    assert!(ok, "{out}");
    let mut made = Vec::new();
    for minute in 0..5u8 {
        if minute == 2 {
            let (ok, out) = cli(&c, &["snapshot", "create", "mine", "-v", "vol1"]);
            assert!(ok, "{out}");
        }
        write_some(&c, minute + 1);
        let (ok, out) = cli(&c, &["job", "clock", "--advance", "60", "-v", "vol1"]);
        assert!(ok, "{out}");
        let now = job_snapshots(&c, "snap");
        made.extend(now.iter().filter(|n| !made.contains(*n)).cloned().collect::<Vec<_>>());
    }
    let left = job_snapshots(&c, "snap");
    assert_eq!(made.len(), 5, "one snapshot per minute with new data: {made:?}");
    assert_eq!(left, made[3..].to_vec(), "exactly the two newest remain");
    let all = snapshots(&c);
    let mine = all.iter().find(|s| s["name"] == "mine").expect("the user's snapshot is untouched");
    assert_eq!(mine["removed"], false);
    let gold = all.iter().filter(|s| s["labels"]["tier"] == "gold").count();
    assert!(gold >= 2, "job labels are carried");

    // Idle: no new data, no new snapshot.
    let before = snapshots(&c).len();
    let (ok, out) = cli(&c, &["job", "clock", "--advance", "180", "-v", "vol1"]);
    assert!(ok, "{out}");
    assert_eq!(snapshots(&c).len(), before, "an idle volume got a snapshot");
    let (_, ls) = cli(&c, &["job", "ls", "-v", "vol1"]);
    assert!(ls.contains("skipped: no new data"), "job ls shows the last result: {ls}");

    // The jobs survive an engine restart.
    c.stop_engine();
    c.start_engine();
    let (_, ls) = cli(&c, &["job", "ls", "-v", "vol1", "--json"]);
    assert!(ls.contains("\"snap\"") && ls.contains("*/1 * * * *"), "{ls}");
}

#[test]
fn backup_job_keeps_one_backup_that_restores_the_latest_content() {
    assert!(have("nbdcopy") && have("qemu-img"));
    let mut c = Cluster::without_engine("vol1", 32 * MB, 2);
    // The engine reads the backup target from the settings file named in its environment.
    let settings = c.path("settings.json");
    let store = c.path("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    std::fs::write(&settings, format!("{{\"backup-target\":\"file://{}\"}}", store.display())).expect("settings");
    c.engine_env = vec![("LONGHORN_SETTINGS".into(), settings.display().to_string())];
    let jobs = c.path("jobs.json").display().to_string();
    c.engine_extra = vec!["--jobs-file".into(), jobs, "--manual-clock".into(), "2026-01-01T00:00:30Z".into()];
    c.start_engine();
    let (ok, out) = cli(&c, &["job", "add", r#"[{"name":"bk","task":"backup","cron":"*/1 * * * *","retain":1}]"#, "-v", "vol1"]);
    assert!(ok, "{out}");
    let backups = |c: &Cluster| -> Vec<serde_json::Value> {
        let o = std::process::Command::new(bin())
            .args(["backup", "ls", "vol1", "--json"])
            .env("LONGHORN_SETTINGS", c.path("settings.json"))
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v.as_array().expect("array").clone()
    };
    for round in 1..=3u8 {
        write_some(&c, round);
        let (ok, out) = cli(&c, &["job", "clock", "--advance", "60", "-v", "vol1"]);
        assert!(ok, "{out}");
        let (_, ls) = cli(&c, &["job", "ls", "-v", "vol1", "--json"]);
        assert!(ls.contains("created"), "round {round}: {ls}\nengine log:\n{}", c.engine_log());
    }
    let b = backups(&c);
    assert_eq!(b.len(), 1, "retain 1 keeps one backup: {b:?}");
    assert_eq!(b[0]["labels"]["RecurringJob"], "bk");
    // Idle: no new backup.
    let (ok, out) = cli(&c, &["job", "clock", "--advance", "60", "-v", "vol1"]);
    assert!(ok, "{out}");
    let (_, ls) = cli(&c, &["job", "ls", "-v", "vol1"]);
    assert!(ls.contains("skipped: no new data"), "{ls}");
    assert_eq!(backups(&c)[0]["name"], b[0]["name"], "an idle volume got a new backup");

    // The backup restores to the latest content.
    let now = c.path("now.raw");
    sh(&format!("nbdcopy '{}' '{}'", c.uri(), now.display()));
    let data = c.path("restored");
    let o = std::process::Command::new(bin())
        .args(["backup", "restore", b[0]["name"].as_str().expect("name"), "--to", "back", "--replicas", "1", "--data-dir"])
        .arg(&data)
        .env("LONGHORN_SETTINGS", c.path("settings.json"))
        .output()
        .expect("run");
    assert!(o.status.success(), "restore: {}", String::from_utf8_lossy(&o.stderr));
    let dir = std::fs::read_dir(data.join("back")).expect("restored volume").filter_map(|e| e.ok()).next().expect("a replica dir").path();
    let (rp, addr) = spawn(
        &["replica", "serve", "--dir", dir.to_str().expect("utf8"), "--volume", "back", "--size", &(32 * MB).to_string(), "--listen", "127.0.0.1:0"],
        &c.path("back-r.log"),
        "listening",
    )
    .expect("restored replica serves");
    let (ep, uri) = spawn(
        &["engine", "serve", "--volume", "back", "--size", &(32 * MB).to_string(), "--replica", &addr, "--nbd",
          &format!("unix:{}", c.path("back.nbd").display()), "--run-dir", c.path("run-back").to_str().expect("utf8")],
        &c.path("back-e.log"),
        "ready",
    )
    .expect("restored engine serves");
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{}'", now.display(), uri));
    drop((ep, rp));
}

#[test]
fn a_failing_job_shows_its_error_and_does_not_stop_the_others() {
    assert!(have("nbdcopy"));
    let mut c = Cluster::without_engine("vol1", 32 * MB, 2);
    // No backup target: the backup job fails at every slot.
    c.engine_env = vec![("LONGHORN_SETTINGS".into(), c.path("no-settings.json").display().to_string())];
    let jobs = c.path("jobs.json").display().to_string();
    c.engine_extra = vec!["--jobs-file".into(), jobs, "--manual-clock".into(), "2026-01-01T00:00:30Z".into()];
    c.start_engine();
    let (ok, out) = cli(&c, &["job", "add", SEED, "-v", "vol1"]);
    assert!(ok, "{out}");
    for round in 1..=2u8 {
        write_some(&c, round);
        let (ok, out) = cli(&c, &["job", "clock", "--advance", "60", "-v", "vol1"]);
        assert!(ok, "{out}");
    }
    let (_, ls) = cli(&c, &["job", "ls", "-v", "vol1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ls).expect("json");
    let job = |n: &str| v.as_array().expect("array").iter().find(|j| j["name"] == n).cloned().expect("job");
    assert!(job("backup")["last_result"].as_str().unwrap_or("").contains("no backup target"), "{v}");
    assert!(job("snap")["last_result"].as_str().unwrap_or("").contains("created"), "{v}");
    assert_eq!(job_snapshots(&c, "snap").len(), 1, "the snapshot job ran, keeping 1");
    assert!(c.engine_log().contains("recurring job failed"), "the log says so");
}
