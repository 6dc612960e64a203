//! The engine: serves one volume from a set of replicas.
//!
//! Data path: a frontend calls [`api::Session`] -> [`session`] fans requests out over
//! [`replica_conn`] connections -> replicas. Control (status, close) lives in
//! [`volume`] and [`control`], beside the I/O path.
pub mod api;
pub mod backup;
pub mod control;
pub mod jobs;
pub mod rebuild;
pub mod recover;
pub mod replica_conn;
mod replies;
pub mod session;
pub mod slots;
pub mod snapshot;
pub mod volume;

pub use api::{BlockBackend, Completer, Extent, IoOp, IoResult, Session};
pub use volume::{Embedded, Mode, Volume, VolumeHandle, VolumeOptions, VolumeStats};
