//! Shared pieces of the integration tests: running the real `sluice` binary
//! on a generated configuration, small TCP servers to put behind it, and
//! clients that connect from chosen loopback addresses.
//!
//! Every wait is for an event with a deadline (a log line, a connection, a
//! byte), never a fixed sleep.

#![allow(dead_code)] // each test binary uses its own subset

mod servers;

pub use servers::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// How long any single expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A loopback address no other test in this run uses, so that tests running
/// in parallel never compete for a port: 127.200.P.N with P from the process
/// id and N counting up.
pub fn unique_loopback() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        200 + (pid % 50) as u8,
        (n / 250) as u8,
        (n % 250 + 1) as u8,
    ))
}

/// A port on `ip` that is free now.
pub fn free_addr(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("bind to find a free port");
    listener.local_addr().unwrap()
}

/// The `i`-th of many distinct client addresses, 127.1.0.1 onwards.
pub fn client_ip(i: u32) -> IpAddr {
    let n = i + 1;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ))
}

/// Connects to `to` from `from` (any free port).
pub fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    socket
        .connect_timeout(&to.into(), DEADLINE)
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Writes a file into a fresh temporary directory that lives as long as the
/// returned guard.
pub struct TempFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn temp_file(name: &str, contents: &str) -> TempFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    TempFile { _dir: dir, path }
}

/// Runs `sluice ARGS` to completion.
pub fn sluice_command(args: &[&str]) -> Output {
    Command::new(SLUICE)
        .args(args)
        .output()
        .expect("run sluice")
}

pub fn check(config: &str) -> Output {
    let file = temp_file("sluice.yaml", config);
    sluice_command(&["--check", "-c", file.path.to_str().unwrap()])
}

/// `config` with the data path's driver the run asks for: `SLUICE_TEST_IO`
/// (`io_uring` or `epoll`) runs the whole suite on one driver; unset, each
/// configuration keeps its own `io` (the default: `auto`).
pub fn with_driver(config: &str) -> String {
    match std::env::var("SLUICE_TEST_IO") {
        Ok(io) if !config.lines().any(|l| l.starts_with("io:")) => {
            format!("{config}\nio: {io}\n")
        }
        _ => config.to_owned(),
    }
}

/// A seccomp filter (classic BPF) that fails `io_uring_setup` with EPERM
/// and allows everything else, as Docker's default profile does.
fn refuse_io_uring_filter() -> Vec<libc::sock_filter> {
    const LOAD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    const ARCH_X86_64: u32 = 0xc000_003e;
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        op(LOAD, 0, 0, 4), // seccomp_data.arch
        op(JUMP_IF_EQUAL, 0, 3, ARCH_X86_64),
        op(LOAD, 0, 0, 0), // seccomp_data.nr
        op(JUMP_IF_EQUAL, 0, 1, libc::SYS_io_uring_setup as u32),
        op(RETURN, 0, 0, ERRNO | libc::EPERM as u32),
        op(RETURN, 0, 0, ALLOW),
    ]
}

fn install_filter(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `program` outlives them.
    let installed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) == 0
    };
    if installed {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A running `sluice` process; killed when dropped.
pub struct Sluice {
    child: Child,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    _config: TempFile,
}

impl Sluice {
    /// Starts sluice on `config` and waits until it says it is ready.
    pub fn start(config: &str) -> Sluice {
        let sluice = Sluice::spawn(config);
        sluice.wait_for_log("sluice is ready");
        sluice
    }

    /// Starts sluice without waiting for anything.
    pub fn spawn(config: &str) -> Sluice {
        Sluice::spawn_with_env(config, &[])
    }

    /// Starts sluice with extra environment variables.
    pub fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> Sluice {
        Sluice::spawn_with(config, env, None, None, false)
    }

    /// Starts sluice where io_uring is refused, as a container runtime's
    /// seccomp profile refuses it: `io_uring_setup` fails with EPERM.
    pub fn spawn_without_io_uring(config: &str) -> Sluice {
        Sluice::spawn_with(config, &[], None, None, true)
    }

    /// Starts sluice inside network namespace `netns` (with its own
    /// `/etc/netns/NAME` files), and waits until it is ready.
    pub fn start_in(netns: &NetNs, config: &str) -> Sluice {
        let sluice = Sluice::spawn_with(config, &[], None, Some(netns), false);
        sluice.wait_for_log("sluice is ready");
        sluice
    }

    /// Starts sluice with its descriptor limit (soft and hard) at
    /// `descriptors`, and waits until it is ready.
    pub fn start_with_descriptor_limit(config: &str, descriptors: u64) -> Sluice {
        let sluice = Sluice::spawn_with(config, &[], Some(descriptors), None, false);
        sluice.wait_for_log("sluice is ready");
        sluice
    }

    fn spawn_with(
        config: &str,
        env: &[(&str, &str)],
        descriptors: Option<u64>,
        netns: Option<&NetNs>,
        refuse_io_uring: bool,
    ) -> Sluice {
        use std::os::unix::process::CommandExt;
        let file = temp_file("sluice.yaml", &with_driver(config));
        let mut command = match netns {
            // `ip netns exec` execs sluice: the child's pid is sluice's.
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &netns.name, SLUICE]);
                command
            }
            None => Command::new(SLUICE),
        };
        if let Some(limit) = descriptors {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only `limit`,
            // a copy owned by the closure.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        if refuse_io_uring {
            // SAFETY: prctl and seccomp are async-signal-safe; the filter
            // is built before the fork and only read.
            let filter = refuse_io_uring_filter();
            unsafe {
                command.pre_exec(move || install_filter(&filter));
            }
        }
        let mut child = command
            .envs(env.iter().copied())
            .arg("-c")
            .arg(&file.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lines, changed) = &*sink;
                lines.lock().unwrap().push(line);
                changed.notify_all();
            }
        });
        Sluice {
            child,
            log,
            _config: file,
        }
    }

    /// The first listener's address in the configuration.
    pub fn listen_addr(&self) -> SocketAddr {
        let text = std::fs::read_to_string(self.config_path()).unwrap();
        let line = text
            .lines()
            .skip_while(|l| !l.starts_with("listeners:"))
            .find(|l| l.trim_start().starts_with("listen:"))
            .expect("a listener in the configuration");
        let value = line.split_once(':').unwrap().1.trim();
        value.trim_matches('"').parse().unwrap()
    }

    pub fn config_path(&self) -> &Path {
        &self._config.path
    }

    /// Waits for a log line containing `needle`; panics with the log so far
    /// if none comes before the deadline.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let (lines, changed) = &*self.log;
        let deadline = Instant::now() + DEADLINE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no log line with {needle:?}; log:\n{}",
                guard.join("\n")
            );
            guard = changed.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// Waits until `needle` has appeared in at least `count` log lines;
    /// returns the last of them.
    pub fn wait_for_log_count(&self, needle: &str, count: usize) -> String {
        let (lines, changed) = &*self.log;
        let deadline = Instant::now() + DEADLINE;
        let mut guard = lines.lock().unwrap();
        loop {
            let matching: Vec<&String> = guard.iter().filter(|l| l.contains(needle)).collect();
            if matching.len() >= count {
                return matching[count - 1].clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "fewer than {count} log lines with {needle:?}; log:\n{}",
                guard.join("\n")
            );
            guard = changed.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Writes `config` over the configuration file and sends SIGHUP; waits
    /// for the outcome and returns its log line.
    pub fn reload(&self, config: &str) -> String {
        let done = self.log_count("configuration reloaded") + self.log_count("reload failed");
        std::fs::write(self.config_path(), with_driver(config)).unwrap();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let lines = self.log_lines();
            let outcomes: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains("configuration reloaded") || l.contains("reload failed"))
                .collect();
            if outcomes.len() > done {
                return outcomes[done].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no reload outcome; log:\n{}",
                lines.join("\n")
            );
            self.wait_for_log_change();
        }
    }

    fn wait_for_log_change(&self) {
        let (lines, changed) = &*self.log;
        let guard = lines.lock().unwrap();
        let seen = guard.len();
        let _ = changed
            .wait_timeout_while(guard, Duration::from_millis(500), |l| l.len() == seen)
            .unwrap();
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a process that is expected to exit by itself.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        wait_with_deadline(&mut self.child)
    }
}

fn wait_with_deadline(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "sluice did not exit in time");
        thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal configuration: one listener on `listen` in front of one pool
/// of `backends` (name, address). `extra_pool` adds pool settings, indented
/// by four spaces; unless it sets `health`, probes are off.
pub fn config(listen: SocketAddr, backends: &[(String, SocketAddr)], extra_pool: &str) -> String {
    let health = if extra_pool.contains("health:") {
        ""
    } else {
        "    health: off\n"
    };
    let mut text = format!(
        "workers: 2\nlisteners:\n  front:\n    listen: {}\n    pool: back\npools:\n  back:\n{health}{extra_pool}    backends:\n",
        fmt_addr(listen)
    );
    for (name, addr) in backends {
        text.push_str(&format!(
            "      - address: {}\n        name: {name}\n",
            fmt_addr(*addr)
        ));
    }
    text
}

pub fn fmt_addr(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        // Quoted: unquoted, YAML reads `[::1]:80` as a list.
        SocketAddr::V6(a) => format!("\"[{}]:{}\"", a.ip(), a.port()),
    }
}

/// A TCP server on its own thread that hands every connection to `handle`
/// on a thread of its own. Stops accepting (and frees its port) when
/// stopped or dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    accepter: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start<F>(handle: F) -> TestServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        TestServer::start_on(SocketAddr::new(unique_loopback(), 0), handle)
    }

    /// Like `start`, on a given address: to bring a stopped server back.
    pub fn start_on<F>(addr: SocketAddr, handle: F) -> TestServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        // A TCP urgent byte is read in its place, as sluice relays it
        // (accepted sockets inherit this from their listener).
        socket2::SockRef::from(&listener)
            .set_out_of_band_inline(true)
            .unwrap();
        let stopping = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(handle);
        let flag = stopping.clone();
        let accepter = thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let handle = handle.clone();
                thread::spawn(move || handle(stream));
            }
        });
        TestServer {
            addr,
            stopping,
            accepter: Some(accepter),
        }
    }

    /// Closes the listening socket: new connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(accepter) = self.accepter.take() {
            self.stopping.store(true, Ordering::SeqCst);
            // Wake the accept loop so it sees the flag and drops the socket.
            let _ = TcpStream::connect(self.addr);
            accepter.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An echo server, and the configuration of sluice in front of it (see
/// [`config`]: one listener, probes off, `extra_pool` added to the pool).
pub fn behind_echo(extra_pool: &str) -> (TestServer, String) {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let text = config(
        free_addr(unique_loopback()),
        &[("echo".into(), server.addr)],
        extra_pool,
    );
    (server, text)
}

/// Writes `message` and checks that it comes back.
pub fn echoes(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
}

/// Echoes until the connection ends, by FIN or by error.
pub fn echo(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A backend that announces its name (one line), then echoes.
pub fn name_server(name: &str) -> TestServer {
    name_server_on(name, SocketAddr::new(unique_loopback(), 0))
}

pub fn name_server_on(name: &str, addr: SocketAddr) -> TestServer {
    let line = format!("{name}\n");
    TestServer::start_on(addr, move |mut stream| {
        if stream.write_all(line.as_bytes()).is_ok() {
            echo(&mut stream);
        }
    })
}

/// `n` name servers called `backend-0`...
pub fn name_servers(n: usize) -> (Vec<TestServer>, Vec<(String, SocketAddr)>) {
    let servers: Vec<TestServer> = (0..n)
        .map(|i| name_server(&format!("backend-{i}")))
        .collect();
    let backends = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("backend-{i}"), s.addr))
        .collect();
    (servers, backends)
}

/// Connects through `sluice` from `client` and returns the name the
/// backend announced.
pub fn backend_for(client: IpAddr, sluice: SocketAddr) -> String {
    let stream = connect_from(client, sluice);
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading the backend name for {client}: {e}"));
    let _ = stream.shutdown(Shutdown::Both);
    assert!(
        line.ends_with('\n'),
        "no name from a backend for client {client}: {line:?}"
    );
    line.trim_end().to_owned()
}

/// `sluice explain` for one client: (backend, retries), names only.
pub fn explain(config_path: &Path, pool: &str, client: &str) -> (String, Vec<String>) {
    explain_without(config_path, pool, client, &[])
}

/// `sluice explain --without` each of `down`: (backend, retries).
pub fn explain_without(
    config_path: &Path,
    pool: &str,
    client: &str,
    down: &[&str],
) -> (String, Vec<String>) {
    let mut args = vec!["explain", "-c", config_path.to_str().unwrap(), pool, client];
    for name in down {
        args.extend(["--without", name]);
    }
    let out = sluice_command(&args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "explain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in {stdout}"))
            .trim()
            .to_owned()
    };
    let name_of = |entry: &str| entry.split(" (").next().unwrap().to_owned();
    let retries = field("retries:");
    let retries = if retries == "none" {
        Vec::new()
    } else {
        retries.split(", ").map(name_of).collect()
    };
    (name_of(&field("backend:")), retries)
}

/// A network namespace of the test's own, with loopback up; deleted, with
/// its `/etc/netns/NAME` files, when dropped. Needs root.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `None`, with the reason printed, where namespaces cannot be made
    /// (not root): the caller skips its test.
    pub fn new(tag: &str) -> Option<NetNs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sluice-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false);
        if !made {
            eprintln!("skipped: cannot create network namespace {name} (needs root and iproute2)");
            return None;
        }
        let netns = NetNs { name };
        netns.run(&["ip", "link", "set", "lo", "up"]);
        Some(netns)
    }

    /// Runs `command` inside the namespace; panics if it fails.
    pub fn run(&self, command: &[&str]) {
        let mut exec = Command::new("ip");
        exec.args(["netns", "exec", &self.name]).args(command);
        run_to_completion(exec);
    }

    /// Writes `/etc/netns/NAME/FILE`, which `ip netns exec` shows at
    /// `/etc/FILE` inside the namespace.
    pub fn etc(&self, file: &str, contents: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), contents).unwrap();
    }

    /// Runs `work` on a thread that has entered the namespace: sockets it
    /// makes are the namespace's.
    pub fn enter<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).unwrap();
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    work()
                })
                .join()
                .unwrap()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// CPU time process `pid` has used, all its threads together.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses), utime and stime are the
    // 12th and 13th fields, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// How many times the worker threads of sluice `pid` went to sleep and
/// woke up (context switches), all workers together.
pub fn worker_wakeups(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .filter(|status| {
            status
                .lines()
                .any(|l| l.starts_with("Name:\tsluice-worker"))
        })
        .map(|status| {
            status
                .lines()
                .filter_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .map(|v| v.trim().parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}

/// The descriptors process `pid` has open.
pub fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Whether some process has accepted `client`'s connection: the kernel
/// lists the server's end in /proc/net/tcp with an inode only once
/// `accept` has given it a descriptor (0 while it waits in the queue).
/// Unlike counting descriptors, this cannot be fooled by a probe's socket
/// that happens to close at the same moment.
pub fn accepted(client: &TcpStream) -> bool {
    fn hex(addr: SocketAddr) -> String {
        let IpAddr::V4(ip) = addr.ip() else {
            panic!("IPv4 only: {addr}")
        };
        format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(ip.octets()),
            addr.port()
        )
    }
    let (server_end, client_end) = (
        hex(client.peer_addr().unwrap()),
        hex(client.local_addr().unwrap()),
    );
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .any(|f| f[1] == server_end && f[2] == client_end && f[9] != "0")
}

/// Polls `condition` every 10 ms until it holds; panics after the deadline.
pub fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_within(DEADLINE, what, condition)
}

/// [`wait_until`] for what takes longer than [`DEADLINE`] on a slow host
/// (a cluster that bootstraps itself).
pub fn wait_until_within(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so that a test can
/// regenerate what it expects instead of keeping a copy.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        Noise(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Writes `total` bytes of `Noise::new(seed)` to `to`; returns their hash.
pub fn send_noise(to: &mut impl Write, seed: u64, total: usize) -> u64 {
    let mut noise = Noise::new(seed);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        noise.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).expect("sending test data");
        left -= n;
    }
    hasher.digest()
}

/// Reads `from` to its end; returns (bytes, hash).
pub fn drain(from: &mut impl Read, chunk: usize, pause: Option<Duration>) -> (usize, u64) {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; chunk];
    let mut total = 0;
    loop {
        let n = from.read(&mut buf).expect("reading test data");
        if n == 0 {
            return (total, hasher.digest());
        }
        hasher.update(&buf[..n]);
        total += n;
        if let Some(pause) = pause {
            // A deliberately slow reader, not a wait for an event.
            thread::sleep(pause);
        }
    }
}

/// GETs `path` from sluice's admin endpoint: (status line, body).
pub fn get(admin: SocketAddr, path: &str) -> (String, String) {
    try_get(admin, path).unwrap_or_else(|| panic!("GET {path} from {admin} got no answer"))
}

/// GETs `path` from an HTTP server at `addr`: (status line, body), or
/// `None` if nothing answered. With `Connection: close`, so that the
/// server closes when done (sluice's bodies have a length, never chunks).
pub fn try_get(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    let (status, _, body) = try_request(addr, "GET", path, &[], "")?;
    Some((status, body))
}

/// One HTTP/1.1 request with `headers` and `body`: (status line, head,
/// body), or `None` if nothing answered.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> Option<(String, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(&format!("{header}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = match chunked {
        true => dechunk(body)?,
        false => body.to_owned(),
    };
    Some((head.lines().next()?.to_owned(), head.to_owned(), body))
}

/// The body of a chunked HTTP/1.1 response (servers other than sluice send
/// them).
fn dechunk(mut chunks: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, rest) = chunks.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(rest.get(..size)?);
        chunks = rest.get(size + 2..)?;
    }
}

/// The value of the sample of `family` whose labels contain every one of
/// `labels` (`key="value"`), if there is one.
pub fn sample(body: &str, family: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

/// `config` with the admin endpoint on a free address: (that address, the
/// configuration).
pub fn with_admin(config: &str) -> (SocketAddr, String) {
    let admin = free_addr(unique_loopback());
    (admin, format!("admin:\n  listen: {admin}\n{config}"))
}

/// The Prometheus text at `/metrics`.
pub fn scrape(admin: SocketAddr) -> String {
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// Connects from `client`, reads the backend's name line, checks an echo;
/// returns the name. Every failure is an `Err`, never a panic, so that
/// client loops can count them.
pub fn round_trip(client: IpAddr, to: SocketAddr) -> Result<String, String> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(client, 0).into()).unwrap();
    socket
        .connect_timeout(&to.into(), DEADLINE)
        .map_err(|e| format!("connect: {e}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .map_err(|e| format!("name: {e}"))?;
    if !name.ends_with('\n') {
        return Err(format!("no name, got {name:?}"));
    }
    reader
        .get_mut()
        .write_all(b"ping")
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = [0u8; 4];
    reader
        .read_exact(&mut echo)
        .map_err(|e| format!("echo: {e}"))?;
    if &echo != b"ping" {
        return Err(format!("echo {echo:?}"));
    }
    Ok(name.trim_end().to_owned())
}

/// Threads that run [`round_trip`] against one address until stopped,
/// each from its own rotating client addresses, counting successes and
/// keeping every failure.
pub struct ClientLoops {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Vec<String>>>,
}

impl ClientLoops {
    pub fn start(loops: u32, to: SocketAddr) -> ClientLoops {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let threads = (0..loops)
            .map(|first| {
                let (stop, served) = (stop.clone(), served.clone());
                thread::spawn(move || {
                    let mut failures = Vec::new();
                    let mut i = first;
                    while !stop.load(Ordering::Relaxed) {
                        match round_trip(client_ip(i % 400), to) {
                            Ok(_) => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.push(format!("client {}: {e}", client_ip(i % 400))),
                        }
                        i += loops;
                    }
                    failures
                })
            })
            .collect();
        ClientLoops {
            stop,
            served,
            threads,
        }
    }

    /// Waits until `n` more round trips have succeeded.
    pub fn wait_for(&self, n: usize) {
        let target = self.served.load(Ordering::Relaxed) + n;
        wait_until("round trips", || {
            self.served.load(Ordering::Relaxed) >= target
        });
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops the loops; returns every failure they saw.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// An /etc/hosts entry for the length of a test.
pub struct HostsEntry {
    name: String,
}

impl HostsEntry {
    pub fn set(name: &str, addrs: &[IpAddr]) -> HostsEntry {
        let entry = HostsEntry {
            name: name.to_owned(),
        };
        entry.write(addrs);
        entry
    }

    pub fn write(&self, addrs: &[IpAddr]) {
        // Tests edit the file one at a time: each reads it, changes its own
        // line and writes it back.
        static EDITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _editing = EDITING.lock().unwrap_or_else(|e| e.into_inner());
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
        let mut lines: Vec<String> = hosts
            .lines()
            .filter(|l| !l.ends_with(&format!(" {}", self.name)))
            .map(str::to_owned)
            .collect();
        lines.extend(addrs.iter().map(|ip| format!("{ip} {}", self.name)));
        // One write, in place: /etc/hosts may be a mount point.
        std::fs::write("/etc/hosts", lines.join("\n") + "\n").unwrap();
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        self.write(&[]);
    }
}
