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

pub fn create_vm(kv: &mut KvWrite<'_>, vm: VmRecord, overcommit: Overcommit) -> KvResult<Outcome> {
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
    let node_id = match crate::scheduler::place(&candidates(kv)?, &request, overcommit) {
        Ok(id) => id,
        Err(refusal) => {
            return Ok(Err(domain(
                ErrorCode::FailedPrecondition,
                refusal.to_string(),
            )))
        }
    };
    let vm = VmRecord {
        zone: project.zone,
        node_id,
        ..vm
    };
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
    // Its volumes stay, detached.
    for attachment in &vm.volumes {
        let volume_key = format!(
            "{PREFIX_VOLUMES}{}/{}",
            attachment.project, attachment.volume
        );
        if let Some(mut volume) = get_json::<VolumeRecord>(kv, &volume_key)? {
            volume.attached_to = None;
            volume.state = "available".into();
            put_json(kv, &volume_key, &volume)?;
        }
    }
    record.usage = record.usage.minus(&vm.usage());
    put_json(kv, &project_key, &record)?;
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
