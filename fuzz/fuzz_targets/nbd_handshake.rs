#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| longhorn_fuzz_checks::nbd_handshake(data));
