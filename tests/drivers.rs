//! The data path's two drivers: io_uring where it works, epoll where it is
//! refused (a seccomp profile, `io_uring_disabled`, an old kernel), chosen
//! by `io: auto | io_uring | epoll`, said once in the log and exported as
//! the `io` label of `sluice_build_info`. (The rest of the suite runs on
//! either: `SLUICE_TEST_IO`.)

mod common;

use common::*;

/// A configuration with an admin endpoint, in front of one echo backend.
fn echo_config(io: &str) -> (TestServer, String, std::net::SocketAddr) {
    let (server, text) = behind_echo("");
    let admin = free_addr(unique_loopback());
    let text = format!("{text}io: {io}\nadmin:\n  listen: {}\n", fmt_addr(admin));
    (server, text, admin)
}

fn relays(sluice: &Sluice) {
    let mut stream = connect_from(client_ip(3), sluice.listen_addr());
    echoes(&mut stream, b"through the driver\n");
}

/// Whether this test process may set up an io_uring at all.
fn io_uring_allowed() -> bool {
    // SAFETY: io_uring_setup fills `params` (zeroed, 120 bytes) and returns
    // a descriptor, closed at once.
    unsafe {
        let mut params = [0u8; 120];
        let fd = libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr());
        if fd >= 0 {
            libc::close(fd as i32);
        }
        fd >= 0
    }
}

/// Expected: `auto` runs io_uring where it can, and says so (and epoll,
/// saying why, on a machine that refuses io_uring to the tests too).
#[test]
fn auto_runs_io_uring_where_it_works() {
    let (_server, text, admin) = echo_config("auto");
    let sluice = Sluice::start(&text);
    let io = if io_uring_allowed() {
        "io_uring"
    } else {
        "epoll"
    };
    sluice.wait_for_log(&format!("data path on {io}"));
    let label = format!("io=\"{io}\"");
    assert_eq!(
        sample(&scrape(admin), "sluice_build_info", &[&label]),
        Some(1.0)
    );
    relays(&sluice);
}

/// Expected: where io_uring is refused (EPERM from `io_uring_setup`, as a
/// container's seccomp profile does), `auto` falls back to epoll, says
/// why, and serves; the control plane runs too.
#[test]
fn auto_falls_back_to_epoll_where_io_uring_is_refused() {
    let (_server, text, admin) = echo_config("auto");
    let sluice = Sluice::spawn_without_io_uring(&text);
    sluice.wait_for_log("sluice is ready");
    let line = sluice.wait_for_log("data path on epoll");
    assert!(line.contains("io_uring cannot be used"), "{line}");
    assert!(line.contains("Operation not permitted"), "{line}");
    assert_eq!(
        sample(&scrape(admin), "sluice_build_info", &["io=\"epoll\""]),
        Some(1.0)
    );
    relays(&sluice);
}

/// Expected: `io: io_uring` where it is refused is a failed start (exit
/// 1) with a clear message, not a silent fallback.
#[test]
fn io_uring_insisted_on_where_refused_fails_the_start() {
    let (_server, text, _admin) = echo_config("io_uring");
    let sluice = Sluice::spawn_without_io_uring(&text);
    let line = sluice.wait_for_log("io: io_uring, but");
    assert!(line.contains("Operation not permitted"), "{line}");
    assert_eq!(sluice.wait_exit().code(), Some(1));
}

/// Expected: `io: epoll` runs epoll even where io_uring works.
#[test]
fn epoll_runs_when_asked_for() {
    let (_server, text, admin) = echo_config("epoll");
    let sluice = Sluice::start(&text);
    sluice.wait_for_log("data path on epoll: io: epoll in the configuration");
    assert_eq!(
        sample(&scrape(admin), "sluice_build_info", &["io=\"epoll\""]),
        Some(1.0)
    );
    relays(&sluice);
}
