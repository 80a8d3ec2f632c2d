//! The tenant-facing REST API.
//!
//! Every error leaves through [`ApiError`], the one mapping from domain and
//! cluster errors to an HTTP status and the stable body
//! `{"error":{"code":"...","message":"..."}}`. Client mistakes are 4xx and
//! logged at debug level; internal errors are 500 with a request id that is
//! logged with the full error chain.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::join::{sha256_hex, JoinRequest, JoinResponse};
use crate::model::{validate_name, Command, DomainError, ErrorCode, Project};
use crate::node::{ClusterError, ClusterNode, MemberView};

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        let request_id = crate::join::random_hex(8);
        tracing::error!(request_id, error = %crate::error_chain(error), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error (request id {request_id}); the agent's log has the details"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_client_error() {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: &self.message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        let status = match e.code {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::TokenInvalid | ErrorCode::TokenExpired | ErrorCode::TokenUsed => StatusCode::FORBIDDEN,
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
        };
        Self::new(status, e.code.as_str(), e.message)
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Domain(d) => d.into(),
            ClusterError::NoLeader { .. } | ClusterError::NoQuorum | ClusterError::NotLeader { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", crate::error_chain(&e))
            }
            ClusterError::Peer(_) | ClusterError::Leader { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("{}; the outcome is unknown, retry the request", crate::error_chain(&e)))
            }
            ClusterError::Membership { .. } => Self::new(StatusCode::CONFLICT, "failed_precondition", e.to_string()),
            other => Self::internal(&other),
        }
    }
}

impl From<crate::model::ReadError> for ApiError {
    fn from(e: crate::model::ReadError) -> Self {
        Self::internal(&e)
    }
}

/// `Json` whose rejections use the API's error body.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                // A body that parses as JSON but not as the request type is
                // as much a malformed request as one that does not parse.
                let status = match rejection.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    other => other,
                };
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "invalid_request" };
                let hint = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    format!("request body is larger than {MAX_BODY_BYTES} bytes")
                } else {
                    rejection.body_text()
                };
                Err(ApiError::new(status, code, hint))
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn router(node: Arc<ClusterNode>) -> Router {
    let authenticated = Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/nodes", get(nodes))
        .route("/v1/projects", get(list_projects).post(create_project))
        .route("/v1/projects/{name}", get(show_project).patch(update_project).delete(delete_project))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/cluster/ca", get(ca_certificate))
        .route("/v1/cluster/join", post(join))
        .merge(authenticated)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, REQUEST_TIMEOUT))
        .with_state(node)
}

/// What an unconfigured node serves on its API port.
pub fn unconfigured_router() -> Router {
    Router::new().route("/healthz", get(healthz)).fallback(|| async {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unconfigured",
            "this node is not part of a cluster yet; run `allod cluster init` or `allod cluster join` on it",
        )
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route; see the README for the API's routes")
}

async fn require_token(State(node): State<Arc<ClusterNode>>, headers: HeaderMap, request: Request, next: Next) -> Response {
    let unauthorized = |message: &str| {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message.to_string()).into_response()
    };
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return unauthorized("missing Authorization header; send `Authorization: Bearer <token>`");
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return unauthorized("the Authorization header must be `Bearer <token>`");
    };
    match node.state.api_token(&sha256_hex(token.trim())) {
        Ok(Some(_record)) => next.run(request).await,
        Ok(None) => unauthorized("the token is not valid for this cluster"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(node): State<Arc<ClusterNode>>) -> Response {
    match node.leader() {
        Some(leader) => Json(serde_json::json!({ "ready": true, "leader_id": leader })).into_response(),
        None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no leader is known yet").into_response(),
    }
}

async fn ca_certificate(State(node): State<Arc<ClusterNode>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/x-pem-file")], node.tls.ca_pem.clone()).into_response()
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster_id: String,
    pub name: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub node_id: u64,
    pub members: Vec<MemberView>,
}

async fn cluster(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<ClusterView>> {
    let info = node.state.cluster()?;
    let metrics = node.raft.metrics().borrow().clone();
    Ok(Json(ClusterView {
        cluster_id: node.config.cluster_id.clone(),
        name: info.map(|i| i.name).unwrap_or_default(),
        leader_id: metrics.current_leader,
        term: metrics.current_term,
        node_id: node.id,
        members: node.members(),
    }))
}

#[derive(Serialize, Deserialize, Debug)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub role: crate::node::MemberRole,
    pub is_leader: bool,
    pub joined_at_ms: Option<u64>,
}

async fn nodes(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<Vec<NodeView>>> {
    let records = node.state.nodes()?;
    let leader = node.leader();
    Ok(Json(
        node.members()
            .into_iter()
            .map(|m| NodeView {
                joined_at_ms: records.iter().find(|r| r.id == m.id).map(|r| r.joined_at_ms),
                is_leader: leader == Some(m.id),
                id: m.id,
                name: m.name,
                api_addr: m.api_addr,
                peer_addr: m.peer_addr,
                role: m.role,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProject {
    description: String,
}

fn project_from(value: serde_json::Value) -> ApiResult<Project> {
    serde_json::from_value(value).map_err(|e| ApiError::internal(&e))
}

async fn list_projects(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<Vec<Project>>> {
    node.linearizable_read().await?;
    Ok(Json(node.state.projects()?))
}

async fn create_project(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreateProject>,
) -> ApiResult<(StatusCode, Json<Project>)> {
    validate_name("project", &body.name)?;
    crate::model::validate_description(&body.description)?;
    let outcome = node
        .write(&Command::CreateProject { name: body.name, description: body.description, now_ms: crate::join::now_ms() })
        .await?;
    Ok((StatusCode::CREATED, Json(project_from(outcome?)?)))
}

fn project_not_found(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("project {name:?} does not exist"))
}

async fn show_project(State(node): State<Arc<ClusterNode>>, Path(name): Path<String>) -> ApiResult<Json<Project>> {
    node.linearizable_read().await?;
    node.state.project(&name)?.map(Json).ok_or_else(|| project_not_found(&name))
}

async fn update_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdateProject>,
) -> ApiResult<Json<Project>> {
    crate::model::validate_description(&body.description)?;
    let outcome = node.write(&Command::UpdateProject { name, description: body.description }).await?;
    Ok(Json(project_from(outcome?)?))
}

async fn delete_project(State(node): State<Arc<ClusterNode>>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteProject { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// A joining node spends its token here and receives its certificate.
async fn join(State(node): State<Arc<ClusterNode>>, ApiJson(body): ApiJson<JoinRequest>) -> ApiResult<Json<JoinResponse>> {
    validate_name("node", &body.name)?;
    for (what, addr) in [("api_addr", &body.api_addr), ("peer_addr", &body.peer_addr)] {
        if addr.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", format!("{what} {addr:?} is not HOST:PORT")));
        }
    }
    crate::pki::check_csr(&body.csr_pem)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", crate::error_chain(&e)))?;
    if node.members().iter().any(|m| m.name == body.name) {
        return Err(ApiError::new(StatusCode::CONFLICT, "already_exists", format!("a member named {:?} already exists; pick another node name", body.name)));
    }
    let outcome = node
        .write(&Command::ConsumeJoinToken {
            id: body.token_id,
            secret_sha256: sha256_hex(&body.secret),
            now_ms: crate::join::now_ms(),
            node_name: body.name,
        })
        .await??;
    let node_id = outcome.get("node_id").and_then(|v| v.as_u64()).ok_or_else(|| ApiError::internal(&std::io::Error::other("join outcome has no node id")))?;
    let ca_key_pem = std::fs::read_to_string(node.data_dir.ca_key()).map_err(|e| ApiError::internal(&e))?;
    let cert_pem = crate::pki::CertificateAuthority::sign_node_csr(&node.tls.ca_pem, &ca_key_pem, &body.csr_pem, node_id)
        .map_err(|e| ApiError::internal(&e))?;
    tracing::info!(node_id, "issued a certificate to a joining node");
    Ok(Json(JoinResponse { node_id, cluster_id: node.config.cluster_id.clone(), cert_pem, ca_pem: node.tls.ca_pem.clone(), ca_key_pem }))
}
