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
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::authz::{Principal, Role};
use crate::join::{sha256_hex, JoinRequest, JoinResponse};
use crate::model::{validate_name, Command, DomainError, ErrorCode, Project, TokenScope};
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
        Self {
            status,
            code,
            message: message.into(),
        }
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
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        let status = match e.code {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::TokenInvalid | ErrorCode::TokenExpired | ErrorCode::TokenUsed => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        };
        Self::new(status, e.code.as_str(), e.message)
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Domain(d) => d.into(),
            ClusterError::NoLeader { .. }
            | ClusterError::NoQuorum
            | ClusterError::NotLeader { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                crate::error_chain(&e),
            ),
            ClusterError::Unconfirmed { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            ClusterError::Peer(_) | ClusterError::Leader { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "{}; the outcome is unknown, retry the request",
                    crate::error_chain(&e)
                ),
            ),
            ClusterError::Membership { .. } => {
                Self::new(StatusCode::CONFLICT, "failed_precondition", e.to_string())
            }
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
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "payload_too_large"
                } else {
                    "invalid_request"
                };
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

/// Every API route with the permission it needs. The authorisation matrix
/// test walks this same list.
pub fn routes() -> crate::authz::Routes<Arc<ClusterNode>> {
    use crate::authz::Permission::*;
    use crate::authz::{Role, Routes};
    use axum::http::Method;
    let project = |role| Project {
        param: "name",
        role,
    };
    Routes::default()
        .add(Method::GET, "/healthz", Public, healthz)
        .add(Method::GET, "/readyz", Public, readyz)
        .add(Method::GET, "/v1/cluster/ca", Public, ca_certificate)
        .add(Method::POST, "/v1/cluster/join", Public, join)
        .add(Method::POST, "/v1/login", Public, login)
        .add(Method::GET, "/v1/cluster", Authenticated, cluster)
        .add(Method::GET, "/v1/nodes", Authenticated, nodes)
        .add(Method::GET, "/v1/projects", Authenticated, list_projects)
        .add(Method::POST, "/v1/projects", ClusterAdmin, create_project)
        .add(
            Method::GET,
            "/v1/projects/{name}",
            project(Role::ProjectViewer),
            show_project,
        )
        .add(
            Method::PATCH,
            "/v1/projects/{name}",
            project(Role::ProjectAdmin),
            update_project,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}",
            project(Role::ClusterAdmin),
            delete_project,
        )
        .add(Method::GET, "/v1/users", ClusterAdmin, list_users)
        .add(Method::POST, "/v1/users", ClusterAdmin, create_user)
        .add(
            Method::POST,
            "/v1/users/{user}/roles",
            ClusterAdmin,
            grant_role,
        )
        .add(
            Method::GET,
            "/v1/users/{user}/tokens",
            SelfOrClusterAdmin { param: "user" },
            list_tokens,
        )
        .add(
            Method::POST,
            "/v1/users/{user}/tokens",
            SelfOrClusterAdmin { param: "user" },
            create_token,
        )
        .add(
            Method::DELETE,
            "/v1/tokens/{id}",
            TokenOwnerOrClusterAdmin { param: "id" },
            revoke_token,
        )
        .add(Method::GET, "/v1/audit", ClusterAdmin, audit_log)
        .add(Method::GET, "/v1/zones", Authenticated, zones)
        .add(
            Method::PUT,
            "/v1/nodes/{node}/zone",
            ClusterAdmin,
            set_node_zone,
        )
}

pub fn router(node: Arc<ClusterNode>) -> Router {
    let (router, table) = routes().finish();
    router
        .route_layer(middleware::from_fn_with_state(
            (node.clone(), table),
            crate::authz::authorize,
        ))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
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
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such API route; see the README for the API's routes",
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(node): State<Arc<ClusterNode>>) -> Response {
    match node.leader() {
        Some(leader) => {
            Json(serde_json::json!({ "ready": true, "leader_id": leader })).into_response()
        }
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no leader is known yet",
        )
        .into_response(),
    }
}

async fn ca_certificate(State(node): State<Arc<ClusterNode>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        node.tls.ca_pem.clone(),
    )
        .into_response()
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
    pub zone: crate::zones::Zone,
}

async fn nodes(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<Vec<NodeView>>> {
    let records = node.state.nodes()?;
    let leader = node.leader();
    Ok(Json(
        node.members()
            .into_iter()
            .map(|m| NodeView {
                joined_at_ms: records
                    .iter()
                    .find(|r| r.id == m.id)
                    .map(|r| r.joined_at_ms),
                zone: records
                    .iter()
                    .find(|r| r.id == m.id)
                    .map(|r| r.zone)
                    .unwrap_or_default(),
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
    /// OFFICIAL (default), OFFICIAL-SENSITIVE or SECRET; fixed for the project's life.
    #[serde(default)]
    zone: Option<String>,
}

fn parse_zone(text: &str) -> ApiResult<crate::zones::Zone> {
    crate::zones::Zone::parse(text).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("unknown zone {text:?}; use OFFICIAL, OFFICIAL-SENSITIVE or SECRET"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProject {
    description: String,
}

fn project_from(value: serde_json::Value) -> ApiResult<Project> {
    serde_json::from_value(value).map_err(|e| ApiError::internal(&e))
}

/// Lists the projects the caller has a role in (all, for cluster admins).
async fn list_projects(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
) -> ApiResult<Json<Vec<Project>>> {
    node.linearizable_read().await?;
    let projects = node.state.projects()?;
    Ok(Json(
        projects
            .into_iter()
            .filter(|p| caller.role_in(&p.name).is_some())
            .collect(),
    ))
}

async fn create_project(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreateProject>,
) -> ApiResult<(StatusCode, Json<Project>)> {
    validate_name("project", &body.name)?;
    crate::model::validate_description(&body.description)?;
    let zone = match body.zone.as_deref() {
        Some(text) => parse_zone(text)?,
        None => crate::zones::Zone::default(),
    };
    let outcome = node
        .write(&Command::CreateProject {
            name: body.name,
            description: body.description,
            now_ms: crate::join::now_ms(),
            zone,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(project_from(outcome?)?)))
}

fn project_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("project {name:?} does not exist"),
    )
}

async fn show_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Project>> {
    node.linearizable_read().await?;
    node.state
        .project(&name)?
        .map(Json)
        .ok_or_else(|| project_not_found(&name))
}

async fn update_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdateProject>,
) -> ApiResult<Json<Project>> {
    crate::model::validate_description(&body.description)?;
    let outcome = node
        .write(&Command::UpdateProject {
            name,
            description: body.description,
        })
        .await?;
    Ok(Json(project_from(outcome?)?))
}

async fn delete_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteProject { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// A joining node spends its token here and receives its certificate.
async fn join(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<JoinRequest>,
) -> ApiResult<Json<JoinResponse>> {
    validate_name("node", &body.name)?;
    for (what, addr) in [("api_addr", &body.api_addr), ("peer_addr", &body.peer_addr)] {
        if addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_none()
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("{what} {addr:?} is not HOST:PORT"),
            ));
        }
    }
    crate::pki::check_csr(&body.csr_pem).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            crate::error_chain(&e),
        )
    })?;
    if node.members().iter().any(|m| m.name == body.name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!(
                "a member named {:?} already exists; pick another node name",
                body.name
            ),
        ));
    }
    let outcome = node
        .write(&Command::ConsumeJoinToken {
            id: body.token_id,
            secret_sha256: sha256_hex(&body.secret),
            now_ms: crate::join::now_ms(),
            node_name: body.name,
        })
        .await??;
    let node_id = outcome
        .get("node_id")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| ApiError::internal(&std::io::Error::other("join outcome has no node id")))?;
    let ca_key_pem =
        std::fs::read_to_string(node.data_dir.ca_key()).map_err(|e| ApiError::internal(&e))?;
    let cert_pem = crate::pki::CertificateAuthority::sign_node_csr(
        &node.tls.ca_pem,
        &ca_key_pem,
        &body.csr_pem,
        node_id,
    )
    .map_err(|e| ApiError::internal(&e))?;
    tracing::info!(node_id, "issued a certificate to a joining node");
    Ok(Json(JoinResponse {
        node_id,
        cluster_id: node.config.cluster_id.clone(),
        cert_pem,
        ca_pem: node.tls.ca_pem.clone(),
        ca_key_pem,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    name: String,
    #[serde(default)]
    password: Option<String>,
}

const MIN_PASSWORD_CHARS: usize = 8;

/// Hashes a password with Argon2id off the async workers.
async fn hash_password(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
    .map_err(|e| ApiError::internal(&std::io::Error::other(e.to_string())))
}

async fn verify_password(password: String, phc: String) -> bool {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(&phc).is_ok_and(|hash| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false)
}

async fn list_users(
    State(node): State<Arc<ClusterNode>>,
) -> ApiResult<Json<Vec<serde_json::Value>>> {
    node.linearizable_read().await?;
    let mut users = Vec::new();
    for user in node.state.users()? {
        let mut view = crate::model::user_view(&user);
        let grants: serde_json::Map<String, serde_json::Value> = node
            .state
            .grants_of(&user.name)?
            .into_iter()
            .map(|(p, r)| (p, r.as_str().into()))
            .collect();
        view["projects"] = grants.into();
        users.push(view);
    }
    Ok(Json(users))
}

async fn create_user(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    validate_name("user", &body.name)?;
    let password_phc = match body.password {
        Some(p) if p.chars().count() < MIN_PASSWORD_CHARS => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("the password must have at least {MIN_PASSWORD_CHARS} characters"),
            ));
        }
        Some(p) => Some(hash_password(p).await?),
        None => None,
    };
    let outcome = node
        .write(&Command::CreateUser {
            name: body.name,
            password_phc,
            now_ms: crate::join::now_ms(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRole {
    role: String,
    #[serde(default)]
    project: Option<String>,
}

fn parse_role(text: &str) -> ApiResult<Role> {
    Role::parse(text).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("unknown role {text:?}; use cluster-admin, project-admin, project-member or project-viewer"),
        )
    })
}

async fn grant_role(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<GrantRole>,
) -> ApiResult<Json<serde_json::Value>> {
    let role = parse_role(&body.role)?;
    let outcome = node
        .write(&Command::GrantRole {
            user,
            project: body.project,
            role,
        })
        .await?;
    Ok(Json(outcome?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    expires_in_secs: Option<u64>,
}

#[derive(Serialize)]
struct NewToken {
    id: String,
    /// The secret, shown only in this answer.
    token: String,
    user: String,
    scope: TokenScope,
    expires_at_ms: Option<u64>,
}

async fn issue_token(
    node: &ClusterNode,
    user: String,
    scope: TokenScope,
    expires_in_secs: Option<u64>,
) -> ApiResult<NewToken> {
    let id = crate::join::random_hex(8);
    let token = format!("allod_{}", crate::join::random_hex(32));
    let now_ms = crate::join::now_ms();
    let expires_at_ms = expires_in_secs.map(|s| now_ms + s.saturating_mul(1000));
    node.write(&Command::CreateToken {
        id: id.clone(),
        secret_sha256: crate::join::sha256_hex(&token),
        user: user.clone(),
        scope: scope.clone(),
        now_ms,
        expires_at_ms,
    })
    .await??;
    Ok(NewToken {
        id,
        token,
        user,
        scope,
        expires_at_ms,
    })
}

async fn create_token(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<NewToken>)> {
    let scope = match (body.project, body.role) {
        (None, None) => TokenScope::Cluster,
        (Some(project), role) => {
            let role = parse_role(role.as_deref().unwrap_or("project-viewer"))?;
            if role == Role::ClusterAdmin {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "a project token cannot carry the cluster-admin role",
                ));
            }
            // Nobody learns of a project through a token request.
            if caller.role_in(&project).is_none() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("project {project:?} does not exist"),
                ));
            }
            TokenScope::Project { project, role }
        }
        (None, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                "a token role needs --project",
            ))
        }
    };
    if body.expires_in_secs == Some(0) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "expires_in_secs must be more than zero",
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(issue_token(&node, user, scope, body.expires_in_secs).await?),
    ))
}

async fn list_tokens(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
) -> ApiResult<Json<Vec<crate::model::ApiTokenRecord>>> {
    node.linearizable_read().await?;
    Ok(Json(node.state.tokens_of(&user)?))
}

async fn revoke_token(
    State(node): State<Arc<ClusterNode>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::RevokeToken { id }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    user: String,
    password: String,
}

/// Sessions from `allod login` last a day.
const LOGIN_TOKEN_SECS: u64 = 24 * 3600;

async fn login(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<Login>,
) -> ApiResult<Json<NewToken>> {
    let refused = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown user or wrong password",
        )
    };
    let user = node.state.user(&body.user)?.ok_or_else(refused)?;
    let Some(phc) = user.password_phc else {
        return Err(refused());
    };
    if !verify_password(body.password, phc).await {
        tracing::info!(user = body.user, "login refused: wrong password");
        return Err(refused());
    }
    Ok(Json(
        issue_token(
            &node,
            user.name,
            TokenScope::Cluster,
            Some(LOGIN_TOKEN_SECS),
        )
        .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only entries of this user.
    user: Option<String>,
    /// Only entries whose action contains this text (e.g. `DELETE`).
    action: Option<String>,
    /// Only entries after this sequence number.
    after: Option<u64>,
    limit: Option<usize>,
    /// `json` (default) or `jsonl` for an export, one entry per line.
    format: Option<String>,
}

async fn audit_log(
    State(node): State<Arc<ClusterNode>>,
    axum::extract::Query(query): axum::extract::Query<AuditQuery>,
) -> ApiResult<Response> {
    node.linearizable_read().await?;
    let entries: Vec<crate::audit::AuditEntry> = node
        .state
        .audit_entries(query.after.unwrap_or(0))?
        .into_iter()
        .filter(|e| {
            query
                .user
                .as_ref()
                .is_none_or(|u| &e.record.context.user == u)
        })
        .filter(|e| {
            query
                .action
                .as_ref()
                .is_none_or(|a| e.record.context.action.contains(a.as_str()))
        })
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    match query.format.as_deref() {
        None | Some("json") => Ok(Json(entries).into_response()),
        Some("jsonl") => {
            let mut body = String::new();
            for entry in &entries {
                body.push_str(&serde_json::to_string(entry).expect("entries serialise"));
                body.push('\n');
            }
            Ok((
                [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                body,
            )
                .into_response())
        }
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("unknown format {other:?}; use json or jsonl"),
        )),
    }
}

async fn zones() -> Json<Vec<crate::zones::ZonePolicy>> {
    Json(crate::zones::policies())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetZone {
    zone: String,
}

async fn set_node_zone(
    State(node): State<Arc<ClusterNode>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetZone>,
) -> ApiResult<Json<serde_json::Value>> {
    let zone = parse_zone(&body.zone)?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("{id:?} is not a node id; `allod cluster status` lists them"),
        )
    })?;
    let outcome = node.write(&Command::SetNodeZone { id, zone }).await?;
    Ok(Json(outcome?))
}
