//! NBD server: protocol constants ([`proto`]), listener and connection life cycle
//! ([`server`]), negotiation and the transmission phase (private modules). Sockets are
//! the replicas' `longhorn_replica::net::Stream`: one stream type over TCP and unix.
mod handshake;
pub mod proto;
pub mod server;
mod transmission;
