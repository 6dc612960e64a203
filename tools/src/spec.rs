//! Volume specs: the one implementation lives in `longhorn_manager::spec`, shared by
//! `longhorn up --spec` and the manager's `POST /v1/volumes`.

pub use longhorn_manager::spec::*;
