//! Projects and their quotas; the lookups every project-scoped route shares.

use crate::api_types::{CreateProject, UpdateProject};
use std::sync::Arc;

use crate::api::{outcome_as, ApiError, ApiJson, ApiResult, Principal};
use crate::cluster::node::ClusterNode;
use crate::state::projects::Project;
use crate::state::{validate_name, Command};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};

pub(super) fn parse_zone(text: &str) -> ApiResult<crate::state::zones::Zone> {
    crate::state::zones::Zone::parse(text).ok_or_else(|| {
        ApiError::invalid(format!(
            "unknown zone {text:?}; use OFFICIAL, OFFICIAL-SENSITIVE or SECRET"
        ))
    })
}

/// Lists the projects the caller has a role in (all, for cluster admins).
#[utoipa::path(get, path = "/v1/projects", tag = "projects",
    responses((status = 200, description = "The projects the caller has a role in", body = Vec<Project>)))]
pub(super) async fn list_projects(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
) -> ApiResult<Json<Vec<Project>>> {
    crate::api::consistency::read_barrier(&node).await?;
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
pub(super) async fn create_project(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreateProject>,
) -> ApiResult<(StatusCode, Json<Project>)> {
    validate_name("project", &body.name)?;
    crate::state::validate_description(&body.description)?;
    let zone = match body.zone.as_deref() {
        Some(text) => parse_zone(text)?,
        None => crate::state::zones::Zone::default(),
    };
    let outcome = node
        .write(&Command::CreateProject {
            name: body.name,
            description: body.description,
            now_ms: crate::cluster::join::now_ms(),
            zone,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

/// The name of a volume given by name or by id (after a linearizable read);
/// an unknown key comes back unchanged, to be refused by whoever uses it.
pub(super) async fn volume_name(
    node: &ClusterNode,
    project: &str,
    key: String,
) -> ApiResult<String> {
    internal_project(project)?;
    crate::api::consistency::read_barrier(node).await?;
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
pub(super) async fn vm_name(node: &ClusterNode, project: &str, key: String) -> ApiResult<String> {
    crate::api::consistency::read_barrier(node).await?;
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
pub(super) fn internal_project(project: &str) -> ApiResult<()> {
    if project.starts_with('_') {
        return Err(ApiError::project_not_found(project));
    }
    Ok(())
}

/// A linearizable read of a project, or 404 when it does not exist.
pub(super) async fn read_project(node: &ClusterNode, name: &str) -> ApiResult<Project> {
    crate::api::consistency::read_barrier(node).await?;
    node.state
        .project(name)?
        .ok_or_else(|| ApiError::project_not_found(name))
}

#[utoipa::path(get, path = "/v1/projects/{name}", tag = "projects", params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project", body = Project)))]
pub(super) async fn show_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Project>> {
    read_project(&node, &name).await.map(Json)
}

#[utoipa::path(patch, path = "/v1/projects/{name}", tag = "projects", params(("name" = String, Path, description = "Project name")), request_body = UpdateProject,
    responses((status = 200, description = "The updated project", body = Project)))]
pub(super) async fn update_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdateProject>,
) -> ApiResult<Json<Project>> {
    crate::state::validate_description(&body.description)?;
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
pub(super) async fn delete_project(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteProject { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/projects/{name}/quota", tag = "projects", params(("name" = String, Path, description = "Project name")),
    request_body = crate::state::quotas::Quota,
    responses((status = 200, description = "The project with its new quota and current usage", body = Project)))]
pub(super) async fn set_quota(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(quota): ApiJson<crate::state::quotas::Quota>,
) -> ApiResult<Json<Project>> {
    quota.validate().map_err(ApiError::invalid)?;
    let outcome = node.write(&Command::SetQuota { project, quota }).await?;
    Ok(Json(outcome_as(outcome?)?))
}
