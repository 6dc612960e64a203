//! A real `longhorn manager serve` on a free loopback port, and HTTP calls to it with
//! curl (a client no one here wrote). Dropping it deletes every volume it owns (their
//! processes outlive the manager by design) and then stops it.

use crate::{spawn, Proc};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub struct Manager {
    pub proc: Proc,
    pub url: String,
    pub listen: String,
    pub data: PathBuf,
    pub run: PathBuf,
    pub log: PathBuf,
    /// Whether Drop deletes the volumes (a test that hands them to a second manager
    /// turns it off on the first).
    pub cleanup: bool,
    /// The network namespace of the manager's host (its API is reached from there).
    pub netns: Option<String>,
    pub token: Option<String>,
    /// The CA (PEM) curl checks the manager's HTTPS certificate against.
    pub ca: Option<PathBuf>,
}

/// Certificates for managers' HTTPS, made with openssl (a tool no one here wrote): a
/// CA, and one server certificate for every address in `ips` signed by it.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes [`Certs`] in `dir` (created) with `name` as the CA's common name.
pub fn make_certs(dir: &Path, name: &str, ips: &[String]) -> Certs {
    std::fs::create_dir_all(dir).expect("mkdir");
    let d = dir.display();
    let sans: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n", sans.join(",")),
    )
    .expect("ext.cnf");
    crate::sh(&format!(
        "cd '{d}' && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 \
           -subj '/CN={name}' -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>&1 \
         && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out req.csr -subj '/CN=longhorn manager' 2>&1 \
         && openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile ext.cnf 2>&1"
    ));
    Certs { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }
}

impl Manager {
    /// Starts a manager with its data under `dir/data` and sockets under `dir/run`.
    pub fn start(dir: &Path) -> Manager {
        Manager::start_on(dir, &format!("127.0.0.1:{}", free_port()), "manager.log")
    }

    /// As [`Manager::start`] on a given address, logging to `dir/LOG_NAME`: a second
    /// manager on the same directories finds the first one's volumes.
    pub fn start_on(dir: &Path, listen: &str, log_name: &str) -> Manager {
        let data = dir.join("data");
        let run = dir.join("run");
        let log = dir.join(log_name);
        let (proc, url) = spawn(
            &["manager", "serve", "--listen", listen, "--data-dir", data.to_str().expect("utf8"), "--run-dir", run.to_str().expect("utf8")],
            &log,
            "listening",
        )
        .expect("the manager starts");
        Manager { proc, url: url.trim_end_matches('/').to_string(), listen: listen.to_string(), data, run, log, cleanup: true, netns: None, token: None, ca: None }
    }

    /// A manager on `host` of `net`, listening on the host's address (port 9500) with
    /// the API token in `token_file`, its replicas for other hosts on that address too.
    /// With `certs`, it serves HTTPS with them.
    pub fn start_on_host(dir: &Path, net: &crate::netns::Net, host: &str, token_file: &Path, certs: Option<&Certs>) -> Manager {
        let data = dir.join("data");
        let run = dir.join("run");
        let log = dir.join("manager.log");
        let listen = format!("{}:9500", net.addr(host));
        let mut args: Vec<String> = [
            "manager", "serve", "--listen", &listen, "--data-dir", data.to_str().expect("utf8"), "--run-dir", run.to_str().expect("utf8"),
            "--token-file", token_file.to_str().expect("utf8"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(c) = certs {
            args.extend(["--tls-cert".to_string(), c.cert.display().to_string(), "--tls-key".to_string(), c.key.display().to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (proc, url) = crate::netns::spawn_on(net, host, &argv, &log, "listening").expect("the manager starts on its host");
        let token = std::fs::read_to_string(token_file).expect("the token").trim().to_string();
        let ca = certs.map(|c| c.ca.clone());
        Manager { proc, url: url.trim_end_matches('/').to_string(), listen, data, run, log, cleanup: true, netns: Some(net.ns(host)), token: Some(token), ca }
    }

    /// One request; (HTTP status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (st, text) = self.call_raw(method, path, body.map(|b| b.to_string()).as_deref(), &[]);
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// One request with a raw body and extra curl arguments (headers); (status, body text).
    pub fn call_raw(&self, method: &str, path: &str, body: Option<&str>, extra: &[&str]) -> (u16, String) {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).args(["--", "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        c.args(["-s", "-m", "180", "-o", "-", "-w", "\n%{http_code}", "-X", method]).args(extra).arg(format!("{}{path}", self.url));
        if let Some(ca) = &self.ca {
            c.arg("--cacert").arg(ca);
        }
        if let Some(t) = &self.token {
            c.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let o = c.output().expect("curl");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let (text, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), text.to_string())
    }

    pub fn get(&self, path: &str) -> Value {
        let (st, v) = self.call("GET", path, None);
        assert_eq!(st, 200, "GET {path}: {v}");
        v
    }

    /// POST that must succeed (200 or 201); its body.
    pub fn post(&self, path: &str, body: &Value) -> Value {
        let (st, v) = self.call("POST", path, Some(body));
        assert!(st == 200 || st == 201, "POST {path} {body}: {st} {v}");
        v
    }

    pub fn volume(&self, name: &str) -> Value {
        self.get(&format!("/v1/volumes/{name}"))
    }

    /// The volume's NBD export (nbd+unix URI).
    pub fn nbd(&self, name: &str) -> String {
        let v = self.volume(name);
        let e = v["nbdEndpoint"].as_str().unwrap_or_default().to_string();
        assert!(e.starts_with("nbd"), "{name} has no nbdEndpoint: {v}");
        e
    }

    pub fn data_paths(&self, name: &str) -> Vec<PathBuf> {
        let v = self.volume(name);
        let rs: Vec<PathBuf> = v["replicas"].as_array().into_iter().flatten().filter_map(|r| r["dataPath"].as_str()).map(PathBuf::from).collect();
        assert!(!rs.is_empty(), "{name} lists no replicas: {v}");
        rs
    }

    /// Polls the volume until `ok` holds of its JSON, up to `secs`; the last JSON.
    pub fn wait_volume(&self, name: &str, secs: u64, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let t = std::time::Instant::now();
        loop {
            let (st, v) = self.call("GET", &format!("/v1/volumes/{name}"), None);
            if st == 200 && ok(&v) {
                return v;
            }
            assert!(t.elapsed().as_secs() < secs, "volume {name}: not {what} within {secs} s: {st} {v}\nmanager log:\n{}", self.log_tail());
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.cleanup {
            if let (200, v) = self.call("GET", "/v1/volumes", None) {
                for n in v["data"].as_array().into_iter().flatten().filter_map(|x| x["name"].as_str()) {
                    let _ = self.call("DELETE", &format!("/v1/volumes/{n}"), None);
                }
            }
            // Replicas kept for other hosts' engines outlive the manager too.
            if let (200, v) = self.call("GET", "/v1/replicas", None) {
                for r in v["data"].as_array().into_iter().flatten() {
                    if let (Some(vol), Some(n)) = (r["volume"].as_str(), r["name"].as_str()) {
                        let _ = self.call("DELETE", &format!("/v1/replicas/{vol}/{n}"), None);
                    }
                }
            }
        }
        self.proc.term();
    }
}

/// A manager on each of `hosts` of `net` (in `base/host-H`), all with one token, which
/// is written to `base/token`; (the token file, the managers in the order of `hosts`).
pub fn start_hosts(base: &Path, net: &crate::netns::Net, hosts: &[&str]) -> (PathBuf, Vec<Manager>) {
    start_hosts_with(base, net, hosts, None)
}

/// As [`start_hosts`], the managers serving HTTPS with a certificate for every host's
/// address signed by one CA (`base/tls/ca.pem`, also in each Manager's `ca`).
pub fn start_hosts_tls(base: &Path, net: &crate::netns::Net, hosts: &[&str]) -> (PathBuf, Vec<Manager>) {
    let ips: Vec<String> = hosts.iter().map(|h| net.addr(h)).collect();
    let certs = make_certs(&base.join("tls"), "longhorn test CA", &ips);
    start_hosts_with(base, net, hosts, Some(&certs))
}

fn start_hosts_with(base: &Path, net: &crate::netns::Net, hosts: &[&str], certs: Option<&Certs>) -> (PathBuf, Vec<Manager>) {
    let token = base.join("token");
    crate::sh(&format!("head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n' > '{0}' && chmod 600 '{0}'", token.display()));
    let mans = hosts
        .iter()
        .map(|h| {
            let d = base.join(format!("host-{h}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            Manager::start_on_host(&d, net, h, &token, certs)
        })
        .collect();
    (token, mans)
}
