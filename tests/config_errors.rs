//! Every class of configuration mistake gives one clear line naming the
//! file, the position where the parser knows it, and the field; `--check`
//! and start-up exit with 1. The reference and demo files are valid.

mod common;

use std::net::TcpListener;

use common::*;

const VALID: &str = "\
listeners:
  redis:
    listen: 127.0.0.1:7000
    pool: redis
pools:
  redis:
    health: off
    backends:
      - address: 10.0.0.1:6379
";

/// Runs `--check` on `text`; asserts exit 1 and returns stderr with the
/// temporary file's path replaced by `sluice.yaml`.
fn rejected(text: &str) -> String {
    let file = temp_file("sluice.yaml", text);
    let out = sluice_command(&["--check", "-c", file.path.to_str().unwrap()]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 for:\n{text}\nstderr: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line expected, got:\n{stderr}"
    );
    stderr
        .replace(file.path.to_str().unwrap(), "sluice.yaml")
        .trim_end()
        .to_owned()
}

fn with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from));
    VALID.replacen(from, to, 1)
}

#[test]
fn the_base_configuration_is_valid() {
    let out = check(VALID);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("configuration is valid (1 listeners, 1 pools, 1 backends)"));
}

#[test]
fn bad_backend_port() {
    assert_eq!(
        rejected(&with("10.0.0.1:6379", "10.0.0.1:99999")),
        "sluice: sluice.yaml:9:18: pools.redis.backends[0].address: invalid socket address \"10.0.0.1:99999\": port must be 1 to 65535"
    );
}

#[test]
fn bad_backend_address() {
    assert_eq!(
        rejected(&with("10.0.0.1:6379", "10.0.0.1")),
        "sluice: sluice.yaml:9:18: pools.redis.backends[0].address: invalid socket address \"10.0.0.1\" (expected ip:port, [ipv6]:port or host:port)"
    );
    assert_eq!(
        rejected(&with("10.0.0.1:6379", "10.0.0.1:0")),
        "sluice: sluice.yaml:9:18: pools.redis.backends[0].address: invalid socket address \"10.0.0.1:0\": port 0 is not allowed"
    );
}

#[test]
fn unresolvable_backend_host() {
    let message = rejected(&with("10.0.0.1:6379", "no-such-host.invalid:6379"));
    assert!(
        message.starts_with("sluice: sluice.yaml:9:18: pools.redis.backends[0].address: cannot resolve host \"no-such-host.invalid\""),
        "{message}"
    );
}

#[test]
fn bad_listen_address() {
    assert_eq!(
        rejected(&with("127.0.0.1:7000", "localhost:7000")),
        "sluice: sluice.yaml:3:13: listeners.redis.listen: invalid socket address \"localhost:7000\" (expected IPv4:port or [IPv6]:port)"
    );
    assert_eq!(
        rejected(&with("127.0.0.1:7000", "127.0.0.1:70000")),
        "sluice: sluice.yaml:3:13: listeners.redis.listen: invalid socket address \"127.0.0.1:70000\" (expected IPv4:port or [IPv6]:port)"
    );
}

#[test]
fn unknown_keys() {
    assert_eq!(
        rejected(&with("    pool: redis\n", "    pool: redis\n    poool: x\n")),
        "sluice: sluice.yaml:5:5: listeners.redis: unknown field `poool`, expected one of `listen`, `pool`, `accept_proxy`, `max_connections`, `rate_limit`, `backlog`"
    );
    assert_eq!(
        rejected(&format!("wokers: 2\n{VALID}")),
        "sluice: sluice.yaml:1:1: unknown field `wokers`, expected one of `workers`, `io`, `pin_workers`, `shutdown_timeout`, `shutdown_delay`, `admin`, `state_file`, `log`, `listeners`, `pools`"
    );
}

#[test]
fn broken_yaml() {
    assert_eq!(
        rejected("listeners:\n\tredis: {}\n"),
        "sluice: sluice.yaml:2:1: found character that cannot start any token, while scanning for the next token"
    );
    assert_eq!(
        rejected("listeners:\n  a: \"unterminated\n"),
        "sluice: sluice.yaml:3:1: found unexpected end of stream, while scanning a quoted scalar at line 2 column 6"
    );
    assert_eq!(
        rejected(""),
        "sluice: sluice.yaml: the file is empty: it needs at least `listeners` and `pools`"
    );
}

#[test]
fn deep_nesting_is_refused_before_parsing_where_it_goes_too_deep() {
    // 200 KB of brackets kept the YAML parser busy for a minute.
    let depth = 100_000;
    let text = format!("{VALID}extra: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    // `extra:` is one level: the 32nd bracket, in column 8 + 31, is the
    // 33rd.
    assert_eq!(
        rejected(&text),
        "sluice: sluice.yaml:10:39: mappings and lists nest deeper than the limit of 32 levels"
    );
    let braces = format!("{VALID}extra: {}1{}\n", "{a: ".repeat(40), "}".repeat(40));
    assert!(rejected(&braces).contains("sluice.yaml:10:132: mappings and lists nest deeper"));
}

#[test]
fn a_file_over_a_mebibyte_is_refused_unread() {
    let comment = format!("# {}\n", "x".repeat(1000));
    let text = format!("{VALID}{}", comment.repeat(1100));
    assert_eq!(
        rejected(&text),
        "sluice: sluice.yaml: the file is larger than the limit of 1024 KiB"
    );
    // /dev/zero never ends: only the limit is read of it.
    let out = sluice_command(&["--check", "-c", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than the limit of 1024 KiB"));
}

#[test]
fn missing_file() {
    let out = sluice_command(&["--check", "-c", "/nonexistent/sluice.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "sluice: /nonexistent/sluice.yaml: cannot read the configuration: No such file or directory (os error 2)"
    );
}

#[test]
fn listener_naming_a_missing_pool() {
    assert_eq!(
        rejected(&with("pool: redis", "pool: cache")),
        "sluice: sluice.yaml:4:11: listeners.redis.pool: pool \"cache\" is not defined (defined pools: redis)"
    );
}

#[test]
fn duplicate_and_overlapping_listen_addresses() {
    let two = |a: &str, b: &str| {
        format!(
            "listeners:\n  a:\n    listen: {a}\n    pool: p\n  b:\n    listen: {b}\n    pool: p\npools:\n  p:\n    backends:\n      - address: 10.0.0.1:1\n"
        )
    };
    assert_eq!(
        rejected(&two("127.0.0.1:7000", "127.0.0.1:7000")),
        "sluice: sluice.yaml:6:13: listeners.b.listen: 127.0.0.1:7000 overlaps the address 127.0.0.1:7000 of listener \"a\""
    );
    assert_eq!(
        rejected(&two("127.0.0.1:7000", "0.0.0.0:7000")),
        "sluice: sluice.yaml:6:13: listeners.b.listen: 0.0.0.0:7000 overlaps the address 127.0.0.1:7000 of listener \"a\""
    );
    // Different families or ports do not overlap.
    assert!(check(&two("0.0.0.0:7000", "\"[::]:7000\""))
        .status
        .success());
    // Unquoted, YAML reads `[::]:7000` as a list: the message says what to do.
    assert_eq!(
        rejected(&two("0.0.0.0:7000", "[::]:7000")),
        "sluice: sluice.yaml:6:13: listeners.b.listen: invalid type: sequence, expected an address such as 0.0.0.0:6379 or \"[::]:6379\" (IPv6 in quotes)"
    );
    assert!(check(&two("0.0.0.0:7000", "0.0.0.0:7001")).status.success());
}

#[test]
fn duplicate_names() {
    assert_eq!(
        rejected(&format!("{VALID}      - address: 10.0.0.2:6379\n        name: 10.0.0.1:6379\n")),
        "sluice: sluice.yaml:11:15: pools.redis.backends[1].name: duplicate backend name \"10.0.0.1:6379\" (also backends[0]); names must be unique in a pool"
    );
    assert_eq!(
        rejected(&format!("{VALID}      - address: 10.0.0.1:6379\n        name: other\n")),
        "sluice: sluice.yaml:10:18: pools.redis.backends[1].address: 10.0.0.1:6379 is also the address of backends[0]"
    );
    assert_eq!(
        rejected(&with(
            "  redis:\n    listen",
            "  redis:\n    listen: 127.0.0.1:7001\n    pool: redis\n  redis:\n    listen"
        )),
        "sluice: sluice.yaml:2:3: listeners: \"redis\" is defined twice"
    );
}

#[test]
fn empty_pool_and_no_listeners() {
    assert_eq!(
        rejected(&with(
            "    backends:\n      - address: 10.0.0.1:6379\n",
            "    backends: []\n"
        )),
        "sluice: sluice.yaml:8:15: pools.redis.backends: a pool needs at least one backend (or `discovery`)"
    );
    assert_eq!(
        rejected("listeners: {}\npools: {}\n"),
        "sluice: sluice.yaml:1:12: listeners: no listeners are defined"
    );
}

#[test]
fn table_size_rules() {
    assert_eq!(
        rejected(&with("health: off", "table_size: 1000")),
        "sluice: sluice.yaml:7:17: pools.redis.table_size: 1000 is not a prime number (the next prime is 1009)"
    );
    assert_eq!(
        rejected(&with("health: off", "table_size: 97")),
        "sluice: sluice.yaml:7:17: pools.redis.table_size: 97 is too small for 1 backends: it must be a prime larger than 100 x backends = 100, e.g. 101"
    );
}

#[test]
fn zero_workers_and_bad_durations() {
    assert_eq!(
        rejected(&format!("workers: 0\n{VALID}")),
        "sluice: sluice.yaml:1:10: workers: must be at least 1 (or `auto`)"
    );
    assert_eq!(
        rejected(&with("health: off", "connect_timeout: 5")),
        "sluice: sluice.yaml:7:22: pools.redis.connect_timeout: duration 5 has no unit (write e.g. `5s` or `5ms`)"
    );
    assert!(
        rejected(&with("health: off", "connect_timeout: soon")).starts_with(
            "sluice: sluice.yaml:7:22: pools.redis.connect_timeout: invalid duration \"soon\""
        )
    );
}

#[test]
fn health_settings() {
    let probe = |settings: &str| with("health: off", &format!("health:\n      {settings}"));
    assert_eq!(
        rejected(&probe("interval: 1s\n      timeout: 2s")),
        "sluice: sluice.yaml:9:16: pools.redis.health.timeout: must be above 0 and at most the interval (1s)"
    );
    assert_eq!(
        rejected(&probe("fall: 0")),
        "sluice: sluice.yaml:8:13: pools.redis.health.fall: 0 is out of range: use 1 to 100"
    );
    assert_eq!(
        rejected(&probe("intervall: 1s")),
        "sluice: sluice.yaml:8:7: pools.redis.health: unknown field `intervall`, expected one of `interval`, `timeout`, `rise`, `fall`, `send`, `expect`, `preset`, `require_master`, `role`, `auth`, `port`, `http`, `send_proxy`"
    );
    assert!(
        check(&probe("send: \"PING\\r\\n\"\n      expect: \"+PONG\""))
            .status
            .success()
    );
}

#[test]
fn health_presets() {
    let probe = |settings: &str| with("health: off", &format!("health:\n      {settings}"));
    for preset in ["redis", "memcached", "postgres", "mysql"] {
        let out = check(&probe(&format!("preset: {preset}")));
        assert!(out.status.success(), "{preset}: {out:?}");
    }
    assert!(check(&probe("preset: redis\n      require_master: true"))
        .status
        .success());
    assert_eq!(
        rejected(&probe("preset: mongodb")),
        "sluice: sluice.yaml:8:15: pools.redis.health.preset: unknown variant `mongodb`, expected one of `redis`, `memcached`, `postgres`, `mysql`"
    );
    assert_eq!(
        rejected(&probe("preset: redis\n      expect: \"+PONG\"")),
        "sluice: sluice.yaml:8:15: pools.redis.health.preset: a preset decides what to send and expect: use either preset or send/expect"
    );
    assert_eq!(
        rejected(&probe("preset: memcached\n      require_master: true")),
        "sluice: sluice.yaml:9:23: pools.redis.health.require_master: applies only to `preset: redis`"
    );
    assert_eq!(
        rejected(&probe("require_master: true")),
        "sluice: sluice.yaml:8:23: pools.redis.health.require_master: applies only to `preset: redis`"
    );
}

/// Role checks, their logins and the HTTP probe: each mistake named by its
/// key, the password file checked as `--check` runs.
#[test]
fn database_probe_settings() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("probe.pass");
    std::fs::write(&password, "s3cret\n").unwrap();
    let password = password.display().to_string();
    let missing = dir.path().join("nowhere.pass").display().to_string();
    let probe = |settings: &str| with("health: off", &format!("health:\n      {settings}"));
    let login = |preset: &str, file: &str| {
        probe(&format!(
            "preset: {preset}\n      role: primary\n      auth: {{ user: probe, password_file: {file} }}"
        ))
    };
    for preset in ["redis", "postgres", "mysql"] {
        let out = check(&login(preset, &password));
        assert!(out.status.success(), "{preset}: {out:?}");
    }
    assert_eq!(
        rejected(&login("postgres", &missing)),
        format!("sluice: sluice.yaml:10:43: pools.redis.health.auth.password_file: cannot read {missing}: No such file or directory (os error 2)")
    );
    let relative = rejected(&login("mysql", "probe.pass"));
    assert!(
        relative.contains("pools.redis.health.auth.password_file: probe.pass is a relative name, which is looked up in $CREDENTIALS_DIRECTORY"),
        "{relative}"
    );
    for (settings, expected) in [
        ("role: primary", "pools.redis.health.role: needs a preset that can tell a primary from a replica"),
        ("preset: memcached\n      role: replica", "pools.redis.health.role: needs a preset"),
        ("preset: postgres\n      role: primary", "pools.redis.health.auth.user: the role check logs in: give the user it logs in as"),
        ("preset: redis\n      auth: { user: probe }", "pools.redis.health.auth.password_file: Redis logs in with a password"),
        ("preset: redis\n      role: replica\n      require_master: true", "pools.redis.health.require_master: contradicts `role: replica`"),
        ("preset: redis\n      role: leader", "pools.redis.health.role: unknown variant `leader`, expected one of `any`, `primary`, `replica`"),
        ("auth: { user: probe }", "pools.redis.health.auth: applies only to `preset: redis`, `postgres` or `mysql`"),
        ("preset: mysql\n      auth: { user: probe, pasword_file: /x }", "unknown field `pasword_file`, expected one of `user`, `password_file`, `database`"),
        ("port: 0", "pools.redis.health.port: port 0 is not allowed"),
        ("port: 70000", "pools.redis.health.port: invalid value: integer `70000`"),
        ("http: { path: primary }", "pools.redis.health.http.path: \"primary\" is not a path"),
        ("http: { method: \"GET /\" }", "pools.redis.health.http.method: \"GET /\" is not an HTTP method"),
        ("http: { expect_status: [] }", "pools.redis.health.http.expect_status: no status could pass"),
        ("http: { expect_status: [200, 700] }", "pools.redis.health.http.expect_status: 700 is not an HTTP status"),
        ("http: { path: /primary }\n      preset: postgres", "pools.redis.health.http: an HTTP probe decides what to send and expect"),
    ] {
        let error = rejected(&probe(settings));
        assert!(error.contains(expected), "{settings}: {error}");
    }
    let patroni =
        probe("port: 8008\n      http: { path: /primary, expect_status: [200], host: db }");
    let out = check(&patroni);
    assert!(out.status.success(), "{out:?}");
}

/// Fail-closed pools, the queue, backups and `first`.
#[test]
fn failover_settings() {
    let pool = |settings: &str| with("health: off", &format!("health: off\n    {settings}"));
    let every = pool("balance: first\n    fail_open: false\n    on_down: close\n    queue: { size: 100, timeout: 10s }")
        .replace("- address: 10.0.0.1:6379", "- address: 10.0.0.1:6379\n      - { address: 10.0.0.2:6379, backup: true }");
    let out = check(&every);
    assert!(out.status.success(), "{out:?}");
    for (settings, expected) in [
        (
            "on_down: shutdown",
            "pools.redis.on_down: unknown variant `shutdown`, expected `keep` or `close`",
        ),
        ("fail_open: maybe", "pools.redis.fail_open: invalid type"),
        (
            "queue: { size: 10, timeout: 0 }",
            "pools.redis.queue.timeout: clients would wait for ever",
        ),
        (
            "queue: { size: 1000000 }",
            "pools.redis.queue.size: 1000000 is more than the limit of 100000",
        ),
        (
            "queue: { length: 10 }",
            "unknown field `length`, expected `size` or `timeout`",
        ),
    ] {
        let error = rejected(&pool(settings));
        assert!(error.contains(expected), "{settings}: {error}");
    }
    let error = rejected(&VALID.replace(
        "- address: 10.0.0.1:6379",
        "- { address: 10.0.0.1:6379, backup: yes please }",
    ));
    assert!(
        error.contains("pools.redis.backends[0].backup: invalid type"),
        "{error}"
    );
}

/// A pool whose backend Redis Sentinel names: no backends of its own, the
/// Sentinels' addresses checked, their login's password read.
#[test]
fn sentinel_discovery_settings() {
    let sentinel = |settings: &str| {
        VALID.replace(
            "    backends:\n      - address: 10.0.0.1:6379\n",
            &format!("    discovery:\n      sentinel: {{ {settings} }}\n"),
        )
    };
    let out = check(&sentinel(
        "addresses: [10.0.0.1:26379, 10.0.0.2:26379, 10.0.0.3:26379], master: mymaster",
    ));
    assert!(out.status.success(), "{out:?}");
    for (settings, expected) in [
        (
            "addresses: [], master: m",
            "pools.redis.discovery.sentinel.addresses: list the Sentinels to ask",
        ),
        (
            "addresses: [10.0.0.1], master: m",
            "pools.redis.discovery.sentinel.addresses[0]: invalid socket address",
        ),
        (
            "addresses: [10.0.0.1:26379], master: \"my master\"",
            "pools.redis.discovery.sentinel.master: the master's name as the Sentinels know it",
        ),
        (
            "addresses: [10.0.0.1:26379], master: m, auth: { user: x }",
            "pools.redis.discovery.sentinel.auth.password_file: Sentinels log in with a password",
        ),
        ("addresses: [10.0.0.1:26379]", "missing field `master`"),
    ] {
        let error = rejected(&sentinel(settings));
        assert!(error.contains(expected), "{settings}: {error}");
    }
    let both = VALID.replace(
        "    backends:\n",
        "    discovery: { sentinel: { addresses: [10.0.0.1:26379], master: m } }\n    backends:\n",
    );
    assert!(rejected(&both).contains("pools.redis.discovery: a pool finds its backend by discovery or lists its backends, not both"));
    let neither = VALID.replace("    backends:\n      - address: 10.0.0.1:6379\n", "");
    assert!(rejected(&neither)
        .contains("pools.redis.backends: a pool needs at least one backend (or `discovery`)"));
}

#[test]
fn unknown_values() {
    assert_eq!(
        rejected(&with("health: off", "balance: fastest")),
        "sluice: sluice.yaml:7:14: pools.redis.balance: unknown variant `fastest`, expected one of `maglev`, `round_robin`, `weighted_round_robin`, `least_connections`, `random`, `power_of_two`, `first`"
    );
    assert_eq!(
        rejected(&with("health: off", "health: sometimes")),
        "sluice: sluice.yaml:7:13: pools.redis.health: invalid value: string \"sometimes\", expected `off` or a mapping of probe settings"
    );
}

/// Keys of the schema whose feature is not built yet are refused, never
/// silently ignored; their default values are accepted.
#[test]
fn limits_balancing_and_proxy_settings_are_checked() {
    for (from, to, expected) in [
        (
            "health: off",
            "health: off\n    max_load_factor: 0.8",
            "pools.redis.max_load_factor: 0.8 is not above 1",
        ),
        (
            "health: off",
            "health: off\n    balance: round_robin\n    max_load_factor: 1.25",
            "pools.redis.max_load_factor: bounded load applies to `balance: maglev` only",
        ),
        (
            "health: off",
            "health: off\n    balance: fastest",
            "pools.redis.balance: unknown variant `fastest`",
        ),
        (
            "pool: redis",
            "pool: redis\n    rate_limit: { burst: 5 }",
            "listeners.redis.rate_limit.burst: a burst needs a rate",
        ),
        (
            "pool: redis",
            "pool: redis\n    rate_limit: { per_client: { burst: 5 } }",
            "listeners.redis.rate_limit.per_client.burst: a burst needs a rate",
        ),
        (
            "health: off",
            "health: { send_proxy: true }",
            "pools.redis.health.send_proxy: probes send the pool's PROXY header",
        ),
        (
            "health: off",
            "health: off\n    send_proxy: v3",
            "pools.redis.send_proxy: unknown variant `v3`",
        ),
    ] {
        let error = rejected(&with(from, to));
        assert!(error.contains(expected), "{to}: {error}");
    }
    let every_setting = with(
        "pool: redis",
        "pool: redis\n    accept_proxy: true\n    max_connections: 100\n    rate_limit: { rate: 50, burst: 100, per_client: { rate: 5, burst: 10 } }",
    )
    .replace(
        "health: off",
        "health: { send_proxy: true }\n    balance: maglev\n    max_load_factor: 1.25\n    engine: copy\n    send_proxy: v2\n    idle_timeout: 10m",
    );
    let out = check(&every_setting);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_reference_and_demo_configurations_are_valid() {
    for file in ["conf/sluice.yaml", "conf/demo.yaml"] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = sluice_command(&["--check", "-c", &path]);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn an_invalid_file_also_fails_the_start() {
    let sluice = Sluice::spawn(&with("10.0.0.1:6379", "10.0.0.1:99999"));
    let status = sluice.wait_exit();
    assert_eq!(status.code(), Some(1));
}

#[test]
fn an_address_in_use_fails_the_start_with_exit_1() {
    // A socket without SO_REUSEPORT holds the port.
    let taken = TcpListener::bind((unique_loopback(), 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let sluice = Sluice::spawn(&with("127.0.0.1:7000", &addr.to_string()));
    let line = sluice.wait_for_log("cannot listen on");
    assert_eq!(
        line,
        format!(
            "sluice: listener redis: cannot listen on {addr}: Address already in use (os error 98)"
        )
    );
    assert_eq!(sluice.wait_exit().code(), Some(1));
}

#[test]
fn usage_errors_exit_2() {
    let out = sluice_command(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let out = sluice_command(&["explain", "only-a-pool"]);
    assert_eq!(out.status.code(), Some(2));
    let out = sluice_command(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn explain_reports_bad_input() {
    let file = temp_file("sluice.yaml", VALID);
    let path = file.path.to_str().unwrap();
    let out = sluice_command(&["explain", "-c", path, "nope", "10.1.1.1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool \"nope\" is not defined"));
    let out = sluice_command(&["explain", "-c", path, "redis", "not-an-ip"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid client address \"not-an-ip\""));
}

#[test]
fn an_admin_token_file_that_cannot_be_read() {
    let text = format!(
        "admin:\n  listen: 127.0.0.1:9137\n  token_file: /nonexistent/sluice.token\n{VALID}"
    );
    let stderr = rejected(&text);
    assert!(
        stderr.contains("admin.token_file: cannot read /nonexistent/sluice.token"),
        "{stderr}"
    );
    assert!(stderr.starts_with("sluice: sluice.yaml:3:"), "{stderr}");
    let unknown = rejected(&format!(
        "admin:\n  listen: 127.0.0.1:9137\n  token: x\n{VALID}"
    ));
    assert!(
        unknown.contains("unknown field `token`, expected `listen` or `token_file`"),
        "{unknown}"
    );
}
