//! A real `longhorn csi` on a unix socket, and gRPC clients of it that talk to the
//! socket the way kubelet and the CSI sidecars do (tonic over a `UnixStream`).

use crate::{spawn, Proc};
pub use longhorn_csi::csi;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

pub struct Driver {
    pub proc: Proc,
    pub sock: PathBuf,
    pub rt: tokio::runtime::Runtime,
    ch: Channel,
}

impl Driver {
    /// Starts `longhorn csi` serving on `dir/csi.sock` as node `node_id`, driving the
    /// given (host, manager URL) pairs; `extra` are more arguments (`--mode node`).
    pub fn start(dir: &Path, node_id: &str, managers: &[(&str, &str)], extra: &[&str]) -> Driver {
        Driver::start_in(dir, None, node_id, node_id, managers, extra)
    }

    /// As [`Driver::start`], on a host of `net` when given (its network namespace);
    /// `name` names its socket and log in `dir`.
    pub fn start_in(
        dir: &Path,
        net: Option<(&crate::netns::Net, &str)>,
        name: &str,
        node_id: &str,
        managers: &[(&str, &str)],
        extra: &[&str],
    ) -> Driver {
        let sock = dir.join(format!("csi-{name}.sock"));
        let endpoint = format!("unix://{}", sock.display());
        let mut args: Vec<String> = vec!["csi".into(), "--endpoint".into(), endpoint, "--node-id".into(), node_id.into()];
        for (h, u) in managers {
            args.push("--manager".into());
            args.push(format!("{h}={u}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = dir.join(format!("csi-{name}.log"));
        let (proc, _) = match net {
            Some((net, host)) => crate::netns::spawn_on(net, host, &argv, &log, "listening"),
            None => spawn(&argv, &log, "listening"),
        }
        .expect("the CSI driver starts");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let path = sock.clone();
        let ch = rt
            .block_on(
                // The URI is a placeholder tonic needs; the connector goes to the socket.
                tonic::transport::Endpoint::from_static("http://[::]:50051").connect_with_connector(tower::service_fn(
                    move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(path.clone()),
                )),
            )
            .expect("connecting to the CSI socket");
        Driver { proc, sock, rt, ch }
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.ch.clone())
    }
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.ch.clone())
    }
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.ch.clone())
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// The answer of a call that must succeed.
pub fn ok<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> T {
    match r {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("{what}: {:?} {}", s.code(), s.message()),
    }
}

/// The status of a call that must fail with `code`; its message.
pub fn fails<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>, code: tonic::Code) -> String {
    match r {
        Ok(r) => panic!("{what}: succeeded, want {code:?}: {:?}", r.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(!s.message().is_empty(), "{what}: no message");
            s.message().to_string()
        }
    }
}

/// A mount capability (ext4 unless `fs` says otherwise) with `mode`.
pub fn mount_cap(mode: csi::volume_capability::access_mode::Mode, fs: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })),
    }
}

pub fn block_cap(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume};
    csi::VolumeCapability { access_mode: Some(AccessMode { mode: mode as i32 }), access_type: Some(AccessType::Block(BlockVolume {})) }
}
