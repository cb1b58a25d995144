//! sluice: a layer-4 TCP load balancer for Linux on io_uring.
//!
//! `main` owns the command line (SPEC "Command line") and start-up: load the
//! configuration, let the control plane bind every listener for every worker
//! and publish the first routing snapshot, start the workers, then hand the
//! main thread to the control plane until the process stops.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use tracing::error;

use sluice::config::{self, Config, HashKey, Workers};
use sluice::control::Controller;
use sluice::snapshot::Snapshot;
use sluice::{logging, signals, worker};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A layer-4 TCP load balancer with Maglev consistent hashing"
)]
struct Cli {
    /// The configuration file.
    #[arg(short = 'c', long = "config", value_name = "PATH", default_value = config::DEFAULT_PATH, global = true)]
    config: PathBuf,

    /// Validate the configuration and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the backend that CLIENT_IP maps to in POOL, and its retry
    /// order, from the configuration file alone.
    Explain {
        /// A pool defined in the configuration.
        pool: String,
        /// The client's address; with `hash_key: source_ip_port`, IP:PORT.
        client_ip: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check && cli.command.is_some() {
        Cli::command()
            .error(
                ErrorKind::ArgumentConflict,
                "--check cannot be combined with a subcommand",
            )
            .exit();
    }
    let result = match &cli.command {
        Some(Command::Explain { pool, client_ip }) => explain(&cli.config, pool, client_ip),
        None if cli.check => check(&cli.config),
        None => run(&cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sluice: {message}");
            ExitCode::from(1)
        }
    }
}

/// `sluice --check`: report whether the file is valid.
fn check(path: &Path) -> Result<(), String> {
    let config = config::load(path).map_err(|e| e.to_string())?;
    let backends: usize = config.pools.values().map(|p| p.backends.len()).sum();
    println!(
        "{}: configuration is valid ({} listeners, {} pools, {} backends)",
        path.display(),
        config.listeners.len(),
        config.pools.len(),
        backends
    );
    Ok(())
}

/// `sluice explain`: where a client goes, computed exactly as a worker does.
fn explain(path: &Path, pool_name: &str, client: &str) -> Result<(), String> {
    let config = config::load(path).map_err(|e| e.to_string())?;
    let snapshot = Snapshot::from_config(&config);
    let pool = snapshot.pool(pool_name).ok_or_else(|| {
        let defined: Vec<&str> = config.pools.keys().map(String::as_str).collect();
        format!(
            "pool {pool_name:?} is not defined in {} (defined pools: {})",
            path.display(),
            defined.join(", ")
        )
    })?;
    let client_addr = match (client.parse::<IpAddr>(), client.parse::<SocketAddr>()) {
        (Ok(_), _) if pool.hash_key == HashKey::SourceIpPort => {
            return Err(format!(
                "pool {pool_name:?} hashes on source_ip_port: give the client as IP:PORT"
            ))
        }
        (Ok(ip), _) => SocketAddr::new(ip, 0),
        (_, Ok(addr)) => addr,
        _ => return Err(format!("invalid client address {client:?}")),
    };
    let mut order = pool.candidates(client_addr);
    let Some(first) = order.next() else {
        return Err(format!(
            "pool {pool_name:?} has no backend with a weight above 0"
        ));
    };
    let retries: Vec<String> = order.map(|b| format!("{} ({})", b.name, b.addr)).collect();
    println!(
        "pool:    {pool_name} (maglev on {}, {} backends, {} slots)",
        match pool.hash_key {
            HashKey::SourceIp => "source_ip",
            HashKey::SourceIpPort => "source_ip_port",
        },
        pool.backends.len(),
        pool.table_size()
    );
    println!("client:  {client}");
    println!("backend: {} ({})", first.name, first.addr);
    println!(
        "retries: {}",
        if retries.is_empty() {
            "none".to_owned()
        } else {
            retries.join(", ")
        }
    );
    Ok(())
}

/// Runs the balancer until SIGTERM or SIGINT.
fn run(path: &Path) -> Result<(), String> {
    let config = config::load(path).map_err(|e| e.to_string())?;
    logging::init(config.log.level, config.log.format, config.log.connections);
    abort_on_panic();
    // Before any thread exists, so that every thread inherits the mask and
    // only the control plane's signalfd sees the signals.
    signals::block().map_err(|e| format!("cannot block signals: {e}"))?;

    let workers = worker_count(&config);
    let pin = config.pin_workers;
    let (mut controller, mut bound) = Controller::new(path.to_owned(), config, workers)?;
    let cpus = worker::allowed_cpus();
    for (id, sockets) in bound.drain(..).enumerate() {
        let cpu = (pin && !cpus.is_empty()).then(|| cpus[id % cpus.len()]);
        let (commands, received) = tokio::sync::mpsc::unbounded_channel();
        worker::spawn(id, sockets, received, controller.shared(), cpu)
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        controller.add_worker(commands);
    }
    controller.run()
}

fn worker_count(config: &Config) -> usize {
    match config.workers {
        Workers::Count(n) => n,
        Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// A panic in any thread ends the process: a worker that died would leave
/// its share of new connections waiting in a listen queue nobody reads.
/// systemd restarts the service.
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        error!("a thread panicked; aborting");
        std::process::abort();
    }));
}
