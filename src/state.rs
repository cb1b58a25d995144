//! Operator states: what an operator said of a backend through the admin
//! API (`ready`, `drain`, `maint`), and the state file that keeps it across
//! restarts.
//!
//! A state belongs to a backend's name within its pool, not to its address:
//! the operator drained "db1", and db1 stays drained if a reload gives it
//! another address. An address of a host-name entry is a backend of its
//! own, `NAME/IP`, with a state of its own. States are kept in memory by
//! the control plane ([`States`]) for the backends the configuration has:
//! they survive a reload for the backends that remain, and leave with the
//! others. They are written to `state_file` after every change, atomically
//! (a temporary file in the same directory, written, synced, renamed over
//! the old one), by a thread of their own so that a slow disk never holds
//! up the control plane; at exit the control plane waits for the last
//! write. Only states other than `ready` are written: an empty file means
//! every backend is ready. The file and the memory hold the same states.
//!
//! Reading the file is forgiving: a missing file is a first start, and a
//! corrupt or unreadable one is logged and ignored, since refusing to start
//! over it would turn a bad disk into an outage. States of backends the
//! configuration does not have are logged, forgotten, and dropped from the
//! file.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What an operator says of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorState {
    /// Takes clients as its health allows.
    #[default]
    Ready,
    /// Takes no new client; open connections stay, probes go on.
    Drain,
    /// Takes no client and is not probed; with `on_down: close` its open
    /// connections are reset when it enters maintenance.
    Maint,
}

impl OperatorState {
    pub const ALL: [OperatorState; 3] = [
        OperatorState::Ready,
        OperatorState::Drain,
        OperatorState::Maint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OperatorState::Ready => "ready",
            OperatorState::Drain => "drain",
            OperatorState::Maint => "maint",
        }
    }
}

impl fmt::Display for OperatorState {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend's place: its pool's name and its own.
pub type Place = (String, String);

/// The state file's contents.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    backends: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Entry {
    pool: String,
    backend: String,
    state: OperatorState,
}

const VERSION: u32 = 1;

/// Every backend's operator state that is not `ready`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct States(BTreeMap<Place, OperatorState>);

impl States {
    /// The states kept in `path`; none if it does not exist, or cannot be
    /// read or understood (logged).
    pub fn load(path: &Path) -> States {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return States::default(),
            Err(e) => {
                warn!(
                    "cannot read the state file {}: {e}; every backend starts ready",
                    path.display()
                );
                return States::default();
            }
        };
        match States::parse(&text) {
            Ok(states) => {
                if !states.0.is_empty() {
                    info!(
                        "state file {}: {} backends in drain or maint",
                        path.display(),
                        states.0.len()
                    );
                }
                states
            }
            Err(e) => {
                warn!(
                    "the state file {} is not valid ({e}); it is ignored and every backend starts ready",
                    path.display()
                );
                States::default()
            }
        }
    }

    /// Reads the state file's text.
    pub fn parse(text: &[u8]) -> Result<States, String> {
        let file: File = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if file.version != VERSION {
            return Err(format!("version {}, not {VERSION}", file.version));
        }
        Ok(States(
            file.backends
                .into_iter()
                .filter(|e| e.state != OperatorState::Ready)
                .map(|e| ((e.pool, e.backend), e.state))
                .collect(),
        ))
    }

    /// The file's text.
    fn render(&self) -> Vec<u8> {
        let file = File {
            version: VERSION,
            backends: self
                .0
                .iter()
                .map(|((pool, backend), state)| Entry {
                    pool: pool.clone(),
                    backend: backend.clone(),
                    state: *state,
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("plain data serializes");
        text.push(b'\n');
        text
    }

    pub fn get(&self, pool: &str, backend: &str) -> OperatorState {
        self.0
            .get(&(pool.to_owned(), backend.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// Sets a backend's state; the one it had.
    pub fn set(&mut self, pool: &str, backend: &str, state: OperatorState) -> OperatorState {
        let place = (pool.to_owned(), backend.to_owned());
        let before = match state {
            OperatorState::Ready => self.0.remove(&place),
            _ => self.0.insert(place, state),
        };
        before.unwrap_or_default()
    }

    /// Forgets the states of the places `present` says the configuration
    /// does not have: those places, with their states.
    pub fn forget_absent(
        &mut self,
        present: impl Fn(&Place) -> bool,
    ) -> Vec<(Place, OperatorState)> {
        let mut forgotten = Vec::new();
        self.0.retain(|place, state| {
            let keep = present(place);
            if !keep {
                forgotten.push((place.clone(), *state));
            }
            keep
        });
        forgotten
    }
}

/// Writes the state file, on a thread of its own, started at the first
/// change (most processes never make one): the newest states win, and a
/// write that fails is logged and tried again at the next change.
#[derive(Default)]
pub struct Writer {
    thread: OnceCell<WriterThread>,
}

/// The writer thread and the channel to it; the thread ends once the
/// channel closes and what was sent is written.
struct WriterThread {
    latest: mpsc::Sender<(PathBuf, Vec<u8>)>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Writes `states` to `path`.
    pub fn write(&self, path: &Path, states: &States) {
        let writer = self.thread.get_or_init(start_writing);
        let _ = writer.latest.send((path.to_owned(), states.render()));
    }

    /// Waits up to `limit` for the writes sent so far, so that a state set
    /// just before a stop is in the file the next start reads.
    pub fn finish(&mut self, limit: Duration) {
        let Some(WriterThread { latest, thread }) = self.thread.take() else {
            return;
        };
        drop(latest);
        let Some(thread) = thread else { return };
        let deadline = Instant::now() + limit;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                warn!("the state file is still being written after {limit:?}: the last drain or maint change may be lost");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Starts the thread that writes what is sent to it.
fn start_writing() -> WriterThread {
    let (latest, pending) = mpsc::channel::<(PathBuf, Vec<u8>)>();
    let started = std::thread::Builder::new()
        .name("sluice-state".into())
        .spawn(move || {
            while let Ok(mut next) = pending.recv() {
                // Only the newest of what queued up meanwhile matters.
                while let Ok(newer) = pending.try_recv() {
                    next = newer;
                }
                let (path, text) = next;
                if let Err(e) = write_atomically(&path, &text) {
                    warn!(
                        "cannot write the state file {}: {e}; drain and maint states will not survive a restart",
                        path.display()
                    );
                }
            }
        });
    let thread = started
        .map_err(|e| warn!("cannot start the state file writer: {e}; states will not be kept"))
        .ok();
    WriterThread { latest, thread }
}

/// Replaces `path` with `text` so that a crash leaves the old file or the
/// new one, never half of one: a temporary file beside it, written and
/// synced, renamed over it, and the directory synced. The temporary file
/// is named after the process and the moment, so two processes sharing the
/// file (during an upgrade, in containers both PID 1) never write into
/// each other's; one a crash leaves is removed at the next start
/// ([`remove_stale_temporaries`]).
pub fn write_atomically(path: &Path, text: &[u8]) -> io::Result<()> {
    let (dir, prefix) = temporaries_of(path)?;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let temporary = dir.join(format!(
        "{prefix}{}-{}.tmp",
        std::process::id(),
        since_epoch.as_nanos()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// The directory of `path` and the prefix of its temporary files there.
fn temporaries_of(path: &Path) -> io::Result<(&Path, String)> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    Ok((dir, format!(".{}.", name.to_string_lossy())))
}

/// Removes the temporary files of `path` that a crash left behind: those
/// older than a minute (a younger one may be another process's write).
pub fn remove_stale_temporaries(path: &Path) {
    let Ok((dir, prefix)) = temporaries_of(path) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(&prefix) && name.ends_with(".tmp")) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > Duration::from_secs(60)));
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_the_file_and_ready_is_not_written() {
        let mut states = States::default();
        states.set("pg", "db1", OperatorState::Drain);
        states.set("pg", "db2", OperatorState::Maint);
        states.set("redis", "a", OperatorState::Maint);
        assert_eq!(
            states.set("redis", "a", OperatorState::Ready),
            OperatorState::Maint
        );
        let text = states.render();
        assert_eq!(States::parse(&text).unwrap(), states);
        assert_eq!(states.get("pg", "db2"), OperatorState::Maint);
        assert_eq!(states.get("redis", "a"), OperatorState::Ready);
        let forgotten = states.forget_absent(|(_, b)| b == "db1");
        assert_eq!(
            forgotten,
            [(("pg".into(), "db2".into()), OperatorState::Maint)]
        );
        assert_eq!(states.get("pg", "db2"), OperatorState::Ready);
        assert_eq!(states.get("pg", "db1"), OperatorState::Drain);
    }

    #[test]
    fn a_file_that_is_not_ours_is_refused() {
        for text in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"version\": 2, \"backends\": []}",
            b"{\"version\": 1, \"backends\": [{\"pool\": \"p\", \"backend\": \"a\", \"state\": \"off\"}]}",
            b"{\"version\": 1, \"backends\": [], \"extra\": 1}",
        ] {
            assert!(States::parse(text).is_err(), "{}", text.escape_ascii());
        }
    }

    #[test]
    fn finish_waits_for_the_last_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut states = States::default();
        let mut writer = Writer::default();
        for state in [OperatorState::Drain, OperatorState::Maint] {
            states.set("pg", "db1", state);
            writer.write(&path, &states);
        }
        writer.finish(Duration::from_secs(10));
        assert_eq!(States::load(&path), states);
        writer.finish(Duration::from_secs(10));
    }

    #[test]
    fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let stale = dir.path().join(".state.json.1-2.tmp");
        let fresh = dir.path().join(".state.json.3-4.tmp");
        let other = dir.path().join(".other.json.1-2.tmp");
        for file in [&stale, &fresh, &other] {
            std::fs::write(file, "x").unwrap();
        }
        let old = std::time::SystemTime::now() - Duration::from_secs(120);
        for file in [&stale, &other] {
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        remove_stale_temporaries(&path);
        assert!(!stale.exists() && fresh.exists() && other.exists());
    }

    #[test]
    fn a_write_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        assert!(write_atomically(&dir.path().join("missing/state.json"), b"x").is_err());
    }
}
