//! sluice: a layer-4 TCP load balancer for Linux on io_uring.
//!
//! `main` owns the command line (SPEC "Command line") and start-up: load the
//! configuration, let the control plane bind every listener for every worker
//! and publish the first routing snapshot, start the workers, then hand the
//! main thread to the control plane until the process stops.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use tracing::{error, info};

use sluice::config::{self, Config, Workers};
use sluice::control::Controller;
use sluice::ctl::{self, Action};
use sluice::state::OperatorState;
use sluice::worker::{self, Driver, WorkerError};
use sluice::{capacity, explain, logging, mailbox, signals};

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
    /// order, from the configuration file alone; or where it goes while
    /// backends are down, or what share of clients a new file moves.
    #[command(after_help = "\
Examples:
  sluice explain -c sluice.yaml redis 10.1.2.3
  sluice explain -c sluice.yaml redis 10.1.2.3 --without cache-b
  sluice explain -c sluice.yaml redis --remap sluice.yaml.new")]
    Explain {
        /// A pool defined in the configuration.
        pool: String,
        /// The client's address; with `hash_key: source_ip_port`, IP:PORT.
        /// Optional with --remap.
        #[arg(required_unless_present = "remap")]
        client_ip: Option<String>,
        /// Where the client goes while backend NAME is down, as once probes
        /// have taken it out. Repeatable.
        #[arg(long, value_name = "NAME", conflicts_with = "remap")]
        without: Vec<String>,
        /// Compare POOL with the pool of that name in NEWFILE: the share of
        /// clients whose backend changes, overall and from which backend to
        /// which; with CLIENT_IP, where that client goes in each.
        #[arg(long, value_name = "NEWFILE")]
        remap: Option<PathBuf>,
    },
    /// Talk to the running sluice through its admin endpoint (admin.listen
    /// and admin.token_file of the configuration file).
    #[command(after_help = "\
Examples:
  sluice ctl status
  sluice ctl drain pg db1 --wait 10m && patch-db1 && sluice ctl ready pg db1
  sluice ctl maint redis cache-b")]
    Ctl {
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Every pool and backend: state, health, open connections, queue.
    Status,
    /// Take no new client on BACKEND; open connections stay and probes go
    /// on. With --wait, exit 0 once it has no open connection, or 1 when
    /// DURATION has passed with connections still open.
    Drain {
        pool: String,
        backend: String,
        /// How long to wait for its connections to end (e.g. 30s, 10m).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Take no client and stop probing BACKEND; with `on_down: close` its
    /// open connections are reset.
    Maint { pool: String, backend: String },
    /// End a drain or maintenance: BACKEND takes clients as its health
    /// allows.
    Ready { pool: String, backend: String },
}

impl CtlCommand {
    fn action(&self) -> Action {
        let set = |pool: &String, backend: &String, state, wait| Action::Set {
            pool: pool.clone(),
            backend: backend.clone(),
            state,
            wait,
        };
        match self {
            CtlCommand::Status => Action::Status,
            CtlCommand::Drain {
                pool,
                backend,
                wait,
            } => set(pool, backend, OperatorState::Drain, *wait),
            CtlCommand::Maint { pool, backend } => set(pool, backend, OperatorState::Maint, None),
            CtlCommand::Ready { pool, backend } => set(pool, backend, OperatorState::Ready, None),
        }
    }
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
        Some(Command::Explain {
            pool,
            client_ip,
            without,
            remap,
        }) => match (remap, client_ip) {
            (Some(new), client) => explain::remap(&cli.config, new, pool, client.as_deref()),
            (None, Some(client)) => explain::client(&cli.config, pool, client, without),
            (None, None) => unreachable!("clap requires CLIENT_IP without --remap"),
        }
        .map(|text| print!("{text}"))
        .map_err(Into::into),
        Some(Command::Ctl { command }) => ctl::run(&cli.config, &command.action())
            .map(|text| print!("{text}"))
            .map_err(Into::into),
        None if cli.check => check(&cli.config).map_err(Into::into),
        None => run(&cli.config),
    };
    logging::flush();
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

/// Runs the balancer until SIGTERM or SIGINT.
fn run(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // Until signals are blocked, SIGTERM ends the process at once, however
    // long resolving the backends' host names takes.
    let config = config::load(path)?;
    // Before any thread exists (the log writer is the first), so that every
    // thread inherits the mask and only the control plane's signalfd sees
    // the signals.
    signals::block().map_err(|e| format!("cannot block signals: {e}"))?;
    logging::init(config.log.level, config.log.format, config.log.connections);
    abort_on_panic();
    let descriptor_limit = capacity::raise_descriptor_limit();

    let workers = worker_count(&config);
    let pin = config.pin_workers;
    let (driver, why) = Driver::choose(config.io)?;
    info!(io = driver.name(), "data path on {}: {why}", driver.name());
    let (mut controller, mut bound) =
        Controller::new(path.to_owned(), config, workers, descriptor_limit, driver)?;
    let cpus = worker::allowed_cpus();
    for (id, sockets) in bound.drain(..).enumerate() {
        let cpu = (pin && !cpus.is_empty()).then(|| cpus[id % cpus.len()]);
        let start = |source| WorkerError::Start { id, source };
        let (mailbox, inbox) = mailbox::mailbox().map_err(start)?;
        worker::spawn(id, driver, sockets, inbox, controller.shared(), cpu).map_err(start)?;
        controller.add_worker(mailbox);
    }
    Ok(controller.run()?)
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
        logging::flush();
        std::process::abort();
    }));
}
