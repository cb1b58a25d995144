//! RESP replies as the Redis probe and Sentinel discovery read them: any
//! bytes get a verdict without a panic, and a reply parsed from a prefix is
//! the reply parsed from the whole, with the same length, since replies are
//! read as bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::resp::{parse, Parsed};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    for end in 0..data.len() {
        match parse(&data[..end]) {
            Parsed::Incomplete => {}
            prefix => {
                assert_eq!(prefix, whole, "decided at {end}");
                return;
            }
        }
    }
});
