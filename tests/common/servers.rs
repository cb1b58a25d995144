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
    // A directory of its own: a replica's full sync writes the master's
    // snapshot there as dump.rdb.
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new("redis-server");
    command
        .arg("--dir")
        .arg(dir.path())
        .args(["--bind", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        // A replica syncs at once, not after the 5 s Redis waits for more.
        .args(["--repl-diskless-sync-delay", "0"])
        // As a replica, it names this address to its master (and so to the
        // Sentinels), not the loopback address it connects from.
        .args(["--replica-announce-ip", &addr.ip().to_string()])
        .args(extra);
    start_server(command, addr, Some(dir), Signal::SIGKILL)
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
        // Postgres listens before it takes logins: a standby answers "the
        // database system is starting up" until its recovery is consistent.
        wait_until("postgres to accept logins", || {
            Command::new(postgres_bin_dir().join("pg_isready"))
                .args(["-q", "-h", &addr.ip().to_string()])
                .args(["-p", &addr.port().to_string()])
                .status()
                .expect("pg_isready: `make test` installs the postgresql package")
                .success()
        });
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
    mariadb_with(init, |_| Vec::new())
}

/// [`mariadb`], with the extra server options `extra` gives for its
/// address.
fn mariadb_with(init: &str, extra: impl FnOnce(SocketAddr) -> Vec<String>) -> Server {
    const SERVER: &str = "/usr/sbin/mariadbd";
    assert!(
        Path::new(SERVER).exists(),
        "{SERVER} is missing: `make test` installs the mariadb-server package"
    );
    let dir = data_dir("mysql");
    let data = dir.path().join("data");
    // A temporary directory of its own: servers bootstrapped at the same
    // time in a shared /tmp trip over each other's temporary tables.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    give_to("mysql", &tmp);
    let mut install = command_as("mysql", Path::new("mariadb-install-db"));
    install
        .args(["--no-defaults", "--skip-test-db", "--skip-name-resolve"])
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--tmpdir={}", tmp.display()));
    run_to_completion(install);
    let init_file = dir.path().join("init.sql");
    std::fs::write(&init_file, init).unwrap();
    let addr = free_addr(unique_loopback());
    let mut command = command_as("mysql", Path::new(SERVER));
    command
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--socket={}", dir.path().join("sock").display()))
        .arg(format!("--tmpdir={}", tmp.display()))
        .arg(format!("--init-file={}", init_file.display()))
        .arg(format!("--bind-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg("--skip-name-resolve")
        .args(extra(addr));
    let server = start_server(command, addr, Some(dir), Signal::SIGKILL);
    // mariadbd listens before it runs the init file; it greets (or refuses
    // with an error packet) once it serves connections.
    wait_until("mariadbd to greet", || {
        TcpStream::connect(addr).is_ok_and(|mut stream| {
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(1)))
                .unwrap();
            stream.read_exact(&mut [0u8; 5]).is_ok()
        })
    });
    server
}

/// Runs `sql` with psql as the superuser at `addr` (sluice, most often):
/// what it printed (unaligned, tuples only), or why it failed.
pub fn psql(addr: SocketAddr, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new("psql")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-c", sql,
        ])
        .env("PGCONNECT_TIMEOUT", "30")
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// A one-node Galera cluster (MariaDB with Debian's galera-4), bootstrapped
/// and synced, with the users of [`mariadb_with_probe`]. Galera's group
/// port is on the server's own address.
pub fn galera_with_probe() -> Server {
    let node = mariadb_with(&probe_users(), |addr| {
        let group = free_addr(addr.ip());
        vec![
            "--wsrep-on=ON".into(),
            "--wsrep-provider=/usr/lib/galera/libgalera_smm.so".into(),
            "--wsrep-cluster-address=gcomm://".into(),
            format!("--wsrep-provider-options=gmcast.listen_addr=tcp://{group}"),
            format!("--wsrep-node-address={}", addr.ip()),
            "--binlog-format=ROW".into(),
            "--innodb-autoinc-lock-mode=2".into(),
        ]
    });
    wait_until("the Galera node to be synced", || {
        mariadb_query(&node, "SHOW GLOBAL STATUS LIKE 'wsrep_local_state'")
            .is_ok_and(|out| out.split_whitespace().last() == Some("4"))
    });
    node
}

/// A MariaDB server with a `probe` user that logs in with
/// [`PROBE_PASSWORD`] and an `admin` user, without a password, that may
/// change global settings ([`mariadb_sql`]).
pub fn mariadb_with_probe() -> Server {
    mariadb(&probe_users())
}

fn probe_users() -> String {
    format!(
        "CREATE USER 'probe'@'%' IDENTIFIED BY '{PROBE_PASSWORD}';\n\
         CREATE USER 'admin'@'%';\n\
         GRANT ALL ON *.* TO 'admin'@'%';\n"
    )
}

/// Runs `sql` as the `admin` user of [`mariadb_with_probe`].
pub fn mariadb_sql(server: &Server, sql: &str) {
    if let Err(error) = mariadb_query(server, sql) {
        panic!("{sql}: {error}");
    }
}

/// Runs `sql` as the `admin` user: what it printed (tab-separated, no
/// column names), or why it failed.
fn mariadb_query(server: &Server, sql: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .args(["-h", &server.addr.ip().to_string()])
        .args(["-P", &server.addr.port().to_string()])
        .args(["-u", "admin", "-N", "-B", "-e", sql])
        .output()
        .expect("mariadb: `make test` installs the mariadb-server package");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// An etcd (Debian's etcd-server) for Patroni, with the v2 API Debian's
/// Patroni speaks.
pub fn etcd() -> Server {
    let ip = unique_loopback();
    let (client, peer) = (free_addr(ip), free_addr(ip));
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new("etcd");
    command
        .args(["--name", "e1", "--enable-v2=true", "--log-level", "error"])
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls=http://{client}"))
        .arg(format!("--advertise-client-urls=http://{client}"))
        .arg(format!("--listen-peer-urls=http://{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
        .arg(format!("--initial-cluster=e1=http://{peer}"));
    start_server(command, client, Some(dir), Signal::SIGKILL)
}

/// A Patroni node of cluster `sluicetest` on `ip`: PostgreSQL on `pg_port`,
/// the REST API on `api_port`, etcd at `etcd`. The first node started
/// bootstraps the cluster and leads; the others replicate from it. Trust
/// for every login over loopback.
pub struct PatroniNode {
    pub server: Server,
    /// PostgreSQL's address.
    pub addr: SocketAddr,
    pub api: SocketAddr,
    config: PathBuf,
}

impl PatroniNode {
    pub fn start(
        name: &str,
        ip: std::net::IpAddr,
        pg_port: u16,
        api_port: u16,
        etcd: SocketAddr,
    ) -> PatroniNode {
        let dir = data_dir("postgres");
        let (addr, api) = (SocketAddr::new(ip, pg_port), SocketAddr::new(ip, api_port));
        let config = dir.path().join("patroni.yml");
        let sockets = dir.path().join("sockets");
        let data = dir.path().join("data");
        std::fs::create_dir(&sockets).unwrap();
        std::fs::write(
            &config,
            format!(
                "scope: sluicetest\nname: {name}\n\
                 restapi: {{ listen: '{api}', connect_address: '{api}' }}\n\
                 etcd: {{ host: '{etcd}' }}\n\
                 bootstrap:\n  dcs: {{ ttl: 10, loop_wait: 1, retry_timeout: 3 }}\n  initdb: [{{ encoding: UTF8 }}]\n  pg_hba:\n    - local all all trust\n    - host replication all 127.0.0.0/8 trust\n    - host all all 127.0.0.0/8 trust\n\
                 postgresql:\n  listen: '{addr}'\n  connect_address: '{addr}'\n  data_dir: {data}\n  bin_dir: {bin}\n  pgpass: {pgpass}\n\
                 \x20 authentication:\n    superuser: {{ username: postgres, password: pw }}\n    replication: {{ username: replicator, password: pw }}\n\
                 \x20 parameters: {{ unix_socket_directories: '{sockets}' }}\n",
                data = data.display(),
                bin = postgres_bin_dir().display(),
                pgpass = dir.path().join("pgpass").display(),
                sockets = sockets.display(),
            ),
        )
        .unwrap();
        give_to("postgres", dir.path());
        let mut command = command_as("postgres", Path::new("patroni"));
        command.arg(&config);
        // SIGKILL would leave its postgres running: SIGTERM stops both.
        let server = start_server(command, api, Some(dir), Signal::SIGTERM);
        PatroniNode {
            server,
            addr,
            api,
            config,
        }
    }

    /// What the REST API answers `GET path` with: its status code.
    pub fn status(&self, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(self.api).ok()?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// `patronictl switchover` from `leader` to `candidate`.
    pub fn switchover(&self, leader: &str, candidate: &str) {
        let mut switchover = command_as("postgres", Path::new("patronictl"));
        switchover.arg("-c").arg(&self.config).args([
            "switchover",
            "--leader",
            leader,
            "--candidate",
            candidate,
            "--force",
        ]);
        run_to_completion(switchover);
    }
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory for a server's data, owned by `user` when the tests
/// run as root.
fn data_dir(user: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    give_to(user, dir.path());
    dir
}

/// Makes `path`, and all below it, `user`'s when the tests run as root:
/// the database servers run as their own users.
fn give_to(user: &str, path: &Path) {
    if running_as_root() {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg(format!("{user}:")).arg(path);
        run_to_completion(chown);
    }
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
