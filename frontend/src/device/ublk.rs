//! `--frontend ublk`: placeholder until the ublk client lands.
use super::{DeviceConfig, DeviceError, Result};
use std::path::PathBuf;

pub fn probe() -> std::result::Result<(), String> {
    Err("not built yet".into())
}

pub struct UblkDevice;

impl UblkDevice {
    pub fn attach(cfg: &DeviceConfig) -> Result<UblkDevice> {
        Err(DeviceError::Unsupported(format!("volume {}: ublk is not available in this build", cfg.volume)))
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::new()
    }
    pub fn detach(self) -> Result<()> {
        Ok(())
    }
}
