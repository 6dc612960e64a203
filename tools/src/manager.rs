//! `longhorn manager serve`: the host's volume manager (the `longhorn-manager` crate);
//! `longhorn manager volume|snapshot|backup|job|setting ...`: the operator CLI over its
//! API (api_cli.rs).

use crate::api_cli::{ApiCmd, Conn};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct ManagerArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: ManagerCmd,
}

#[derive(Subcommand)]
pub enum ManagerCmd {
    /// Serve the REST API (/v1), the web UI (/), events and /metrics, and own the
    /// volumes of this host. Prints `listening http://ADDR` (https with --tls-cert)
    /// once serving.
    Serve(ServeArgs),
    #[command(flatten)]
    Api(ApiCmd),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but 127.0.0.1 or [::1] needs --token-file.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub listen: std::net::SocketAddr,
    /// Where replica directories live: DATA_DIR/VOLUME/replica-N.
    #[arg(long, default_value = "/var/lib/longhorn")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = crate::DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
    pub run_dir: PathBuf,
    /// The manager's own state (one JSON per volume, secrets, logs). Default DATA_DIR/manager.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A file whose first line is the API token (Authorization: Bearer TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The address of this host that replicas serving other hosts' engines listen on
    /// (the host's own address on the network between hosts). Default: the --listen
    /// address, or 127.0.0.1 when that is a wildcard.
    #[arg(long)]
    pub replica_address: Option<std::net::IpAddr>,
    /// Serve HTTPS with this certificate chain (PEM, the host's certificate first; its
    /// names must include the address clients use). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

pub fn run(a: ManagerArgs) -> Result<()> {
    match a.cmd {
        ManagerCmd::Api(c) => crate::api_cli::run(&a.conn, c),
        ManagerCmd::Serve(a) => {
            let token = match &a.token_file {
                Some(p) => Some(longhorn_manager::read_token(p)?),
                None => None,
            };
            let data_dir = std::path::absolute(&a.data_dir).context("--data-dir")?;
            let run_dir = std::path::absolute(&a.run_dir).context("--run-dir")?;
            let state_dir = match a.state_dir {
                Some(s) => std::path::absolute(&s).context("--state-dir")?,
                None => data_dir.join("manager"),
            };
            let replica_ip = a.replica_address.unwrap_or(if a.listen.ip().is_unspecified() { [127, 0, 0, 1].into() } else { a.listen.ip() });
            let tls = a.tls_cert.zip(a.tls_key);
            longhorn_manager::serve(longhorn_manager::Config { listen: a.listen, data_dir, run_dir, state_dir, token, replica_ip, tls })
        }
    }
}
