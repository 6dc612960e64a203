//! The README's first command, `tools/start`, as a new user runs it: it starts the
//! manager, creates and attaches a volume through the API and prints where the UI, the
//! device and the NBD export are. (The test gives it the freshly built binary through
//! LONGHORN_BIN instead of letting it run cargo inside `cargo test`.)

use longhorn_tests::manager::free_port;
use longhorn_tests::*;
use std::path::Path;
use std::process::Command;

fn start(args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/start");
    let o = Command::new(script).args(args).env("LONGHORN_BIN", bin()).output().expect("run tools/start");
    let mut s = String::from_utf8_lossy(&o.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

/// Stops what the script left running (it runs in the background on purpose), whatever
/// the test's outcome.
struct Stop {
    url: String,
    listen: String,
}

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = sh_try(&format!("curl -s -m 60 -X POST '{}/v1/volumes/vol1?action=detach'", self.url));
        let _ = sh_try(&format!("pkill -TERM -f 'manager serve --listen {} '", self.listen));
    }
}

#[test]
fn tools_start_runs_the_manager_and_serves_a_volume() {
    let dir = tempfile::tempdir_in(test_root()).expect("temp dir");
    let data = dir.path().join("data");
    let run = dir.path().join("run");
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let _stop = Stop { url: url.clone(), listen: listen.clone() };
    let args = [
        "vol1",
        "--size",
        "64M",
        "--replicas",
        "2",
        "--frontend",
        "none",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--run-dir",
        run.to_str().expect("utf-8 path"),
    ];
    let (ok, out) = start(&args);
    assert!(ok, "tools/start failed:\n{out}");
    assert!(out.contains(&format!("web UI   {url}/")), "no UI URL in:\n{out}");
    let nbd = format!("nbd+unix:///?socket={}/vol1.nbd", run.display());
    assert!(out.contains(&nbd), "no NBD export {nbd} in:\n{out}");

    // A real volume behind it: data written over NBD reads back.
    sh(&format!("qemu-io -f raw -c 'write -P 0x5a 1M 2M' '{nbd}'"));
    let r = sh(&format!("qemu-io -f raw -c 'read -P 0x5a 1M 2M' '{nbd}'"));
    assert!(!r.contains("Pattern verification failed"), "{r}");
    let v: serde_json::Value = serde_json::from_str(&sh(&format!("curl -sf '{url}/v1/volumes/vol1'"))).expect("volume JSON");
    assert_eq!(v["state"], "attached", "{v}");
    assert_eq!(v["numberOfReplicas"], 2, "{v}");
    for i in 0..2 {
        assert!(data.join("vol1").join(format!("replica-{i}")).join("volume.meta").exists(), "replica {i} directory");
    }
    // The UI is served at the printed URL.
    let page = sh(&format!("curl -sf '{url}/'"));
    assert!(page.to_lowercase().contains("<html"), "not a page: {page:.200}");

    // Run again: the manager and the volume are found, not made twice.
    let (ok, again) = start(&args);
    assert!(ok, "second run failed:\n{again}");
    assert!(again.contains("already answers") && again.contains("exists already"), "{again}");
    let r = sh(&format!("qemu-io -f raw -c 'read -P 0x5a 1M 2M' '{nbd}'"));
    assert!(!r.contains("Pattern verification failed"), "{r}");

    // Bad input is refused with the API's message, and nothing is made.
    let (ok, bad) = start(&["Bad/Name", "--listen", &listen, "--data-dir", data.to_str().expect("utf-8 path")]);
    assert!(!ok, "a bad name was accepted:\n{bad}");
    assert!(bad.contains("HTTP 4"), "{bad}");
}
