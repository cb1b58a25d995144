//! The configuration loader and validator: any text gets a verdict, and an
//! error points inside the file (or just past its end). Host names resolve offline: fuzzing sends
//! no packet anywhere.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice::config::{self, Resolver};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = config::parse(Path::new("f.yaml"), text, Resolver::Offline) {
        let message = error.to_string();
        // `f.yaml:LINE:COLUMN: ...`: the line is one of the file's.
        if let Some(line) = message
            .strip_prefix("f.yaml:")
            .and_then(|rest| rest.split(':').next()?.parse::<usize>().ok())
        {
            // YAML ends a line at CRLF, CR or LF; the end of the stream
            // may be reported on the line after the last.
            let lines = text.replace("\r\n", "\n").matches(['\r', '\n']).count() + 1;
            assert!(line >= 1 && line <= lines + 1, "{message}");
        }
    }
});
