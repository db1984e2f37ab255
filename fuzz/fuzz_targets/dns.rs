#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tungate_fuzz::run("dns", data));
