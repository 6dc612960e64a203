//! Replicas on the engine's host reached over unix sockets (`replica serve --listen
//! unix:PATH`). Everything a volume does over them is the same code as over TCP, and
//! `rebuild.rs` runs its rebuild story over them too (a rebuild under fio verify, an
//! incremental return on the same socket path). Here: nobody but root can connect, as
//! the README promises.

use longhorn_tests::*;

#[test]
fn only_root_can_reach_a_replica_socket() {
    assert!(have("setpriv") && std::path::Path::new("/usr/bin/python3").exists(), "setpriv and /usr/bin/python3 are needed");
    let c = Cluster::new_unix("vol1", 16 * MB, 1);
    let path = c.replicas[0].addr.trim_start_matches("unix:").to_string();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).expect("socket").permissions());
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // The directories on the way must let `nobody` reach the socket itself, or the
    // refusal below would prove nothing about the socket's own mode.
    sh(&format!("chmod o+x '{}'", c.tmp.path().display()));
    let (walk, out) = sh_try(&format!("setpriv --reuid=65534 --regid=65534 --clear-groups test -e '{path}'"));
    assert!(walk, "user nobody cannot reach {path} through its directories: {out}");
    let probe = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c \
         \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{path}')\" 2>&1"
    );
    let (ok, out) = sh_try(&probe);
    assert!(!ok && out.contains("PermissionError"), "an unprivileged user connected (or failed otherwise):\n{out}");
}
