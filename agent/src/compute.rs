//! VM records as the state machine changes them: placement happens where
//! the create applies, in log order, from the state every replica holds, so
//! two concurrent creates can neither overfill a node nor break a quota, and
//! every replica picks the same node.

use std::collections::BTreeMap;

use allod_raft::{KvRead, KvWrite};

use crate::model::{
    domain, get_json, put_json, Attachment, ErrorCode, NodeRecord, Outcome, Project, VmRecord,
    VolumeRecord, PREFIX_NODES, PREFIX_PROJECTS, PREFIX_VMS, PREFIX_VOLUMES,
};
use crate::scheduler::{Candidate, Overcommit, Request};

type KvResult<T> = Result<T, allod_raft::KvError>;

/// The scheduler's view of every node: capacity and what is placed there.
fn candidates(kv: &impl KvRead) -> KvResult<Vec<Candidate>> {
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
                schedulable: node.vcpus > 0 && node.memory_bytes > 0 && !node.maintenance,
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
        if vm.power == "stopped" {
            continue;
        }
        if let Some(node) = nodes.get_mut(&vm.node_id) {
            node.used_vcpus += vm.vcpus;
            node.used_memory_bytes += vm.memory_bytes;
            if let Some(group) = vm.anti_affinity {
                *node.groups.entry(group).or_default() += 1;
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
    nics: Vec<crate::network::PortRecord>,
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
    if vm.power == "stopped" {
        // Only defined: it must fit a node, but reserves room only when started.
        for n in &mut nodes {
            n.used_vcpus = 0;
            n.used_memory_bytes = 0;
        }
    }
    let node_id = match crate::scheduler::place(&nodes, &request, overcommit) {
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
            crate::network::delete_port(kv, &vm.project, &nic.port)?;
        }
        Ok(())
    };
    for mut port in nics {
        port.node = node_id;
        port.vm = Some(vm.name.clone());
        match crate::network::create_port(kv, port)? {
            Ok(v) => {
                let port: crate::network::PortRecord =
                    serde_json::from_value(v).expect("a port record");
                vm.nics.push(crate::model::VmNic {
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
        volume.state = "in-use".into();
        let created = crate::volumes::create_volume(
            kv,
            volume,
            Some(crate::volumes::VolumeSource::Image { name: boot.image }),
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
    // Its boot volume and its NICs go with it; other volumes stay, detached.
    record.usage = record.usage.minus(&vm.usage());
    put_json(kv, &project_key, &record)?;
    for nic in &vm.nics {
        crate::network::delete_port(kv, project, &nic.port)?;
    }
    for attachment in &vm.volumes {
        let volume_key = format!(
            "{PREFIX_VOLUMES}{}/{}",
            attachment.project, attachment.volume
        );
        if let Some(mut volume) = get_json::<VolumeRecord>(kv, &volume_key)? {
            volume.attached_to = None;
            volume.state = "available".into();
            put_json(kv, &volume_key, &volume)?;
            if vm.boot_volume.as_deref() == Some(volume.id.as_str()) {
                let deleted =
                    crate::volumes::delete_volume(kv, &attachment.project, &attachment.volume)?;
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
    if attach {
        if let Err(why) = crate::zones::may_connect(vm.zone, volume.zone) {
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
        volume.state = "in-use".into();
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
        volume.attached_to = None;
        volume.state = "available".into();
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
    change: impl FnOnce(&mut VmRecord) -> Result<(), crate::model::DomainError>,
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
    if vm.power != "stopped" || vm.state != "stopped" {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "VM {name:?} must be stopped to change its vCPUs or memory (it is {})",
                vm.state
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
    state: String,
    reason: Option<String>,
    generation: u64,
) -> KvResult<Outcome> {
    update_vm(kv, project, name, |vm| {
        if vm.node_id == node {
            vm.state = state;
            vm.reason = reason;
            vm.observed_generation = generation;
        }
        Ok(())
    })
}

/// Starting a stopped VM: its node must have room for it again.
pub fn start_vm(
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
    if vm.power == "stopped" {
        let nodes = candidates(kv)?;
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
        vm.power = "running".into();
        vm.force_stop = false;
        Ok(())
    })
}
