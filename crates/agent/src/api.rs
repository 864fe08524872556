//! The agent's HTTP + JSON API (used by the `hitless` CLI; curl works too).
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/status` | | this appliance, whether it drives, the engine status, instances, fronts |
//! | GET | `/v1/progress?since=N` | | progress lines with `seq >= N` |
//! | POST | `/v1/upgrade` | `{"image": "/path/to/image-dir"}` | starts an ISSU |
//! | POST | `/v1/abort`, `/v1/rollback`, `/v1/commit`, `/v1/resume` | | operator commands |
//!
//! Errors are `{"error": "<sentence>"}` with a 4xx/5xx status; a malformed request changes
//! nothing.
//!
//! With tokens (`[api] tokens_file`, see [`crate::auth`]) every request needs
//! `Authorization: Bearer TOKEN`: `GET` requests the `read` role, every other the `operator`
//! role. A request without a recognised token is answered 401, one whose token's role does not
//! allow it 403; neither reaches the handler.
//!
//! Bounds: a connection must send a complete request head within
//! [`Bounds::header_read_timeout`] of its start (or of its previous answer), or it is closed;
//! at most [`Bounds::max_connections`] connections are served at once (more wait in the
//! listen backlog), and as connections speak HTTP/1.1 only, each has at most one request in
//! flight; a request body is at most [`MAX_BODY`] bytes and must arrive within
//! [`Bounds::body_read_timeout`] of the head. Every handler bounds its own work (2 s for the
//! peer's status, 30 s for the driver's answer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::appliance::{Description, Op, OpOk};
use crate::auth::{Role, Tokens};
use crate::driver::{Appliances, Input, OperatorRequest, ProgressLine, SharedView};

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The largest request head (request line and headers) read.
const MAX_HEAD_BUFFER: usize = 64 * 1024;

/// The API server's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// How long a connection may take to send a complete request head, from its start or
    /// from its previous answer (an idle kept-alive connection is closed after it too).
    pub header_read_timeout: Duration,
    /// How long a request's body may take to arrive after its head: a body that trickles in
    /// is cut off.
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

#[derive(Clone)]
struct Ctx {
    inputs: mpsc::Sender<Input>,
    view: SharedView,
    apps: Appliances,
}

/// The answer of `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub appliance: hitless_core::ApplianceId,
    pub driving: bool,
    pub engine: Option<hitless_core::Status>,
    pub instances: Vec<crate::appliance::Started>,
    pub local: Description,
    pub peer: Option<Description>,
    pub peer_error: Option<String>,
    /// The next index of this agent's journal (its own records when it drives, the driver's
    /// mirrored records otherwise): two agents showing the same value hold the same history.
    #[serde(default)]
    pub journal_next_index: u64,
    /// The pair's witness (kind and endpoints), or the warning that it has none.
    #[serde(default)]
    pub witness: String,
}

/// The body of `POST /v1/upgrade`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The target image directory.
    pub image: std::path::PathBuf,
}

#[derive(Deserialize)]
struct Since {
    since: Option<u64>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The role a request needs: `read` for `GET` (and `HEAD`), `operator` for everything else.
fn role_needed(method: &Method) -> Role {
    if method == Method::GET || method == Method::HEAD {
        Role::Read
    } else {
        Role::Operator
    }
}

/// A refusal of the credentials or of a request's framing: the connection is closed after
/// it, so that a client without a good token cannot keep one of the bounded connections.
fn refused(status: StatusCode, message: String) -> Response {
    let mut r = error(status, message);
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"hitless\""),
        );
    }
    r
}

/// Lets a request through when it bears a token whose role allows it.
async fn authorize(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    let needed = role_needed(req.method());
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(presented) = presented else {
        tracing::debug!(method = %req.method(), path = %req.uri().path(), "API request without a bearer token refused");
        return refused(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required: send `Authorization: Bearer TOKEN` with a token of the agent's tokens file ([api] tokens_file)".into(),
        );
    };
    match tokens.role_of(presented) {
        None => {
            tracing::debug!(method = %req.method(), path = %req.uri().path(), "API request with an unrecognised bearer token refused");
            refused(
                StatusCode::UNAUTHORIZED,
                "the bearer token was not recognised: it is not in the agent's tokens file".into(),
            )
        }
        Some(role) if !role.allows(needed) => refused(
            StatusCode::FORBIDDEN,
            format!(
                "{} {} needs the {needed} role; the token presented has the {role} role",
                req.method(),
                req.uri().path()
            ),
        ),
        Some(_) => next.run(req).await,
    }
}

/// The API's routes, behind the credential check when there are `tokens`.
fn router(ctx: Ctx, tokens: Option<Arc<Tokens>>) -> Router {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/progress", get(progress))
        .route("/v1/upgrade", post(upgrade))
        .route("/v1/abort", post(|s| operator(s, OperatorRequest::Abort)))
        .route(
            "/v1/rollback",
            post(|s| operator(s, OperatorRequest::Rollback)),
        )
        .route("/v1/commit", post(|s| operator(s, OperatorRequest::Commit)))
        .route("/v1/resume", post(|s| operator(s, OperatorRequest::Resume)))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such API path; see /v1/status") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx);
    match tokens {
        // On every route and the fallback: an unknown path is refused like a known one.
        Some(tokens) => app.layer(axum::middleware::from_fn_with_state(tokens, authorize)),
        None => app,
    }
}

/// Who may use the API.
#[derive(Clone, Debug)]
pub enum Access {
    /// Requests need a bearer token of these.
    Tokens(Arc<Tokens>),
    /// Anyone who reaches the address (a loopback address, or explicitly allowed).
    Open,
}

/// Starts serving the API on `addr`.
pub async fn serve(
    addr: SocketAddr,
    inputs: mpsc::Sender<Input>,
    view: SharedView,
    apps: Appliances,
    access: Access,
    bounds: Bounds,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, Ctx { inputs, view, apps }, access, bounds);
    Ok(())
}

fn serve_on(listener: tokio::net::TcpListener, ctx: Ctx, access: Access, bounds: Bounds) {
    let tokens = match access {
        Access::Tokens(t) => Some(t),
        Access::Open => None,
    };
    serve_router(listener, router(ctx, tokens), bounds);
}

/// The request with its body read whole, within `timeout` and [`MAX_BODY`]; or the refusal to
/// answer (the connection is closed after it).
async fn read_body(
    req: Request<hyper::body::Incoming>,
    timeout: Duration,
) -> Result<Request, Response> {
    use http_body_util::BodyExt as _;
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(Request::from_parts(
            parts,
            axum::body::Body::from(collected.to_bytes()),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {MAX_BODY} bytes"),
        )),
        Ok(Err(e)) => Err(refused(
            StatusCode::BAD_REQUEST,
            format!("the request body could not be read: {e}"),
        )),
        Err(_) => Err(refused(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )),
    }
}

/// Serves `app` on `listener` within `bounds` (in a task of its own).
fn serve_router(listener: tokio::net::TcpListener, app: Router, bounds: Bounds) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;
    let slots = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            // A connection is accepted only with a slot free: the others wait in the backlog.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken.
                    tracing::warn!("the API cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let app = app.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        async move {
                            let answer = match read_body(req, bounds.body_read_timeout).await {
                                Ok(req) => match app.oneshot(req).await {
                                    Ok(r) => r,
                                    Err(never) => match never {},
                                },
                                Err(refusal) => refusal,
                            };
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(bounds.header_read_timeout)
                    .max_buf_size(MAX_HEAD_BUFFER)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(%from, "API connection ended: {e}");
                }
            });
        }
    });
}

async fn status(State(ctx): State<Ctx>) -> Response {
    let (driving, engine, instances, journal_next_index) = {
        let v = ctx.view.lock().expect("view lock");
        (
            v.driving,
            v.engine.clone(),
            v.instances.values().cloned().collect(),
            v.journal_next_index,
        )
    };
    let local = ctx.apps.local.describe();
    let (peer, peer_error) = match tokio::time::timeout(
        Duration::from_secs(2),
        ctx.apps.remote.exec(Op::Describe),
    )
    .await
    {
        Ok(Ok(OpOk::Described(d))) => (Some(*d), None),
        Ok(Ok(other)) => (None, Some(format!("unexpected answer {other:?}"))),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Err(_) => (
            None,
            Some("the peer agent did not answer within 2 s".into()),
        ),
    };
    Json(StatusAnswer {
        appliance: ctx.apps.local.id(),
        driving,
        engine,
        instances,
        local,
        peer,
        peer_error,
        journal_next_index,
        witness: ctx.apps.local.witness_summary(),
    })
    .into_response()
}

async fn progress(State(ctx): State<Ctx>, Query(q): Query<Since>) -> Response {
    let since = q.since.unwrap_or(0);
    let lines: Vec<ProgressLine> = {
        let v = ctx.view.lock().expect("view lock");
        v.progress
            .iter()
            .filter(|l| l.seq >= since)
            .cloned()
            .collect()
    };
    Json(lines).into_response()
}

async fn upgrade(State(ctx): State<Ctx>, body: Bytes) -> Response {
    let req: UpgradeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                "the upgrade request is not valid JSON of the form {{\"image\": \"/path\"}}: {e}"
            ),
            )
        }
    };
    operator(
        State(ctx),
        OperatorRequest::Upgrade {
            image_dir: req.image,
        },
    )
    .await
}

async fn operator(State(ctx): State<Ctx>, request: OperatorRequest) -> Response {
    let (tx, rx) = oneshot::channel();
    if ctx
        .inputs
        .try_send(Input::Operator { request, reply: tx })
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is too busy to take the request; try again",
        );
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(message))) => Json(json!({ "ok": message })).into_response(),
        Ok(Ok(Err(e))) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, "the request was dropped"),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent did not answer within 30 s",
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::auth::{Credential, Role, Tokens};
    use crate::config::AgentConfig;
    use crate::front::{Front, FrontLimits};
    use crate::peer::PeerLink;
    use crate::remote::{PeerMsg, Remote};
    use hitless_core::{ApplianceId, ControlEpoch};

    const CONFIG: &str = r#"
appliance = "primary"
api_listen = "127.0.0.1:7701"
peer_listen = "127.0.0.1:7711"
peer_addr = "127.0.0.1:9"
service_addr = "127.0.0.1:6380"
data_dir = "/nonexistent/hitless-api-test"
image = "/nonexistent/image"
"#;

    /// An API on a free loopback port, in front of an appliance with no instances and a
    /// peer that is never there; the driver's inputs are handed to the test.
    struct Served {
        addr: SocketAddr,
        inputs: mpsc::Receiver<Input>,
        _peer_events: mpsc::Receiver<crate::peer::PeerEvent<PeerMsg>>,
    }

    async fn serve_test(access: Access, bounds: Bounds) -> Served {
        let config = AgentConfig::parse(Path::new("test.toml"), CONFIG).unwrap();
        let backend: Arc<dyn hitless_vmm::Backend> = Arc::new(hitless_vmm::ProcessBackend::new(
            hitless_vmm::ProcessConfig::default(),
        ));
        let (obs_tx, _) = mpsc::channel(4);
        let local = crate::appliance::Appliance::new(
            ApplianceId::Primary,
            config,
            backend,
            crate::images::ImageCatalog::default(),
            Front::new(FrontLimits::default()).unwrap(),
            obs_tx,
        );
        let (link, peer_events) = PeerLink::<PeerMsg>::start(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
            Duration::from_millis(50),
            3,
            || PeerMsg::Heartbeat {
                from: ApplianceId::Primary,
                driving: false,
                epoch: ControlEpoch(0),
            },
        )
        .await
        .unwrap();
        let apps = Appliances {
            local,
            remote: Remote::new(link, ApplianceId::Secondary),
        };
        let (tx, inputs) = mpsc::channel(16);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ctx = Ctx {
            inputs: tx,
            view: SharedView::default(),
            apps,
        };
        serve_on(listener, ctx, access, bounds);
        Served {
            addr,
            inputs,
            _peer_events: peer_events,
        }
    }

    fn credential(role: Role) -> Credential {
        Credential {
            role,
            token: crate::auth::generate(),
        }
    }

    /// One request on a connection of its own; the status and the body's JSON.
    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        // Read to the end; a connection reset after the answer (the agent closed it with part
        // of an oversized body unread) ends it too.
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let read_all = async {
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                raw.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read_all)
            .await
            .expect("the API answers within 20 s");
        let out = String::from_utf8_lossy(&raw);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        (code, serde_json::from_str(body).unwrap_or_default())
    }

    fn message(v: &serde_json::Value) -> &str {
        v["error"].as_str().unwrap_or_default()
    }

    #[tokio::test]
    async fn an_upgrade_without_a_token_is_refused_401_and_starts_nothing() {
        let op = credential(Role::Operator);
        let tokens = Arc::new(Tokens::from_credentials(&[op]));
        let mut api = serve_test(Access::Tokens(tokens), Bounds::default()).await;
        let body = r#"{"image": "/x"}"#;
        let (code, v) = request(api.addr, "POST", "/v1/upgrade", None, body).await;
        assert_eq!(code, 401, "{v}");
        assert!(message(&v).contains("bearer token is required"), "{v}");
        // Another scheme is no bearer token either.
        let (code, _) = request(api.addr, "POST", "/v1/upgrade", Some(""), body).await;
        assert_eq!(code, 401);
        assert!(
            matches!(api.inputs.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
            "a refused request reached the driver"
        );
    }

    #[tokio::test]
    async fn a_read_token_gets_the_status_and_is_refused_403_on_an_upgrade() {
        let read = credential(Role::Read);
        let tokens = Arc::new(Tokens::from_credentials(std::slice::from_ref(&read)));
        let mut api = serve_test(Access::Tokens(tokens), Bounds::default()).await;
        let (code, v) = request(api.addr, "GET", "/v1/status", Some(&read.token), "").await;
        assert_eq!(code, 200, "{v}");
        let status: StatusAnswer = serde_json::from_value(v).unwrap();
        assert_eq!(status.appliance, ApplianceId::Primary);
        let (code, v) = request(api.addr, "GET", "/v1/progress", Some(&read.token), "").await;
        assert_eq!(code, 200, "{v}");
        for path in ["/v1/upgrade", "/v1/abort", "/v1/commit"] {
            let body = r#"{"image": "/x"}"#;
            let (code, v) = request(api.addr, "POST", path, Some(&read.token), body).await;
            assert_eq!(code, 403, "{path}: {v}");
            assert!(
                message(&v).contains("needs the operator role")
                    && message(&v).contains("has the read role"),
                "{v}"
            );
        }
        assert!(
            api.inputs.try_recv().is_err(),
            "a refused request reached the driver"
        );
    }

    #[tokio::test]
    async fn a_wrong_token_of_the_right_length_is_refused() {
        let op = credential(Role::Operator);
        let tokens = Arc::new(Tokens::from_credentials(std::slice::from_ref(&op)));
        let mut api = serve_test(Access::Tokens(tokens), Bounds::default()).await;
        let wrong = crate::auth::generate();
        assert_eq!(wrong.len(), op.token.len());
        let (code, v) = request(api.addr, "GET", "/v1/status", Some(&wrong), "").await;
        assert_eq!(code, 401, "{v}");
        assert!(message(&v).contains("not recognised"), "{v}");
        let (code, _) = request(api.addr, "POST", "/v1/abort", Some(&wrong), "").await;
        assert_eq!(code, 401);
        assert!(
            api.inputs.try_recv().is_err(),
            "a refused request reached the driver"
        );
    }

    #[tokio::test]
    async fn a_request_refused_for_its_credentials_closes_its_kept_alive_connection() {
        let tokens = Arc::new(Tokens::from_credentials(&[credential(Role::Read)]));
        let bounds = Bounds {
            header_read_timeout: Duration::from_secs(60),
            ..Bounds::default()
        };
        let api = serve_test(Access::Tokens(tokens), bounds).await;
        let mut s = TcpStream::connect(api.addr).await.unwrap();
        // HTTP/1.1 keeps a connection alive unless one side says otherwise.
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("the agent closes the connection after refusing the request")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_operator_token_reaches_the_driver() {
        let op = credential(Role::Operator);
        let tokens = Arc::new(Tokens::from_credentials(&[
            credential(Role::Read),
            op.clone(),
        ]));
        let mut api = serve_test(Access::Tokens(tokens), Bounds::default()).await;
        let driver = tokio::spawn(async move {
            match api.inputs.recv().await {
                Some(Input::Operator {
                    request: OperatorRequest::Upgrade { image_dir },
                    reply,
                }) => {
                    let _ = reply.send(Ok("upgrade started".into()));
                    image_dir
                }
                _ => panic!("the driver got no upgrade request"),
            }
        });
        let body = r#"{"image": "/images/kvd-2"}"#;
        let (code, v) = request(api.addr, "POST", "/v1/upgrade", Some(&op.token), body).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["ok"], "upgrade started");
        assert_eq!(driver.await.unwrap(), Path::new("/images/kvd-2"));
        // The operator role reads too.
        let (code, _) = request(api.addr, "GET", "/v1/progress", Some(&op.token), "").await;
        assert_eq!(code, 200);
    }

    #[tokio::test]
    async fn without_tokens_the_api_is_open() {
        let api = serve_test(Access::Open, Bounds::default()).await;
        let (code, v) = request(api.addr, "GET", "/v1/progress", None, "").await;
        assert_eq!(code, 200, "{v}");
    }

    #[tokio::test]
    async fn a_connection_that_sends_half_a_request_head_is_closed_after_the_header_timeout() {
        let bounds = Bounds {
            header_read_timeout: Duration::from_millis(300),
            ..Bounds::default()
        };
        let api = serve_test(Access::Open, bounds).await;
        let mut s = TcpStream::connect(api.addr).await.unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: te")
            .await
            .unwrap();
        let mut out = Vec::new();
        // Closed by the server (what it writes before, if anything, is no answer to it).
        let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection is still open after 20 s");
        assert!(
            !String::from_utf8_lossy(&out).contains("200 OK"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[tokio::test]
    async fn a_body_that_trickles_in_or_runs_over_the_limit_is_refused_and_starts_nothing() {
        let op = credential(Role::Operator);
        let tokens = Arc::new(Tokens::from_credentials(std::slice::from_ref(&op)));
        let bounds = Bounds {
            body_read_timeout: Duration::from_millis(300),
            ..Bounds::default()
        };
        let mut api = serve_test(Access::Tokens(tokens), bounds).await;
        let mut s = TcpStream::connect(api.addr).await.unwrap();
        let head = format!(
            "POST /v1/upgrade HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 20\r\n\r\n{{\"image\"",
            op.token
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("the connection is closed")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        let big = format!("{{\"image\": \"{}\"}}", "x".repeat(MAX_BODY));
        let (code, v) = request(api.addr, "POST", "/v1/upgrade", Some(&op.token), &big).await;
        assert_eq!(code, 413, "{v}");
        assert!(
            api.inputs.try_recv().is_err(),
            "a refused request reached the driver"
        );
    }

    #[tokio::test]
    async fn a_connection_beyond_the_cap_waits_until_one_closes() {
        let bounds = Bounds {
            header_read_timeout: Duration::from_secs(60),
            max_connections: 1,
            ..Bounds::default()
        };
        let api = serve_test(Access::Open, bounds).await;
        let holder = TcpStream::connect(api.addr).await.unwrap();
        // Let the server take the first connection (and its only slot) before the second.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = TcpStream::connect(api.addr).await.unwrap();
        second
            .write_all(b"GET /v1/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut first_bytes = [0u8; 1];
        let early =
            tokio::time::timeout(Duration::from_millis(500), second.read(&mut first_bytes)).await;
        assert!(early.is_err(), "a connection beyond the cap was served");
        drop(holder);
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), second.read_to_end(&mut out))
            .await
            .expect("served once the slot is free")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("200 OK"), "{text}");
    }

    #[tokio::test]
    async fn a_tokens_file_the_group_or_others_may_read_stops_the_start_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("api-tokens");
        crate::auth::write_file(&file, &[credential(Role::Operator)]).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let data = tmp.path().join("data");
        let text = CONFIG.replace("/nonexistent/hitless-api-test", &data.display().to_string())
            + &format!("[api]\ntokens_file = \"{}\"\n", file.display());
        let config = AgentConfig::parse(Path::new("test.toml"), &text).unwrap();
        let e = crate::daemon::run(config).await.unwrap_err().to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains("0644"), "{e}");
        assert!(!data.exists(), "a refused start created {}", data.display());
    }
}
