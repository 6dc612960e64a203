//! The web UI in a real browser against a real manager with real replicas:
//! tests/ui/story.mjs (playwright-core driving Debian's chromium) clicks through the
//! screens; at each `@@ STEP` line it prints, this test does and checks what a browser
//! cannot: data written over NBD, `volume-snap-*.img` in every replica directory, the
//! volume's state file, backups in the stores (a file:// directory, NFS-Ganesha's
//! export, moto's S3 bucket), `qemu-img compare` of a restored volume with its source,
//! replica directories gone after Delete, a replica process killed. Screenshots of
//! each page go to target/ui-screenshots/.

use longhorn_tests::manager::{free_port, Manager};
use longhorn_tests::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn wait_port(port: u16, what: &str, log: &Path) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "{what} did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// NFS-Ganesha exporting `dir` at /backups on 127.0.0.1 (as tests/tests/backup_nfs.rs).
fn ganesha(run: &Path, dir: &Path) -> (Server, String) {
    assert!(have("ganesha.nfsd"), "ganesha.nfsd is not installed (tests/run installs nfs-ganesha, nfs-ganesha-vfs)");
    std::fs::create_dir_all(dir).expect("mkdir export");
    std::fs::create_dir_all(run.join("recovery")).expect("mkdir");
    let port = free_port();
    let conf = run.join("ganesha.conf");
    std::fs::write(
        &conf,
        format!(
            r#"NFS_CORE_PARAM {{ Protocols = 4; NFS_Port = {port}; Bind_addr = 127.0.0.1; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }}
NFSV4 {{ Graceless = true; Minor_Versions = 0, 1; RecoveryBackend = fs; RecoveryRoot = "{rec}"; Allow_Numeric_Owners = true; Only_Numeric_Owners = true; }}
EXPORT {{ Export_Id = 1; Path = "{dir}"; Pseudo = "/backups"; Protocols = 4; Transports = TCP; Access_Type = RW; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
"#,
            rec = run.join("recovery").display(),
            dir = dir.canonicalize().expect("export").display()
        ),
    )
    .expect("ganesha.conf");
    let log = run.join("ganesha.log");
    let child = Command::new("ganesha.nfsd")
        .arg("-F")
        .arg("-f")
        .arg(&conf)
        .arg("-L")
        .arg(&log)
        .arg("-p")
        .arg(run.join("ganesha.pid"))
        .args(["-N", "NIV_EVENT"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ganesha.nfsd");
    let s = Server(child);
    wait_port(port, "ganesha", &log);
    (s, format!("nfs://127.0.0.1:/backups?nfsOptions=port={port},soft,timeo=150"))
}

/// moto's S3 server with a bucket `backups` (as tests/tests/backup_s3.rs); its endpoint.
fn moto(run: &Path) -> (Server, String) {
    assert!(have("moto_server"), "moto_server is not installed (tests/run installs it: pip install 'moto[server]')");
    let port = free_port();
    let log = run.join("moto.log");
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn moto_server");
    let s = Server(child);
    wait_port(port, "moto_server", &log);
    let ep = format!("http://127.0.0.1:{port}");
    sh(&format!("curl -sf -X PUT '{ep}/backups'"));
    (s, ep)
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// The replica process serving `dir` (a `longhorn replica serve --dir DIR` under the
/// volume's `longhorn up`).
fn replica_pid(dir: &Path) -> Option<i32> {
    let out = sh(&format!("pgrep -f -- 'replica serve .*--dir {}( |$)' || true", dir.display()));
    out.lines().next().and_then(|l| l.trim().parse().ok())
}

/// The pid of the volume's `longhorn up`, from the manager's state file.
fn up_pid(m: &Manager, vol: &str) -> Result<i64, String> {
    let p = m.data.join("manager").join("volumes").join(format!("{vol}.json"));
    let st: Value = serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?).map_err(|e| format!("{}: {e}", p.display()))?;
    st["pid"].as_i64().ok_or(format!("no pid in {}: {st}", p.display()))
}

struct Ctx<'a> {
    m: &'a Manager,
    src_data: PathBuf,
    file_store: PathBuf,
    nfs_store: PathBuf,
    s3: String,
    paths: HashMap<String, Vec<PathBuf>>,
    killed: Option<(PathBuf, i32)>,
}

/// Does one `@@ STEP` of the story; Ok(extra fields for the reply).
fn handle(cx: &mut Ctx, step: &str, d: &Value) -> Result<Value, String> {
    let m = cx.m;
    let vol = d["volume"].as_str().unwrap_or_default().to_string();
    match step {
        "attached" => {
            // Data over NBD from the host side: random bytes from a file, and patterns.
            let nbd = m.nbd(&vol);
            sh(&format!("nbdcopy '{}' '{nbd}'", cx.src_data.display()));
            sh(&format!("qemu-io -f raw -c 'write -P 0xab 40M 3M' -c 'write -P 0x5c 63M 1M' '{nbd}'"));
            sh(&format!("qemu-io -f raw -c 'read -P 0xab 40M 3M' '{nbd}'"));
            Ok(json!({"wrote": "16 MiB random at 0, 3 MiB of 0xab at 40 MiB, 1 MiB of 0x5c at 63 MiB"}))
        }
        "snapshot" => {
            let snap = d["snapshot"].as_str().unwrap_or_default();
            let dirs = m.data_paths(&vol);
            for dir in &dirs {
                let f = dir.join(format!("volume-snap-{snap}.img"));
                if !f.exists() {
                    return Err(format!("{} is missing; {} holds {:?}", f.display(), dir.display(), files_under(dir)));
                }
            }
            // A snapshot with markup in a label, taken through the API: the UI shows it as text.
            let (st, v) = m.call("POST", &format!("/v1/volumes/{vol}?action=snapshotCreate"), Some(&json!({"name":"labelled","labels":{"note":"<b>bold</b>"}})));
            if st != 200 && st != 201 {
                return Err(format!("snapshotCreate with a label: {st} {v}"));
            }
            Ok(json!({"snapshot": "labelled", "replicas": dirs.len()}))
        }
        "job" => {
            let job = d["job"].as_str().unwrap_or_default();
            let v = m.volume(&vol);
            let jobs = v["recurringJobs"].as_array().cloned().unwrap_or_default();
            if !jobs.iter().any(|j| j["name"] == job && j["cron"] == "*/5 * * * *" && j["retain"] == 2) {
                return Err(format!("job {job} not in the volume: {:?}", v["recurringJobs"]));
            }
            if jobs.iter().any(|j| j["name"] == "ninechars") {
                return Err("the refused job was kept".into());
            }
            // Kept in the manager's state on disk.
            let on_disk = files_under(&m.data).into_iter().filter(|f| f.ends_with(".json")).any(|f| {
                std::fs::read_to_string(&f).map(|s| s.contains(&format!("\"{job}\"")) && s.contains("*/5 * * * *")).unwrap_or(false)
            });
            if !on_disk {
                return Err(format!("job {job} is in no state file under {}", m.data.display()));
            }
            Ok(json!({}))
        }
        "restored" => {
            let src = d["source"].as_str().unwrap_or_default();
            let backup = d["backup"].as_str().unwrap_or_default();
            let kind = d["kind"].as_str().unwrap_or_default();
            let store_has = match kind {
                "file" => files_under(&cx.file_store).iter().any(|f| f.contains(backup)),
                "nfs" => files_under(&cx.nfs_store).iter().any(|f| f.contains(backup)),
                _ => sh(&format!("curl -sf '{}/backups?list-type=2&prefix=lh/'", cx.s3)).contains(backup),
            };
            if !store_has {
                return Err(format!("backup {backup} is not in the {kind} store"));
            }
            let (a, b) = (m.nbd(src), m.nbd(&vol));
            let (same, out) = sh_try(&format!("qemu-img compare -f raw -F raw '{a}' '{b}'"));
            if !same {
                return Err(format!("{vol} differs from {src}: {out}"));
            }
            cx.paths.insert(vol.clone(), m.data_paths(&vol));
            Ok(json!({"compare": out.trim()}))
        }
        "deleted" => {
            let (st, _) = m.call("GET", &format!("/v1/volumes/{vol}"), None);
            if st != 404 {
                return Err(format!("GET {vol} after Delete: {st}"));
            }
            for p in cx.paths.get(&vol).into_iter().flatten() {
                if p.exists() {
                    return Err(format!("{} is still there after Delete", p.display()));
                }
            }
            Ok(json!({}))
        }
        "kill-replica" => {
            // `longhorn up` would restart and rebuild the replica within a second,
            // between two of the manager's samples: it is stopped (SIGSTOP) until the
            // UI has shown the volume degraded, then let go ("resume-rebuild").
            let up = up_pid(m, &vol)?;
            sh(&format!("kill -STOP {up}"));
            let dir = m.data_paths(&vol).into_iter().next().expect("a replica");
            let pid = replica_pid(&dir).ok_or(format!("no replica process serves {}", dir.display()))?;
            sh(&format!("kill -9 {pid}"));
            cx.killed = Some((dir, pid));
            Ok(json!({"pid": pid}))
        }
        "resume-rebuild" => {
            let up = up_pid(m, &vol)?;
            sh(&format!("kill -CONT {up}"));
            Ok(json!({}))
        }
        "healed" => {
            let v = m.volume(&vol);
            let rs = v["replicas"].as_array().cloned().unwrap_or_default();
            if v["robustness"] != "healthy" || rs.len() != 3 || rs.iter().any(|r| r["mode"] != "RW") {
                return Err(format!("the API does not say healthy with 3 RW replicas: {v}"));
            }
            if let Some((dir, old)) = &cx.killed {
                match replica_pid(dir) {
                    Some(p) if p != *old => {}
                    p => return Err(format!("no new replica process for {} (killed {old}, now {p:?})", dir.display())),
                }
            }
            Ok(json!({}))
        }
        other => Err(format!("unknown step {other}")),
    }
}

#[test]
fn web_ui_story_in_a_real_browser() {
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ui = root.join("tests").join("ui");
    for tool in ["node", "chromium", "qemu-io", "qemu-img", "nbdcopy", "pgrep", "curl"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    assert!(ui.join("node_modules").join("playwright-core").exists(), "run `npm ci` in tests/ui (tests/run does)");
    let tmp = tempfile::Builder::new().prefix("lh-ui-").tempdir_in(test_root()).expect("tmp");
    let shots = root.join("target").join("ui-screenshots");
    let _ = std::fs::remove_dir_all(&shots);

    let m = Manager::start(tmp.path());
    let file_store = tmp.path().join("file-store");
    std::fs::create_dir_all(&file_store).expect("mkdir");
    let nfs_store = tmp.path().join("nfs-export");
    let gdir = tmp.path().join("ganesha");
    let (_g, nfs_url) = ganesha(&gdir, &nfs_store);
    let (_s3, s3) = moto(tmp.path());
    let src_data = tmp.path().join("random.bin");
    random_file(&src_data, 16 * MB);

    let targets = json!([
        {"kind": "file", "url": format!("file://{}", file_store.display())},
        {"kind": "nfs", "url": nfs_url},
        {"kind": "s3", "url": "s3://backups@us-east-1/lh", "secret": "ui-s3",
         "secretData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINTS": s3}},
    ]);
    let mut story = Command::new("node")
        .arg(ui.join("story.mjs"))
        .current_dir(&ui)
        .env("MANAGER_URL", &m.url)
        .env("UI_VOLUME", "uivol")
        .env("UI_SIZE", "64Mi")
        .env("UI_SCREENSHOTS", &shots)
        .env("UI_TARGETS", targets.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node story.mjs");
    let mut to_story = story.stdin.take().expect("stdin");
    let err = story.stderr.take().expect("stderr");
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("story: {l}");
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    let mut cx = Ctx { m: &m, src_data, file_store, nfs_store, s3, paths: HashMap::new(), killed: None };
    let mut steps = Vec::new();
    let mut failed = None;
    for line in BufReader::new(story.stdout.take().expect("stdout")).lines().map_while(Result::ok) {
        println!("story: {line}");
        let Some(rest) = line.strip_prefix("@@ ") else { continue };
        let (step, data) = rest.split_once(' ').unwrap_or((rest, "{}"));
        let d: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        let reply = match handle(&mut cx, step, &d) {
            Ok(mut r) => {
                r["ok"] = json!(true);
                steps.push(step.to_string());
                r
            }
            Err(e) => {
                failed = Some(format!("{step}: {e}"));
                json!({"error": e})
            }
        };
        let _ = writeln!(to_story, "{reply}");
    }
    let st = story.wait().expect("wait story");
    let stderr = errs.join().unwrap_or_default();
    let mlog = || m.log_tail();
    if let Some(f) = failed {
        panic!("step {f}\nstory stderr:\n{stderr}\nmanager log (tail):\n{}", mlog());
    }
    assert!(st.success(), "the UI story failed ({st}):\n{stderr}\nmanager log (tail):\n{}", mlog());
    for want in ["attached", "snapshot", "job", "restored", "deleted", "kill-replica", "resume-rebuild", "healed"] {
        assert!(steps.iter().any(|s| s == want), "the story skipped {want}: {steps:?}");
    }
    assert_eq!(steps.iter().filter(|s| *s == "restored").count(), 3, "a restore per backup target: {steps:?}");
    for s in ["volumes", "volume", "recurring-job-error", "settings", "volume-backup", "backups", "backups-volume", "volume-degraded", "volume-healthy"] {
        assert!(shots.join(format!("{s}.png")).exists(), "no screenshot {s}.png");
    }
    drop(cx);
    drop(m);
    println!("UI story: {:.1} s; screenshots in {}", t0.elapsed().as_secs_f64(), shots.display());
}
