//! The admin endpoint at `admin.listen`: Prometheus text at `GET /metrics`,
//! whether this instance should get traffic at `GET /ready`
//! ([`Readiness`]: what a BGP speaker, keepalived or an upstream balancer
//! checks), every pool and backend as JSON at `GET /api/pools`, operator
//! state changes at `POST /api/pools/POOL/backends/NAME/state` ([`api`]),
//! and a status page at `GET /` (`page`).
//!
//! HTTP/1.1 by hyper, one request per connection. The endpoint shares the
//! control plane's runtime, so a slow or hostile client of the admin port
//! must cost bounded memory and descriptors and never delay a signal or a
//! probe, nor keep Prometheus or a `/ready` check from an answer:
//!
//! - the request head must come within [`HEAD_DEADLINE`] and be at most
//!   [`MAX_REQUEST`] bytes, a body at most [`api::MAX_BODY`], and the whole
//!   exchange must end within [`DEADLINE`];
//! - at most a number of connections set by the descriptor budget are open
//!   at once; when one more comes, the oldest is closed, so that clients
//!   that send slowly or not at all can delay a scrape by no more than the
//!   time it takes to accept it, however many they open.
//!
//! What concerns backends is answered by the control plane, which owns
//! them: the endpoint sends it an [`Ask`](api::Ask) and waits at most
//! [`ASK_DEADLINE`] for the answer. State changes need the bearer token of
//! `admin.token_file`, which the control plane checks. The address belongs
//! on a private network: reads need no token.

pub mod api;
mod page;
mod readiness;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::logging::Throttle;
use crate::metrics::Metrics;
use api::{Ask, Resource, StateChange};

pub use readiness::Readiness;

/// Largest request head read.
pub const MAX_REQUEST: usize = 8192;

/// How long a client has to send its request head, from accept.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);

/// How long one request may take, from accept to the last byte sent.
const DEADLINE: Duration = Duration::from_secs(10);

/// How long a request waits for the control plane's answer. It answers at
/// once unless it is stopping with its hands full.
const ASK_DEADLINE: Duration = Duration::from_secs(3);

/// Connections closed to make room are logged at most once per interval.
static FULL: Throttle = Throttle::new();

/// Serves the admin endpoint on `listener` until the process ends, with at
/// most `room` connections open at once. Runs on the control plane's
/// runtime; each connection is a task of its own.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Endpoint, room: usize) {
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
        let endpoint = endpoint.clone();
        let leaving = open.enter();
        let id = leaving.id;
        let task = tokio::task::spawn_local(async move {
            let _leaving = leaving;
            let answered = tokio::time::timeout(DEADLINE, endpoint.exchange(stream)).await;
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

/// What the admin endpoint answers from: the metrics, the readiness, and
/// the control plane to ask about backends.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub asks: mpsc::Sender<Ask>,
}

/// A response: status, content type, body.
type Answer = (StatusCode, &'static str, Bytes);

impl Endpoint {
    /// One HTTP/1.1 exchange on `stream`: a request, its answer, closed.
    async fn exchange(self, stream: tokio::net::TcpStream) -> hyper::Result<()> {
        let service = hyper::service::service_fn(move |request| {
            let endpoint = self.clone();
            async move { Ok::<_, Infallible>(endpoint.respond(request).await) }
        });
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_DEADLINE)
            .max_buf_size(MAX_REQUEST)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service)
            .await
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let resource = Resource::parse(request.uri().path());
        let method = request.method().clone();
        let allowed = match resource {
            Resource::BackendState { .. } => "POST",
            _ => "GET",
        };
        let (status, content_type, body) = match (&resource, &method) {
            (Resource::Page, &Method::GET) => {
                let mut response = text(StatusCode::OK, page::CONTENT_TYPE, page::html());
                response
                    .headers_mut()
                    .insert(header::CONTENT_SECURITY_POLICY, page::policy());
                return response;
            }
            (Resource::Metrics, &Method::GET) => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render().into(),
            ),
            (Resource::Ready, &Method::GET) => match self.readiness.not_ready() {
                None => (StatusCode::OK, "text/plain", "ready\n".into()),
                Some(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n").into(),
                ),
            },
            (Resource::Pools, &Method::GET) => self.pools().await,
            (Resource::BackendState { pool, backend }, &Method::POST) => {
                self.set_state(pool.clone(), backend.clone(), request).await
            }
            (Resource::NotFound, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /, /metrics, /ready or /api/pools\n".into(),
            ),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                format!("method not allowed: use {allowed}\n").into(),
            ),
        };
        let mut response = text(status, content_type, body);
        let headers = response.headers_mut();
        match status {
            StatusCode::METHOD_NOT_ALLOWED => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }

    async fn pools(&self) -> Answer {
        let (reply, answer) = oneshot::channel();
        match self.ask(Ask::Pools(reply), answer).await {
            Ok(view) => json(StatusCode::OK, &view),
            Err(busy) => busy,
        }
    }

    async fn set_state(&self, pool: String, backend: String, request: Request<Incoming>) -> Answer {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| api::bearer(value.as_bytes()));
        let body = match Limited::new(request.into_body(), api::MAX_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is over {} bytes", api::MAX_BODY),
                )
            }
            Err(e) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the body: {e}"),
                )
            }
        };
        // Judged by the control plane after the token: a client without
        // the token learns nothing from the body's fate.
        let change = StateChange::parse(&body).map(|change| change.state);
        let (done, answer) = oneshot::channel();
        let ask = Ask::SetState {
            pool: pool.clone(),
            backend: backend.clone(),
            change,
            token,
            done,
        };
        match self.ask(ask, answer).await {
            Ok(Ok((state, before))) => json(
                StatusCode::OK,
                &serde_json::json!({ "pool": pool, "backend": backend, "state": state, "was": before }),
            ),
            Ok(Err(refusal)) => {
                let (status, why) = refusal.answer();
                failure(status, &why)
            }
            Err(busy) => busy,
        }
    }

    /// Sends `ask` to the control plane and waits for its answer.
    async fn ask<T>(&self, ask: Ask, answer: oneshot::Receiver<T>) -> Result<T, Answer> {
        let unavailable = |why: &str| failure(StatusCode::SERVICE_UNAVAILABLE, why);
        if self.asks.try_send(ask).is_err() {
            return Err(unavailable(
                "the control plane has too many requests waiting; try again",
            ));
        }
        match tokio::time::timeout(ASK_DEADLINE, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) | Err(_) => Err(unavailable(
                "the control plane did not answer in time; try again",
            )),
        }
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Answer {
    let mut body = serde_json::to_vec(value).expect("plain data serializes");
    body.push(b'\n');
    (status, "application/json", body.into())
}

/// An error as JSON: `{"error": "..."}`.
fn failure(status: StatusCode, why: &str) -> Answer {
    json(status, &serde_json::json!({ "error": why }))
}
