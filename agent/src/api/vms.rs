//! VM power actions, resizing, and the serial console over a websocket.

use crate::api_types::{AttachVolume, CreateVm, UpdateVm};
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};

use crate::state::vms::{PowerState, VmState};

pub(super) async fn set_power(
    node: &ClusterNode,
    project: String,
    key: String,
    power: PowerState,
    force: bool,
) -> ApiResult<Json<VmRecord>> {
    let name = vm_name(node, &project, key).await?;
    let outcome = node
        .write(&Command::SetVmPower {
            project,
            name,
            power,
            force,
            overcommit_cpu_percent: OVERCOMMIT.cpu_percent(),
            overcommit_memory_percent: OVERCOMMIT.memory_percent(),
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
    set_power(&node, project, vm, PowerState::Running, false).await
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/stop", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM, asked to power off (ACPI), forced off after the node's stop timeout", body = VmRecord)))]
pub(super) async fn stop_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
) -> ApiResult<Json<VmRecord>> {
    set_power(&node, project, vm, PowerState::Stopped, false).await
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/force-stop", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM, to be powered off at once", body = VmRecord)))]
pub(super) async fn force_stop_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
) -> ApiResult<Json<VmRecord>> {
    set_power(&node, project, vm, PowerState::Stopped, true).await
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

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/migrate", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    request_body = crate::api_types::MigrateVm,
    responses((status = 200, description = "The VM; its `migration` says where it goes and how far it is (phase, bytes sent and remaining, downtime once done)", body = VmRecord)))]
pub(super) async fn migrate_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm)): Path<(String, String)>,
    ApiJson(body): ApiJson<crate::api_types::MigrateVm>,
) -> ApiResult<Json<VmRecord>> {
    let name = vm_name(&node, &project, vm).await?;
    let to = match &body.to {
        Some(wanted) => Some(super::cluster::node_id_of(&node, wanted)?),
        None => None,
    };
    let overcommit = crate::state::scheduler::Overcommit::DEFAULT;
    let command = Command::Migration {
        command: crate::state::migration::MigrationCommand::Start {
            project,
            name,
            to,
            at_ms: crate::cluster::join::now_ms(),
            overcommit_cpu_percent: overcommit.cpu_percent(),
            overcommit_memory_percent: overcommit.memory_percent(),
        },
    };
    let outcome = node.write(&command).await?;
    Ok(Json(outcome_as(outcome?)?))
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
    let _invalid = |m: String| ApiError::invalid(m);
    if let Some(v) = body.vcpus {
        if v == 0 || v > MAX_VM_VCPUS {
            return Err(ApiError::invalid(format!(
                "vcpus must be 1 to {MAX_VM_VCPUS}, not {v}"
            )));
        }
    }
    if let Some(m) = body.memory_bytes {
        if !(MIN_VM_MEMORY..=MAX_VM_MEMORY).contains(&m) || !m.is_multiple_of(1 << 20) {
            return Err(ApiError::invalid(format!(
                "memory_bytes {m} must be a multiple of 1 MiB from 64 MiB to 4 TiB (e.g. --memory 512M)"
            )));
        }
    }
    if body.vcpus.is_none() && body.memory_bytes.is_none() {
        return Err(ApiError::invalid("give vcpus, memory_bytes or both"));
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
    State(app): State<AppState>,
    Path((project, vm)): Path<(String, String)>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let node = app.node.clone();
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::upgrade_required(
            rejection.status(),
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
        return Err(ApiError::wrong_node(format!(
            "VM {name:?} runs on node {}; open its console through that node's API ({})",
            vm.node_id,
            addr.map_or("unknown address".into(), |a| format!("https://{a}"))
        )));
    }
    let Some(compute) = app.local.compute.get().cloned() else {
        return Err(ApiError::failed_precondition(
            "this node runs no VMs (--libvirt-uri none)",
        ));
    };
    let (uri, me, id) = (
        compute.libvirt_uri.clone(),
        crate::reconcile::compute::node_key(&node),
        vm.id.clone(),
    );
    let pty = tokio::task::spawn_blocking(move || {
        hypervisor::lifecycle::Hypervisor::connect(&uri, &me).and_then(|h| h.console_pty(&id))
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .ok_or_else(|| {
        ApiError::failed_precondition(format!("VM {name:?} is not running; start it first"))
    })?;
    let file = open_console(&pty)
        .map_err(|e| ApiError::unavailable(format!("cannot open the console {pty}: {e}")))?;
    Ok(upgrade.on_upgrade(move |socket| relay(socket, file)))
}

/// Opens a VM's serial console device for [`relay`]: never as the
/// controlling terminal, without blocking, and raw (bytes pass as they
/// are: no echo, no line editing, no CR/LF changes).
fn open_console(path: &str) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
        .open(path)?;
    if let Ok(mut attrs) = nix::sys::termios::tcgetattr(&file) {
        nix::sys::termios::cfmakeraw(&mut attrs);
        let _ = nix::sys::termios::tcsetattr(&file, nix::sys::termios::SetArg::TCSANOW, &attrs);
    }
    Ok(file)
}

use crate::api::{
    network, outcome_as, read_project, vm_name, volumes, ApiError, ApiJson, ApiResult, AppState,
    Principal, MAX_VOLUME_BYTES,
};
use crate::cluster::node::ClusterNode;
use crate::state::auth::Role;
use crate::state::vms::VmRecord;
use crate::state::{validate_name, Command};
use std::os::unix::fs::OpenOptionsExt;

/// Console bytes to the websocket and websocket bytes to the console,
/// until either side closes.
pub(super) async fn relay(socket: WebSocket, file: std::fs::File) {
    use futures_util::StreamExt;
    let (tx, rx) = socket.split();
    relay_with(tx, rx, file).await;
}

/// [`relay`] over any sink and stream of websocket messages. The console is
/// read and written without blocking through the runtime's reactor, so
/// when either side closes nothing is left reading the guest's serial
/// device (a blocking read would hold a thread of the blocking pool and
/// swallow the guest's next output).
pub(super) async fn relay_with<E: std::fmt::Display>(
    mut tx: impl futures_util::Sink<Message> + Unpin,
    mut rx: impl futures_util::Stream<Item = Result<Message, E>> + Unpin,
    file: std::fs::File,
) {
    use futures_util::{SinkExt, StreamExt};
    use std::io::{Read, Write};
    // SAFETY: the `File` owns its descriptor, and nothing closes or
    // replaces it while the `AsyncFd` holds it.
    let console = match unsafe { tokio::io::unix::AsyncFd::register(file) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot watch the console device: {e}");
            return;
        }
    };
    let out = async {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok(mut ready) = console.readable().await else {
                break;
            };
            match ready.try_io(|fd| fd.get_ref().read(&mut buf)) {
                Err(_would_block) => continue,
                Ok(Ok(0)) => {
                    tracing::info!("console closed by the VM side");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::info!("console read failed: {e}");
                    break;
                }
                Ok(Ok(n)) => {
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
    let input = async {
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
            let mut written = 0;
            while written < data.len() {
                let Ok(mut ready) = console.writable().await else {
                    return;
                };
                match ready.try_io(|fd| fd.get_ref().write(&data[written..])) {
                    Err(_would_block) => continue,
                    Ok(Ok(n)) => written += n,
                    Ok(Err(e)) => {
                        tracing::info!("console write failed: {e}");
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = out => {}
        () = input => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// After the websocket closes, the guest's next output stays in the
    /// device for the next reader: nothing goes on reading it. (QEMU holds
    /// the pty's master; the agent opens the device libvirt names.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_console_stops_reading_the_guests_serial_device() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let device = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
        ))
        .unwrap();
        let device = device.to_str().unwrap().to_string();
        let mut qemu = std::fs::File::from(pty.master);
        let (to_client, mut client_sees) = tokio::sync::mpsc::unbounded_channel::<Message>();
        let (client_sends, from_client) =
            tokio::sync::mpsc::unbounded_channel::<Result<Message, std::io::Error>>();
        let sink = Box::pin(futures_util::sink::unfold(to_client, |tx, m| async move {
            tx.send(m).map(|()| tx)
        }));
        let stream = Box::pin(futures_util::stream::unfold(from_client, |mut rx| async {
            rx.recv().await.map(|m| (m, rx))
        }));
        let relay = tokio::spawn(relay_with(sink, stream, open_console(&device).unwrap()));
        // Both ways while open.
        client_sends
            .send(Ok(Message::Binary(b"ls\n".to_vec().into())))
            .unwrap();
        let mut typed = [0u8; 3];
        tokio::task::block_in_place(|| qemu.read_exact(&mut typed)).unwrap();
        assert_eq!(&typed, b"ls\n");
        qemu.write_all(b"hello").unwrap();
        let first = client_sees.recv().await.unwrap();
        assert_eq!(first.into_data().as_ref(), b"hello");
        // The client goes away; the guest writes on.
        drop(client_sends);
        tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("the relay ends when the websocket closes")
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        qemu.write_all(b"after").unwrap();
        let mut next = open_console(&device).unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while seen.len() < 5 && std::time::Instant::now() < deadline {
            let mut buf = [0u8; 16];
            match next.read(&mut buf) {
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen, b"after", "the guest's output after the close");
    }
}

/// How far this node's proposals let placement overcommit a node; a create
/// and a later start carry the same value, so every replica decides alike.
const OVERCOMMIT: crate::state::scheduler::Overcommit =
    crate::state::scheduler::Overcommit::DEFAULT;

pub(super) const MIN_VM_MEMORY: u64 = 64 << 20;
pub(super) const MAX_VM_MEMORY: u64 = 4 << 40;
pub(super) const MAX_VM_VCPUS: u64 = 256;

pub(super) const MAX_VM_NICS: usize = 8;

pub(super) fn vm_not_found(project: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("VM {name:?} does not exist in project {project:?}"))
}

#[utoipa::path(get, path = "/v1/projects/{name}/vms", tag = "vms", params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's VMs", body = Vec<crate::state::vms::VmRecord>)))]
pub(super) async fn list_vms(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<crate::state::vms::VmRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.vms(&project)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms", tag = "vms", params(("name" = String, Path, description = "Project name")),
    request_body = CreateVm,
    responses((status = 201, description = "The VM, placed on a node of the project's zone", body = crate::state::vms::VmRecord)))]
pub(super) async fn create_vm(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<CreateVm>,
) -> ApiResult<(StatusCode, Json<crate::state::vms::VmRecord>)> {
    validate_name("VM", &body.name)?;
    if let Some(group) = &body.anti_affinity {
        validate_name("anti-affinity group", group)?;
    }
    let _invalid = |message: String| ApiError::invalid(message);
    if body.vcpus == 0 || body.vcpus > MAX_VM_VCPUS {
        return Err(ApiError::invalid(format!(
            "vcpus must be 1 to {MAX_VM_VCPUS}, not {}",
            body.vcpus
        )));
    }
    if body.memory_bytes < MIN_VM_MEMORY
        || body.memory_bytes > MAX_VM_MEMORY
        || body.memory_bytes % (1 << 20) != 0
    {
        return Err(ApiError::invalid(format!(
            "memory_bytes {} must be a multiple of 1 MiB from 64 MiB to 4 TiB (e.g. --memory 512M)",
            body.memory_bytes
        )));
    }
    if let Some(priority) = body.priority.filter(|p| !(-1000..=1000).contains(p)) {
        return Err(ApiError::invalid(format!(
            "priority must be from -1000 to 1000, not {priority}"
        )));
    }
    let overcommit = OVERCOMMIT;
    if body.disk_size_bytes.is_some() && body.image.is_none() {
        return Err(ApiError::invalid(
            "disk_size_bytes needs an image to clone (--image)",
        ));
    }
    if let Some(size) = body.disk_size_bytes {
        if size == 0 || !size.is_multiple_of(512) || size > MAX_VOLUME_BYTES {
            return Err(ApiError::invalid(format!(
                "disk_size_bytes {size} must be a positive multiple of 512, at most 64 TiB (e.g. --disk-size 10G)"
            )));
        }
    }
    if body.nics.len() > MAX_VM_NICS {
        return Err(ApiError::invalid(format!(
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
    let vm_id = crate::cluster::join::random_hex(8);
    let boot = body.image.map(|image| crate::state::vms::BootDisk {
        volume: volumes::new_volume(
            project.clone(),
            format!("{}-boot", body.name.chars().take(58).collect::<String>()),
            body.disk_size_bytes.unwrap_or(0),
            None,
        )
        .expect("a VM name makes a valid volume name"),
        image,
    });
    let vm = crate::state::vms::VmRecord {
        id: vm_id,
        name: body.name,
        project,
        // The state machine fills in the zone and the node it chose.
        zone: crate::state::zones::Zone::default(),
        vcpus: body.vcpus,
        memory_bytes: body.memory_bytes,
        anti_affinity: body.anti_affinity,
        node_id: 0,
        state: VmState::Creating,
        reason: None,
        volumes: Vec::new(),
        generation: 1,
        created_at_ms: crate::cluster::join::now_ms(),
        power: if body.start == Some(false) {
            PowerState::Stopped
        } else {
            PowerState::Running
        },
        force_stop: false,
        reboots: 0,
        boot_volume: None,
        observed_generation: 0,
        nics: Vec::new(),
        restart_policy: body.restart_policy.unwrap_or_default(),
        priority: body.priority.unwrap_or(0),
        last_restart: None,
        relocation: None,
        migration: None,
    };
    let outcome = node
        .write(&Command::CreateVm {
            vm,
            overcommit_cpu_percent: overcommit.cpu_percent(),
            overcommit_memory_percent: overcommit.memory_percent(),
            boot,
            nics,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

#[utoipa::path(get, path = "/v1/projects/{name}/vms/{vm}", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "The VM", body = crate::state::vms::VmRecord)))]
pub(super) async fn show_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<Json<crate::state::vms::VmRecord>> {
    let name = vm_name(&node, &project, name).await?;
    node.state
        .vm(&project, &name)?
        .map(Json)
        .ok_or_else(|| vm_not_found(&project, &name))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/vms/{vm}", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    responses((status = 204, description = "Deleted; its volumes stay, detached")))]
pub(super) async fn delete_vm(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let name = vm_name(&node, &project, name).await?;
    node.write(&Command::DeleteVm { project, name }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/projects/{name}/vms/{vm}/volumes", tag = "vms",
    params(("name" = String, Path, description = "Project name"), ("vm" = String, Path, description = "VM name or id")),
    request_body = AttachVolume,
    responses((status = 200, description = "The VM with the volume attached", body = crate::state::vms::VmRecord)))]
pub(super) async fn attach_volume(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
    Path((project, vm)): Path<(String, String)>,
    ApiJson(body): ApiJson<AttachVolume>,
) -> ApiResult<Json<crate::state::vms::VmRecord>> {
    let vm = vm_name(&node, &project, vm).await?;
    let volume_project = body.project.unwrap_or_else(|| project.clone());
    match caller.role_in(&volume_project) {
        None => return Err(ApiError::project_not_found(&volume_project)),
        Some(role) if role < Role::ProjectMember => {
            return Err(ApiError::forbidden(format!(
            "attaching a volume of project {volume_project:?} needs the project-member role there"
        )))
        }
        Some(_) => {}
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
    responses((status = 200, description = "The VM without the volume", body = crate::state::vms::VmRecord)))]
pub(super) async fn detach_volume(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vm, volume)): Path<(String, String, String)>,
) -> ApiResult<Json<crate::state::vms::VmRecord>> {
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
            return Err(ApiError::not_found(format!(
                "no volume {volume:?} is attached to VM {vm:?}"
            )))
        }
        _ => {
            return Err(ApiError::failed_precondition(format!(
                "several attached volumes are named {volume:?}; name it by its id"
            )))
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
