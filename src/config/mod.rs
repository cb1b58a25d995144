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

pub use bounds::{MAX_DEPTH, MAX_FILE_BYTES};
pub use schema::{
    Balance, Config, Endpoint, Engine, HashKey, HealthProbe, LogFormat, LogLevel, Pool, Workers,
};
pub use validate::{resolve, Resolver};

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
    let error = |message: String| ConfigError {
        file: path.to_owned(),
        position: None,
        field: None,
        message,
    };
    // One byte more than the limit tells a file at the limit from a larger
    // one, without reading a huge file (or an endless one) whole.
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| error(format!("cannot read the configuration: {e}")))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(error(format!(
            "the file is larger than the limit of {} KiB",
            MAX_FILE_BYTES / 1024
        )));
    }
    parse(path, &text, Resolver::Dns)
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
