//! Real servers from Debian packages, each on a free loopback address and
//! stopped when dropped: redis-server, memcached, PostgreSQL (a primary, and
//! standbys made with pg_basebackup), MariaDB.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{free_addr, unique_loopback, wait_until};

/// A server process from a Debian package on a free loopback port; stopped
/// when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// SIGKILL, or the signal that makes the server clean up after itself
    /// at once.
    stop: Signal,
    /// Its data directory, if it has one: removed once it has stopped.
    _data: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), self.stop);
        let _ = self.child.wait();
    }
}

/// Starts `command` and waits until it accepts connections on `addr`. With
/// a data directory, the server's standard error goes to `server.log` in
/// it, shown if the server exits instead.
fn start_server(
    mut command: Command,
    addr: SocketAddr,
    data: Option<tempfile::TempDir>,
    stop: Signal,
) -> Server {
    let program = command.get_program().to_string_lossy().into_owned();
    let log = data.as_ref().map(|dir| dir.path().join("server.log"));
    let stderr = match &log {
        Some(path) => std::fs::File::create(path).unwrap().into(),
        None => Stdio::null(),
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}): `make test` installs it"));
    let mut server = Server {
        child,
        addr,
        stop,
        _data: data,
    };
    wait_until(&format!("{program} on {addr}"), || {
        if let Some(status) = server.child.try_wait().unwrap() {
            let log = log.as_ref().map(std::fs::read_to_string);
            panic!("{program} exited ({status}) before listening on {addr}: {log:?}");
        }
        TcpStream::connect(addr).is_ok()
    });
    server
}

pub fn redis_server() -> Server {
    redis_server_with(&[])
}

/// A redis-server with extra arguments, e.g. `--replicaof HOST PORT`.
pub fn redis_server_with(extra: &[&str]) -> Server {
    let addr = free_addr(unique_loopback());
    let mut command = Command::new("redis-server");
    command
        .args(["--bind", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        // As a replica, it names this address to its master (and so to the
        // Sentinels), not the loopback address it connects from.
        .args(["--replica-announce-ip", &addr.ip().to_string()])
        .args(extra);
    start_server(command, addr, None, Signal::SIGKILL)
}

/// Sends one command as a RESP array and reads a one-line reply.
pub fn redis_call(stream: &mut BufReader<TcpStream>, args: &[&str]) -> String {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.get_mut().write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).unwrap();
    if let Some(len) = line.strip_prefix('$') {
        let len: i64 = len.trim().parse().unwrap();
        if len < 0 {
            return "(nil)".into();
        }
        let mut value = vec![0u8; len as usize + 2];
        stream.read_exact(&mut value).unwrap();
        return String::from_utf8(value[..len as usize].to_vec()).unwrap();
    }
    line.trim_end().to_owned()
}

/// A redis-sentinel monitoring `master` as `mymaster` (quorum 2, down
/// after a second), logging in to it and asking its own clients for
/// `password`.
pub fn redis_sentinel(master: SocketAddr, password: &str) -> Server {
    let addr = free_addr(unique_loopback());
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind {ip}\nprotected-mode no\nrequirepass \"{password}\"\n\
             sentinel monitor mymaster {mip} {mport} 2\n\
             sentinel auth-pass mymaster \"{password}\"\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\n",
            port = addr.port(),
            ip = addr.ip(),
            mip = master.ip(),
            mport = master.port(),
        ),
    )
    .unwrap();
    let mut command = Command::new("redis-sentinel");
    command.arg(&conf);
    start_server(command, addr, Some(dir), Signal::SIGKILL)
}

pub fn memcached() -> Server {
    let addr = free_addr(unique_loopback());
    let mut command = Command::new("memcached");
    command
        .args(["-l", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string()])
        .args(["-U", "0", "-m", "16", "-u", "root"]);
    start_server(command, addr, None, Signal::SIGKILL)
}

/// A throwaway PostgreSQL cluster (initdb, trust authentication) in a
/// scratch directory.
pub fn postgres() -> Server {
    Postgres::primary().server
}

/// The password of the `probe` role that [`Postgres::primary`] creates and
/// of the `probe` user of [`mariadb_with_probe`].
pub const PROBE_PASSWORD: &str = "pr0be secret";

/// A PostgreSQL server of a replicated pair: a primary made by initdb, or a
/// standby made from one by `pg_basebackup -R`, streaming from it.
/// Trust for every login over loopback but the `probe` role's, which needs
/// its SCRAM-SHA-256 password ([`PROBE_PASSWORD`]).
pub struct Postgres {
    pub server: Server,
    data: PathBuf,
}

impl Postgres {
    pub fn primary() -> Postgres {
        let bin = postgres_bin_dir();
        let dir = data_dir("postgres");
        let data = dir.path().join("data");
        let mut initdb = command_as("postgres", &bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        run_to_completion(initdb);
        // First match wins: the probe must log in with its password.
        let hba = "local all all trust\n\
                   host all probe 127.0.0.0/8 scram-sha-256\n\
                   host all all 127.0.0.0/8 trust\n\
                   host replication all 127.0.0.0/8 trust\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let primary = Postgres::start(dir, data);
        primary.sql(&format!(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE probe LOGIN PASSWORD '{PROBE_PASSWORD}'"
        ));
        primary
    }

    /// A standby of this server, caught up with it.
    pub fn standby(&self) -> Postgres {
        let dir = data_dir("postgres");
        let data = dir.path().join("data");
        let mut backup = command_as("postgres", &postgres_bin_dir().join("pg_basebackup"));
        backup
            .args(["-h", &self.server.addr.ip().to_string()])
            .args(["-p", &self.server.addr.port().to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "--no-sync", "-D"])
            .arg(&data);
        run_to_completion(backup);
        Postgres::start(dir, data)
    }

    fn start(dir: tempfile::TempDir, data: PathBuf) -> Postgres {
        let addr = free_addr(unique_loopback());
        let mut command = command_as("postgres", &postgres_bin_dir().join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-p", &addr.port().to_string()])
            .args(["-c", &format!("listen_addresses={}", addr.ip())])
            .arg("-F");
        // An immediate shutdown: killed, postgres would leave its shared
        // memory segment behind.
        let server = start_server(command, addr, Some(dir), Signal::SIGQUIT);
        Postgres { server, data }
    }

    /// Ends recovery: the standby becomes a primary.
    pub fn promote(&self) {
        let mut promote = command_as("postgres", &postgres_bin_dir().join("pg_ctl"));
        promote.args(["promote", "-w", "-D"]).arg(&self.data);
        run_to_completion(promote);
    }

    /// Runs `sql` as the superuser; returns what it printed, unaligned.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", &self.server.addr.ip().to_string()])
            .args(["-p", &self.server.addr.port().to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql: `make test` installs the postgresql package");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// The newest PostgreSQL server Debian's `postgresql` package installed.
fn postgres_bin_dir() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten();
    versions
        .filter_map(|entry| {
            let version: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
            bin.join("postgres").exists().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server in /usr/lib/postgresql: `make test` installs the postgresql package")
}

/// A MariaDB server on a fresh data directory (mariadb-install-db: only
/// `localhost` accounts) that runs `init` at start-up: SQL, one statement a
/// line. Host names are not resolved, so `localhost` accounts do not match
/// TCP clients.
pub fn mariadb(init: &str) -> Server {
    const SERVER: &str = "/usr/sbin/mariadbd";
    assert!(
        Path::new(SERVER).exists(),
        "{SERVER} is missing: `make test` installs the mariadb-server package"
    );
    let dir = data_dir("mysql");
    let data = dir.path().join("data");
    let mut install = command_as("mysql", Path::new("mariadb-install-db"));
    install
        .args(["--no-defaults", "--skip-test-db", "--skip-name-resolve"])
        .arg(format!("--datadir={}", data.display()));
    run_to_completion(install);
    let init_file = dir.path().join("init.sql");
    std::fs::write(&init_file, init).unwrap();
    let addr = free_addr(unique_loopback());
    let mut command = command_as("mysql", Path::new(SERVER));
    command
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--socket={}", dir.path().join("sock").display()))
        .arg(format!("--init-file={}", init_file.display()))
        .arg(format!("--bind-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg("--skip-name-resolve");
    start_server(command, addr, Some(dir), Signal::SIGKILL)
}

/// A MariaDB server with a `probe` user that logs in with
/// [`PROBE_PASSWORD`] and an `admin` user, without a password, that may
/// change global settings ([`mariadb_sql`]).
pub fn mariadb_with_probe() -> Server {
    mariadb(&format!(
        "CREATE USER 'probe'@'%' IDENTIFIED BY '{PROBE_PASSWORD}';\n\
         CREATE USER 'admin'@'%';\n\
         GRANT ALL ON *.* TO 'admin'@'%';\n"
    ))
}

/// Runs `sql` as the `admin` user of [`mariadb_with_probe`].
pub fn mariadb_sql(server: &Server, sql: &str) {
    let out = Command::new("mariadb")
        .args(["-h", &server.addr.ip().to_string()])
        .args(["-P", &server.addr.port().to_string()])
        .args(["-u", "admin", "-e", sql])
        .output()
        .expect("mariadb: `make test` installs the mariadb-server package");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory for a server's data, owned by `user` when the tests
/// run as root.
fn data_dir(user: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if running_as_root() {
        let mut chown = Command::new("chown");
        chown.arg(format!("{user}:")).arg(dir.path());
        run_to_completion(chown);
    }
    dir
}

/// `program` run as `user` when the tests run as root, since database
/// servers refuse to run as root; as the current user otherwise.
pub fn command_as(user: &str, program: &Path) -> Command {
    if !running_as_root() {
        return Command::new(program);
    }
    let mut command = Command::new("setpriv");
    command
        .args([&format!("--reuid={user}"), &format!("--regid={user}")])
        .args(["--init-groups", "--"])
        .arg(program);
    command
}

/// Runs a set-up command; panics with its output if it fails.
pub fn run_to_completion(mut command: Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", command.get_program()));
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
