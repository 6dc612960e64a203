//! The replica: a volume stored as a chain of sparse files in Longhorn's on-disk
//! layout (`meta`, `store`), and the replica side of the data protocol (`proto`,
//! `server`).
pub mod auth;
pub mod expand;
pub mod export;
pub mod extent;
pub mod fault;
pub mod meta;
pub mod names;
pub mod net;
pub mod proto;
pub mod rebuild;
pub mod server;
pub mod shm;
pub mod snapshot;
pub mod store;
mod uring;

pub use server::ReplicaServer;
pub use store::{Store, StoreError};
