#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| longhorn_fuzz_checks::backup_volume_cfg(data));
