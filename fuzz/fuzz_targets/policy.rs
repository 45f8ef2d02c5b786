#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| socksgate_fuzz::targets::policy_target(data));
