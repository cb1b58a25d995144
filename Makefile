# sluice: build, test, run the demo, benchmark, install.
#
#   make test      install what the tests need (Debian packages) and run them all,
#                  the integration tests on both drivers (io_uring, then epoll)
#   make run       three local redis-server backends and sluice in front of them
#   make bench     sluice next to HAProxy, NGINX and a direct connection (benches/compare
#                  installs the peers and writes benches/RESULTS.md), how sluice scales
#                  (benches/scaling), and the Maglev criterion benchmarks
#   make deb       the Debian package, target/debian/sluice_VERSION_ARCH.deb (installs
#                  the pinned cargo-deb if it is missing); see Cargo.toml
#   make install   PREFIX=/usr/local DESTDIR= : binary, unit, /etc/sluice/sluice.yaml,
#                  dashboard and alert rules in PREFIX/share/sluice
#                  (BIN=path installs an already built binary instead of building)
#   make fuzz      every fuzz target for FUZZ_SECONDS each (default 60), with
#                  libFuzzer (installs cargo-fuzz); see scripts/fuzz
#   make soak      mixed traffic with faults for SOAK_SECONDS (default 600), on the
#                  release build; writes benches/SOAK.md. Then the differential test
#                  of the drivers on SLUICE_DIFF_SEEDS (default 5000) random seeds.
#                  Not part of `make test`.

PREFIX  ?= /usr/local
DESTDIR ?=
CARGO   ?= cargo
BIN     ?= target/release/sluice

# Debian packages the tests talk to or use: the servers behind sluice (the
# tests start their own on loopback ports, whatever services the packages
# start), systemd-analyze to verify the unit file, and Prometheus with
# promtool to scrape sluice and check the alert rules, Chromium to load the
# status page in a real browser. (`make deb`, which the
# package test runs, installs cargo-deb itself.)
TEST_PACKAGES := redis-server redis-sentinel redis-tools memcached postgresql mariadb-server patroni etcd-server systemd prometheus iproute2 nftables bird2 curl chromium

CARGO_DEB_VERSION := 3.8.0

FUZZ_SECONDS ?= 60
SOAK_SECONDS ?= 600

.PHONY: all build test deps run bench install deb lint clean fuzz soak

all: build

build:
	$(CARGO) build --release

deps:
	@scripts/apt-install $(TEST_PACKAGES)

# The integration suite runs twice: on the default driver (io_uring), then
# with every configuration on epoll, the fallback.
test: deps
	$(CARGO) test --all-targets
	SLUICE_TEST_IO=epoll $(CARGO) test --tests

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

run: build
	@scripts/apt-install redis-server redis-tools
	scripts/run-demo

bench: build
	$(CARGO) build --release --example minirelay
	benches/compare
	benches/yardstick
	benches/scaling
	$(CARGO) bench --bench maglev

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz

soak: deps
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test soak -- --ignored --nocapture
	$(CARGO) test --release --test differential -- --ignored many_seeds --nocapture

# The default BIN is built first; another BIN is installed as it is.
install: $(if $(filter target/release/sluice,$(BIN)),build)
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/sluice
	install -D -m 0644 systemd/sluice.service $(DESTDIR)/lib/systemd/system/sluice.service
	sed -i 's|/usr/bin/sluice|$(PREFIX)/bin/sluice|' $(DESTDIR)/lib/systemd/system/sluice.service
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/sluice conf/grafana-dashboard.json conf/prometheus-alerts.yml
	@# Never overwrite an operator's configuration.
	@if [ -e $(DESTDIR)/etc/sluice/sluice.yaml ]; then \
		echo "keeping the existing $(DESTDIR)/etc/sluice/sluice.yaml"; \
	else \
		install -D -m 0644 conf/sluice.yaml $(DESTDIR)/etc/sluice/sluice.yaml; \
	fi

deb:
	@$(CARGO) deb --version 2>/dev/null | grep -qx 'cargo-deb $(CARGO_DEB_VERSION)' || \
		$(CARGO) install cargo-deb --version $(CARGO_DEB_VERSION) --locked
	$(CARGO) deb --strip

clean:
	$(CARGO) clean
