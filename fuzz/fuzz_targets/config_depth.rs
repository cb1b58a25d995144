//! The depth walk that guards the YAML parser, against the parser itself:
//! whatever text the walk lets through, libyaml must not find nested deeper
//! than the limit. A text the walk undercounts would bring back the parser's
//! quadratic time on deep nesting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_yaml::Value;
use sluice::config::{check_depth, MAX_DEPTH};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Aliases nest a value without nesting the text (and cost the scanner
    // nothing): not what the walk counts.
    if text.contains('*') || check_depth(text).is_err() {
        return;
    }
    match serde_yaml::from_str::<Value>(text) {
        Ok(value) => assert!(depth(&value) <= MAX_DEPTH, "{}", depth(&value)),
        Err(e) => assert!(!e.to_string().contains("recursion limit"), "{e}"),
    }
});

fn depth(value: &Value) -> usize {
    match value {
        Value::Sequence(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Mapping(map) => {
            1 + map
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        Value::Tagged(tagged) => depth(&tagged.value),
        _ => 0,
    }
}
