//! The admin endpoint at `admin.listen`: Prometheus text at `GET /metrics`,
//! and at `GET /ready` whether this instance should get traffic
//! ([`Readiness`]): what a BGP speaker, keepalived or an upstream balancer
//! checks.
//!
//! A deliberately small HTTP/1.x server: one request per connection, `GET`
//! only, a request head of at most [`MAX_REQUEST`] bytes. It shares the
//! control plane's runtime, so a slow or hostile client of the admin port
//! must cost bounded memory and descriptors and never delay a signal or a
//! probe, nor keep Prometheus or a `/ready` check from an answer:
//!
//! - the request head must come within [`HEAD_DEADLINE`], and the whole
//!   exchange end within [`DEADLINE`];
//! - at most a number of connections set by the descriptor budget are open
//!   at once; when one more comes, the oldest is closed, so that clients
//!   that send slowly or not at all can delay a scrape by no more than the
//!   time it takes to accept it, however many they open.
//!
//! [`Request::parse`], the only code that reads bytes from such a client,
//! is fuzzed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::logging::Throttle;
use crate::metrics::Metrics;

/// Largest request head read.
pub const MAX_REQUEST: usize = 8192;

/// How long a client has to send its request head, from accept.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);

/// How long one request may take, from accept to the last byte sent.
const DEADLINE: Duration = Duration::from_secs(10);

/// Connections closed to make room are logged at most once per interval.
static FULL: Throttle = Throttle::new();

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics` (with or without a query string).
    Metrics,
    /// `GET /ready`.
    Ready,
    /// `GET` of any other path.
    NotFound,
    /// Anything but `GET`, or no request line at all.
    NotAllowed,
}

impl Request {
    /// Reads the request line at the start of `head`: `METHOD PATH
    /// VERSION`. The rest of the head (headers) is not needed.
    pub fn parse(head: &[u8]) -> Request {
        let line_end = head
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(head.len());
        let mut parts = head[..line_end].split(|&b| b == b' ');
        let (method, target) = (parts.next(), parts.next());
        let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
        match (method, path) {
            (Some(b"GET"), Some(b"/metrics")) => Request::Metrics,
            (Some(b"GET"), Some(b"/ready")) => Request::Ready,
            (Some(b"GET"), _) => Request::NotFound,
            _ => Request::NotAllowed,
        }
    }
}

/// Whether this instance should get new connections, as `/ready` says:
/// 200 while it serves and every pool has a backend up; 503, with the
/// reason, while it starts, once it drains, and while a pool has none.
/// Set by the control plane, read by the admin endpoint on the same
/// thread.
#[derive(Clone, Default)]
pub struct Readiness(Rc<RefCell<ReadyState>>);

#[derive(Default)]
struct ReadyState {
    phase: Phase,
    /// Pools with no backend up, by name.
    pools_down: Vec<String>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Starting,
    Serving,
    Draining,
}

impl Readiness {
    /// Every listener accepts.
    pub fn serving(&self) {
        self.0.borrow_mut().phase = Phase::Serving;
    }

    /// A stop signal came: never ready again.
    pub fn draining(&self) {
        self.0.borrow_mut().phase = Phase::Draining;
    }

    /// The pools that have no backend up now.
    pub fn pools_down<'a>(&self, pools: impl IntoIterator<Item = &'a String>) {
        let mut pools: Vec<String> = pools.into_iter().cloned().collect();
        pools.sort();
        self.0.borrow_mut().pools_down = pools;
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        let state = self.0.borrow();
        match state.phase {
            Phase::Starting => Some("starting".to_owned()),
            Phase::Draining => Some("draining".to_owned()),
            Phase::Serving if !state.pools_down.is_empty() => Some(format!(
                "no backend up in pool {}",
                state.pools_down.join(", ")
            )),
            Phase::Serving => None,
        }
    }
}

/// Serves the admin endpoint on `listener` until the process ends, with at
/// most `room` connections open at once. Runs on the control plane's
/// runtime; each connection is a task of its own.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    room: usize,
) {
    let open = Open::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("admin endpoint: cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.len() >= room {
            open.close_oldest();
            if let Some(suppressed) = FULL.allow() {
                warn!(
                    suppressed,
                    "admin endpoint: {room} connections open, closed the oldest to answer {peer}"
                );
            }
            // The closed task drops its socket when it next runs: let it,
            // before accepting more, so descriptors stay within `room`.
            tokio::task::yield_now().await;
        }
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        let leaving = open.enter();
        let id = leaving.id;
        let task = tokio::task::spawn_local(async move {
            let _leaving = leaving;
            let answered =
                tokio::time::timeout(DEADLINE, answer(stream, &metrics, &readiness)).await;
            if !matches!(answered, Ok(Ok(()))) {
                debug!(%peer, "admin request failed or timed out");
            }
        });
        open.started(id, task.abort_handle());
    }
}

/// The admin connections open, oldest first: each task's abort handle.
#[derive(Default, Clone)]
struct Open(Rc<RefCell<OpenState>>);

#[derive(Default)]
struct OpenState {
    tasks: BTreeMap<u64, Option<AbortHandle>>,
    next: u64,
}

/// Takes a connection out of [`Open`] when its task ends, however it ends
/// (aborted included).
struct Leaving {
    open: Open,
    id: u64,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.open.0.borrow_mut().tasks.remove(&self.id);
    }
}

impl Open {
    fn len(&self) -> usize {
        self.0.borrow().tasks.len()
    }

    /// Counts a new connection, whose task is about to start.
    fn enter(&self) -> Leaving {
        let mut state = self.0.borrow_mut();
        let id = state.next;
        state.next += 1;
        state.tasks.insert(id, None);
        Leaving {
            open: self.clone(),
            id,
        }
    }

    /// Connection `id`'s task is spawned: it can be closed from now on.
    fn started(&self, id: u64, task: AbortHandle) {
        if let Some(slot) = self.0.borrow_mut().tasks.get_mut(&id) {
            *slot = Some(task);
        }
    }

    /// Closes the oldest connection.
    fn close_oldest(&self) {
        let oldest = self.0.borrow_mut().tasks.pop_first();
        if let Some((_, Some(task))) = oldest {
            task.abort();
        }
    }
}

/// One HTTP/1.x exchange: reads the request head, answers, closes.
async fn answer(
    mut stream: tokio::net::TcpStream,
    metrics: &Metrics,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(HEAD_DEADLINE, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let (status, content_type, body) = match Request::parse(&head) {
        Request::Metrics => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        Request::Ready => match readiness.not_ready() {
            None => ("200 OK", "text/plain", "ready\n".to_owned()),
            Some(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        Request::NotFound => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics or /ready\n".to_owned(),
        ),
        Request::NotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads a request head: up to its blank line, at most [`MAX_REQUEST`]
/// bytes, or what came before the client stopped sending.
async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_get_metrics_and_ready_are_served() {
        for (head, expected) in [
            (
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                Request::Metrics,
            ),
            (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", Request::Metrics),
            (b"GET /ready HTTP/1.0\r\n\r\n", Request::Ready),
            (b"GET / HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Request::NotAllowed),
            (b"", Request::NotAllowed),
            (b"\r\n\r\n", Request::NotAllowed),
        ] {
            assert_eq!(Request::parse(head), expected, "{}", head.escape_ascii());
        }
    }

    #[test]
    fn ready_only_while_serving_with_a_backend_up_in_every_pool() {
        let readiness = Readiness::default();
        assert_eq!(readiness.not_ready().as_deref(), Some("starting"));
        readiness.serving();
        assert_eq!(readiness.not_ready(), None);
        let down = ["redis".to_owned(), "pg".to_owned()];
        readiness.pools_down(&down);
        assert_eq!(
            readiness.not_ready().as_deref(),
            Some("no backend up in pool pg, redis")
        );
        readiness.pools_down(&[]);
        assert_eq!(readiness.not_ready(), None);
        readiness.draining();
        assert_eq!(readiness.not_ready().as_deref(), Some("draining"));
    }

    proptest! {
        #[test]
        fn any_head_gets_an_answer(head in proptest::collection::vec(any::<u8>(), 0..MAX_REQUEST)) {
            Request::parse(&head);
        }

        #[test]
        fn headers_never_change_the_answer(
            path in "/[a-z?=&]{0,12}",
            headers in proptest::collection::vec("[A-Za-z-]{1,10}: [ -~]{0,40}", 0..8),
        ) {
            let head = format!("GET {path} HTTP/1.1\r\n{}\r\n\r\n", headers.join("\r\n"));
            let expected = match path.split('?').next() {
                Some("/metrics") => Request::Metrics,
                Some("/ready") => Request::Ready,
                _ => Request::NotFound,
            };
            prop_assert_eq!(Request::parse(head.as_bytes()), expected);
        }
    }
}
