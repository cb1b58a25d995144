//! sluice: a layer-4 TCP load balancer for Linux on io_uring.
//!
//! The binary (`main.rs`) is a thin command line over these modules; they
//! are a library so that benchmarks and tests can reach the balancer and the
//! configuration directly. The modules follow the path of a connection:
//!
//! - [`config`]: the YAML file, its validation and error messages.
//! - [`control`]: the control plane: reloads, health verdicts, drain.
//! - [`health`]: probes and the passive failure count.
//! - [`snapshot`]: immutable routing state, swapped atomically.
//! - [`balancer`]: client address → backend (Maglev).
//! - [`worker`]: thread-per-core workers, on one of two drivers:
//!   [`uring`] (the default) or epoll ([`relay`]).
//! - [`capacity`]: how many connections the descriptor limit allows.
//! - [`connection`]: what happens to a connection, whatever the driver:
//!   admission, backend choice and retries, how its ending is judged.
//! - [`relay`]: one connection: dial the backend, move the bytes.
//! - [`net`]: socket options, listening and connecting.
//! - [`pipe`]: the per-worker pipes of the splice engine.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the admin endpoint that serves them.
//! - [`shared`]: what the control plane and the workers share.
//! - [`mailbox`]: how the control plane reaches the workers.
//! - [`signals`], [`systemd`], [`logging`]: process plumbing.
//! - [`explain`]: `sluice explain`, routing computed from the file alone.

pub mod admin;
pub mod balancer;
pub mod capacity;
pub mod config;
pub mod connection;
pub mod control;
pub mod driver;
pub mod explain;
pub mod health;
pub mod limits;
pub mod logging;
pub mod mailbox;
pub mod metrics;
pub mod net;
pub mod pipe;
pub mod proxy_protocol;
pub mod shared;
pub mod signals;
pub mod snapshot;
pub mod systemd;
pub mod worker;
