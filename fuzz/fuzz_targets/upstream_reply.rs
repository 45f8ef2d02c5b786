#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| socksgate_fuzz::targets::upstream_reply_target(data));
