//! What the admin endpoint reads from a client beyond hyper's parsing: any
//! path names a resource or none, and any body is a state change or a
//! clear refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::admin::api::{Resource, StateChange};

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        let resource = Resource::parse(path);
        if path == "/metrics" {
            assert_eq!(resource, Resource::Metrics);
        }
    }
    let _ = StateChange::parse(data);
});
