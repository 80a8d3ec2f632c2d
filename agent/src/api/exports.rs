//! `POST /v1/projects/{name}/volumes/{volume}/exports`: a short-lived NBD
//! credential for an operator who needs a volume outside a VM (backups,
//! `qemu-img`, `nbdcopy`), valid on one node's NBD socket only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiJson, ApiResult};
use crate::api_types::CreateExport;
use crate::cluster::node::ClusterNode;
use crate::state::exports::{ExportGrant, MAX_GRANT_SECS};
use crate::state::Command;

/// The default lifetime of an export.
const DEFAULT_TTL_SECS: u64 = 3600;

/// A new export: the URI carries its secret and is shown only here.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewExport {
    /// `nbd+unix:///grant-ID.SECRET?socket=PATH`, for `qemu-img`,
    /// `nbdcopy`, `nbdinfo` or `qemu-nbd` on node `node`.
    pub uri: String,
    pub node: u64,
    pub volume: String,
    pub read_only: bool,
    pub expires_at_ms: u64,
}

#[utoipa::path(post, path = "/v1/projects/{name}/volumes/{volume}/exports", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    request_body = CreateExport,
    responses((status = 201, description = "A credential for the volume on one node's NBD socket; shown only now", body = NewExport)))]
pub(super) async fn create_export(
    State(node): State<Arc<ClusterNode>>,
    Path((project, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<CreateExport>,
) -> ApiResult<(StatusCode, Json<NewExport>)> {
    let ttl = body.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if ttl == 0 || ttl > MAX_GRANT_SECS {
        return Err(ApiError::invalid(format!(
            "ttl_secs must be between 1 and {MAX_GRANT_SECS} (7 days)"
        )));
    }
    let name = crate::api::projects::volume_name(&node, &project, key).await?;
    let volume = node
        .state
        .volume(&project, &name)?
        .ok_or_else(|| ApiError::not_found(format!("volume {name:?} does not exist")))?;
    let target = body.node.unwrap_or(node.id);
    let Some(socket) = node.state.nbd_socket(target)? else {
        return Err(if node.state.nodes()?.iter().any(|n| n.id == target) {
            ApiError::failed_precondition(format!(
                "node {target} serves no block storage yet; pick another with --node"
            ))
        } else {
            ApiError::invalid(format!(
                "node {target} is not a member of this cluster (see allod node list)"
            ))
        });
    };
    let id = crate::cluster::join::random_hex(8);
    let secret = crate::cluster::join::random_hex(16);
    let now = crate::cluster::join::now_ms();
    let grant = ExportGrant {
        id: id.clone(),
        volume_id: volume.id.clone(),
        project,
        volume: name.clone(),
        node: target,
        read_only: body.read_only,
        secret_sha256: crate::cluster::join::sha256_hex(&secret),
        created_at_ms: now,
        expires_at_ms: now + ttl * 1000,
    };
    let expires_at_ms = grant.expires_at_ms;
    node.write(&Command::CreateExportGrant { grant }).await??;
    Ok((
        StatusCode::CREATED,
        Json(NewExport {
            uri: format!("nbd+unix:///grant-{id}.{secret}?socket={socket}"),
            node: target,
            volume: name,
            read_only: body.read_only,
            expires_at_ms,
        }),
    ))
}
