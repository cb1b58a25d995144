//! The admin endpoint's request reader: any request head gets an answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::admin::Request;

fuzz_target!(|data: &[u8]| {
    let request = Request::parse(data);
    if data.starts_with(b"GET /metrics ") {
        assert_eq!(request, Request::Metrics);
    }
});
