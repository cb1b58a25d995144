//! The Debian package (`make deb`), installed the way an operator installs
//! it: dpkg puts the binary, the unit (enabled), the configuration as a
//! conffile, the dashboard, the alert rules and the docs in place; a
//! reinstall keeps an edited configuration; a purge leaves nothing behind.
//!
//! Needs root and dpkg (CI runs `make test` as root); skipped otherwise,
//! and where sluice is installed already, from a package or `make install`
//! (it would be replaced, then purged). A `policy-rc.d` that forbids
//! starting services is in place meanwhile (the machine's own, if any, is
//! put back after), so that where systemd runs the
//! installed unit is enabled but not started (the reference configuration
//! it would start with probes made-up backends).
//! Runs once, not again for the epoll pass of `make test`: nothing in it
//! depends on the driver.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every path the package installs, and the one the install enables.
const INSTALLED: [&str; 8] = [
    "/usr/bin/sluice",
    "/usr/lib/systemd/system/sluice.service",
    "/etc/sluice/sluice.yaml",
    "/usr/share/sluice/grafana-dashboard.json",
    "/usr/share/sluice/prometheus-alerts.yml",
    "/usr/share/doc/sluice/README.md",
    "/usr/share/doc/sluice/operations.md",
    "/etc/systemd/system/multi-user.target.wants/sluice.service",
];

/// What a purge must remove, directories included.
const GONE_AFTER_PURGE: [&str; 5] = [
    "/etc/sluice",
    "/usr/share/sluice",
    "/usr/share/doc/sluice",
    "/usr/lib/systemd/system/sluice.service",
    "/etc/systemd/system/multi-user.target.wants/sluice.service",
];

/// What `deb-systemd-invoke` asks before it starts a service: 101 says no.
const POLICY: &str = "/usr/sbin/policy-rc.d";

/// Forbids starting services while it lives (the machine's own
/// `policy-rc.d`, if any, is put back afterwards).
struct NoServiceStarts {
    kept: Option<Vec<u8>>,
}

impl NoServiceStarts {
    fn new() -> NoServiceStarts {
        use std::os::unix::fs::PermissionsExt;
        let kept = std::fs::read(POLICY).ok();
        std::fs::write(
            POLICY,
            "#!/bin/sh\n# sluice's package test: start nothing.\nexit 101\n",
        )
        .unwrap();
        std::fs::set_permissions(POLICY, std::fs::Permissions::from_mode(0o755)).unwrap();
        NoServiceStarts { kept }
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        let _ = match &self.kept {
            Some(kept) => std::fs::write(POLICY, kept),
            None => std::fs::remove_file(POLICY),
        };
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Why this machine cannot run the test, if it cannot.
fn cannot_run() -> Option<&'static str> {
    if std::env::var_os("SLUICE_TEST_IO").is_some() {
        return Some("the package does not depend on the driver: tested in the first pass");
    }
    if !common::running_as_root() {
        return Some("installing a package needs root");
    }
    if Command::new("dpkg").arg("--version").output().is_err() {
        return Some("no dpkg here");
    }
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "sluice"])
        .output()
        .is_ok_and(|o| o.stdout == b"install ok installed");
    if installed {
        return Some("a sluice package is installed here; `dpkg --purge sluice` to run this test");
    }
    if INSTALLED.iter().any(|path| Path::new(path).exists()) {
        return Some(
            "sluice's files are installed here (make install?); the package would replace them",
        );
    }
    None
}

/// Builds the package with `make deb`: its path.
fn build() -> PathBuf {
    let out = run("make", &["deb"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("make deb named no package:\n{stdout}"));
    PathBuf::from(path)
}

#[test]
fn the_package_installs_keeps_an_edited_configuration_and_purges_clean() {
    if let Some(why) = cannot_run() {
        eprintln!("skipped: {why}");
        return;
    }
    let _no_starts = NoServiceStarts::new();
    let deb = build();
    let deb = deb.to_str().unwrap();
    let info =
        String::from_utf8(run("dpkg-deb", &["--field", deb, "Package", "Depends"]).stdout).unwrap();
    assert!(info.contains("Package: sluice"), "{info}");

    run("dpkg", &["-i", deb]);
    for path in INSTALLED {
        assert!(
            Path::new(path).exists(),
            "the package did not install {path}"
        );
    }
    let version = String::from_utf8(run("/usr/bin/sluice", &["--version"]).stdout).unwrap();
    assert!(
        version.starts_with(&format!("sluice {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let unit = "/usr/lib/systemd/system/sluice.service";
    let verify = run("systemd-analyze", &["verify", unit]);
    assert!(
        verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    run(
        "/usr/bin/sluice",
        &["--check", "-c", "/etc/sluice/sluice.yaml"],
    );
    let conffiles =
        String::from_utf8(run("dpkg-query", &["-W", "-f=${Conffiles}", "sluice"]).stdout).unwrap();
    assert!(conffiles.contains("/etc/sluice/sluice.yaml"), "{conffiles}");

    // An operator's edit survives a reinstall, and dpkg asks nothing (its
    // standard input is closed: a question would fail the install).
    let config = "/etc/sluice/sluice.yaml";
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(config).unwrap()
    );
    std::fs::write(config, &edited).unwrap();
    run("dpkg", &["-i", deb]);
    assert_eq!(std::fs::read_to_string(config).unwrap(), edited);

    run("dpkg", &["--purge", "sluice"]);
    for path in INSTALLED.iter().chain(&GONE_AFTER_PURGE) {
        assert!(!Path::new(path).exists(), "{path} is left after a purge");
    }
    let state = Path::new("/var/lib/systemd/deb-systemd-helper-enabled");
    let leftovers: Vec<_> = std::fs::read_dir(state)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("sluice"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "left after a purge: {leftovers:?}");
}
