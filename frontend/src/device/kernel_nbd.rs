//! `--frontend nbd`: placeholder until the kernel NBD client lands.
use super::{DeviceConfig, DeviceError, Result};
use std::path::PathBuf;

pub fn probe() -> std::result::Result<(), String> {
    Err("not built yet".into())
}

pub struct NbdDevice;

impl NbdDevice {
    pub fn attach(cfg: &DeviceConfig) -> Result<NbdDevice> {
        Err(DeviceError::Unsupported(format!("volume {}: kernel NBD is not available in this build", cfg.volume)))
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::new()
    }
    pub fn detach(self) -> Result<()> {
        Ok(())
    }
}
