//! Frontends of a Longhorn volume. Today: an NBD server (unix socket and TCP) that
//! serves a [`longhorn_engine::api::BlockBackend`].
//!
//! ```no_run
//! # fn demo(backend: std::sync::Arc<dyn longhorn_engine::api::BlockBackend>) -> std::io::Result<()> {
//! let server = longhorn_frontend::NbdServer::bind("unix:/run/longhorn/vol1.sock", backend)?;
//! println!("connect with {}", server.uri());
//! let handle = server.spawn()?;
//! // ... later
//! handle.shutdown();
//! # Ok(()) }
//! ```
pub mod nbd;

pub use nbd::server::{NbdServer, NbdServerHandle};
pub mod device;
