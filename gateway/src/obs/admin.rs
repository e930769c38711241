//! The hub's admin HTTP listener (axum): `/metrics`, the JSON API and the status page.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the live status page (embedded HTML/JS, no external resources) |
//! | `GET /metrics` | Prometheus text format (prometheus-client's encoder) |
//! | `GET /api/status` | [`Status`]: groups, shards, streams, consumer groups |
//! | `GET /api/shards` | the shard slots |
//! | `GET /api/streams` · `/api/streams/{name}` | streams with offsets and traffic |
//! | `GET /api/groups` · `/api/groups/{stream}/{group}` | consumer groups with lag |
//! | `GET /api/clients` | the busiest client sessions of all shards, by records/s |
//!
//! With a token (`[admin] token_file`), every route but `/` requires
//! `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::view::{NodeView, Status};

/// The status page, embedded in the binary.
pub const STATUS_HTML: &str = include_str!("status.html");

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Binding or configuring the TCP listener failed.
    #[error("admin listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The token file could not be read or is empty.
    #[error("admin token file {path}: {reason}")]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads a bearer token file (trimmed; must not be empty).
pub fn read_token(path: &std::path::Path) -> Result<String, AdminError> {
    let bad = |reason: String| AdminError::Token {
        path: path.to_owned(),
        reason,
    };
    let t = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let t = t.trim();
    if t.is_empty() {
        return Err(bad("is empty".to_owned()));
    }
    Ok(t.to_owned())
}

#[derive(Clone)]
struct AppState {
    view: Arc<NodeView>,
    token: Option<Arc<str>>,
}

/// The running listener; dropping it stops it.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl AdminServer {
    /// Binds `addr` and serves. Must be called inside a tokio runtime.
    pub fn start(
        addr: SocketAddr,
        view: Arc<NodeView>,
        token: Option<String>,
    ) -> Result<Self, AdminError> {
        let bind = |source| AdminError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind)?;
        std_listener.set_nonblocking(true).map_err(bind)?;
        let local = std_listener.local_addr().map_err(bind)?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(bind)?;
        let state = AppState {
            view,
            token: token.map(Arc::from),
        };
        let app = router(state);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!("admin listener stopped: {e}");
            }
        });
        Ok(Self {
            addr: local,
            _stop: stop,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/shards", get(shards))
        .route("/api/streams", get(streams))
        .route("/api/streams/{name}", get(stream))
        .route("/api/clients", get(clients))
        .route("/api/groups", get(groups))
        .route("/api/groups/{stream}/{group}", get(group))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(|| async { Html(STATUS_HTML) }))
        .merge(api)
        .with_state(state)
}

async fn auth(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(want) = &st.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(want.as_bytes())) {
            return (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
        }
    }
    next.run(req).await
}

/// Gathers the status off the async threads (it walks the store directory).
async fn gather(st: &AppState) -> Result<Status, StatusCode> {
    let view = st.view.clone();
    tokio::task::spawn_blocking(move || view.status())
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

async fn metrics(State(st): State<AppState>) -> Response {
    let view = st.view.clone();
    match tokio::task::spawn_blocking(move || view.metrics_text()).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn status(State(st): State<AppState>) -> Result<axum::Json<Status>, StatusCode> {
    gather(&st).await.map(axum::Json)
}

async fn shards(State(st): State<AppState>) -> Result<Response, StatusCode> {
    let s = gather(&st).await?;
    Ok(axum::Json(s.shards).into_response())
}

async fn streams(State(st): State<AppState>) -> Result<Response, StatusCode> {
    let s = gather(&st).await?;
    Ok(axum::Json(s.streams).into_response())
}

async fn stream(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, StatusCode> {
    let s = gather(&st).await?;
    let found = s.streams.into_iter().find(|x| x.name == name);
    found
        .map(|x| axum::Json(x).into_response())
        .ok_or(StatusCode::NOT_FOUND)
}

async fn clients(State(st): State<AppState>) -> Result<Response, StatusCode> {
    let s = gather(&st).await?;
    Ok(axum::Json(s.clients).into_response())
}

async fn groups(State(st): State<AppState>) -> Result<Response, StatusCode> {
    let s = gather(&st).await?;
    Ok(axum::Json(s.consumer_groups).into_response())
}

async fn group(
    State(st): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
) -> Result<Response, StatusCode> {
    let s = gather(&st).await?;
    let found = s
        .consumer_groups
        .into_iter()
        .find(|g| g.stream == stream && g.group == group);
    found
        .map(|x| axum::Json(x).into_response())
        .ok_or(StatusCode::NOT_FOUND)
}
