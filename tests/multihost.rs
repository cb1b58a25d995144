//! More than one machine: three sluice instances behind a router that
//! spreads flows over them by layer-4 multipath hashing (ECMP), built in
//! network namespaces:
//!
//! ```text
//!   client (256 source addresses 10.1.x.y)
//!     | 10.0.1.0/24
//!   router ── ECMP route 10.9.9.9/32 over lb1, lb2, lb3; flows pinned (conf/bird/flow-pinning.nft)
//!     | 10.0.11.0/24, 10.0.12.0/24, 10.0.13.0/24        | 10.0.2.0/24
//!   lb1, lb2, lb3 (sluice on 10.9.9.9:6379, held on lo)   backends (name servers on 10.0.2.2)
//! ```
//!
//! The route follows each instance's `/ready`: in the first test the test
//! itself plays the BGP speaker (it polls `/ready` and rewrites the route),
//! in the second BIRD does, as operators run it (conf/bird/). Both check
//! that flows spread over every instance and every client reaches the
//! backend `sluice explain` names for it, whichever instance carried it;
//! that stopping an instance, or restarting each in turn, fails no
//! connection and moves no client to another backend; and (first test)
//! that when a backend dies every instance takes it out within `fall ×
//! interval + timeout`, only its clients move, and every instance, asked
//! for every client, moves them to the same places.
//!
//! Needs root (network namespaces); skipped with a message otherwise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), 6379);
const CLIENTS: u32 = 256;
const INSTANCES: usize = 3;

/// Health checks of every instance: a dead backend is out within
/// `fall × interval + timeout` = 2 × 200 + 100 = 500 ms.
const HEALTH: &str = "{ interval: 200ms, timeout: 100ms, fall: 2, rise: 1 }";
const EJECTION_BOUND: Duration = Duration::from_millis(500);

/// The two tests build the same addresses in their own namespaces; one at
/// a time keeps the machine's two cores for one of them.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn client_addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        1,
        (i / 250) as u8 + 1,
        (i % 250) as u8 + 1,
    ))
}

/// The address of instance `n` (0-based) on its link to the router, and
/// the router's on that link.
fn instance_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 11 + n as u8, 2)
}

fn router_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 11 + n as u8, 1)
}

fn admin_addr(n: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(instance_addr(n)), 9137)
}

/// Puts every client address on the loopback of `netns`.
fn add_client_addresses(netns: &NetNs) {
    let batch: String = (0..CLIENTS)
        .map(|i| format!("addr add {}/32 dev lo\n", client_addr(i)))
        .collect();
    let batch_file = temp_file("clients", &batch);
    ip(&[
        "-n",
        &netns.name,
        "-batch",
        batch_file.path.to_str().unwrap(),
    ]);
}

/// Connects every client once, from inside `netns`, to the service
/// address: the backend each reached, or its failure.
fn every_client_from(netns: &NetNs) -> Vec<(IpAddr, Result<String, String>)> {
    netns.enter(|| {
        (0..CLIENTS)
            .map(client_addr)
            .map(|c| (c, round_trip(c, SERVICE)))
            .collect()
    })
}

/// Puts the calling thread in `netns` for good: what it connects or binds
/// from now on is the namespace's.
fn enter_for_good(netns: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hosts, their links, the backends, and one sluice per instance.
struct Topology {
    router: NetNs,
    client: NetNs,
    backend_host: NetNs,
    hosts: Vec<NetNs>,
    backends: Vec<TestServer>,
    configs: Vec<String>,
    sluices: Vec<Option<Sluice>>,
    /// Each client's backend, as `sluice explain` names it.
    expected: BTreeMap<IpAddr, String>,
}

impl Drop for Topology {
    /// The backends stop from inside their namespace, where their wake-up
    /// connection goes.
    fn drop(&mut self) {
        let backends = std::mem::take(&mut self.backends);
        self.backend_host.enter(move || drop(backends));
    }
}

impl Topology {
    fn build() -> Option<Topology> {
        let router = NetNs::new("r")?;
        let client = NetNs::new("c")?;
        let backend_host = NetNs::new("b")?;
        let hosts: Vec<NetNs> = (0..INSTANCES)
            .map(|n| NetNs::new(&format!("lb{}", n + 1)))
            .collect::<Option<_>>()?;
        router.run(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ]);
        let link = |(a, a_if, a_addr): (&NetNs, &str, String),
                    (b, b_if, b_addr): (&NetNs, &str, String)| {
            ip(&[
                "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
                "netns", &b.name,
            ]);
            for (ns, dev, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
                ip(&[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    dev,
                ]);
                ip(&["-n", &ns.name, "link", "set", dev, "up"]);
            }
        };
        link(
            (&router, "r-c", "10.0.1.1".into()),
            (&client, "c-r", "10.0.1.2".into()),
        );
        link(
            (&router, "r-b", "10.0.2.1".into()),
            (&backend_host, "b-r", "10.0.2.2".into()),
        );
        ip(&[
            "-n",
            &client.name,
            "route",
            "add",
            "default",
            "via",
            "10.0.1.1",
        ]);
        ip(&[
            "-n",
            &backend_host.name,
            "route",
            "add",
            "default",
            "via",
            "10.0.2.1",
        ]);
        ip(&[
            "-n",
            &router.name,
            "route",
            "add",
            "10.1.0.0/16",
            "via",
            "10.0.1.2",
        ]);
        for (n, host) in hosts.iter().enumerate() {
            link(
                (
                    &router,
                    &format!("r-lb{}", n + 1),
                    router_addr(n).to_string(),
                ),
                (host, "lb-r", instance_addr(n).to_string()),
            );
            let via = router_addr(n).to_string();
            ip(&["-n", &host.name, "route", "add", "default", "via", &via]);
            ip(&["-n", &host.name, "addr", "add", "10.9.9.9/32", "dev", "lo"]);
            // Established flows keep their instance (flow-pinning.nft).
            let table = (101 + n).to_string();
            let mark = (1 + n).to_string();
            ip(&[
                "-n",
                &router.name,
                "rule",
                "add",
                "fwmark",
                &mark,
                "table",
                &table,
            ]);
            let gateway = instance_addr(n).to_string();
            ip(&[
                "-n",
                &router.name,
                "route",
                "add",
                "10.9.9.9/32",
                "via",
                &gateway,
                "table",
                &table,
            ]);
        }
        router.run(&["nft", "-f", &format!("{ROOT}/conf/bird/flow-pinning.nft")]);
        add_client_addresses(&client);

        let backends: Vec<TestServer> = backend_host.enter(|| {
            (0..3)
                .map(|i| {
                    let addr = SocketAddr::new("10.0.2.2".parse().unwrap(), 0);
                    name_server_on(&format!("backend-{i}"), addr)
                })
                .collect()
        });
        let configs: Vec<String> = (0..INSTANCES)
            .map(|n| {
                let mut text = format!(
                    "workers: 2\nshutdown_delay: 1s\nshutdown_timeout: 10s\nadmin:\n  listen: {}\n\
                     listeners:\n  front:\n    listen: {SERVICE}\n    pool: back\n\
                     pools:\n  back:\n    retries: 2\n    health: {HEALTH}\n    backends:\n",
                    admin_addr(n)
                );
                for (i, server) in backends.iter().enumerate() {
                    text.push_str(&format!(
                        "      - address: {}\n        name: backend-{i}\n",
                        server.addr
                    ));
                }
                text
            })
            .collect();
        // Whole before anything may fail, so that its `Drop` stops the
        // backends inside their namespace.
        let mut topology = Topology {
            router,
            client,
            backend_host,
            hosts,
            backends,
            configs,
            sluices: (0..INSTANCES).map(|_| None).collect(),
            expected: BTreeMap::new(),
        };
        for n in 0..INSTANCES {
            topology.start(n);
        }
        topology.expected = topology.explain(&[]);
        Some(topology)
    }

    /// Every client's backend by `sluice explain`, with `down` taken out.
    fn explain(&self, down: &[&str]) -> BTreeMap<IpAddr, String> {
        let config = self.sluices.iter().flatten().next().unwrap().config_path();
        (0..CLIENTS)
            .map(client_addr)
            .map(|c| (c, explain_without(config, "back", &c.to_string(), down).0))
            .collect()
    }

    fn sluice(&self, n: usize) -> &Sluice {
        self.sluices[n].as_ref().expect("instance running")
    }

    /// `/ready` of instance `n`, from the router: the status code, if it
    /// answered.
    fn ready(&self, n: usize) -> Option<u16> {
        self.router.enter(|| ready_status(admin_addr(n)))
    }

    /// Connections each instance relayed so far (its metrics, read from the
    /// router).
    fn relayed(&self) -> Vec<f64> {
        self.router.enter(|| {
            (0..INSTANCES)
                .map(|n| {
                    scrape(admin_addr(n))
                        .lines()
                        .filter(|l| l.starts_with("sluice_connections_total{"))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum()
                })
                .collect()
        })
    }

    /// The instances the router's route to the service goes through.
    fn next_hops(&self) -> BTreeSet<usize> {
        let out = Command::new("ip")
            .args(["-n", &self.router.name, "route", "show", "10.9.9.9/32"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        (0..INSTANCES)
            .filter(|&n| text.contains(&format!("via {} ", instance_addr(n))))
            .collect()
    }

    /// Stops instance `n` with SIGTERM and waits for it to exit 0.
    fn stop(&mut self, n: usize) -> Sluice {
        let sluice = self.sluices[n].take().expect("instance running");
        sluice.signal(Signal::SIGTERM);
        sluice
    }

    fn start(&mut self, n: usize) {
        self.sluices[n] = Some(Sluice::start_in(&self.hosts[n], &self.configs[n]));
    }
}

/// A GET of `/ready` at `admin`: its status code, if anything answered.
fn ready_status(admin: SocketAddr) -> Option<u16> {
    try_get(admin, "/ready")?.0.split(' ').nth(1)?.parse().ok()
}

/// Clients connecting through the service address without pause, each
/// from its own addresses in turn, checking each reaches its backend.
struct Traffic {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(client: &NetNs, expected: &BTreeMap<IpAddr, String>, loops: u32) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let threads = (0..loops)
            .map(|first| {
                let (stop, served) = (stop.clone(), served.clone());
                let (netns, expected) = (client.name.clone(), expected.clone());
                thread::spawn(move || {
                    enter_for_good(&netns);
                    let mut failures = Vec::new();
                    let mut i = first;
                    while !stop.load(Ordering::Relaxed) {
                        let c = client_addr(i % CLIENTS);
                        match round_trip(c, SERVICE) {
                            Ok(name) if name == expected[&c] => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(name) => {
                                failures.push(format!("{c} reached {name}, not {}", expected[&c]))
                            }
                            Err(e) => failures.push(format!("{c}: {e}")),
                        }
                        i += loops;
                    }
                    failures
                })
            })
            .collect();
        Traffic {
            stop,
            served,
            threads,
        }
    }

    fn wait_for(&self, n: usize) {
        let target = self.served.load(Ordering::Relaxed) + n;
        wait_until("round trips through the service address", || {
            self.served.load(Ordering::Relaxed) >= target
        });
    }

    /// Stops; (connections served, every failure).
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (self.served.load(Ordering::Relaxed), failures)
    }
}

/// Long-lived connections, one per client address given, opened through
/// the service address: after whatever happens meanwhile, each must still
/// echo.
struct Held(Vec<(IpAddr, BufReader<TcpStream>)>);

impl Held {
    fn open(client: &NetNs, clients: impl Iterator<Item = IpAddr> + Send) -> Held {
        Held(client.enter(|| {
            clients
                .map(|c| {
                    let mut reader = BufReader::new(connect_from(c, SERVICE));
                    let mut name = String::new();
                    reader.read_line(&mut name).unwrap();
                    (c, reader)
                })
                .collect()
        }))
    }

    /// Checks every connection still echoes; returns the failures.
    fn check(mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for (c, reader) in &mut self.0 {
            let mut echo = [0u8; 5];
            let result = reader
                .get_mut()
                .write_all(b"still")
                .and_then(|()| reader.read_exact(&mut echo));
            match result {
                Ok(()) if &echo == b"still" => {}
                Ok(()) => failures.push(format!("held {c}: echo {echo:?}")),
                Err(e) => failures.push(format!("held {c}: {e}")),
            }
        }
        failures
    }
}

/// Plays the BGP speaker: polls every instance's `/ready` from the router
/// and keeps the multipath route over the ready ones.
struct RouteFollower {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RouteFollower {
    fn start(router: &NetNs) -> RouteFollower {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = router.name.clone();
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            enter_for_good(&netns);
            let mut announced: Option<BTreeSet<usize>> = None;
            while !flag.load(Ordering::Relaxed) {
                let ready: BTreeSet<usize> = (0..INSTANCES)
                    .filter(|&n| ready_status(admin_addr(n)) == Some(200))
                    .collect();
                if announced.as_ref() != Some(&ready) {
                    let mut args = vec!["route", "replace", "10.9.9.9/32"];
                    let gateways: Vec<String> = ready
                        .iter()
                        .map(|&n| instance_addr(n).to_string())
                        .collect();
                    for gateway in &gateways {
                        args.extend(["nexthop", "via", gateway]);
                    }
                    if gateways.is_empty() {
                        args = vec!["route", "del", "10.9.9.9/32"];
                    }
                    // (ip in this thread's namespace: the router's.)
                    let _ = Command::new("ip").args(&args).status();
                    announced = Some(ready);
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        RouteFollower {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RouteFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until the router's route goes through exactly `hops`.
fn wait_for_hops(topology: &Topology, hops: &[usize]) {
    let want: BTreeSet<usize> = hops.iter().copied().collect();
    wait_until("the route to follow /ready", || {
        topology.next_hops() == want
    });
}

/// Every client once: each reached its expected backend; and every
/// instance carried some of them.
fn check_spread_and_backends(topology: &Topology) -> Vec<f64> {
    let before = topology.relayed();
    for (client, reached) in every_client_from(&topology.client) {
        assert_eq!(
            reached.as_deref(),
            Ok(topology.expected[&client].as_str()),
            "client {client}"
        );
    }
    let after = topology.relayed();
    let carried: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(
        carried.iter().sum::<f64>(),
        f64::from(CLIENTS),
        "{carried:?}"
    );
    for (n, count) in carried.iter().enumerate() {
        assert!(
            *count > 0.0,
            "instance {} carried no flow: {carried:?}",
            n + 1
        );
    }
    carried
}

/// Stops instance `n` under traffic and with connections held open
/// through every instance: the route drops it while it still accepts, its
/// open connections finish, nothing fails. Returns how long after SIGTERM
/// the route dropped it, and when its listeners closed.
fn stop_under_traffic(topology: &mut Topology, n: usize) -> (Duration, Duration) {
    let traffic = Traffic::start(&topology.client, &topology.expected, 4);
    traffic.wait_for(200);
    let held = Held::open(&topology.client, (0..24).map(|i| client_addr(i * 10)));
    let others: Vec<usize> = (0..INSTANCES).filter(|&m| m != n).collect();
    let signalled = Instant::now();
    let stopping = topology.stop(n);
    wait_for_hops(topology, &others);
    let withdrawn = signalled.elapsed();
    traffic.wait_for(200);
    stopping.wait_for_log("stopping: no new connections");
    let closed = signalled.elapsed();
    // The held connections of the stopping instance still work after its
    // listeners closed: their flows stay with it, and its drain waits for
    // them.
    let held_failures = held.check();
    assert_eq!(stopping.wait_exit().code(), Some(0));
    traffic.wait_for(200);
    let (served, mut failures) = traffic.stop();
    failures.extend(held_failures);
    assert!(
        failures.is_empty(),
        "{} of {served} connections failed while instance {} stopped: {failures:?}",
        failures.len(),
        n + 1
    );
    eprintln!(
        "instance {} stopped: {served} connections through the others, 0 failed; \
         route withdrawn {withdrawn:?} after SIGTERM, listeners closed {closed:?} after",
        n + 1
    );
    (withdrawn, closed)
}

#[test]
fn instances_behind_ecmp_keep_every_client_on_its_backend() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut topology) = Topology::build() else {
        return;
    };
    let _follower = RouteFollower::start(&topology.router);
    wait_for_hops(&topology, &[0, 1, 2]);

    let carried = check_spread_and_backends(&topology);
    eprintln!("{CLIENTS} clients over {INSTANCES} instances: {carried:?}, each on its backend");

    // One instance stops: withdrawn first, then closed.
    let (withdrawn, closed) = stop_under_traffic(&mut topology, 0);
    assert!(withdrawn < closed, "{withdrawn:?} {closed:?}");
    topology.start(0);
    wait_for_hops(&topology, &[0, 1, 2]);

    // A rolling restart, one instance at a time.
    let traffic = Traffic::start(&topology.client, &topology.expected, 4);
    for n in 0..INSTANCES {
        traffic.wait_for(100);
        let stopping = topology.stop(n);
        assert_eq!(stopping.wait_exit().code(), Some(0));
        topology.start(n);
        wait_for_hops(&topology, &[0, 1, 2]);
    }
    traffic.wait_for(100);
    let (served, failures) = traffic.stop();
    assert!(
        failures.is_empty(),
        "{} of {served} connections failed during the rolling restart: {failures:?}",
        failures.len()
    );
    eprintln!("rolling restart of {INSTANCES} instances: {served} connections, 0 failed");
    check_spread_and_backends(&topology);

    // A backend dies: every instance takes it out within fall × interval +
    // timeout, and they all move the same clients to the same places.
    let died = Instant::now();
    // (Stopped from inside its namespace: its wake-up connection must
    // reach it, and nothing else.)
    let mut dead = topology.backends.remove(1);
    topology.backend_host.enter(|| dead.stop());
    let mut out_after = Vec::new();
    for n in 0..INSTANCES {
        topology.sluice(n).wait_for_log("backend is down");
        out_after.push(died.elapsed());
    }
    let converged = *out_after.iter().max().unwrap();
    eprintln!("backend-1 died: out of every instance after {out_after:?}");
    // The probe in flight when it died may have just passed: one more
    // interval, and a second for scheduling on a loaded machine.
    assert!(
        converged <= EJECTION_BOUND + Duration::from_millis(200) + Duration::from_secs(1),
        "converged after {converged:?}"
    );
    let after = topology.explain(&["backend-1"]);
    let before = std::mem::replace(&mut topology.expected, after);
    // Only backend-1's clients move (Maglev): every other keeps its backend.
    let moved = before
        .iter()
        .filter(|(client, old)| topology.expected[*client] != **old)
        .inspect(|(client, old)| assert_eq!(*old, "backend-1", "{client} moved"))
        .count();
    assert!(moved > 0);
    check_spread_and_backends(&topology);
    // And each instance, asked directly for every client (the client
    // addresses on its own loopback, so nothing else may run now), routes
    // it where the others do.
    for (n, host) in topology.hosts.iter().enumerate() {
        add_client_addresses(host);
        for (client, reached) in every_client_from(host) {
            assert_eq!(
                reached.as_deref(),
                Ok(topology.expected[&client].as_str()),
                "instance {} routes {client} elsewhere",
                n + 1
            );
        }
    }
    eprintln!("{moved} clients of backend-1 moved, the same way on every instance");
}

/// BIRD on the router and on every instance's host (conf/bird/), each
/// instance's announcement tied to its `/ready` by
/// `conf/bird/sluice-ready-check`.
struct Bird {
    daemons: Vec<Child>,
    /// Configurations and control sockets.
    dir: tempfile::TempDir,
}

impl Drop for Bird {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

impl Bird {
    fn start(topology: &Topology) -> Bird {
        // The guard first: whatever fails below, it stops what started.
        let mut bird = Bird {
            daemons: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let dir = bird.dir.path().to_owned();
        let spawn = |netns: &NetNs, program: &str, args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &netns.name, program])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{program}: {e}"))
        };
        let socket = |name: &str| dir.join(format!("{name}.ctl"));
        bird.daemons.push(spawn(
            &topology.router,
            "bird",
            &[
                "-f",
                "-c",
                &format!("{ROOT}/conf/bird/router.conf"),
                "-s",
                socket("router").to_str().unwrap(),
            ],
        ));
        let template =
            std::fs::read_to_string(format!("{ROOT}/conf/bird/sluice-host.conf")).unwrap();
        for (n, host) in topology.hosts.iter().enumerate() {
            let config = template
                .replace("@HOST@", &instance_addr(n).to_string())
                .replace("@AS@", &(65001 + n).to_string())
                .replace("@ROUTER@", &router_addr(n).to_string());
            let path = dir.join(format!("lb{n}.conf"));
            std::fs::write(&path, config).unwrap();
            let control = socket(&format!("lb{n}"));
            bird.daemons.push(spawn(
                host,
                "bird",
                &[
                    "-f",
                    "-c",
                    path.to_str().unwrap(),
                    "-s",
                    control.to_str().unwrap(),
                ],
            ));
            wait_until("BIRD to open its control socket", || control.exists());
            bird.daemons.push(spawn(
                host,
                &format!("{ROOT}/conf/bird/sluice-ready-check"),
                &[
                    &format!("http://{}/ready", admin_addr(n)),
                    control.to_str().unwrap(),
                    "service",
                ],
            ));
        }
        bird
    }
}

#[test]
fn instances_announced_by_bird_follow_ready() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut topology) = Topology::build() else {
        return;
    };
    if Command::new("bird").arg("--version").output().is_err() {
        eprintln!("skipped: no bird here (`make test` installs bird2)");
        return;
    }
    let _bird = Bird::start(&topology);
    let announced = Instant::now();
    wait_for_hops(&topology, &[0, 1, 2]);
    eprintln!(
        "BGP: every instance announced {:?} after BIRD started",
        announced.elapsed()
    );
    assert!((0..INSTANCES).all(|n| topology.ready(n) == Some(200)));
    let carried = check_spread_and_backends(&topology);
    eprintln!("{CLIENTS} clients over {INSTANCES} instances (BGP): {carried:?}");

    // SIGTERM: /ready turns 503, BIRD withdraws the route, and only then,
    // shutdown_delay later, do the listeners close.
    let (withdrawn, closed) = stop_under_traffic(&mut topology, 1);
    assert!(
        withdrawn < closed,
        "route withdrawn {withdrawn:?} after SIGTERM, listeners closed {closed:?} after"
    );
    topology.start(1);
    wait_for_hops(&topology, &[0, 1, 2]);
    check_spread_and_backends(&topology);
}
