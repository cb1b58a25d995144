//! sluice: a layer-4 TCP load balancer for Linux on io_uring.
//!
//! The binary (`main.rs`) is a thin command line over these modules; they
//! are a library so that benchmarks and tests can reach the balancer and the
//! configuration directly. Every module once, in the order a client's bytes
//! meet them, then the control plane that steers them:
//!
//! - [`worker`]: thread-per-core workers, each on one of the two
//!   [`driver`]s (io_uring, or epoll where io_uring is refused), which
//!   accept, dial and move the bytes.
//! - [`capacity`]: how many connections the descriptor limit allows; a
//!   worker counts each before it accepts it.
//! - [`connection`]: what happens to a connection, whatever the driver:
//!   when to accept, admission (with [`limits`] and [`proxy_protocol`]),
//!   backend choice and retries, half-close and engines, how its ending
//!   is judged. Its life is one sans-I/O state machine both drivers feed.
//! - [`snapshot`]: the routing state a connection is routed by, immutable
//!   and swapped atomically; [`balancer`]: client address → backend
//!   (Maglev and the other algorithms).
//! - [`net`]: socket options, listening and connecting; [`pipe`]: the
//!   per-worker pipes of the splice engine.
//! - [`metrics`]: Prometheus metrics the connections count in.
//! - [`shared`]: what the control plane and the workers share;
//!   [`mailbox`]: how the control plane reaches the workers.
//! - [`config`]: the YAML file, its validation and error messages;
//!   [`control`]: the control plane (reloads, health verdicts, the drain);
//!   [`health`]: probes and the passive failure count; [`discovery`]: a
//!   pool's backend as Redis Sentinel names it; [`resp`]: the little of
//!   the Redis protocol that probes and discovery speak.
//! - [`admin`]: the admin endpoint (`/metrics`, `/ready`, the JSON API, the
//!   status page); [`state`]: operator states (drain, maint) and the file
//!   that keeps them across restarts.
//! - [`signals`], [`systemd`], [`logging`]: process plumbing.
//! - [`explain`]: `sluice explain`, routing computed from the file alone;
//!   [`ctl`]: `sluice ctl`, a client of a running sluice's admin API.

pub mod admin;
pub mod balancer;
pub mod capacity;
pub mod config;
pub mod connection;
pub mod control;
pub mod ctl;
pub mod discovery;
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
pub mod resp;
pub mod shared;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod systemd;
pub mod worker;
