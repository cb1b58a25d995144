//! Stopping: on SIGTERM or SIGINT `/ready` turns 503 at once, listeners
//! keep accepting for `shutdown_delay` (routers that poll `/ready` move new
//! flows away meanwhile), then every listener stops and open connections
//! have up to `shutdown_timeout` to finish. A second signal ends either
//! wait at once, and so does the timeout, after the workers have reset what
//! is left.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::mailbox::Command;
use crate::signals::{Request, Signals};

use super::Controller;

impl Controller {
    /// Drains: returns once every connection has finished, or a second
    /// signal or `shutdown_timeout` (0: no limit) ended the wait.
    pub(super) async fn drain(&mut self, signal: Signal, signals: &Signals) {
        self.readiness.draining();
        let delay = self.config.shutdown_delay;
        if !delay.is_zero() {
            let delay = humantime::format_duration(delay);
            info!(%signal, "stopping: /ready answers 503; still accepting for {delay} (shutdown_delay)");
            self.notifier
                .stopping(&format!("not ready; still accepting for {delay}"));
            if !self.wait_out(self.config.shutdown_delay, signals).await {
                return;
            }
        }
        self.listeners.stop_all();
        let open = self.shared.connections.open();
        let timeout = self.config.shutdown_timeout;
        info!(%signal, open, "stopping: no new connections; waiting for open ones to finish");
        if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .is_ok_and(|v| v.trim() == "0")
        {
            info!(
                "net.ipv4.tcp_migrate_req is 0: connections waiting to be accepted at this moment are reset; \
                 set it to 1 so that another process on the same ports takes them over"
            );
        }
        let status = format!("draining {open} connections");
        match delay.is_zero() {
            true => self.notifier.stopping(&status),
            false => self.notifier.status(&status),
        }
        let deadline = async {
            if timeout.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(timeout).await
            }
        };
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    // Accept loops count a connection before they accept
                    // it, so once none runs, the count misses none.
                    let accepting = self.shared.accepting.load(Ordering::Acquire);
                    if accepting == 0 && self.shared.connections.open() == 0 {
                        info!("all connections finished; exiting");
                        return;
                    }
                }
                _ = &mut deadline => {
                    warn!(
                        open = self.shared.connections.open(),
                        "shutdown_timeout of {} reached; closing the remaining connections",
                        humantime::format_duration(timeout)
                    );
                    self.close_all().await;
                    return;
                }
                Some(ask) = self.asks.1.recv() => self.answer(ask),
                request = signals.next() => if self.stops_now(request) {
                    return;
                },
            }
        }
    }

    /// Waits `delay`, still answering signals and following backend
    /// health (the listeners still accept meanwhile): `false` if a second
    /// stop signal ended the wait.
    async fn wait_out(&mut self, delay: Duration, signals: &Signals) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                Some(event) = self.events.recv() => self.handle(event),
                Some(ask) = self.asks.1.recv() => self.answer(ask),
                request = signals.next() => if self.stops_now(request) {
                    return false;
                },
            }
        }
    }

    /// A signal while stopping: a second stop signal (or a signal that
    /// cannot be read) ends the wait at once; SIGHUP is ignored.
    fn stops_now(&self, request: io::Result<Request>) -> bool {
        match request {
            Ok(Request::Reload) => {
                info!("SIGHUP while stopping: ignored");
                false
            }
            Ok(Request::Stop(_)) | Err(_) => {
                warn!(
                    open = self.shared.connections.open(),
                    "second signal: exiting now"
                );
                true
            }
        }
    }

    /// Has every worker reset its open connections (each logs its own end),
    /// and waits a moment for them to finish doing so.
    async fn close_all(&self) {
        for worker in &self.workers {
            worker.send(Command::CloseAll);
        }
        let give_up = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.shared.connections.open() > 0 && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
