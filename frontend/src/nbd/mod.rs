//! NBD server: protocol constants ([`proto`]), listener and connection life cycle
//! ([`server`]), negotiation and the transmission phase (private modules).
mod handshake;
mod net;
pub mod proto;
pub mod server;
mod transmission;
