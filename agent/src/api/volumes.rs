//! Volume, snapshot, clone and image routes.

use crate::api_types::{CloneVolume, CreateSnapshot, CreateVolume, Resize, Rollback};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;

use crate::api::{
    internal_project, outcome_as, read_project, volume_name, ApiError, ApiJson, ApiQuery,
    ApiResult, AppState, LocalServices, Principal,
};
use crate::cluster::node::ClusterNode;
use crate::state::operations::{Operation, OperationState, Work};
use crate::state::volumes::VolumeRecord;
use crate::state::volumes::{ImageRecord, SnapshotRecord, VolumeSource, IMAGE_PROJECT};
use crate::state::volumes::{ImageState, VolumeState};
use crate::state::{validate_name, Command};

pub(super) fn check_size(size: u64) -> ApiResult<()> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VOLUME_BYTES {
        return Err(ApiError::invalid(format!(
            "size_bytes {size} must be a positive multiple of 512, at most 64 TiB (e.g. --size 20G)"
        )));
    }
    Ok(())
}

pub(super) fn new_volume(
    project: String,
    name: String,
    size: u64,
    replicas: Option<u8>,
) -> ApiResult<VolumeRecord> {
    validate_name("volume", &name)?;
    if let Some(r) = replicas {
        if !(1..=3).contains(&r) {
            return Err(ApiError::invalid(format!(
                "replicas must be 1, 2 or 3, not {r}"
            )));
        }
    }
    Ok(VolumeRecord {
        id: crate::cluster::join::random_hex(8),
        name,
        project,
        size_bytes: size,
        // 0: as many as the storage map allows, up to 3 (decided when applied).
        replicas: replicas.unwrap_or(0),
        // 0: 2, or 1 for a single replica (decided when applied).
        min_replicas: 0,
        object_size_bytes: OBJECT_SIZE_BYTES,
        state: VolumeState::Available,
        // The state machine sets it from the project.
        zone: crate::state::zones::Zone::default(),
        created_at_ms: crate::cluster::join::now_ms(),
        attached_to: None,
        map_epoch: 0,
        seq: 0,
        snapshots: Vec::new(),
        parent: None,
        lease: None,
        read_only: false,
        in_sync: Vec::new(),
        out_of_sync: Vec::new(),
        recovering: Vec::new(),
        moving_to: None,
        scrubbed_at_ms: 0,
        deep_scrubbed_at_ms: 0,
        scrub_repairs: 0,
        scrub_unrepairable: 0,
        scrub_requested: None,
    })
}

#[utoipa::path(post, path = "/v1/projects/{name}/volumes", tag = "volumes", params(("name" = String, Path, description = "Project name")),
    request_body = CreateVolume,
    responses((status = 201, description = "The volume: thin, or a copy-on-write clone", body = VolumeRecord)))]
pub(super) async fn create_volume(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<CreateVolume>,
) -> ApiResult<(StatusCode, Json<VolumeRecord>)> {
    internal_project(&project)?;
    let source = match (body.from_image, body.from_snapshot) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give from_image or from_snapshot, not both",
            ))
        }
        (Some(name), None) => Some(VolumeSource::Image { name }),
        (None, Some(s)) => Some(VolumeSource::Snapshot {
            volume: s.volume,
            snapshot: s.snapshot,
        }),
        (None, None) => None,
    };
    match (body.size_bytes, &source) {
        (Some(size), _) => check_size(size)?,
        (None, None) => {
            return Err(ApiError::invalid(
                "size_bytes is required (e.g. --size 20G)",
            ))
        }
        (None, Some(_)) => {}
    }
    let mut volume = new_volume(
        project,
        body.name,
        body.size_bytes.unwrap_or(0),
        body.replicas,
    )?;
    if let Some(m) = body.min_replicas {
        if !(1..=3).contains(&m) || body.replicas.is_some_and(|r| m > r) {
            return Err(ApiError::invalid(format!(
                "min_replicas must be between 1 and replicas ({}), not {m}",
                body.replicas.unwrap_or(3)
            )));
        }
        volume.min_replicas = m;
    }
    let outcome = node
        .write(&Command::CreateVolume { volume, source })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

pub(super) async fn volume_record(
    node: &ClusterNode,
    project: &str,
    key: String,
) -> ApiResult<VolumeRecord> {
    let name = volume_name(node, project, key).await?;
    node.state.volume(project, &name)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "volume {name:?} does not exist in project {project:?}"
        ))
    })
}

#[utoipa::path(post, path = "/v1/projects/{name}/volumes/{volume}/resize", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    request_body = Resize,
    responses((status = 200, description = "The volume at its new size (clients see it when they reconnect)", body = VolumeRecord)))]
pub(super) async fn resize_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<Resize>,
) -> ApiResult<Json<VolumeRecord>> {
    check_size(body.size_bytes)?;
    let name = volume_name(&node, &project, key).await?;
    let outcome = node
        .write(&Command::ResizeVolume {
            project,
            name,
            size_bytes: body.size_bytes,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(get, path = "/v1/projects/{name}/volumes/{volume}/snapshots", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    responses((status = 200, description = "The volume's snapshots, oldest first", body = Vec<SnapshotRecord>)))]
pub(super) async fn list_snapshots(
    State(node): State<Arc<ClusterNode>>,
    Path((project, key)): Path<(String, String)>,
) -> ApiResult<Json<Vec<SnapshotRecord>>> {
    Ok(Json(volume_record(&node, &project, key).await?.snapshots))
}

#[utoipa::path(post, path = "/v1/projects/{name}/volumes/{volume}/snapshots", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    request_body = CreateSnapshot,
    responses((status = 201, description = "The volume with its new snapshot (crash-consistent; copy-on-write, instant)", body = VolumeRecord)))]
pub(super) async fn create_snapshot(
    State(node): State<Arc<ClusterNode>>,
    Path((project, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<VolumeRecord>)> {
    validate_name("snapshot", &body.name)?;
    let volume = volume_name(&node, &project, key).await?;
    let outcome = node
        .write(&Command::CreateSnapshot {
            project,
            volume,
            name: body.name,
            now_ms: crate::cluster::join::now_ms(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/volumes/{volume}/snapshots/{snapshot}", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id"), ("snapshot" = String, Path, description = "Snapshot name")),
    responses((status = 204, description = "Deleted; its copies are freed in the background")))]
pub(super) async fn delete_snapshot(
    State(node): State<Arc<ClusterNode>>,
    Path((project, key, snapshot)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let volume = volume_name(&node, &project, key).await?;
    node.write(&Command::DeleteSnapshot {
        project,
        volume,
        name: snapshot,
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/projects/{name}/volumes/{volume}/rollback", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    request_body = Rollback,
    responses((status = 200, description = "The volume, back at the snapshot's content (newer snapshots are kept)", body = VolumeRecord)))]
pub(super) async fn rollback_volume(
    State(app): State<AppState>,
    Path((project, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<Rollback>,
) -> ApiResult<Json<VolumeRecord>> {
    let node = app.node.clone();
    let volume = volume_record(&node, &project, key).await?;
    let Some(snap) = volume.snapshots.iter().find(|s| s.name == body.snapshot) else {
        return Err(ApiError::not_found(format!(
            "volume {:?} has no snapshot {:?}",
            volume.name, body.snapshot
        )));
    };
    if volume.attached_to.is_some() {
        return Err(ApiError::failed_precondition(format!("volume {:?} is attached to a VM; stop the VM and detach the volume before rolling it back", volume.name),
        ));
    }
    if volume.read_only {
        return Err(ApiError::failed_precondition(format!(
            "volume {:?} is read-only",
            volume.name
        )));
    }
    // Carried out by this node's storage reconciler, which would retry it
    // after a restart; the answer waits for it.
    blocks(&app.local)?;
    let operation = Operation::pending(
        crate::cluster::join::random_hex(8),
        node.id,
        Work::RollbackVolume {
            volume_id: volume.id.clone(),
            snapshot_id: snap.id,
        },
        crate::cluster::join::now_ms(),
    );
    let id = operation.id.clone();
    node.write(&Command::StartOperation { operation }).await??;
    if let Some(error) = wait_for_operation(&node, &id).await?.error {
        return Err(match error.code.as_str() {
            "not_found" => ApiError::not_found(error.message),
            "failed_precondition" => ApiError::failed_precondition(error.message),
            _ => ApiError::unavailable(error.message),
        });
    }
    crate::api::consistency::read_barrier(&node).await?;
    Ok(Json(
        node.state.volume(&project, &volume.name)?.unwrap_or(volume),
    ))
}

#[utoipa::path(post, path = "/v1/projects/{name}/volumes/{volume}/clone", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    request_body = CloneVolume,
    responses((status = 201, description = "The clone: copy-on-write, created without copying data", body = VolumeRecord)))]
pub(super) async fn clone_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<CloneVolume>,
) -> ApiResult<(StatusCode, Json<VolumeRecord>)> {
    if let Some(size) = body.size_bytes {
        check_size(size)?;
    }
    let source = volume_name(&node, &project, key).await?;
    let volume = new_volume(
        project,
        body.name,
        body.size_bytes.unwrap_or(0),
        body.replicas,
    )?;
    let outcome = node
        .write(&Command::CreateVolume {
            volume,
            source: Some(VolumeSource::Snapshot {
                volume: source,
                snapshot: body.snapshot,
            }),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

pub(super) fn blocks(
    local: &LocalServices,
) -> ApiResult<Arc<crate::reconcile::storage::BlockStore>> {
    local.blocks.get().cloned().ok_or_else(|| {
        ApiError::unavailable("this node's block store is not running; try another node")
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImportImage {
    /// The image's name (a DNS label).
    name: String,
    /// SHA-256 of the uploaded bytes, in hex; the import fails if they differ.
    sha256: String,
    /// Make the image private to this project (default: public).
    #[serde(default)]
    project: Option<String>,
}

/// Removes an upload however its request ends, unless it was handed to
/// an operation.
struct TempFile(Option<std::path::PathBuf>);

impl TempFile {
    fn path(&self) -> &std::path::Path {
        self.0.as_deref().expect("not handed over yet")
    }

    /// From now on the operation that writes the image owns the file.
    fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[utoipa::path(post, path = "/v1/images", tag = "images", params(ImportImage),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The disk image: raw or qcow2 (detected)"),
    responses((status = 201, description = "The imported image, ready to clone", body = ImageRecord)))]
pub(super) async fn import_image(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<ImportImage>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<ImageRecord>)> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let node = &app.node;
    validate_name("image", &q.name)?;
    let mut checksum = image::Checksum::new(&q.sha256).map_err(image_error)?;
    if let Some(p) = &q.project {
        read_project(node, p).await?;
    }
    crate::api::consistency::read_barrier(node).await?;
    if node.state.image(&q.name)?.is_some() {
        return Err(ApiError::already_exists(format!(
            "image {:?} already exists",
            q.name
        )));
    }
    // The block store must run here: this node writes the image.
    blocks(&app.local)?;
    // The upload goes to a file first: it is checked before anything is stored.
    let operation_id = crate::cluster::join::random_hex(8);
    let upload = format!("{operation_id}.upload");
    let imports = node.data_dir.path().join("imports");
    tokio::fs::create_dir_all(&imports)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let tmp = TempFile(Some(imports.join(&upload)));
    let mut file = tokio::fs::File::create(tmp.path())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    // The upload may not fill the file system that holds the cluster state:
    // a tenth of it stays free.
    let room = upload_room(node.data_dir.path())?;
    let no_room = |room: u64| {
        ApiError::insufficient_storage(format!(
            "the upload would leave less than a tenth of the file system holding this node's \
             cluster state ({}) free; at most {room} bytes fit now. Free space there, or \
             upload through a node with more; nothing was stored",
            node.data_dir.path().display()
        ))
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > room) {
        return Err(no_room(room));
    }
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid(format!(
                "the upload broke off after {} bytes: {e}",
                checksum.bytes_so_far()
            ))
        })?;
        if checksum.bytes_so_far() + chunk.len() as u64 > room {
            return Err(no_room(room));
        }
        checksum.update(&chunk).map_err(image_error)?;
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(&e))?;
    }
    file.flush().await.map_err(|e| ApiError::internal(&e))?;
    drop(file);
    let verified = checksum.finish().map_err(image_error)?;
    let plan = probe_image(tmp.path(), verified.len_bytes).await?;
    let volume = new_volume(
        IMAGE_PROJECT.into(),
        q.name.clone(),
        plan.volume_size_bytes,
        None,
    )?;
    let volume = VolumeRecord {
        state: VolumeState::Importing,
        ..volume
    };
    let image = ImageRecord {
        name: q.name.clone(),
        project: q.project.clone(),
        size_bytes: plan.virtual_size_bytes,
        format: plan.format.as_str().to_string(),
        sha256: verified.sha256,
        state: ImageState::Importing,
        volume_id: volume.id.clone(),
        created_at_ms: crate::cluster::join::now_ms(),
    };
    let operation = Operation::pending(
        operation_id.clone(),
        node.id,
        Work::ImportImage {
            image: q.name.clone(),
            upload,
        },
        crate::cluster::join::now_ms(),
    );
    node.write(&Command::CreateImage {
        image,
        volume,
        operation: Some(operation),
    })
    .await??;
    // This node's storage reconciler writes the upload into the volume (and
    // would again after a restart); the answer waits for it.
    tmp.hand_over();
    let finished = wait_for_operation(node, &operation_id).await?;
    if let Some(error) = finished.error {
        return Err(ApiError::import_failed(format!(
            "{}; nothing was kept",
            error.message
        )));
    }
    crate::api::consistency::read_barrier(node).await?;
    let image = node
        .state
        .image(&q.name)?
        .ok_or_else(|| ApiError::not_found(format!("image {:?} was deleted meanwhile", q.name)))?;
    Ok((StatusCode::CREATED, Json(image)))
}

/// Waits until an operation of this node has finished (its outcome is
/// applied here first, since this node records it).
async fn wait_for_operation(node: &ClusterNode, id: &str) -> ApiResult<Operation> {
    let mut applied = node.applied.subscribe();
    loop {
        if let Some(operation) = node.state.operation(id)? {
            if operation.state != OperationState::Pending {
                return Ok(operation);
            }
        }
        // Operations are resources: every change to one moves `applied`.
        if applied.changed().await.is_err() {
            return Err(ApiError::unavailable(
                "this node is shutting down; the operation goes on when it is back",
            ));
        }
    }
}

/// An image the upload cannot become: 413 when too large, 400 otherwise.
fn image_error(e: image::ImageError) -> ApiError {
    match e {
        e if e.is_too_large() => ApiError::too_large(e.to_string()),
        image::ImageError::Qcow2Header(e) => ApiError::invalid(format!(
            "the upload starts like a qcow2 image but is not a valid one: {e}; nothing was stored"
        )),
        e => ApiError::invalid(e.to_string()),
    }
}

/// How many bytes an upload may take on the file system holding `dir`, so
/// that a tenth of it stays free for the cluster state.
fn upload_room(dir: &std::path::Path) -> ApiResult<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| {
        ApiError::internal(&std::io::Error::other(format!(
            "cannot read the free space of {}: {e}",
            dir.display()
        )))
    })?;
    let block = stat.fragment_size();
    Ok(room_for_upload(
        stat.blocks_available().saturating_mul(block),
        stat.blocks().saturating_mul(block),
    ))
}

/// Of `available` free bytes on a file system of `total`, what an upload
/// may use: all but a tenth of the total.
fn room_for_upload(available: u64, total: u64) -> u64 {
    available.saturating_sub(total / 10)
}

/// The longest `qemu-img info` may read an upload.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The conversion plan from the file's first bytes (format, sizes, what is
/// refused); a qcow2 image is also read whole by `qemu-img info`, which
/// finds damage past its header before anything is stored.
async fn probe_image(path: &std::path::Path, len: u64) -> ApiResult<image::ConversionPlan> {
    let head = crate::reconcile::operations::read_head(path)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let plan = image::plan(&head, len).map_err(image_error)?;
    if plan.format == image::Format::Qcow2 {
        let out = tokio::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(path)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(PROBE_TIMEOUT, out)
            .await
            .map_err(|_| {
                ApiError::invalid(format!(
                    "qemu-img could not read the upload within {} s; it is damaged or built to be slow to read; nothing was stored",
                    PROBE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| ApiError::internal(&e))?;
        if !out.status.success() {
            return Err(ApiError::invalid(format!(
                "the upload starts like a qcow2 image but is not a valid one: {}; nothing was stored",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(plan)
}

pub(super) fn visible(caller: &Principal, image: &ImageRecord) -> bool {
    image
        .project
        .as_ref()
        .is_none_or(|p| caller.role_in(p).is_some())
}

#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "Public images and those of the caller's projects", body = Vec<ImageRecord>)))]
pub(super) async fn list_images(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
) -> ApiResult<Json<Vec<ImageRecord>>> {
    crate::api::consistency::read_barrier(&node).await?;
    Ok(Json(
        node.state
            .images()?
            .into_iter()
            .filter(|i| visible(&caller, i))
            .collect(),
    ))
}

pub(super) fn image_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("image {name:?} does not exist"))
}

#[utoipa::path(get, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path, description = "Image name")),
    responses((status = 200, description = "The image", body = ImageRecord)))]
pub(super) async fn show_image(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<ImageRecord>> {
    crate::api::consistency::read_barrier(&node).await?;
    match node.state.image(&name)? {
        Some(i) if visible(&caller, &i) => Ok(Json(i)),
        _ => Err(image_not_found(&name)),
    }
}

#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path, description = "Image name")),
    responses((status = 204, description = "Deleted (refused while volumes are cloned from it)")))]
pub(super) async fn delete_image(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteImage { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Largest volume: 64 TiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Volumes are split into objects of this size.
pub const OBJECT_SIZE_BYTES: u64 = 4 << 20;

#[utoipa::path(get, path = "/v1/projects/{name}/volumes", tag = "volumes", params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's volumes", body = Vec<crate::state::volumes::VolumeRecord>)))]
pub(super) async fn list_volumes(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<crate::state::volumes::VolumeRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.volumes(&project)?))
}

/// A volume with the recovery work running on it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct VolumeView {
    #[serde(flatten)]
    pub volume: crate::state::volumes::VolumeRecord,
    /// The job running on it now (resync, re-replication, rebalance,
    /// drain, scrub), with its progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery: Option<crate::state::storage::StorageJob>,
}

#[utoipa::path(get, path = "/v1/projects/{name}/volumes/{volume}", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    responses((status = 200, description = "The volume, and the recovery job running on it", body = VolumeView)))]
pub(super) async fn show_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<Json<VolumeView>> {
    let name = volume_name(&node, &project, name).await?;
    let volume = node.state.volume(&project, &name)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "volume {name:?} does not exist in project {project:?}"
        ))
    })?;
    let recovery = node
        .state
        .storage_jobs()?
        .into_iter()
        .find(|j| j.volume == volume.id);
    Ok(Json(VolumeView { volume, recovery }))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/volumes/{volume}", tag = "volumes",
    params(("name" = String, Path, description = "Project name"), ("volume" = String, Path, description = "Volume name or id")),
    responses((status = 204, description = "Deleted; its quota is free again")))]
pub(super) async fn delete_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let name = volume_name(&node, &project, name).await?;
    node.write(&Command::DeleteVolume { project, name })
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod upload_tests {
    #[test]
    fn an_upload_leaves_a_tenth_of_the_file_system_free() {
        assert_eq!(super::room_for_upload(500, 1000), 400);
        assert_eq!(super::room_for_upload(100, 1000), 0);
        assert_eq!(super::room_for_upload(50, 1000), 0);
    }
}
