//! The tenant-facing REST API.
//!
//! Every error leaves through [`ApiError`], the one mapping from domain and
//! cluster errors to an HTTP status and the stable body
//! `{"error":{"code":"...","message":"..."}}`. Client mistakes are 4xx and
//! logged at debug level; internal errors are 500 with a request id that is
//! logged with the full error chain.

use std::sync::{Arc, OnceLock};

use axum::extract::{FromRef, Request, State};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api::authz::Principal;
use crate::cluster::node::ClusterNode;
use crate::state::auth::Role;

pub mod abuse;
pub mod authz;
mod cluster;
pub mod consistency;
mod error;
mod exports;
pub mod forwarded;
mod network;
pub mod oidc;
mod openapi;
mod projects;
mod storage;
pub(crate) mod users;
mod vms;
mod volumes;

use cluster::*;
pub use error::{
    ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, ErrorDetail, MAX_BODY_BYTES, REQUEST_TIMEOUT,
};
use openapi::openapi_json;
pub use openapi::{openapi, openapi_pretty};
use projects::*;
use users::*;
use vms::*;
use volumes::*;

/// What every handler may reach: the cluster node, the authentication
/// services, and this node's local services once they run.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<ClusterNode>,
    pub auth: Arc<authz::AuthServices>,
    pub local: Arc<LocalServices>,
}

/// Services of this node that start after the API does.
#[derive(Default)]
pub struct LocalServices {
    /// How this node runs VMs, when it does.
    pub compute: OnceLock<crate::reconcile::compute::ComputeOptions>,
    /// This node's block store, once it is serving.
    pub blocks: OnceLock<Arc<crate::reconcile::storage::BlockStore>>,
}

impl AppState {
    pub fn new(node: Arc<ClusterNode>, local: Arc<LocalServices>) -> Self {
        Self::with_shed(node, local, Arc::default())
    }

    /// With the table of shed addresses its listener refuses at accept.
    pub fn with_shed(
        node: Arc<ClusterNode>,
        local: Arc<LocalServices>,
        shed: Arc<crate::cluster::serve::Shed>,
    ) -> Self {
        Self {
            node,
            auth: Arc::new(authz::AuthServices {
                shed,
                ..Default::default()
            }),
            local,
        }
    }
}

impl FromRef<AppState> for Arc<authz::AuthServices> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl FromRef<AppState> for Arc<ClusterNode> {
    fn from_ref(state: &AppState) -> Self {
        state.node.clone()
    }
}

/// Every API route with the permission it needs. The authorisation matrix
/// test walks this same list.
pub fn routes() -> crate::api::authz::Routes<AppState> {
    use crate::api::authz::Permission::*;
    use crate::api::authz::Routes;
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
        .add(Method::GET, "/v1/nodes/{node}", Authenticated, show_node)
        .add(
            Method::POST,
            "/v1/nodes/{node}/drain",
            ClusterAdmin,
            drain_node,
        )
        .add(
            Method::POST,
            "/v1/nodes/{node}/resume",
            ClusterAdmin,
            resume_node,
        )
        .add(
            Method::GET,
            "/v1/storage",
            ClusterAdmin,
            storage::storage_status,
        )
        .add(
            Method::POST,
            "/v1/storage/scrub",
            ClusterAdmin,
            storage::request_scrub,
        )
        .add(
            Method::PATCH,
            "/v1/storage/config",
            ClusterAdmin,
            storage::set_storage_config,
        )
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
            Method::POST,
            "/v1/projects/{name}/volumes/{volume}/exports",
            project(Role::ClusterAdmin),
            exports::create_export,
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
        // Operators place VMs on hardware; tenants do not.
        .add(
            Method::POST,
            "/v1/projects/{name}/vms/{vm}/migrate",
            ClusterAdmin,
            vms::migrate_vm,
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
            Method::PATCH,
            "/v1/users/{user}",
            ClusterAdmin,
            users::update_user,
        )
        .add(
            Method::DELETE,
            "/v1/users/{user}",
            ClusterAdmin,
            users::delete_user,
        )
        .add(
            Method::POST,
            "/v1/users/{user}/roles",
            ClusterAdmin,
            grant_role,
        )
        .add(
            Method::DELETE,
            "/v1/users/{user}/roles",
            ClusterAdmin,
            users::revoke_role,
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

pub fn router(state: AppState) -> Router {
    let (router, table) = routes().finish();
    router
        .route_layer(middleware::from_fn_with_state(
            state.node.clone(),
            consistency::read_consistency,
        ))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), table),
            crate::api::authz::authorize,
        ))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(time_limit))
        .layer(middleware::from_fn_with_state(
            state.node.clone(),
            no_revoked_certs,
        ))
        .layer(middleware::from_fn(read_body_first))
        .with_state(state)
}

/// A client that presents a node certificate (none needs to: callers
/// authenticate with tokens) is refused unless it is a member's: a removed
/// node's, or one minted for a key its node never joined with, gets 403.
async fn no_revoked_certs(
    State(node): State<Arc<ClusterNode>>,
    identity: Option<axum::Extension<crate::cluster::peer::PeerIdentity>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    if let Some(cert) = identity.as_ref().and_then(|i| i.node_cert.as_ref()) {
        if let Err(why) = node.admit_node_cert(cert, false).await {
            tracing::warn!(node = cert.id, reason = %why, "refused an API request with a node certificate");
            let mut refused = ApiError::forbidden(why).into_response();
            refused.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            return refused;
        }
    }
    next.run(request).await
}

/// The most a refused request's body is read before its connection is let
/// go of anyway.
const DRAIN_MAX_BYTES: usize = 16 << 20;

/// Reads a request's whole body before anything answers it. An answer sent
/// while the client is still sending (a refusal by the authorisation layer,
/// a malformed path, a body too large) would otherwise make the server drop
/// a connection the client is still writing to, and the client would see
/// its connection cut instead of the answer. Image uploads stream and are
/// left alone.
async fn read_body_first(req: Request, next: middleware::Next) -> Response {
    use http_body_util::BodyExt;
    if is_image_upload(&req) {
        return next.run(req).await;
    }
    let (parts, mut body) = req.into_parts();
    let mut bytes = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return ApiError::bad_request("the request body broke off").into_response();
        };
        if let Ok(data) = frame.into_data() {
            read += data.len();
            if read <= MAX_BODY_BYTES {
                bytes.extend_from_slice(&data);
            } else if read > DRAIN_MAX_BYTES {
                break;
            }
        }
    }
    if read > MAX_BODY_BYTES {
        return ApiError::body_too_large().into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// An image upload streams its body for as long as the image takes to
/// send, so neither the request time limit nor reading the body first
/// applies to it.
fn is_image_upload(req: &Request) -> bool {
    req.method() == axum::http::Method::POST && req.uri().path() == "/v1/images"
}

/// Every request but an image upload (which takes as long as the image
/// takes to send) gets [`REQUEST_TIMEOUT`].
async fn time_limit(req: Request, next: middleware::Next) -> Response {
    if is_image_upload(&req) {
        return next.run(req).await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(format!(
            "the request took longer than {} s",
            REQUEST_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// The API with no authentication or authorisation at all: every caller is
/// a cluster administrator. It exists only in builds with the
/// `bench-unauthenticated` feature, for the benchmark that measures what
/// authentication costs; the `allod` binary never has it.
#[cfg(feature = "bench-unauthenticated")]
pub fn router_unauthenticated(state: AppState) -> Router {
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
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// What an unconfigured node serves on its API port.
pub fn unconfigured_router() -> Router {
    Router::new().route("/healthz", get(healthz)).fallback(|| async {
        ApiError::unconfigured("this node is not part of a cluster yet; run `allod cluster init` or `allod cluster join` on it",
        )
    })
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such API route; see the README for the API's routes")
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
        time_ms: crate::cluster::join::now_ms(),
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
        None => ApiError::not_ready("no leader is known yet").into_response(),
    }
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
        let committed = include_str!("../../../docs/openapi.json");
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
