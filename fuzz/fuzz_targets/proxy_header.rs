//! The PROXY protocol reader (v1 and v2): any bytes get a verdict; a header
//! found is within the bytes, and reads the same on its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proxy_protocol::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((length, carried))) = parse_header(data) {
        assert!(length <= data.len());
        let alone = parse_header(&data[..length]).expect("the header alone parses");
        assert_eq!(alone, Some((length, carried)));
    }
});
