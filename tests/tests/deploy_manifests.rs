//! The Kubernetes deployment (deploy/kubernetes) checked offline by
//! tests/deploy/validate.py: every document against the Kubernetes schemas of
//! kubernetes-validate (from PyPI, see tests/run), strict; the snapshot custom
//! resources against tests/deploy/*.schema.json; and the references between the files
//! (accounts, roles, secrets, classes, the CSI socket paths, the StorageClass
//! parameters the driver accepts). Broken copies, made here, prove that each kind of
//! check rejects what it is meant to, naming the file, the document and the problem.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> PathBuf {
    repo().join("deploy").join("kubernetes")
}

/// The validator needs kubernetes-validate (which brings jsonschema, referencing and
/// PyYAML). Missing, the test fails: a skipped check would pass broken manifests.
fn require_validator() {
    let o = Command::new("python3")
        .args(["-c", "import kubernetes_validate, jsonschema, referencing, yaml"])
        .output()
        .expect("running python3");
    assert!(
        o.status.success(),
        "kubernetes-validate is not importable by python3 (tests/run installs it from PyPI: \
         python3 -m pip install kubernetes-validate): {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

fn validate(dir: &Path) -> Output {
    Command::new("python3")
        .arg(repo().join("tests").join("deploy").join("validate.py"))
        .arg(dir)
        .output()
        .expect("running tests/deploy/validate.py")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the copy's directory");
    for e in std::fs::read_dir(from).expect("reading deploy/kubernetes") {
        let e = e.expect("reading deploy/kubernetes");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copying a manifest");
        }
    }
}

#[test]
fn deploy_manifests_are_valid() {
    require_validator();
    let o = validate(&manifests());
    let out = text(&o);
    assert!(o.status.success(), "deploy/kubernetes does not validate:\n{out}");
    assert!(!out.contains("FAIL"), "{out}");
    // Each object the deployment depends on was checked, by the schema meant for it.
    for (line, by) in [
        ("csidriver.yaml#1 CSIDriver/driver.longhorn.io", "(strict)"),
        ("storageclass.yaml#1 StorageClass/longhorn", "(strict)"),
        ("storageclass.yaml#2 StorageClass/longhorn-with-jobs", "(strict)"),
        ("node.yaml#1 DaemonSet/longhorn-node", "(strict)"),
        ("controller.yaml#1 Deployment/longhorn-csi-controller", "(strict)"),
        ("secret.yaml#1 Secret/longhorn-manager-token", "(strict)"),
        ("rbac.yaml#1 Namespace/longhorn-system", "(strict)"),
        ("volumesnapshotclass.yaml#1 VolumeSnapshotClass/longhorn-snapshot", "volumesnapshotclass.schema.json"),
        ("volumesnapshotclass.yaml#2 VolumeSnapshotClass/longhorn-backup", "volumesnapshotclass.schema.json"),
        ("VolumeSnapshot/longhorn-example-snap", "volumesnapshot.schema.json"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("ok ") && l.contains(line) && l.ends_with(by)),
            "no `ok` line for {line} checked by {by}:\n{out}"
        );
    }
    assert!(out.contains("ok   cross-references of"), "{out}");
}

/// One broken copy: in FILE, NEEDLE (which must occur exactly once) becomes
/// REPLACEMENT, and the validator must fail naming WHERE (file#document kind/name) and
/// saying WHAT.
struct Breakage {
    file: &'static str,
    needle: &'static str,
    replacement: &'static str,
    r#where: &'static str,
    what: &'static str,
}

const BREAKAGES: &[Breakage] = &[
    // The managers' CA is a key of the Secret make-tls.sh makes (declared there).
    Breakage {
        file: "controller.yaml",
        needle: "              - key: ca.crt\n",
        replacement: "              - key: ca.pem\n",
        r#where: "controller.yaml#1 Deployment/longhorn-csi-controller",
        what: "Secret longhorn-manager-tls has no key 'ca.pem'",
    },
    // A misspelt field: the API server would drop it and the setting would be lost.
    Breakage {
        file: "node.yaml",
        needle: "        - name: csi-plugin\n          image: longhorn-rs/longhorn:0.1.0\n",
        replacement: "        - name: csi-plugin\n          image: longhorn-rs/longhorn:0.1.0\n          imagePullPolice: Always\n",
        r#where: "node.yaml#1 DaemonSet/longhorn-node",
        what: "'imagePullPolice' was unexpected",
    },
    Breakage {
        file: "rbac.yaml",
        needle: "  kind: ClusterRole\n  name: longhorn-csi-attacher\n  apiGroup",
        replacement: "  kind: ClusterRole\n  name: longhorn-csi-attach\n  apiGroup",
        r#where: "ClusterRoleBinding/longhorn-csi-attacher",
        what: "roleRef names ClusterRole 'longhorn-csi-attach', which none of these manifests defines",
    },
    Breakage {
        file: "storageclass.yaml",
        needle: r#""cron":"*/2 * * * *""#,
        replacement: r#""cron":"*/2 * * *""#,
        r#where: "storageclass.yaml#2 StorageClass/longhorn-with-jobs",
        what: "cron '*/2 * * *' has 4 fields, not 5",
    },
    Breakage {
        file: "storageclass.yaml",
        needle: r#""retain":1},{"name":"backup""#,
        replacement: r#""retain":0},{"name":"backup""#,
        r#where: "storageclass.yaml#2 StorageClass/longhorn-with-jobs",
        what: "retain must be a whole number from 1 to 250, not 0",
    },
    Breakage {
        file: "storageclass.yaml",
        needle: r#"{"name":"snap","#,
        replacement: r#"{"name":"snapshots","#,
        r#where: "storageclass.yaml#2 StorageClass/longhorn-with-jobs",
        what: "name must be 1 to 8 characters",
    },
    Breakage {
        file: "storageclass.yaml",
        needle: "  staleReplicaTimeout: \"2880\"\n  fromBackup: \"\"\n  # Also",
        replacement: "  staleReplicaTimeout: \"2880\"\n  fromBackup: \"\"\n  diskSelector: ssd\n  # Also",
        r#where: "storageclass.yaml#1 StorageClass/longhorn",
        what: "parameter 'diskSelector' is not one driver.longhorn.io accepts",
    },
    Breakage {
        file: "volumesnapshotclass.yaml",
        needle: "  name: longhorn-backup\ndriver: driver.longhorn.io\n",
        replacement: "  name: longhorn-backup\ndriver: longhorn.io\n",
        r#where: "volumesnapshotclass.yaml#2 VolumeSnapshotClass/longhorn-backup",
        what: "driver 'longhorn.io' is not the CSIDriver of these manifests",
    },
    Breakage {
        file: "volumesnapshotclass.yaml",
        needle: "deletionPolicy: Delete\nparameters:\n  type: snap",
        replacement: "deletionPolicy: Keep\nparameters:\n  type: snap",
        r#where: "volumesnapshotclass.yaml#1 VolumeSnapshotClass/longhorn-snapshot",
        what: "deletionPolicy: 'Keep' is not one of ['Delete', 'Retain']",
    },
    Breakage {
        file: "example-pvc.yaml",
        needle: "    persistentVolumeClaimName: longhorn-example\n",
        replacement: "    persistentVolumeClaimName: longhorn-example\n    volumeSnapshotContentName: pre-made\n",
        r#where: "example-pvc.yaml#3 VolumeSnapshot/longhorn-example-snap",
        what: "spec.source: needs exactly one of persistentVolumeClaimName, volumeSnapshotContentName",
    },
    Breakage {
        file: "node.yaml",
        needle: "--kubelet-registration-path=/var/lib/kubelet/plugins/driver.longhorn.io/csi.sock",
        replacement: "--kubelet-registration-path=/var/lib/kubelet/plugins/longhorn/csi.sock",
        r#where: "node.yaml#1 DaemonSet/longhorn-node",
        what: "--kubelet-registration-path=/var/lib/kubelet/plugins/longhorn/csi.sock is not where the socket is on the host",
    },
    Breakage {
        file: "controller.yaml",
        needle: "            - name: token\n              mountPath: /etc/longhorn\n",
        replacement: "            - name: manager-token\n              mountPath: /etc/longhorn\n",
        r#where: "controller.yaml#1 Deployment/longhorn-csi-controller",
        what: "volumeMount 'manager-token' names no volume of the pod",
    },
    Breakage {
        file: "node.yaml",
        needle: "--node-id=$(NODE_NAME)",
        replacement: "--node-id=$(NODE)",
        r#where: "node.yaml#1 DaemonSet/longhorn-node",
        what: "uses $(NODE), which is not in its env",
    },
];

#[test]
fn broken_copies_are_rejected() {
    require_validator();
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut missed = Vec::new();
    for (i, b) in BREAKAGES.iter().enumerate() {
        let dir = tmp.path().join(format!("broken-{i}"));
        copy_dir(&manifests(), &dir);
        let path = dir.join(b.file);
        let s = std::fs::read_to_string(&path).expect("reading a copied manifest");
        assert_eq!(
            s.matches(b.needle).count(),
            1,
            "breakage {i}: {:?} must occur exactly once in deploy/kubernetes/{}; the manifest changed, update this test",
            b.needle,
            b.file
        );
        std::fs::write(&path, s.replacen(b.needle, b.replacement, 1)).expect("writing the broken copy");
        let o = validate(&dir);
        let out = text(&o);
        let named = out.lines().any(|l| l.starts_with("FAIL ") && l.contains(b.r#where) && l.contains(b.what));
        if o.status.code() != Some(1) || !named {
            missed.push(format!(
                "breakage {i} ({}: {:?} -> {:?}): wanted exit 1 and a FAIL line naming {:?} with {:?}; got {:?}:\n{out}",
                b.file, b.needle, b.replacement, b.r#where, b.what, o.status.code()
            ));
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}

/// Without kubernetes-validate the validator must stop with an error, never pass.
#[test]
fn validator_without_kubernetes_validate_fails() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let fake = tmp.path().join("kubernetes_validate");
    std::fs::create_dir_all(&fake).expect("creating the stand-in package");
    std::fs::write(
        fake.join("__init__.py"),
        "raise ImportError(\"No module named 'kubernetes_validate'\", name='kubernetes_validate')\n",
    )
    .expect("writing the stand-in package");
    let o = Command::new("python3")
        .arg(repo().join("tests").join("deploy").join("validate.py"))
        .arg(manifests())
        .env("PYTHONPATH", tmp.path())
        .output()
        .expect("running tests/deploy/validate.py");
    let out = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains("cannot import kubernetes_validate") && out.contains("tests/run"), "{out}");
}

/// deploy/kubernetes/make-tls.sh: a CA and per-node certificates that openssl verifies,
/// for the node's address and 127.0.0.1, which a real manager serves and curl trusts
/// through the CA; a second run adding a node keeps the CA; bad arguments are refused.
#[test]
fn make_tls_makes_certificates_a_manager_serves() {
    use longhorn_tests::{sh, sh_try, spawn};
    let t = tempfile::Builder::new().prefix("lh-make-tls-").tempdir_in(longhorn_tests::test_root()).expect("tempdir");
    let out = t.path().join("tls");
    let script = manifests().join("make-tls.sh");
    let run = |args: &[&str]| Command::new(&script).arg(&out).args(args).output().expect("running make-tls.sh");
    let o = run(&["node-a=127.0.0.3"]);
    assert!(o.status.success(), "{}", text(&o));
    let printed = text(&o);
    assert!(printed.contains("create secret generic longhorn-manager-tls") && printed.contains("node-a.key"), "{printed}");
    let ca = std::fs::read(out.join("ca.crt")).expect("ca.crt");
    let d = out.display();
    sh(&format!("openssl verify -CAfile '{d}/ca.crt' '{d}/node-a.crt'"));
    let san = sh(&format!("openssl x509 -in '{d}/node-a.crt' -noout -ext subjectAltName"));
    assert!(san.contains("IP Address:127.0.0.3") && san.contains("IP Address:127.0.0.1"), "{san}");

    let o = run(&["node-b=127.0.0.4"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(out.join("ca.crt")).expect("ca.crt"), ca, "a second run made another CA");
    sh(&format!("openssl verify -CAfile '{d}/ca.crt' '{d}/node-b.crt'"));
    for bad in ["node-c", "Node_C=127.0.0.5", "node-c=not-an-ip"] {
        let o = run(&[bad]);
        assert_eq!(o.status.code(), Some(2), "{bad} was taken: {}", text(&o));
    }

    // The manager of node-a with its certificate, as node.yaml starts it.
    let port = longhorn_tests::manager::free_port();
    let listen = format!("127.0.0.3:{port}");
    let tok = t.path().join("token");
    std::fs::write(&tok, "s3cr3t-t0ken-of-some-length\n").expect("token");
    let (data, rundir) = (t.path().join("data"), t.path().join("run"));
    let cert = format!("{d}/node-a.crt");
    let key = format!("{d}/node-a.key");
    let args = [
        "manager", "serve", "--listen", &listen, "--token-file", tok.to_str().expect("utf8"), "--data-dir", data.to_str().expect("utf8"),
        "--run-dir", rundir.to_str().expect("utf8"), "--tls-cert", &cert, "--tls-key", &key,
    ];
    let (_m, url) = spawn(&args, &t.path().join("manager.log"), "listening").expect("the manager starts with make-tls.sh's certificate");
    let (ok, code) = sh_try(&format!("curl -s -m 5 -o /dev/null -w '%{{http_code}}' --cacert '{d}/ca.crt' '{}/healthz'", url.trim()));
    assert!(ok && code.trim() == "200", "curl through the CA: {code}");
}
