//! The storage cluster as an operator sees it: health, nodes, degraded
//! objects and recovery jobs; the cluster-wide storage settings.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::api::{outcome_as, ApiError, ApiJson, ApiResult};
use crate::cluster::node::ClusterNode;
use crate::state::storage::{StorageConfig, StorageConfigChange, StorageStatus};
use crate::state::Command;

#[utoipa::path(get, path = "/v1/storage", tag = "storage",
    responses((status = 200, description = "Health (`ok`, `degraded`, `recovering`), each node's state and use, degraded objects and running recovery jobs", body = StorageStatus)))]
pub(super) async fn storage_status(
    State(node): State<Arc<ClusterNode>>,
) -> ApiResult<Json<StorageStatus>> {
    crate::api::consistency::read_barrier(&node).await?;
    Ok(Json(
        node.state.storage_status(crate::cluster::join::now_ms())?,
    ))
}

#[utoipa::path(post, path = "/v1/storage/scrub", tag = "storage", request_body = crate::api_types::ScrubRequest,
    responses((status = 202, description = "How many volumes will be scrubbed (each by its steward, in the background; `allod storage status` shows the jobs, `allod volume show` the results)", body = Object)))]
pub(super) async fn request_scrub(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<crate::api_types::ScrubRequest>,
) -> ApiResult<(axum::http::StatusCode, Json<serde_json::Value>)> {
    crate::api::consistency::read_barrier(&node).await?;
    let volume_ids =
        match (&body.project, &body.volume) {
            (Some(project), Some(name)) => match node.state.volume(project, name)? {
                Some(v) => vec![v.id],
                None => {
                    return Err(ApiError::not_found(format!(
                        "volume {name:?} does not exist in project {project:?}"
                    )))
                }
            },
            (None, None) => node
                .state
                .all_volumes()?
                .into_iter()
                .map(|v| v.id)
                .collect(),
            _ => return Err(ApiError::invalid(
                "give both project and volume to scrub one volume, or neither to scrub them all",
            )),
        };
    let outcome = node
        .write(&Command::RequestScrub {
            volume_ids,
            deep: body.deep,
        })
        .await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(outcome?)))
}

#[utoipa::path(patch, path = "/v1/storage/config", tag = "storage", request_body = StorageConfigChange,
    responses((status = 200, description = "The storage settings after the change", body = StorageConfig)))]
pub(super) async fn set_storage_config(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(change): ApiJson<StorageConfigChange>,
) -> ApiResult<Json<StorageConfig>> {
    if change == StorageConfigChange::default() {
        return Err(ApiError::invalid(
            "nothing to change: give down_out_after_s, recovery_rate_bytes or scrub_interval_s",
        ));
    }
    let outcome = node.write(&Command::SetStorageConfig { change }).await?;
    Ok(Json(outcome_as(outcome?)?))
}
