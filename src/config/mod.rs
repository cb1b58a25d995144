//! Loading the configuration file: bound, parse (serde), validate, resolve
//! host names.
//!
//! This module owns the rule that a configuration is either entirely valid or
//! rejected with one message of the form
//! `FILE:LINE:COLUMN: FIELD.PATH: what is wrong`, so that `--check`, start-up
//! and reloads all report mistakes the same way. The types of the file are
//! in [`schema`]; the checks that look across the file are in `validate`;
//! the limits on what the parser is given at all are in `bounds`.

mod bounds;
mod locate;
pub mod schema;
mod validate;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use bounds::{check_depth, MAX_DEPTH, MAX_FILE_BYTES};
pub use schema::{
    Balance, Config, Endpoint, Engine, HashKey, HealthProbe, Io, LogFormat, LogLevel, Pool, Workers,
};
pub use validate::{read_password, resolve, Resolver};

/// Where `sluice` looks for its configuration when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/sluice/sluice.yaml";

/// A configuration that cannot be used, with enough context to find the
/// mistake: the file, the position in it when known, and the field.
#[derive(Debug)]
pub struct ConfigError {
    file: PathBuf,
    /// 1-based line and column.
    position: Option<(usize, usize)>,
    /// Dotted path of the offending field, e.g. `pools.redis.backends[1].address`.
    field: Option<String>,
    message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A mistake found by validation, before it is given a file position.
#[derive(Debug)]
pub(crate) struct Problem {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads, parses, validates and resolves the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &read(path)?, Resolver::Dns)
}

/// The text of the configuration file at `path`, read within
/// [`MAX_FILE_BYTES`].
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let error = |message: String| ConfigError {
        file: path.to_owned(),
        position: None,
        field: None,
        message,
    };
    // One byte more than the limit tells a file at the limit from a larger
    // one, without reading a huge file (or an endless one) whole. The size
    // is judged before the text is decoded: the limit may cut a character.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| error(format!("cannot read the configuration: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(error(format!(
            "the file is larger than the limit of {} KiB",
            MAX_FILE_BYTES / 1024
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        error(format!(
            "cannot read the configuration: it is not UTF-8 text ({e})"
        ))
    })
}

/// Parses and validates `text` as if read from `path` (used in messages),
/// resolving host names with `resolver`.
pub fn parse(path: &Path, text: &str, resolver: Resolver) -> Result<Config, ConfigError> {
    let error = |position, message: String| ConfigError {
        file: path.to_owned(),
        position,
        field: None,
        message,
    };
    if text.trim().is_empty() {
        return Err(error(
            None,
            "the file is empty: it needs at least `listeners` and `pools`".into(),
        ));
    }
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(error(
            None,
            format!(
                "the file is larger than the limit of {} KiB",
                MAX_FILE_BYTES / 1024
            ),
        ));
    }
    bounds::check_depth(text).map_err(|position| {
        error(
            Some(position),
            format!("mappings and lists nest deeper than the limit of {MAX_DEPTH} levels"),
        )
    })?;
    let mut config: Config = serde_yaml::from_str(text).map_err(|e| from_yaml_error(path, e))?;
    validate::validate(&mut config, resolver).map_err(|problem| ConfigError {
        file: path.to_owned(),
        position: locate::position(text, &problem.field),
        field: Some(problem.field),
        message: problem.message,
    })?;
    Ok(config)
}

/// serde_yaml renders errors as `FIELD: MESSAGE at line L column C`; this
/// takes them apart so that they read like every other configuration error.
fn from_yaml_error(path: &Path, error: serde_yaml::Error) -> ConfigError {
    let position = error.location().map(|l| (l.line(), l.column()));
    let mut text = error.to_string();
    if let Some((line, column)) = position {
        // libyaml's syntax errors carry the position mid-sentence.
        text = text.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    // A field path is present when the text starts with one, ending in ": ".
    let (field, message) = match text.split_once(": ") {
        Some((field, message)) if looks_like_field_path(field) => {
            (Some(field.to_owned()), message.to_owned())
        }
        _ => (None, text),
    };
    ConfigError {
        file: path.to_owned(),
        position,
        field,
        message,
    }
}

fn looks_like_field_path(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;

    /// (balance, retries, connect timeout in ms, backends)
    type PoolModel = (&'static str, u32, u32, Vec<BackendModel>);
    /// (ip, port, weight)
    type BackendModel = ([u8; 4], u16, u32);

    /// A configuration as an operator would write it: the model a test
    /// generates, rendered as YAML.
    #[derive(Debug, Clone)]
    struct Model {
        /// (listener port, pool index, max_connections)
        listeners: Vec<(u16, usize, u32)>,
        pools: Vec<PoolModel>,
        flow_style: bool,
    }

    fn model() -> impl Strategy<Value = Model> {
        let backend = (any::<[u8; 4]>(), 1u16.., 0u32..=1000);
        let pool = (
            prop::sample::select(vec![
                "maglev",
                "round_robin",
                "weighted_round_robin",
                "least_connections",
                "random",
                "power_of_two",
            ]),
            0u32..=3,
            1u32..10_000,
            proptest::collection::vec(backend, 1..6),
        );
        (
            proptest::collection::vec(pool, 1..4),
            proptest::collection::vec((1u16.., any::<prop::sample::Index>(), 0u32..100), 1..4),
            any::<bool>(),
        )
            .prop_map(|(pools, listeners, flow_style)| Model {
                listeners: listeners
                    .into_iter()
                    .map(|(port, pool, max)| (port, pool.index(pools.len()), max))
                    .collect(),
                pools,
                flow_style,
            })
            .prop_filter("distinct ports and addresses", |m| {
                let mut ports: Vec<u16> = m.listeners.iter().map(|l| l.0).collect();
                ports.sort_unstable();
                ports.dedup();
                let distinct_backends = m.pools.iter().all(|(_, _, _, backends)| {
                    let mut addrs: Vec<_> = backends.iter().map(|b| (b.0, b.1)).collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    addrs.len() == backends.len()
                });
                ports.len() == m.listeners.len() && distinct_backends
            })
    }

    impl Model {
        fn yaml(&self) -> String {
            let mut text = String::from("listeners:\n");
            for (i, (port, pool, max)) in self.listeners.iter().enumerate() {
                text.push_str(&format!(
                    "  l{i}:\n    listen: 127.0.0.1:{port}\n    pool: p{pool}\n    max_connections: {max}\n"
                ));
            }
            text.push_str("pools:\n");
            for (i, (balance, retries, timeout, backends)) in self.pools.iter().enumerate() {
                text.push_str(&format!(
                    "  p{i}:\n    balance: {balance}\n    retries: {retries}\n    connect_timeout: {timeout}ms\n    health: off\n    backends:\n"
                ));
                for (ip, port, weight) in backends {
                    let addr = SocketAddr::from((*ip, *port));
                    if self.flow_style {
                        text.push_str(&format!(
                            "      - {{ address: \"{addr}\", weight: {weight} }}\n"
                        ));
                    } else {
                        text.push_str(&format!(
                            "      - address: {addr}\n        weight: {weight}\n"
                        ));
                    }
                }
            }
            text
        }
    }

    fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("sluice.yaml"), text, Resolver::Offline)
    }

    proptest! {
        #[test]
        fn any_text_is_judged_without_panicking(text in "\\PC{0,400}") {
            let _ = parse_text(&text);
        }

        #[test]
        fn yaml_shaped_text_is_judged_without_panicking(
            text in "([a-z_]{1,10}: ?[\\[\\]{}0-9a-z.:\"',&*!| -]{0,20}\n {0,6}){1,20}"
        ) {
            let _ = parse_text(&text);
        }

        #[test]
        fn a_valid_file_reads_back_as_written(model in model()) {
            let config = parse_text(&model.yaml()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(config.listeners.len(), model.listeners.len());
            for (i, (port, pool, max)) in model.listeners.iter().enumerate() {
                let listener = &config.listeners[&format!("l{i}")];
                prop_assert_eq!(listener.listen.0.port(), *port);
                prop_assert_eq!(&listener.pool, &format!("p{pool}"));
                prop_assert_eq!(listener.max_connections, *max);
            }
            for (i, (_, retries, timeout, backends)) in model.pools.iter().enumerate() {
                let pool = &config.pools[&format!("p{i}")];
                prop_assert_eq!(pool.retries, *retries);
                prop_assert_eq!(pool.connect_timeout.as_millis(), *timeout as u128);
                let read: Vec<(SocketAddr, u32)> = pool.endpoints().iter().map(|e| (e.addr, e.weight)).collect();
                let written: Vec<(SocketAddr, u32)> = backends.iter().map(|(ip, port, w)| (SocketAddr::from((*ip, *port)), *w)).collect();
                prop_assert_eq!(read, written);
            }
        }

        /// A misspelt key anywhere is refused, with the line it is on.
        #[test]
        fn a_misspelt_key_is_refused_where_it_is(model in model(), at in any::<prop::sample::Index>()) {
            let text = model.yaml();
            let lines: Vec<&str> = text.lines().collect();
            let keys = [
                "listeners", "pools", "listen", "pool", "max_connections", "balance",
                "retries", "connect_timeout", "health", "backends", "address", "weight",
            ];
            let key_at = |line: &str| -> Option<usize> {
                let start = line.len() - line.trim_start().len();
                let start = if line[start..].starts_with("- ") { start + 2 } else { start };
                let (key, _) = line[start..].split_once(':')?;
                keys.contains(&key).then_some(start)
            };
            let keyed: Vec<usize> = (0..lines.len()).filter(|&i| key_at(lines[i]).is_some()).collect();
            let target = keyed[at.index(keyed.len())];
            let mut broken: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            let start = key_at(lines[target]).unwrap();
            broken[target].insert(start, 'x');
            let error = parse_text(&broken.join("\n")).expect_err("a misspelt key").to_string();
            prop_assert!(error.starts_with(&format!("sluice.yaml:{}:", target + 1)), "{} (line {})", error, target + 1);
        }
    }
}
