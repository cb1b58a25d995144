//! What can go wrong on the control plane, at start and on a reload, each
//! with the one line an operator reads: at start it is the process's last
//! word (exit 1), on a reload it is logged and the configuration in use is
//! kept.

use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The file is invalid (its own located message).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Listen {
        listener: String,
        addr: SocketAddr,
        source: io::Error,
    },
    /// The control plane's copy of a listening socket.
    #[error("listener {listener}: {source}")]
    ListenerSocket { listener: String, source: io::Error },
    #[error("admin: cannot listen on {addr}: {source}")]
    Admin { addr: SocketAddr, source: io::Error },
    #[error("admin: {0}")]
    AdminSocket(io::Error),
    #[error("cannot read signals: {0}")]
    Signals(io::Error),
    #[error(
        "the descriptor limit of {limit} leaves no room for connections: {workers} workers, \
         {listeners} listeners and {backends} backends need {needed} descriptors; \
         raise LimitNOFILE (ulimit -n)"
    )]
    NoRoom {
        limit: u64,
        workers: usize,
        listeners: usize,
        backends: usize,
        needed: usize,
    },
    /// The thread that reads the file on a reload could not start.
    #[error("the configuration could not be read: no thread to read it")]
    NoReader,
}
