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

use crate::audit::AuditEntry;
use crate::authz::{Principal, Role};
use crate::join::{sha256_hex, JoinRequest, JoinResponse};
use crate::model::{
    validate_name, ApiTokenRecord, Command, DomainError, ErrorCode, NodeRecord, Project, TokenScope,
};
use crate::node::{ClusterError, ClusterNode, MemberView};
use crate::zones::ZonePolicy;

mod network;
mod vms;
mod volumes;
use volumes::create_volume;

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// Every error answer: `{"error":{"code":"...","message":"..."}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `not_found`, `invalid_argument`,
    /// `already_exists`, `unauthenticated`, `forbidden`, `unavailable`, ...
    pub code: String,
    /// What was wrong and how to fix it, in words.
    pub message: String,
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
                code: self.code.to_string(),
                message: self.message,
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
            ErrorCode::QuotaExceeded => StatusCode::CONFLICT,
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
        let value = match Json::<serde_json::Value>::from_request(req, state).await {
            Ok(Json(value)) => value,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                ))
            }
            Err(rejection) => {
                return Err(ApiError::new(
                    // A missing content type stays 415; everything else is 400.
                    match rejection.status() {
                        StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        _ => StatusCode::BAD_REQUEST,
                    },
                    "invalid_request",
                    rejection.body_text(),
                ));
            }
        };
        // serde reads a struct from an array too; every request body of this
        // API is an object, so anything else is refused.
        if !value.is_object() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body must be a JSON object",
            ));
        }
        serde_json::from_value(value).map(ApiJson).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the request body does not fit this route: {e}"),
            )
        })
    }
}

/// `Query` whose rejections use the API's error body.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    rejection.body_text(),
                )
            })
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
        .add(Method::GET, "/v1/openapi.json", Public, openapi_json)
        .add(Method::GET, "/v1/cluster/ca", Public, ca_certificate)
        .add(Method::POST, "/v1/cluster/join", Public, join)
        .add(Method::POST, "/v1/login", Public, login)
        .add(Method::GET, "/v1/cluster", Authenticated, cluster)
        .add(Method::GET, "/v1/nodes", Authenticated, nodes)
        .add(
            Method::GET,
            "/v1/ip-pools",
            Authenticated,
            network::list_pools,
        )
        .add(
            Method::POST,
            "/v1/ip-pools",
            ClusterAdmin,
            network::create_pool,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/vpcs",
            project(Role::ProjectViewer),
            network::list_vpcs,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vpcs",
            project(Role::ProjectMember),
            network::create_vpc,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/vpcs/{vpc}",
            project(Role::ProjectMember),
            network::delete_vpc,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/vpcs/{vpc}/subnets",
            project(Role::ProjectViewer),
            network::list_subnets,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vpcs/{vpc}/subnets",
            project(Role::ProjectMember),
            network::create_subnet,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/security-groups",
            project(Role::ProjectViewer),
            network::list_security_groups,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/security-groups",
            project(Role::ProjectMember),
            network::create_security_group,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/security-groups/{sg}",
            project(Role::ProjectMember),
            network::delete_security_group,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/security-groups/{sg}/rules",
            project(Role::ProjectMember),
            network::add_rule,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/security-groups/{sg}/rules/{rule}",
            project(Role::ProjectMember),
            network::delete_rule,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/ports",
            project(Role::ProjectViewer),
            network::list_ports,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/ports",
            project(Role::ProjectMember),
            network::create_port,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/ports/{port}",
            project(Role::ProjectMember),
            network::delete_port,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/floating-ips",
            project(Role::ProjectViewer),
            network::list_fips,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/floating-ips",
            project(Role::ProjectMember),
            network::allocate_fip,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/floating-ips/{ip}/bind",
            project(Role::ProjectMember),
            network::bind_fip,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/floating-ips/{ip}",
            project(Role::ProjectMember),
            network::release_fip,
        )
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
        .add(
            Method::PUT,
            "/v1/projects/{name}/quota",
            project(Role::ClusterAdmin),
            set_quota,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/volumes",
            project(Role::ProjectViewer),
            list_volumes,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/volumes",
            project(Role::ProjectMember),
            create_volume,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/volumes/{volume}",
            project(Role::ProjectViewer),
            show_volume,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/volumes/{volume}",
            project(Role::ProjectMember),
            delete_volume,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/volumes/{volume}/resize",
            project(Role::ProjectMember),
            volumes::resize_volume,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/volumes/{volume}/snapshots",
            project(Role::ProjectViewer),
            volumes::list_snapshots,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/volumes/{volume}/snapshots",
            project(Role::ProjectMember),
            volumes::create_snapshot,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/volumes/{volume}/snapshots/{snapshot}",
            project(Role::ProjectMember),
            volumes::delete_snapshot,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/volumes/{volume}/rollback",
            project(Role::ProjectMember),
            volumes::rollback_volume,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/volumes/{volume}/clone",
            project(Role::ProjectMember),
            volumes::clone_volume,
        )
        .add(
            Method::GET,
            "/v1/images",
            Authenticated,
            volumes::list_images,
        )
        .add(
            Method::POST,
            "/v1/images",
            ClusterAdmin,
            volumes::import_image,
        )
        .add(
            Method::GET,
            "/v1/images/{image}",
            Authenticated,
            volumes::show_image,
        )
        .add(
            Method::DELETE,
            "/v1/images/{image}",
            ClusterAdmin,
            volumes::delete_image,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/vms",
            project(Role::ProjectViewer),
            list_vms,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vms",
            project(Role::ProjectMember),
            create_vm,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/vms/{vm}",
            project(Role::ProjectViewer),
            show_vm,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/vms/{vm}",
            project(Role::ProjectMember),
            delete_vm,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vms/{vm}/volumes",
            project(Role::ProjectMember),
            attach_volume,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vms/{vm}/start",
            project(Role::ProjectMember),
            vms::start_vm,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vms/{vm}/stop",
            project(Role::ProjectMember),
            vms::stop_vm,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vms/{vm}/force-stop",
            project(Role::ProjectMember),
            vms::force_stop_vm,
        )
        .add(
            Method::POST,
            "/v1/projects/{name}/vms/{vm}/reboot",
            project(Role::ProjectMember),
            vms::reboot_vm,
        )
        .add(
            Method::PATCH,
            "/v1/projects/{name}/vms/{vm}",
            project(Role::ProjectMember),
            vms::update_vm,
        )
        .add(
            Method::GET,
            "/v1/projects/{name}/vms/{vm}/console",
            project(Role::ProjectMember),
            vms::console,
        )
        .add(
            Method::DELETE,
            "/v1/projects/{name}/vms/{vm}/volumes/{volume}",
            project(Role::ProjectMember),
            detach_volume,
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
        .add(Method::GET, "/v1/oidc/issuers", ClusterAdmin, list_issuers)
        .add(
            Method::PUT,
            "/v1/oidc/issuers/{issuer}",
            ClusterAdmin,
            put_issuer,
        )
        .add(
            Method::DELETE,
            "/v1/oidc/issuers/{issuer}",
            ClusterAdmin,
            delete_issuer,
        )
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
        .layer(middleware::from_fn(time_limit))
        .with_state(node)
}

/// Every request but an image upload (which takes as long as the image
/// takes to send) gets [`REQUEST_TIMEOUT`].
async fn time_limit(req: Request, next: middleware::Next) -> Response {
    if req.method() == axum::http::Method::POST && req.uri().path() == "/v1/images" {
        return next.run(req).await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the request took longer than {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

/// The API with no authentication or authorisation at all: every caller is
/// a cluster administrator. It exists only in builds with the
/// `bench-unauthenticated` feature, for the benchmark that measures what
/// authentication costs; the `allod` binary never has it.
#[cfg(feature = "bench-unauthenticated")]
pub fn router_unauthenticated(node: Arc<ClusterNode>) -> Router {
    let (router, _) = routes().finish();
    router
        .route_layer(middleware::from_fn(
            |mut request: Request, next: middleware::Next| async move {
                request.extensions_mut().insert(Principal {
                    user: "benchmark".into(),
                    token_id: "-".into(),
                    cluster_admin: true,
                    project_roles: Default::default(),
                    project_scoped: false,
                });
                next.run(request).await
            },
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

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// This node's clock, in milliseconds since the epoch (joining nodes
    /// compare theirs with it).
    pub time_ms: u64,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ready {
    pub ready: bool,
    pub leader_id: u64,
}

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is up", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        time_ms: crate::join::now_ms(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "The node knows a leader and serves requests", body = Ready)))]
async fn readyz(State(node): State<Arc<ClusterNode>>) -> Response {
    match node.leader() {
        Some(leader) => Json(Ready {
            ready: true,
            leader_id: leader,
        })
        .into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no leader is known yet",
        )
        .into_response(),
    }
}

#[utoipa::path(get, path = "/v1/cluster/ca", tag = "cluster",
    responses((status = 200, description = "The cluster CA certificate (PEM)", body = String, content_type = "application/x-pem-file")))]
async fn ca_certificate(State(node): State<Arc<ClusterNode>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        node.tls.ca_pem.clone(),
    )
        .into_response()
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct ClusterView {
    pub cluster_id: String,
    pub name: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub node_id: u64,
    pub members: Vec<MemberView>,
}

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "The cluster, its leader and members", body = ClusterView)))]
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

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub role: crate::node::MemberRole,
    pub is_leader: bool,
    pub joined_at_ms: Option<u64>,
    pub zone: crate::zones::Zone,
    /// Capacity the node reported (0 until it has).
    pub vcpus: u64,
    pub memory_bytes: u64,
    /// The node's block store: address, capacity, use, failure domain
    /// (absent until it has registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::volumes::NodeStorage>,
}

#[utoipa::path(get, path = "/v1/nodes", tag = "cluster",
    responses((status = 200, description = "Every member node", body = Vec<NodeView>)))]
async fn nodes(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<Vec<NodeView>>> {
    let records = node.state.nodes()?;
    let leader = node.leader();
    Ok(Json(
        node.members()
            .into_iter()
            .map(|m| {
                let record = records.iter().find(|r| r.id == m.id);
                NodeView {
                    joined_at_ms: record.map(|r| r.joined_at_ms),
                    zone: record.map(|r| r.zone).unwrap_or_default(),
                    vcpus: record.map_or(0, |r| r.vcpus),
                    memory_bytes: record.map_or(0, |r| r.memory_bytes),
                    storage: record.and_then(|r| r.storage.clone()),
                    is_leader: leader == Some(m.id),
                    id: m.id,
                    name: m.name,
                    api_addr: m.api_addr,
                    peer_addr: m.peer_addr,
                    role: m.role,
                }
            })
            .collect(),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// A DNS label: 1-63 lowercase letters, digits or '-', starting with a letter.
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    name: String,
    /// At most 1024 bytes.
    #[serde(default)]
    #[schema(max_length = 1024)]
    description: String,
    /// OFFICIAL (default), OFFICIAL-SENSITIVE or SECRET; fixed for the project's life.
    #[serde(default)]
    #[schema(value_type = Option<crate::zones::Zone>)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    #[schema(max_length = 1024)]
    description: String,
}

/// Lists the projects the caller has a role in (all, for cluster admins).
#[utoipa::path(get, path = "/v1/projects", tag = "projects",
    responses((status = 200, description = "The projects the caller has a role in", body = Vec<Project>)))]
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

#[utoipa::path(post, path = "/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, description = "The new project", body = Project)))]
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
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

/// The name of a volume given by name or by id (after a linearizable read);
/// an unknown key comes back unchanged, to be refused by whoever uses it.
async fn volume_name(node: &ClusterNode, project: &str, key: String) -> ApiResult<String> {
    internal_project(project)?;
    node.linearizable_read().await?;
    if node.state.volume(project, &key)?.is_some() {
        return Ok(key);
    }
    Ok(node
        .state
        .volumes(project)?
        .into_iter()
        .find(|v| v.id == key)
        .map_or(key, |v| v.name))
}

/// The name of a VM given by name or by id, as [`volume_name`].
async fn vm_name(node: &ClusterNode, project: &str, key: String) -> ApiResult<String> {
    node.linearizable_read().await?;
    if node.state.vm(project, &key)?.is_some() {
        return Ok(key);
    }
    Ok(node
        .state
        .vms(project)?
        .into_iter()
        .find(|v| v.id == key)
        .map_or(key, |v| v.name))
}

/// Images' base volumes live in a pseudo-project whose name no project can
/// have; the volume routes do not reach it (the image routes do).
fn internal_project(project: &str) -> ApiResult<()> {
    if project.starts_with('_') {
        return Err(project_not_found(project));
    }
    Ok(())
}

/// A linearizable read of a project, or 404 when it does not exist.
async fn read_project(node: &ClusterNode, name: &str) -> ApiResult<Project> {
    node.linearizable_read().await?;
    node.state
        .project(name)?
        .ok_or_else(|| project_not_found(name))
}

fn project_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("project {name:?} does not exist"),
    )
}

#[utoipa::path(get, path = "/v1/projects/{name}", tag = "projects", params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project", body = Project)))]
async fn show_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Project>> {
    read_project(&node, &name).await.map(Json)
}

#[utoipa::path(patch, path = "/v1/projects/{name}", tag = "projects", params(("name" = String, Path, description = "Project name")), request_body = UpdateProject,
    responses((status = 200, description = "The updated project", body = Project)))]
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
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(delete, path = "/v1/projects/{name}", tag = "projects", params(("name" = String, Path, description = "Project name")),
    responses((status = 204, description = "Deleted")))]
async fn delete_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteProject { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/projects/{name}/quota", tag = "projects", params(("name" = String, Path, description = "Project name")),
    request_body = crate::quota::Quota,
    responses((status = 200, description = "The project with its new quota and current usage", body = Project)))]
async fn set_quota(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(quota): ApiJson<crate::quota::Quota>,
) -> ApiResult<Json<Project>> {
    quota
        .validate()
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", why))?;
    let outcome = node.write(&Command::SetQuota { project, quota }).await?;
    Ok(Json(outcome_as(outcome?)?))
}

/// Largest volume: 64 TiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Volumes are split into objects of this size.
pub const OBJECT_SIZE_BYTES: u64 = 4 << 20;

#[utoipa::path(get, path = "/v1/projects/{name}/volumes", tag = "volumes", params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's volumes", body = Vec<crate::model::VolumeRecord>)))]
async fn list_volumes(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<crate::model::VolumeRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.volumes(&project)?))
}

#[utoipa::path(get, path = "/v1/projects/{name}/volumes/{volume}", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    responses((status = 200, description = "The volume", body = crate::model::VolumeRecord)))]
async fn show_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<Json<crate::model::VolumeRecord>> {
    let name = volume_name(&node, &project, name).await?;
    node.state
        .volume(&project, &name)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("volume {name:?} does not exist in project {project:?}"),
            )
        })
}

#[utoipa::path(delete, path = "/v1/projects/{name}/volumes/{volume}", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    responses((status = 204, description = "Deleted; its quota is free again")))]
async fn delete_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let name = volume_name(&node, &project, name).await?;
    node.write(&Command::DeleteVolume { project, name })
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

const MIN_VM_MEMORY: u64 = 64 << 20;
const MAX_VM_MEMORY: u64 = 4 << 40;
const MAX_VM_VCPUS: u64 = 256;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    name: String,
    #[schema(minimum = 1, maximum = 256)]
    vcpus: u64,
    /// A multiple of 1 MiB, from 64 MiB to 4 TiB.
    #[schema(
        minimum = 67_108_864,
        maximum = 4_398_046_511_104_u64,
        multiple_of = 1_048_576
    )]
    memory_bytes: u64,
    /// VMs of one group never share a node.
    #[serde(default)]
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    anti_affinity: Option<String>,
    /// Boot from a new volume cloned from this image (instant).
    #[serde(default)]
    image: Option<String>,
    /// Start it once created (default true); false only defines it.
    #[serde(default)]
    start: Option<bool>,
    /// The boot volume's size (default: the image's; a multiple of 512).
    #[serde(default)]
    #[schema(minimum = 512, maximum = 70_368_744_177_664_u64, multiple_of = 512)]
    disk_size_bytes: Option<u64>,
    /// NICs on the project's subnets, eth0 first; each gets a port named
    /// `<vm>-nic<N>`, deleted with the VM.
    #[serde(default)]
    #[schema(max_items = 8)]
    nics: Vec<network::VmNicRequest>,
}

const MAX_VM_NICS: usize = 8;

fn vm_not_found(project: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("VM {name:?} does not exist in project {project:?}"),
    )
}

#[utoipa::path(get, path = "/v1/projects/{name}/vms", tag = "vms", params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's VMs", body = Vec<crate::model::VmRecord>)))]
async fn list_vms(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<crate::model::VmRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.vms(&project)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms", tag = "vms", params(("name" = String, Path, description = "Project name")),
    request_body = CreateVm,
    responses((status = 201, description = "The VM, placed on a node of the project's zone", body = crate::model::VmRecord)))]
async fn create_vm(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<CreateVm>,
) -> ApiResult<(StatusCode, Json<crate::model::VmRecord>)> {
    validate_name("VM", &body.name)?;
    if let Some(group) = &body.anti_affinity {
        validate_name("anti-affinity group", group)?;
    }
    let invalid =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message);
    if body.vcpus == 0 || body.vcpus > MAX_VM_VCPUS {
        return Err(invalid(format!(
            "vcpus must be 1 to {MAX_VM_VCPUS}, not {}",
            body.vcpus
        )));
    }
    if body.memory_bytes < MIN_VM_MEMORY
        || body.memory_bytes > MAX_VM_MEMORY
        || body.memory_bytes % (1 << 20) != 0
    {
        return Err(invalid(format!(
            "memory_bytes {} must be a multiple of 1 MiB from 64 MiB to 4 TiB (e.g. --memory 512M)",
            body.memory_bytes
        )));
    }
    let overcommit = crate::scheduler::Overcommit::default();
    if body.disk_size_bytes.is_some() && body.image.is_none() {
        return Err(invalid(
            "disk_size_bytes needs an image to clone (--image)".into(),
        ));
    }
    if let Some(size) = body.disk_size_bytes {
        if size == 0 || !size.is_multiple_of(512) || size > MAX_VOLUME_BYTES {
            return Err(invalid(format!(
                "disk_size_bytes {size} must be a positive multiple of 512, at most 64 TiB (e.g. --disk-size 10G)"
            )));
        }
    }
    if body.nics.len() > MAX_VM_NICS {
        return Err(invalid(format!(
            "a VM has at most {MAX_VM_NICS} NICs, not {}",
            body.nics.len()
        )));
    }
    let stem: String = body.name.chars().take(58).collect();
    let nics = body
        .nics
        .into_iter()
        .enumerate()
        .map(|(i, nic)| {
            network::new_port(
                project.clone(),
                format!("{stem}-nic{i}"),
                &nic.subnet,
                nic.ip.as_deref(),
                nic.security_groups,
                0,
            )
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let vm_id = crate::join::random_hex(8);
    let boot = body.image.map(|image| crate::compute::BootDisk {
        volume: volumes::new_volume(
            project.clone(),
            format!("{}-boot", body.name.chars().take(58).collect::<String>()),
            body.disk_size_bytes.unwrap_or(0),
            None,
        )
        .expect("a VM name makes a valid volume name"),
        image,
    });
    let vm = crate::model::VmRecord {
        id: vm_id,
        name: body.name,
        project,
        // The state machine fills in the zone and the node it chose.
        zone: crate::zones::Zone::default(),
        vcpus: body.vcpus,
        memory_bytes: body.memory_bytes,
        anti_affinity: body.anti_affinity,
        node_id: 0,
        state: "creating".into(),
        reason: None,
        volumes: Vec::new(),
        generation: 1,
        created_at_ms: crate::join::now_ms(),
        power: if body.start == Some(false) {
            "stopped"
        } else {
            "running"
        }
        .into(),
        force_stop: false,
        reboots: 0,
        boot_volume: None,
        observed_generation: 0,
        nics: Vec::new(),
    };
    let outcome = node
        .write(&Command::CreateVm {
            vm,
            overcommit_cpu_percent: (overcommit.cpu * 100.0) as u32,
            overcommit_memory_percent: (overcommit.memory * 100.0) as u32,
            boot,
            nics,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

#[utoipa::path(get, path = "/v1/projects/{name}/vms/{vm}", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM", body = crate::model::VmRecord)))]
async fn show_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<Json<crate::model::VmRecord>> {
    let name = vm_name(&node, &project, name).await?;
    node.state
        .vm(&project, &name)?
        .map(Json)
        .ok_or_else(|| vm_not_found(&project, &name))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/vms/{vm}", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 204, description = "Deleted; its volumes stay, detached")))]
async fn delete_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let name = vm_name(&node, &project, name).await?;
    node.write(&Command::DeleteVm { project, name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    /// The volume's name.
    volume: String,
    /// The volume's project when it is not the VM's (same zone only; the
    /// caller needs the member role there).
    #[serde(default)]
    project: Option<String>,
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/volumes", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    request_body = AttachVolume,
    responses((status = 200, description = "The VM with the volume attached", body = crate::model::VmRecord)))]
async fn attach_volume(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
    Path((project, vm)): Path<(String, String)>,
    ApiJson(body): ApiJson<AttachVolume>,
) -> ApiResult<Json<crate::model::VmRecord>> {
    let vm = vm_name(&node, &project, vm).await?;
    let volume_project = body.project.unwrap_or_else(|| project.clone());
    if caller
        .role_in(&volume_project)
        .is_none_or(|role| role < Role::ProjectMember)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("project {volume_project:?} does not exist or you are not a member of it"),
        ));
    }
    let outcome = node
        .write(&Command::AttachVolume {
            project,
            vm,
            volume_project,
            volume: body.volume,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/vms/{vm}/volumes/{volume}", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id"),
        ("volume" = String, Path, description = "The attached volume's name or id")),
    responses((status = 200, description = "The VM without the volume", body = crate::model::VmRecord)))]
async fn detach_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm, volume)): Path<(String, String, String)>,
) -> ApiResult<Json<crate::model::VmRecord>> {
    let vm = vm_name(&node, &project, vm).await?;
    let record = node
        .state
        .vm(&project, &vm)?
        .ok_or_else(|| vm_not_found(&project, &vm))?;
    let matches: Vec<_> = record
        .volumes
        .iter()
        .filter(|a| a.volume == volume || a.volume_id == volume)
        .collect();
    let attachment = match matches.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no volume {volume:?} is attached to VM {vm:?}"),
            ))
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "failed_precondition",
                format!("several attached volumes are named {volume:?}; name it by its id"),
            ))
        }
    };
    let outcome = node
        .write(&Command::DetachVolume {
            project,
            vm,
            volume_project: attachment.project,
            volume: attachment.volume,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

/// A joining node spends its token here and receives its certificate.
#[utoipa::path(post, path = "/v1/cluster/join", tag = "cluster", request_body = JoinRequest,
    responses((status = 200, description = "The joining node's identity and certificate", body = JoinResponse)))]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    name: String,
    /// At least 8 characters; users without one log in only with tokens.
    #[serde(default)]
    #[schema(min_length = 8)]
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

/// A user as the API shows it: never the password hash.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub name: String,
    pub cluster_admin: bool,
    pub has_password: bool,
    pub created_at_ms: u64,
    /// The user's role in each project (only in listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<std::collections::BTreeMap<String, Role>>,
}

/// What a role grant changed.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoleGrant {
    pub user: String,
    /// Absent for `cluster-admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub role: Role,
}

/// Reads a command's outcome as the type the API answers with.
fn outcome_as<T: DeserializeOwned>(value: serde_json::Value) -> ApiResult<T> {
    serde_json::from_value(value).map_err(|e| ApiError::internal(&e))
}

#[utoipa::path(get, path = "/v1/users", tag = "users",
    responses((status = 200, description = "Every user with their project roles", body = Vec<UserView>)))]
async fn list_users(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<Vec<UserView>>> {
    node.linearizable_read().await?;
    let mut users = Vec::new();
    for user in node.state.users()? {
        let mut view: UserView = outcome_as(crate::model::user_view(&user))?;
        view.projects = Some(node.state.grants_of(&user.name)?.into_iter().collect());
        users.push(view);
    }
    Ok(Json(users))
}

#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, description = "The new user", body = UserView)))]
async fn create_user(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
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
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRole {
    #[schema(value_type = Role)]
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

#[utoipa::path(post, path = "/v1/users/{user}/roles", tag = "users", params(("user" = String, Path, description = "User name")), request_body = GrantRole,
    responses((status = 200, description = "The role granted", body = RoleGrant)))]
async fn grant_role(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<GrantRole>,
) -> ApiResult<Json<RoleGrant>> {
    let role = parse_role(&body.role)?;
    let outcome = node
        .write(&Command::GrantRole {
            user,
            project: body.project,
            role,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Scope the token to this project (at most `role` there).
    #[serde(default)]
    project: Option<String>,
    /// The role of a project token; `project-viewer` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Role>)]
    role: Option<String>,
    /// Lifetime in seconds (1 to 10 years' worth); no expiry when absent.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315_360_000)]
    expires_in_secs: Option<u64>,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewToken {
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
    let expires_at_ms = expires_in_secs.map(|s| now_ms.saturating_add(s.saturating_mul(1000)));
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

#[utoipa::path(post, path = "/v1/users/{user}/tokens", tag = "tokens", params(("user" = String, Path, description = "User name")), request_body = CreateToken,
    responses((status = 201, description = "The new token; its secret is shown only here", body = NewToken)))]
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
            // Nobody learns of a project through a token request: a project
            // that does not exist and one without a role look the same.
            if caller.role_in(&project).is_none() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    format!("project {project:?} does not exist or you have no role in it"),
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
    if let Some(secs) = body.expires_in_secs {
        if secs == 0 || secs > MAX_TOKEN_SECS {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!(
                    "expires_in_secs must be between 1 and {MAX_TOKEN_SECS} (ten years); \
                     leave it out for a token that does not expire"
                ),
            ));
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(issue_token(&node, user, scope, body.expires_in_secs).await?),
    ))
}

#[utoipa::path(get, path = "/v1/users/{user}/tokens", tag = "tokens", params(("user" = String, Path, description = "User name")),
    responses((status = 200, description = "The user's tokens (never their secrets)", body = Vec<ApiTokenRecord>)))]
async fn list_tokens(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
) -> ApiResult<Json<Vec<ApiTokenRecord>>> {
    node.linearizable_read().await?;
    Ok(Json(node.state.tokens_of(&user)?))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked")))]
async fn revoke_token(
    State(node): State<Arc<ClusterNode>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::RevokeToken { id }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    user: String,
    password: String,
}

/// The longest lifetime a token can be given.
const MAX_TOKEN_SECS: u64 = 10 * 365 * 24 * 3600;

/// Sessions from `allod login` last a day.
const LOGIN_TOKEN_SECS: u64 = 24 * 3600;

#[utoipa::path(post, path = "/v1/login", tag = "tokens", request_body = Login,
    responses((status = 200, description = "A cluster-scoped token valid for a day", body = NewToken)))]
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

const MAX_AUDIT_LIMIT: usize = 1_000_000;

#[derive(Deserialize, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    Json,
    Jsonl,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries of this user.
    user: Option<String>,
    /// Only entries whose action contains this text (e.g. `DELETE`).
    action: Option<String>,
    /// Only entries after this sequence number.
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after: Option<u64>,
    /// At most this many entries (all when absent).
    #[param(minimum = 0, maximum = 1_000_000)]
    limit: Option<usize>,
    /// `json` (default) or `jsonl` for an export, one entry per line.
    format: Option<AuditFormat>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "Audit entries, oldest first (JSON array, or JSON lines with format=jsonl)", content(
        (Vec<AuditEntry> = "application/json"),
        (String = "application/x-ndjson")))))]
async fn audit_log(
    State(node): State<Arc<ClusterNode>>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> ApiResult<Response> {
    let after = query.after.unwrap_or(0);
    if after > i64::MAX as u64 || query.limit.is_some_and(|l| l > MAX_AUDIT_LIMIT) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("`after` must be at most {} and `limit` at most {MAX_AUDIT_LIMIT}; page with `after` for more", i64::MAX),
        ));
    }
    node.linearizable_read().await?;
    let entries: Vec<AuditEntry> = node
        .state
        .audit_entries(after)?
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
    match query.format.unwrap_or(AuditFormat::Json) {
        AuditFormat::Json => Ok(Json(entries).into_response()),
        AuditFormat::Jsonl => {
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
    }
}

#[utoipa::path(get, path = "/v1/zones", tag = "zones",
    responses((status = 200, description = "What each classification zone demands", body = Vec<ZonePolicy>)))]
async fn zones() -> Json<Vec<ZonePolicy>> {
    Json(crate::zones::policies())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetZone {
    #[schema(value_type = crate::zones::Zone)]
    zone: String,
}

#[utoipa::path(put, path = "/v1/nodes/{node}/zone", tag = "cluster", params(("node" = u64, Path, description = "Node id")), request_body = SetZone,
    responses((status = 200, description = "The node's record", body = NodeRecord)))]
async fn set_node_zone(
    State(node): State<Arc<ClusterNode>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetZone>,
) -> ApiResult<Json<NodeRecord>> {
    let zone = parse_zone(&body.zone)?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("{id:?} is not a node id; `allod cluster status` lists them"),
        )
    })?;
    let outcome = node.write(&Command::SetNodeZone { id, zone }).await?;
    Ok(Json(outcome_as(outcome?)?))
}

/// An OIDC issuer as configured with `PUT /v1/oidc/issuers/{issuer}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuerSpec {
    /// The exact `iss` of its tokens (an https:// URL).
    issuer: String,
    /// The `aud` its tokens must carry.
    audience: String,
    /// The claim mapped to roles (default `groups`; dotted paths allowed).
    #[serde(default)]
    claim: Option<String>,
    #[serde(default)]
    mappings: Vec<crate::oidc::ClaimMapping>,
    /// A CA certificate (PEM) to trust for the issuer's HTTPS.
    #[serde(default)]
    ca_pem: Option<String>,
}

#[utoipa::path(get, path = "/v1/oidc/issuers", tag = "oidc",
    responses((status = 200, description = "The OIDC issuers this cluster trusts", body = Vec<crate::oidc::OidcIssuer>)))]
async fn list_issuers(
    State(node): State<Arc<ClusterNode>>,
) -> ApiResult<Json<Vec<crate::oidc::OidcIssuer>>> {
    node.linearizable_read().await?;
    Ok(Json(node.state.oidc_issuers()?))
}

#[utoipa::path(put, path = "/v1/oidc/issuers/{issuer}", tag = "oidc",
    params(("issuer" = String, Path, description = "The issuer's name in Allod")), request_body = IssuerSpec,
    responses((status = 200, description = "The issuer as stored", body = crate::oidc::OidcIssuer)))]
async fn put_issuer(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<IssuerSpec>,
) -> ApiResult<Json<crate::oidc::OidcIssuer>> {
    let issuer = crate::oidc::OidcIssuer {
        name,
        issuer: body.issuer,
        audience: body.audience,
        claim: body.claim.unwrap_or_else(|| "groups".into()),
        mappings: body.mappings,
        ca_pem: body.ca_pem,
    };
    issuer.validate()?;
    let outcome = node.write(&Command::PutOidcIssuer { issuer }).await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(delete, path = "/v1/oidc/issuers/{issuer}", tag = "oidc",
    params(("issuer" = String, Path, description = "The issuer's name in Allod")),
    responses((status = 204, description = "Removed; its tokens are refused from now on")))]
async fn delete_issuer(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteOidcIssuer { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "This document", body = Object)))]
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOCUMENT.get_or_init(openapi_pretty);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.as_str(),
    )
        .into_response()
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Allod API",
        description = "The tenant and operator API of an Allod cluster. Every route but the \
            public ones takes `Authorization: Bearer <token>`: an API token (`allod token \
            create`, `allod login`) or an OIDC access token of a configured issuer. Errors are \
            `{\"error\":{\"code\",\"message\"}}`."
    ),
    paths(
        healthz,
        readyz,
        openapi_json,
        ca_certificate,
        join,
        login,
        cluster,
        nodes,
        set_node_zone,
        zones,
        list_projects,
        create_project,
        show_project,
        update_project,
        delete_project,
        set_quota,
        list_volumes,
        volumes::create_volume,
        show_volume,
        delete_volume,
        volumes::resize_volume,
        volumes::list_snapshots,
        volumes::create_snapshot,
        volumes::delete_snapshot,
        volumes::rollback_volume,
        volumes::clone_volume,
        volumes::import_image,
        volumes::list_images,
        volumes::show_image,
        volumes::delete_image,
        list_vms,
        create_vm,
        show_vm,
        delete_vm,
        attach_volume,
        detach_volume,
        vms::start_vm,
        vms::stop_vm,
        vms::force_stop_vm,
        vms::reboot_vm,
        vms::update_vm,
        vms::console,
        list_users,
        create_user,
        grant_role,
        list_tokens,
        create_token,
        revoke_token,
        audit_log,
        list_issuers,
        put_issuer,
        delete_issuer,
        network::list_pools,
        network::create_pool,
        network::list_vpcs,
        network::create_vpc,
        network::delete_vpc,
        network::list_subnets,
        network::create_subnet,
        network::list_security_groups,
        network::create_security_group,
        network::delete_security_group,
        network::add_rule,
        network::delete_rule,
        network::list_ports,
        network::create_port,
        network::delete_port,
        network::list_fips,
        network::allocate_fip,
        network::bind_fip,
        network::release_fip
    ),
    components(schemas(ErrorBody, ErrorDetail, AuditFormat))
)]
struct ApiDoc;

/// The API's OpenAPI 3 document. Which routes need a token comes from the
/// same permission table the middleware enforces, and every operation
/// documents the error body as its `default` answer.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    use utoipa::OpenApi as _;
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.info.license = Some(utoipa::openapi::License::new("Apache-2.0"));
    let (_, table) = routes().finish();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        utoipa::openapi::security::SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("An Allod API token or an OIDC access token"))
                .build(),
        ),
    );
    let error = ResponseBuilder::new()
        .description("The request was refused or failed; the body says why")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            (axum::http::Method::GET, &mut item.get),
            (axum::http::Method::POST, &mut item.post),
            (axum::http::Method::PUT, &mut item.put),
            (axum::http::Method::PATCH, &mut item.patch),
            (axum::http::Method::DELETE, &mut item.delete),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            let public = matches!(
                table.get(&method, path),
                Some(crate::authz::Permission::Public) | None
            );
            if !public {
                operation.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
            }
            operation
                .responses
                .responses
                .insert("default".into(), RefOr::T(error.clone()));
        }
    }
    doc
}

/// [`openapi`] as the pretty JSON that is served and committed.
pub fn openapi_pretty() -> String {
    let mut text = openapi().to_pretty_json().expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route of the router is documented and nothing else is.
    #[test]
    fn openapi_documents_exactly_the_routes() {
        let (_, table) = routes().finish();
        let mut routed: Vec<String> = table
            .routes()
            .into_iter()
            .map(|(method, path, _)| format!("{method} {path}"))
            .collect();
        routed.sort();
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        documented.sort();
        assert_eq!(routed, documented);
    }

    /// The committed document is the one the code generates.
    #[test]
    fn committed_openapi_is_current() {
        let committed = include_str!("../../docs/openapi.json");
        assert!(
            committed == openapi_pretty(),
            "docs/openapi.json is out of date; regenerate it with \
             `cargo run --bin allod -- openapi > docs/openapi.json`"
        );
    }

    #[test]
    fn only_public_routes_go_without_a_token() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let public: Vec<String> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .iter()
                    .filter(|(_, op)| op.get("security").is_none())
                    .map(move |(m, _)| format!("{} {path}", m.to_uppercase()))
            })
            .collect();
        assert_eq!(
            public,
            [
                "GET /healthz",
                "GET /readyz",
                "GET /v1/cluster/ca",
                "POST /v1/cluster/join",
                "POST /v1/login",
                "GET /v1/openapi.json"
            ]
        );
    }
}
