"""Shared pieces of the sluice benchmarks (benches/compare, benches/scaling).

Everything runs on loopback (127.0.0.0/8), on scratch ports 17200-17299 and in
a temporary directory. A Lab starts the servers and kills every process it
started when it closes, at exit, or when the script gets SIGTERM, SIGHUP or
SIGINT. Client tools run with a timeout each, so a hung peer cannot hang a run.

Run as `benchlib.py serve-lines HOST PORT` it is the idle backend: it answers
every line with the same line and holds connections open.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import csv
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
SLUICE_BUILD = ROOT / "target" / "release" / "sluice"
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A server that did not start or a measurement that failed; says why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP exit through the normal path (finally, atexit)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))


def raise_fd_limit() -> int:
    """Raises this process's descriptor limit to the hard limit (children
    inherit it) and returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def apt_install(packages: list[str]) -> None:
    """Installs the Debian packages that are missing (scripts/apt-install)."""
    subprocess.run([str(ROOT / "scripts" / "apt-install"), *packages], check=True)


def check_ports_free(ports) -> None:
    for port in ports:
        with socket.socket() as probe:
            # As the servers do: connections in TIME-WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError as error:
                raise BenchError(f"scratch port {HOST}:{port} is taken: {error}") from None


def run(argv: list[str], timeout: float) -> str:
    """Runs a client tool and returns its standard output."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise BenchError(f"{argv[0]} exited with status {done.returncode}: {said}")
    return done.stdout


def first_line(argv: list[str]) -> str:
    """The first line a command prints on either stream (for versions)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    release = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
    microcode = re.search(r"^microcode\s*:\s*(.*)$", cpuinfo, re.M)
    return {
        "CPUs": f"{len(os.sched_getaffinity(0))} x {model.group(1) if model else 'unknown'}",
        "microcode": microcode.group(1) if microcode else "unknown",
        "mitigations": mitigations(),
        "memory": f"{int(memory.group(1)) / 2**20:.1f} GiB" if memory else "unknown",
        "kernel": os.uname().release,
        "distribution": release.group(1) if release else "unknown",
        "load average at start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def mitigations() -> str:
    """What the kernel says of each CPU vulnerability it mitigates (the
    ones that cost system calls and context switches), in short."""
    directory = Path("/sys/devices/system/cpu/vulnerabilities")
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return "unknown"
    said = []
    for entry in entries:
        text = entry.read_text().strip()
        if text != "Not affected":
            said.append(f"{entry.name}: {text}")
    return "; ".join(said) or "none needed"


def source_revision() -> str:
    return first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])


def wait_for_sluice_build(timeout: float = 300) -> Path:
    """target/release/sluice, waiting for it while a rebuild replaces it."""
    deadline = time.monotonic() + timeout
    while not SLUICE_BUILD.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{SLUICE_BUILD} does not exist: build it with `make build`")
        log(f"waiting for {SLUICE_BUILD} (a build may be replacing it)")
        time.sleep(5)
    return SLUICE_BUILD


def terminate_with_parent() -> None:
    """Run in a server just before exec: the kernel sends it SIGTERM if the
    script dies, even of SIGKILL, when nothing else would stop it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Lab:
    """A temporary directory and the servers started in it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        self._procs: list[subprocess.Popen] = []
        atexit.register(self.close)

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def copy_sluice(self) -> Path:
        """A private copy of the sluice binary, so that a rebuild during the
        run changes nothing."""
        return Path(shutil.copy2(wait_for_sluice_build(), self.dir / "sluice"))

    def start(self, name: str, argv: list[str], ports, host: str = HOST,
              timeout: float = 15) -> subprocess.Popen:
        """Starts a server in its own process group, output to NAME.log, and
        returns once every port of host accepts connections."""
        with open(self.dir / f"{name}.log", "wb") as output:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, cwd=self.dir,
                                    start_new_session=True, preexec_fn=terminate_with_parent)
        self._procs.append(proc)
        deadline = time.monotonic() + timeout
        for port in ports:
            while not accepts(port, host):
                if proc.poll() is not None:
                    raise BenchError(f"{name} exited with status {proc.returncode}: "
                                     f"{self.log_tail(name)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: nothing accepts on {host}:{port} "
                                     f"after {timeout:.0f}s: {self.log_tail(name)}")
                time.sleep(0.02)
        return proc

    def log_tail(self, name: str) -> str:
        lines = (self.dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:]) or "no output"

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the server's process group, SIGKILL after 5 seconds."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self._procs[:]):
            self.stop(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def accepts(port: int, host: str = HOST) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


# Backends -----------------------------------------------------------------

def start_redis(lab: Lab, port: int, host: str = HOST, name: str = "redis") -> subprocess.Popen:
    return lab.start(name, ["redis-server", "--bind", host, "--port", str(port),
                            "--save", "", "--appendonly", "no", "--logfile", ""], [port], host)


def start_iperf3(lab: Lab, port: int) -> subprocess.Popen:
    return lab.start("iperf3", ["iperf3", "-s", "-B", HOST, "-p", str(port)], [port])


def start_http(lab: Lab, port: int, fd_limit: int) -> subprocess.Popen:
    """NGINX answering every request with `200 ok`."""
    temp = lab.dir / "http-temp"
    temp.mkdir()
    config = lab.write("http.conf", f"""\
worker_processes 2;
worker_rlimit_nofile {fd_limit};
pid {lab.dir}/http.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {HOST}:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
    return lab.start("http", ["nginx", "-p", str(lab.dir), "-e", "stderr", "-c", str(config),
                              "-g", "daemon off;"], [port])


def start_line_server(lab: Lab, port: int, host: str = HOST) -> subprocess.Popen:
    return lab.start("lines", [sys.executable, __file__, "serve-lines", host, str(port)], [port])


def serve_lines(host: str, port: int) -> None:
    """The idle backend: one line back for every line, connections held open."""
    raise_fd_limit()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(answer, host, port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# Proxies: routes map a listener name to (listen port, backend port) ---------

def haproxy_maxconn(fd_limit: int) -> int:
    """HAProxy asks for 2 descriptors per connection, plus 2 per splice pipe
    (maxconn / 4 of them): stay under the limit, or it refuses to start."""
    return min(12000, (fd_limit - 500) * 2 // 5)


def start_haproxy(lab: Lab, routes: dict[str, tuple[int, int]], fd_limit: int) -> subprocess.Popen:
    maxconn = haproxy_maxconn(fd_limit)
    sections = "".join(f"""
listen {name}
    bind {HOST}:{listen}
    server {name} {HOST}:{backend}
""" for name, (listen, backend) in routes.items())
    config = lab.write("haproxy.cfg", f"""\
global
    nbthread 2
    maxconn {maxconn}

defaults
    mode tcp
    option splice-auto
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{sections}""")
    return lab.start("haproxy", ["haproxy", "-f", str(config), "-db"],
                     [listen for listen, _ in routes.values()])


def start_nginx_stream(lab: Lab, routes: dict[str, tuple[int, int]],
                       fd_limit: int) -> subprocess.Popen:
    servers = "".join(f"    server {{ listen {HOST}:{listen}; proxy_pass {HOST}:{backend}; }}\n"
                      for listen, backend in routes.values())
    config = lab.write("nginx-stream.conf", f"""\
load_module {NGINX_STREAM_MODULE};
worker_processes 2;
worker_rlimit_nofile {fd_limit};
pid {lab.dir}/nginx-stream.pid;
error_log stderr warn;
events {{ worker_connections 12000; }}
stream {{
    access_log off;
    proxy_connect_timeout 5s;
    proxy_timeout 1h;
{servers}}}
""")
    return lab.start("nginx", ["nginx", "-p", str(lab.dir), "-e", "stderr", "-c", str(config),
                               "-g", "daemon off;"], [listen for listen, _ in routes.values()])


def sluice_config(routes: dict[str, tuple[int, int]], engine: str | None = None,
                  io: str | None = None) -> str:
    """Two workers, one listener and one pool (health off) per route; `io` picks
    the driver (default: sluice's own, auto)."""
    lines = ["workers: 2", "shutdown_timeout: 1s"] + ([f"io: {io}"] if io else []) + ["listeners:"]
    for name, (listen, _) in routes.items():
        lines += [f"  {name}:", f"    listen: {HOST}:{listen}", f"    pool: {name}"]
    lines.append("pools:")
    for name, (_, backend) in routes.items():
        lines += [f"  {name}:", "    health: off"]
        lines += [f"    engine: {engine}"] if engine else []
        lines += ["    backends:", f"      - address: {HOST}:{backend}"]
    return "\n".join(lines) + "\n"


def check_sluice_config(binary: Path, config: Path) -> None:
    done = subprocess.run([str(binary), "--check", "-c", str(config)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        raise BenchError(done.stderr.strip() or f"sluice --check exited {done.returncode}")


def start_sluice(lab: Lab, binary: Path, name: str, config: Path, ports) -> subprocess.Popen:
    check_sluice_config(binary, config)
    return lab.start(name, [str(binary), "-c", str(config)], ports)


# What a proxy costs: its processes, their memory, threads, descriptors -----

def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (NGINX: the master and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"^VmRSS:\s*(\d+) kB", status, re.M).group(1))
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time used so far by pids (all their threads)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def measured_cpu(pid: int | None, measure):
    """Runs `measure()`: its result, and the CPU seconds the process tree of
    `pid` used meanwhile (0 without a pid: nothing to charge)."""
    tree = process_tree(pid) if pid else []
    before = cpu_seconds(tree)
    result = measure()
    return result, cpu_seconds(tree) - before


def rotated(items: list, round_: int) -> list:
    """`items` in round `round_`'s order: shifted by one each round, so
    that none always runs first (on a warmer or a colder machine)."""
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def thread_count(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/task")) for pid in pids)


def fd_count(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


# Workload clients ----------------------------------------------------------

def iperf3(port: int, seconds: int = 4) -> dict:
    """One connection, as fast as it goes: Gbit/s received."""
    result = json.loads(run(["iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"],
                            timeout=seconds + 30))
    if "error" in result:
        raise BenchError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    return {"gbps": received["bits_per_second"] / 1e9, "work": received["bytes"] / 1e9}


def redis_benchmark(port: int, clients: int, requests: int, pipeline: int = 1,
                    keepalive: bool = True) -> dict:
    """redis-benchmark GET: requests/s, p50 and p99 in milliseconds. Without
    keepalive each request has a connection of its own."""
    output = run(["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(clients),
                  "-n", str(requests), "-P", str(pipeline), "-k", "1" if keepalive else "0",
                  "-t", "get", "--csv"], timeout=180)
    rows = [row for row in csv.DictReader(line for line in output.splitlines()
                                          if line.startswith('"')) if row.get("test") == "GET"]
    if not rows:
        raise BenchError(f"redis-benchmark printed no GET result: {output.strip()[-200:]!r}")
    row = rows[0]
    return {"rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]),
            "p99": float(row["p99_latency_ms"]), "work": requests}


def wrk(port: int, seconds: int = 4, connections: int = 50) -> dict:
    """HTTP GET with `Connection: close`, so one TCP connection per request:
    requests/s and wrk's error counts."""
    output = run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s",
                  "-H", "Connection: close", f"http://{HOST}:{port}/"], timeout=seconds + 30)
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M)
    if not rate:
        raise BenchError(f"wrk printed no Requests/sec: {output.strip()[-200:]!r}")
    errors = []
    socket_errors = re.search(r"Socket errors: (.*)", output)
    if socket_errors:
        errors += [part.strip() for part in socket_errors.group(1).split(",")
                   if not part.strip().endswith(" 0")]
    bad_status = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if bad_status:
        errors.append(f"non-2xx {bad_status.group(1)}")
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    if not total:
        raise BenchError(f"wrk printed no request count: {output.strip()[-200:]!r}")
    return {"rps": float(rate.group(1)), "errors": ", ".join(errors) or "0",
            "work": int(total.group(1))}


@contextlib.contextmanager
def held_connections(port: int, count: int, timeout: float = 90):
    """Opens count connections to port, sends a line on each and reads the
    answer, then holds them all open for the body of the with."""
    deadline = time.monotonic() + timeout
    sockets: list[socket.socket] = []
    try:
        try:
            while len(sockets) < count:
                batch = []
                for _ in range(min(200, count - len(sockets))):
                    batch.append(socket.create_connection((HOST, port), timeout=10))
                    sockets.append(batch[-1])
                for sock in batch:
                    sock.sendall(b"hello\n")
                for sock in batch:
                    answer = b""
                    while not answer.endswith(b"\n"):
                        chunk = sock.recv(64)
                        if not chunk:
                            raise BenchError(f"{len(sockets)} of {count} connections open: "
                                             f"one closed before it answered")
                        answer += chunk
                if time.monotonic() > deadline:
                    raise BenchError(f"only {len(sockets)} of {count} connections open "
                                     f"after {timeout:.0f}s")
        except OSError as error:
            raise BenchError(f"{len(sockets)} of {count} connections open: {error}") from None
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def idle_cost(proxy_pid: int, port: int, count: int) -> dict:
    """What count idle connections (each has carried one line each way) cost
    the proxy: resident memory per connection and its threads meanwhile."""
    pids = process_tree(proxy_pid)
    rss_before, fds_before = rss_kib(pids), fd_count(pids)
    with held_connections(port, count):
        pids = process_tree(proxy_pid)
        rss_open, threads = rss_kib(pids), thread_count(pids)
    wait_until_closed(pids, fds_before + count // 10 + 32)
    return {"kib": (rss_open - rss_before) / count, "threads": threads}


def wait_until_closed(pids: list[int], fds: int, timeout: float = 20) -> None:
    """Waits until the proxy's descriptors are down to fds (the connections
    are gone; what the proxy keeps for later ones may remain)."""
    deadline = time.monotonic() + timeout
    while fd_count(pids) > fds:
        if time.monotonic() > deadline:
            log(f"warning: the proxy still has {fd_count(pids)} descriptors open "
                f"{timeout:.0f}s after the clients closed (expected about {fds})")
            return
        time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve-lines"] or len(sys.argv) != 4:
        sys.exit("usage: benchlib.py serve-lines HOST PORT")
    serve_lines(sys.argv[2], int(sys.argv[3]))
