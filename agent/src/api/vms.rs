//! VM power actions, resizing, and the serial console over a websocket.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;

use super::{
    outcome_as, vm_name, ApiError, ApiJson, ApiResult, MAX_VM_MEMORY, MAX_VM_VCPUS, MIN_VM_MEMORY,
};
use crate::model::{Command, VmRecord};
use crate::node::ClusterNode;

async fn set_power(
    node: &ClusterNode,
    project: String,
    key: String,
    power: &str,
    force: bool,
) -> ApiResult<Json<VmRecord>> {
    let name = vm_name(node, &project, key).await?;
    let outcome = node
        .write(&Command::SetVmPower {
            project,
            name,
            power: power.into(),
            force,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/start", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM, to be started by its node", body = VmRecord)))]
pub(super) async fn start_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
) -> ApiResult<Json<VmRecord>> {
    set_power(&node, project, vm, "running", false).await
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/stop", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM, asked to power off (ACPI), forced off after the node's stop timeout", body = VmRecord)))]
pub(super) async fn stop_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
) -> ApiResult<Json<VmRecord>> {
    set_power(&node, project, vm, "stopped", false).await
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/force-stop", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM, to be powered off at once", body = VmRecord)))]
pub(super) async fn force_stop_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
) -> ApiResult<Json<VmRecord>> {
    set_power(&node, project, vm, "stopped", true).await
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/reboot", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM, to be reset by its node", body = VmRecord)))]
pub(super) async fn reboot_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
) -> ApiResult<Json<VmRecord>> {
    let name = vm_name(&node, &project, vm).await?;
    let outcome = node.write(&Command::RebootVm { project, name }).await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 256)]
    vcpus: Option<u64>,
    #[serde(default)]
    #[schema(
        minimum = 67_108_864,
        maximum = 4_398_046_511_104_u64,
        multiple_of = 1_048_576
    )]
    memory_bytes: Option<u64>,
}

#[utoipa::path(patch, path = "/v1/projects/{name}/vms/{vm}", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    request_body = UpdateVm,
    responses((status = 200, description = "The VM with its new size (it must be stopped)", body = VmRecord)))]
pub(super) async fn update_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
    ApiJson(body): ApiJson<UpdateVm>,
) -> ApiResult<Json<VmRecord>> {
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", m);
    if let Some(v) = body.vcpus {
        if v == 0 || v > MAX_VM_VCPUS {
            return Err(invalid(format!(
                "vcpus must be 1 to {MAX_VM_VCPUS}, not {v}"
            )));
        }
    }
    if let Some(m) = body.memory_bytes {
        if !(MIN_VM_MEMORY..=MAX_VM_MEMORY).contains(&m) || !m.is_multiple_of(1 << 20) {
            return Err(invalid(format!(
                "memory_bytes {m} must be a multiple of 1 MiB from 64 MiB to 4 TiB (e.g. --memory 512M)"
            )));
        }
    }
    if body.vcpus.is_none() && body.memory_bytes.is_none() {
        return Err(invalid("give vcpus, memory_bytes or both".into()));
    }
    let name = vm_name(&node, &project, vm).await?;
    let outcome = node
        .write(&Command::ResizeVm {
            project,
            name,
            vcpus: body.vcpus,
            memory_bytes: body.memory_bytes,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(get, path = "/v1/projects/{name}/vms/{vm}/console", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 101, description = "A websocket carrying the serial console both ways (binary frames); connect to the API of the VM's node (`node_api` in the VM)")))]
pub(super) async fn console(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "upgrade_required",
            format!(
                "this route is a websocket ({}); connect with a websocket client, e.g. `allod vm console`",
                rejection.body_text()
            ),
        )
    })?;
    let name = vm_name(&node, &project, vm).await?;
    let vm = node
        .state
        .vm(&project, &name)?
        .ok_or_else(|| super::vm_not_found(&project, &name))?;
    if vm.node_id != node.id {
        let addr = node
            .members()
            .into_iter()
            .find(|m| m.id == vm.node_id)
            .map(|m| m.api_addr);
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_node",
            format!(
                "VM {name:?} runs on node {}; open its console through that node's API ({})",
                vm.node_id,
                addr.map_or("unknown address".into(), |a| format!("https://{a}"))
            ),
        ));
    }
    let Some(compute) = node.compute.get().cloned() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "failed_precondition",
            "this node runs no VMs (--libvirt-uri none)",
        ));
    };
    let (uri, me, id) = (
        compute.libvirt_uri.clone(),
        crate::reconciler::node_key(&node),
        vm.id.clone(),
    );
    let pty = tokio::task::spawn_blocking(move || {
        hypervisor::lifecycle::Hypervisor::connect(&uri, &me).and_then(|h| h.console_pty(&id))
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "failed_precondition",
            format!("VM {name:?} is not running; start it first"),
        )
    })?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(&pty)
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("cannot open the console {pty}: {e}"),
            )
        })?;
    // Raw: bytes pass as they are (no echo, no line editing, no CR/LF changes).
    if let Ok(mut attrs) = nix::sys::termios::tcgetattr(&file) {
        nix::sys::termios::cfmakeraw(&mut attrs);
        let _ = nix::sys::termios::tcsetattr(&file, nix::sys::termios::SetArg::TCSANOW, &attrs);
    }
    Ok(upgrade.on_upgrade(move |socket| relay(socket, file)))
}

use std::os::unix::fs::OpenOptionsExt;

/// Console bytes to the websocket and websocket bytes to the console,
/// until either side closes.
async fn relay(socket: WebSocket, file: std::fs::File) {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tx, mut rx) = socket.split();
    let mut reader = tokio::fs::File::from_std(file.try_clone().expect("a pty descriptor"));
    let mut writer = tokio::fs::File::from_std(file);
    let out = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => {
                    tracing::info!("console closed by the VM side");
                    break;
                }
                Err(e) => {
                    tracing::info!("console read failed: {e}");
                    break;
                }
                Ok(n) => {
                    if tx
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let input = async move {
        while let Some(msg) = rx.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::info!("console websocket failed: {e}");
                    break;
                }
            };
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if writer.write_all(&data).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = out => {}
        () = input => {}
    }
}
