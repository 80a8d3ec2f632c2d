//! VM records as the state machine changes them: placement happens where
//! the create applies, in log order, from the state every replica holds, so
//! two concurrent creates can neither overfill a node nor break a quota, and
//! every replica picks the same node.

use std::collections::BTreeMap;

use allod_raft::{KvRead, KvWrite};
use serde::{Deserialize, Serialize};

use super::nodes::NodeRecord;
use super::projects::Project;
use super::quotas::Usage;
use super::scheduler::{Candidate, Overcommit, Request};
use super::volumes::VolumeRecord;
use super::zones::Zone;
use super::{
    domain, get_json, put_json, ErrorCode, Outcome, ReadError, StateView, PREFIX_NODES,
    PREFIX_PROJECTS, PREFIX_VMS, PREFIX_VOLUMES,
};

type KvResult<T> = Result<T, allod_raft::KvError>;

/// A volume attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attachment {
    pub project: String,
    pub volume: String,
    pub volume_id: String,
}

/// A VM's NIC: the port made for it with the VM (deleted with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmNic {
    /// The port's name (`<vm>-nic<N>`), e.g. for `allod fip bind --port`.
    pub port: String,
    pub vpc: String,
    pub subnet: String,
    pub mac: String,
    /// The address IPAM gave it; the guest gets it by DHCP.
    pub ip: String,
}

/// A VM's record: its desired spec and where the scheduler put it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    /// The project's zone; the VM runs only on nodes of this zone.
    pub zone: Zone,
    pub vcpus: u64,
    pub memory_bytes: u64,
    /// VMs of one group never share a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// The node the scheduler chose (set when the create applies).
    #[serde(rename = "node", alias = "node_id")]
    pub node_id: u64,
    /// What its node last saw: `creating`, `running`, `stopping`,
    /// `stopped`, `paused`, `crashed`, or `failed` (with `reason`).
    #[schema(value_type = String)]
    pub state: VmState,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// In boot order: the first is the boot disk.
    #[serde(default)]
    pub volumes: Vec<Attachment>,
    /// Bumped by every change to the spec (vCPUs, memory, disks).
    pub generation: u64,
    pub created_at_ms: u64,
    /// What the owner wants: `running` or `stopped`.
    #[serde(default = "default_power")]
    #[schema(value_type = String)]
    pub power: PowerState,
    /// A stop that pulls the plug instead of asking the guest.
    #[serde(default)]
    pub force_stop: bool,
    /// Bumped by every reboot request.
    #[serde(default)]
    pub reboots: u64,
    /// The boot volume made with the VM (deleted with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_volume: Option<String>,
    /// The spec generation its node last defined.
    #[serde(default)]
    pub observed_generation: u64,
    /// Its NICs, in the guest's order (eth0 first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<VmNic>,
    /// What happens when its node dies: `always` (restarted elsewhere, or
    /// waiting until some node has room), `best-effort` (restarted if a
    /// node has room then, else stopped) or `never` (stopped).
    #[serde(default)]
    #[schema(value_type = String)]
    pub restart_policy: super::ha::RestartPolicy,
    /// Restarts after a node's death place higher priorities first.
    #[serde(default)]
    pub priority: i32,
    /// The last time it was restarted on another node, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<super::ha::Restart>,
    /// A drain moves it: its node stops it, and the stop's report places
    /// it on the node chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relocation: Option<super::ha::Relocation>,
    /// Its live migration in progress, or the last one (`state::migration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Box<super::migration::Migration>>,
}

fn default_power() -> PowerState {
    PowerState::Running
}

/// What the owner wants a VM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Running,
    Stopped,
}

/// What a VM's node last saw it do (serialised as the lowercase word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Not yet defined on its node, or waiting for its network.
    Creating,
    Running,
    /// Asked to power off (ACPI), not yet off.
    Stopping,
    Stopped,
    Paused,
    Crashed,
    /// Its node could not run it; `reason` says why.
    Failed,
    /// Its node died and no other node has room for it yet; `reason` says
    /// what is missing. It is placed as soon as some node has room.
    Waiting,
}

impl VmState {
    /// Between two steady states: the reconciler looks again soon.
    pub fn is_transient(self) -> bool {
        !matches!(
            self,
            VmState::Running | VmState::Stopped | VmState::Failed | VmState::Waiting
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Paused => "paused",
            VmState::Crashed => "crashed",
            VmState::Failed => "failed",
            VmState::Waiting => "waiting",
        }
    }
}

impl Candidate {
    /// Counts `vm` as placed on this node: its room and its group.
    pub(super) fn hold(&mut self, vm: &VmRecord) {
        self.used_vcpus += vm.vcpus;
        self.used_memory_bytes += vm.memory_bytes;
        if let Some(group) = &vm.anti_affinity {
            *self.groups.entry(group.clone()).or_default() += 1;
        }
    }
}

impl VmRecord {
    pub fn usage(&self) -> Usage {
        Usage {
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            vms: 1,
            ..Default::default()
        }
    }
}

/// The scheduler's view of every node: capacity and what is placed there.
pub(super) fn candidates(kv: &impl KvRead) -> KvResult<Vec<Candidate>> {
    let mut nodes: BTreeMap<u64, Candidate> = BTreeMap::new();
    for (_, bytes) in kv.scan(PREFIX_NODES)? {
        let Ok(node) = serde_json::from_slice::<NodeRecord>(&bytes) else {
            continue;
        };
        nodes.insert(
            node.id,
            Candidate {
                id: node.id,
                name: node.name,
                zone: node.zone,
                maintenance: node.maintenance,
                down: node.liveness != super::ha::Liveness::Healthy,
                vcpus: node.vcpus,
                memory_bytes: node.memory_bytes,
                used_vcpus: 0,
                used_memory_bytes: 0,
                groups: BTreeMap::new(),
            },
        );
    }
    for (_, bytes) in kv.scan(PREFIX_VMS)? {
        let Ok(vm) = serde_json::from_slice::<VmRecord>(&bytes) else {
            continue;
        };
        // A stopped VM reserves nothing; starting it checks for room.
        if vm.power == PowerState::Stopped {
            continue;
        }
        // A VM a drain or a migration moves holds room where it is and
        // where it goes.
        let going = vm.relocation.as_ref().map(|r| r.to).or(vm
            .migration
            .as_ref()
            .filter(|m| m.active() && m.to != vm.node_id)
            .map(|m| m.to));
        for id in std::iter::once(vm.node_id).chain(going) {
            if let Some(node) = nodes.get_mut(&id) {
                node.hold(&vm);
            }
        }
    }
    Ok(nodes.into_values().collect())
}

/// The boot disk a VM is created with: a clone of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootDisk {
    /// The new volume (id and name chosen by the proposer).
    pub volume: VolumeRecord,
    pub image: String,
}

pub fn create_vm(
    kv: &mut KvWrite<'_>,
    vm: VmRecord,
    overcommit: Overcommit,
    boot: Option<BootDisk>,
    nics: Vec<crate::state::network::PortRecord>,
) -> KvResult<Outcome> {
    let project_key = format!("{PREFIX_PROJECTS}{}", vm.project);
    let key = format!("{PREFIX_VMS}{}/{}", vm.project, vm.name);
    let Some(mut project) = get_json::<Project>(kv, &project_key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("project {:?} does not exist", vm.project),
        )));
    };
    if kv.get(&key)?.is_some() {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!(
                "VM {:?} already exists in project {:?}",
                vm.name, vm.project
            ),
        )));
    }
    if let Err(why) = project.quota.admits(&project.usage, &vm.usage()) {
        return Ok(Err(domain(ErrorCode::QuotaExceeded, why)));
    }
    let request = Request {
        zone: project.zone,
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        anti_affinity: vm.anti_affinity.clone(),
    };
    let mut nodes = candidates(kv)?;
    if vm.power == PowerState::Stopped {
        // Only defined: it must fit a node, but reserves room only when started.
        for n in &mut nodes {
            n.used_vcpus = 0;
            n.used_memory_bytes = 0;
        }
    }
    let node_id = match crate::state::scheduler::place(&nodes, &request, overcommit) {
        Ok(id) => id,
        Err(refusal) => {
            return Ok(Err(domain(
                ErrorCode::FailedPrecondition,
                refusal.to_string(),
            )))
        }
    };
    let mut vm = VmRecord {
        zone: project.zone,
        node_id,
        nics: Vec::new(),
        ..vm
    };
    // Its ports live where it runs. Nothing is rolled back by the log, so a
    // refusal undoes the ports made before it.
    let undo = |kv: &mut KvWrite<'_>, vm: &VmRecord| -> KvResult<()> {
        for nic in &vm.nics {
            crate::state::network::delete_port(kv, &vm.project, &nic.port)?;
        }
        Ok(())
    };
    for mut port in nics {
        port.node = node_id;
        port.vm = Some(vm.name.clone());
        match crate::state::network::create_port(kv, port)? {
            Ok(v) => {
                let port: crate::state::network::PortRecord =
                    serde_json::from_value(v).expect("a port record");
                vm.nics.push(crate::state::vms::VmNic {
                    port: port.name,
                    vpc: port.vpc,
                    subnet: port.subnet,
                    mac: port.mac,
                    ip: port.ip.to_string(),
                });
            }
            Err(refused) => {
                undo(kv, &vm)?;
                return Ok(Err(refused));
            }
        }
    }
    if let Some(boot) = boot {
        let mut volume = boot.volume;
        volume.attached_to = Some(vm.id.clone());
        volume.refresh_state();
        let created = crate::state::volumes::create_volume(
            kv,
            volume,
            Some(crate::state::volumes::VolumeSource::Image { name: boot.image }),
        )?;
        let volume: VolumeRecord = match created {
            Ok(v) => serde_json::from_value(v).expect("a volume record"),
            Err(refused) => {
                undo(kv, &vm)?;
                return Ok(Err(refused));
            }
        };
        vm.volumes.insert(
            0,
            Attachment {
                project: volume.project.clone(),
                volume: volume.name.clone(),
                volume_id: volume.id.clone(),
            },
        );
        vm.boot_volume = Some(volume.id);
        // The volume's usage is in the project now.
        project = get_json::<Project>(kv, &project_key)?.expect("still there");
    }
    project.usage = project.usage.plus(&vm.usage());
    put_json(kv, &project_key, &project)?;
    put_json(kv, &key, &vm)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

pub fn delete_vm(kv: &mut KvWrite<'_>, project: &str, name: &str) -> KvResult<Outcome> {
    let project_key = format!("{PREFIX_PROJECTS}{project}");
    let key = format!("{PREFIX_VMS}{project}/{name}");
    let (Some(mut record), Some(vm)) = (
        get_json::<Project>(kv, &project_key)?,
        get_json::<VmRecord>(kv, &key)?,
    ) else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("VM {name:?} does not exist in project {project:?}"),
        )));
    };
    if let Err(refused) = super::migration::refuse_while_migrating(&vm) {
        return Ok(Err(refused));
    }
    // Its boot volume and its NICs go with it; other volumes stay, detached.
    record.usage = record.usage.minus(&vm.usage());
    put_json(kv, &project_key, &record)?;
    for nic in &vm.nics {
        crate::state::network::delete_port(kv, project, &nic.port)?;
    }
    for attachment in &vm.volumes {
        let volume_key = format!(
            "{PREFIX_VOLUMES}{}/{}",
            attachment.project, attachment.volume
        );
        if let Some(mut volume) = get_json::<VolumeRecord>(kv, &volume_key)? {
            volume.attached_to = None;
            volume.refresh_state();
            put_json(kv, &volume_key, &volume)?;
            if vm.boot_volume.as_deref() == Some(volume.id.as_str()) {
                let deleted = crate::state::volumes::delete_volume(
                    kv,
                    &attachment.project,
                    &attachment.volume,
                )?;
                if let Err(e) = deleted {
                    tracing::warn!(volume = %volume.id, "boot volume kept: {e}");
                }
            }
        }
    }
    kv.delete(&key)?;
    Ok(Ok(serde_json::Value::Null))
}

/// Attaches (or, with `attach` false, detaches) a volume, possibly of
/// another project of the same zone; never across zones.
pub fn attach(
    kv: &mut KvWrite<'_>,
    project: &str,
    vm_name: &str,
    volume_project: &str,
    volume_name: &str,
    attach: bool,
) -> KvResult<Outcome> {
    let vm_key = format!("{PREFIX_VMS}{project}/{vm_name}");
    let volume_key = format!("{PREFIX_VOLUMES}{volume_project}/{volume_name}");
    let Some(mut vm) = get_json::<VmRecord>(kv, &vm_key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("VM {vm_name:?} does not exist in project {project:?}"),
        )));
    };
    let Some(mut volume) = get_json::<VolumeRecord>(kv, &volume_key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("volume {volume_name:?} does not exist in project {volume_project:?}"),
        )));
    };
    if let Err(refused) = super::migration::refuse_while_migrating(&vm) {
        return Ok(Err(refused));
    }
    if attach {
        if let Err(why) = crate::state::zones::may_connect(vm.zone, volume.zone) {
            return Ok(Err(domain(
                ErrorCode::FailedPrecondition,
                format!("cannot attach volume {volume_name:?} to VM {vm_name:?}: {why}"),
            )));
        }
        match &volume.attached_to {
            Some(holder) if *holder == vm.id => {
                return Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
            }
            Some(_) => {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "volume {volume_name:?} is attached to another VM; detach it there first"
                    ),
                )))
            }
            None => {}
        }
        volume.attached_to = Some(vm.id.clone());
        volume.refresh_state();
        vm.volumes.push(Attachment {
            project: volume_project.to_string(),
            volume: volume_name.to_string(),
            volume_id: volume.id.clone(),
        });
    } else {
        if volume.attached_to.as_deref() != Some(vm.id.as_str()) {
            return Ok(Err(domain(
                ErrorCode::NotFound,
                format!("volume {volume_name:?} is not attached to VM {vm_name:?}"),
            )));
        }
        if matches!(
            vm.state,
            VmState::Running | VmState::Stopping | VmState::Paused
        ) {
            // Its QEMU holds the disk open; the guest would lose it under
            // its feet.
            return Ok(Err(domain(
                ErrorCode::FailedPrecondition,
                format!(
                    "VM {vm_name:?} is {}; stop it (allod vm stop {vm_name} --project {project}) before detaching volume {volume_name:?}",
                    vm.state.as_str()
                ),
            )));
        }
        volume.attached_to = None;
        volume.refresh_state();
        vm.volumes.retain(|a| a.volume_id != volume.id);
    }
    vm.generation += 1;
    put_json(kv, &volume_key, &volume)?;
    put_json(kv, &vm_key, &vm)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

/// Changes a VM's record (bumping nothing: callers decide what changes).
pub fn update_vm(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    change: impl FnOnce(&mut VmRecord) -> Result<(), crate::state::DomainError>,
) -> KvResult<Outcome> {
    let key = format!("{PREFIX_VMS}{project}/{name}");
    let Some(mut vm) = get_json::<VmRecord>(kv, &key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("VM {name:?} does not exist in project {project:?}"),
        )));
    };
    if let Err(refused) = change(&mut vm) {
        return Ok(Err(refused));
    }
    put_json(kv, &key, &vm)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

/// New vCPUs and memory for a stopped VM, within its project's quota and
/// its node's capacity.
pub fn resize_vm(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    vcpus: Option<u64>,
    memory_bytes: Option<u64>,
) -> KvResult<Outcome> {
    let key = format!("{PREFIX_VMS}{project}/{name}");
    let project_key = format!("{PREFIX_PROJECTS}{project}");
    let (Some(mut vm), Some(mut record)) = (
        get_json::<VmRecord>(kv, &key)?,
        get_json::<Project>(kv, &project_key)?,
    ) else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("VM {name:?} does not exist in project {project:?}"),
        )));
    };
    if vm.power != PowerState::Stopped || vm.state != VmState::Stopped {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "VM {name:?} must be stopped to change its vCPUs or memory (it is {})",
                vm.state.as_str()
            ),
        )));
    }
    let before = vm.usage();
    vm.vcpus = vcpus.unwrap_or(vm.vcpus);
    vm.memory_bytes = memory_bytes.unwrap_or(vm.memory_bytes);
    let after = vm.usage();
    let without = record.usage.minus(&before);
    if let Err(why) = record.quota.admits(&without, &after) {
        return Ok(Err(domain(ErrorCode::QuotaExceeded, why)));
    }
    record.usage = without.plus(&after);
    vm.generation += 1;
    put_json(kv, &project_key, &record)?;
    put_json(kv, &key, &vm)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

/// Records what the VM's node observed; reports from any other node (one
/// the VM has left) are ignored.
#[allow(clippy::too_many_arguments)]
pub fn report_vm(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    node: u64,
    state: VmState,
    reason: Option<String>,
    generation: u64,
) -> KvResult<Outcome> {
    let outcome = update_vm(kv, project, name, |vm| {
        observe(vm, node, state, reason, generation);
        Ok(())
    })?;
    // A VM a drain moves has stopped on its node: it starts on the next.
    let key = format!("{PREFIX_VMS}{project}/{name}");
    if let Some(mut vm) = get_json::<VmRecord>(kv, &key)? {
        if let (Some(relocation), true) = (vm.relocation.clone(), vm.node_id == node) {
            if matches!(vm.state, VmState::Stopped | VmState::Crashed) {
                super::ha::relocated(kv, &mut vm, relocation)?;
                put_json(kv, &key, &vm)?;
                super::ha::finish_drain(kv, node)?;
                return Ok(Ok(serde_json::to_value(&vm).expect("serialisable")));
            }
        }
    }
    Ok(outcome)
}

/// What a node's report does to a VM's record. The rule between desired
/// and observed power lives here, not in the reconciler, which never
/// writes desired state: a VM its owner wants running, last seen running
/// (or paused), that its node now sees stopped or crashed has been powered
/// off from inside (the guest shut down, or it crashed) — its desired power
/// becomes `stopped`, and it stays off until someone starts it. This holds
/// too when the agent was down while it happened: the node compares with the
/// record, not with its memory. A report from another node (the VM moved)
/// or of an older generation than one already recorded is ignored.
pub fn observe(
    vm: &mut VmRecord,
    node: u64,
    state: VmState,
    reason: Option<String>,
    generation: u64,
) {
    if vm.node_id != node || generation < vm.observed_generation {
        return;
    }
    if vm.power == PowerState::Running
        && vm.relocation.is_none()
        && matches!(vm.state, VmState::Running | VmState::Paused)
        && matches!(state, VmState::Stopped | VmState::Crashed)
    {
        vm.power = PowerState::Stopped;
        vm.force_stop = false;
    }
    vm.state = state;
    vm.reason = reason;
    vm.observed_generation = generation;
}

/// Desired power: `running` starts the VM again where it was placed (if
/// its node still has room under `overcommit`); `stopped` asks it to stop.
pub fn set_power(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    power: PowerState,
    force: bool,
    overcommit: Overcommit,
) -> KvResult<Outcome> {
    if power == PowerState::Running {
        return start_vm(kv, project, name, overcommit);
    }
    update_vm(kv, project, name, |vm| {
        super::migration::refuse_while_migrating(vm)?;
        vm.power = power;
        vm.force_stop = force;
        Ok(())
    })
}

pub fn reboot_vm(kv: &mut KvWrite<'_>, project: &str, name: &str) -> KvResult<Outcome> {
    update_vm(kv, project, name, |vm| {
        super::migration::refuse_while_migrating(vm)?;
        if vm.power != PowerState::Running {
            return Err(domain(
                ErrorCode::FailedPrecondition,
                format!("VM {name:?} is stopped; start it instead"),
            ));
        }
        vm.reboots += 1;
        Ok(())
    })
}

/// Starting a stopped VM: its node must have room for it again.
fn start_vm(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    overcommit: Overcommit,
) -> KvResult<Outcome> {
    let key = format!("{PREFIX_VMS}{project}/{name}");
    let Some(vm) = get_json::<VmRecord>(kv, &key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("VM {name:?} does not exist in project {project:?}"),
        )));
    };
    if vm.power == PowerState::Stopped {
        let nodes = candidates(kv)?;
        if nodes
            .iter()
            .find(|n| n.id == vm.node_id)
            .is_none_or(|n| n.down)
        {
            // Its node is dead or unheard: it starts on another.
            let mut vm = vm;
            vm.power = PowerState::Running;
            return match super::ha::place(kv, &vm, overcommit)? {
                Ok(to) => {
                    super::ha::move_vm(kv, &mut vm, to)?;
                    vm.state = VmState::Creating;
                    vm.reason = None;
                    put_json(kv, &key, &vm)?;
                    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
                }
                Err(why) => Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("VM {name:?}'s node is down and no other can start it: {why}"),
                ))),
            };
        }
        if let Some(node) = nodes.iter().find(|n| n.id == vm.node_id) {
            let cpu = ((node.vcpus as f64 * overcommit.cpu) as u64).saturating_sub(node.used_vcpus);
            let memory = ((node.memory_bytes as f64 * overcommit.memory) as u64)
                .saturating_sub(node.used_memory_bytes);
            if cpu < vm.vcpus || memory < vm.memory_bytes {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "node {} has no room to start VM {name:?} ({cpu} vCPUs and {memory} bytes of memory free); stop another VM there first",
                        node.name
                    ),
                )));
            }
        }
    }
    update_vm(kv, project, name, |vm| {
        vm.power = PowerState::Running;
        vm.force_stop = false;
        Ok(())
    })
}

impl StateView {
    pub fn vms(&self, project: &str) -> Result<Vec<VmRecord>, ReadError> {
        self.list(&format!("{PREFIX_VMS}{project}/"))
    }

    pub fn vm(&self, project: &str, name: &str) -> Result<Option<VmRecord>, ReadError> {
        self.get(&format!("{PREFIX_VMS}{project}/{name}"))
    }
}

/// A VM record for tests: `vm-1` of project `p` on node 1, spec generation
/// 2 and observed as such.
#[cfg(test)]
pub(crate) fn sample_record(power: PowerState, state: VmState) -> VmRecord {
    VmRecord {
        id: "vm-1".into(),
        name: "web".into(),
        project: "p".into(),
        zone: Zone::default(),
        vcpus: 1,
        memory_bytes: 256 << 20,
        anti_affinity: None,
        node_id: 1,
        state,
        reason: None,
        volumes: Vec::new(),
        generation: 2,
        created_at_ms: 0,
        power,
        force_stop: false,
        reboots: 0,
        boot_volume: None,
        observed_generation: 2,
        nics: Vec::new(),
        restart_policy: Default::default(),
        priority: 0,
        last_restart: None,
        relocation: None,
        migration: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(power: PowerState, state: VmState) -> VmRecord {
        sample_record(power, state)
    }

    #[test]
    fn a_guest_seen_running_then_off_is_wanted_off_until_started() {
        for (last_seen, now_seen) in [
            (VmState::Running, VmState::Stopped),
            (VmState::Paused, VmState::Stopped),
            (VmState::Running, VmState::Crashed),
        ] {
            let mut vm = record(PowerState::Running, last_seen);
            observe(&mut vm, 1, now_seen, None, 2);
            assert_eq!((vm.power, vm.state), (PowerState::Stopped, now_seen));
        }
    }

    #[test]
    fn a_start_asked_during_a_stop_is_not_undone_by_the_stop_finishing() {
        let mut vm = record(PowerState::Running, VmState::Stopping);
        observe(&mut vm, 1, VmState::Stopped, None, 2);
        assert_eq!(
            (vm.power, vm.state),
            (PowerState::Running, VmState::Stopped)
        );
    }

    #[test]
    fn reports_from_another_node_or_an_older_generation_are_ignored() {
        let mut vm = record(PowerState::Running, VmState::Running);
        observe(&mut vm, 2, VmState::Stopped, None, 2);
        assert_eq!(vm, record(PowerState::Running, VmState::Running));
        observe(&mut vm, 1, VmState::Failed, Some("old".into()), 1);
        assert_eq!(vm, record(PowerState::Running, VmState::Running));
        observe(&mut vm, 1, VmState::Running, None, 3);
        assert_eq!(vm.observed_generation, 3);
    }
}
