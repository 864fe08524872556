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

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::appliance::{Description, Op, OpOk};
use crate::driver::{Appliances, Input, OperatorRequest, ProgressLine, SharedView};

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

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

/// Starts serving the API on `addr`.
pub async fn serve(
    addr: SocketAddr,
    inputs: mpsc::Sender<Input>,
    view: SharedView,
    apps: Appliances,
) -> std::io::Result<()> {
    let ctx = Ctx { inputs, view, apps };
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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("API server stopped: {e}");
        }
    });
    Ok(())
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
