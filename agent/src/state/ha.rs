//! High availability as the state machine decides it: each node's liveness
//! (as the leader's failure detection reports its transitions), and what a
//! node's death does to its VMs.
//!
//! When a node is declared dead, in the same transaction:
//! - every volume attached to one of its VMs gets a new writer epoch, so
//!   every replica refuses the old writer's I/O from the moment the new
//!   writer (or anyone holding the new epoch) speaks to it;
//! - its VMs wanted running are placed on other nodes by the scheduler's
//!   usual filters, highest priority first: `always` and `best-effort`
//!   ones restart there; an `always` one that fits nowhere waits (its
//!   `reason` says why) and is placed as soon as a node has room; a
//!   `best-effort` one that fits nowhere, and a `never` one, are stopped;
//! - its stopped VMs are moved where they fit, so that starting one later
//!   does not wait for a dead node.
//!
//! The node itself stops its VMs before it can be declared dead when it
//! cannot reach a quorum (self-fencing, in the compute reconciler), so no
//! restarted VM ever runs beside its old copy.

use allod_raft::{KvRead, KvWrite, NodeId};
use serde::{Deserialize, Serialize};

use super::nodes::NodeRecord;
use super::scheduler::{Overcommit, Request};
use super::vms::{PowerState, VmRecord, VmState};
use super::{get_json, put_json, Outcome, PREFIX_NODES, PREFIX_VMS};

type KvResult<T> = Result<T, allod_raft::KvError>;

/// A node as the leader's failure detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    #[default]
    Healthy,
    /// Unheard for longer than the suspect timeout: takes no new VMs.
    Suspect,
    /// Unheard for longer than the dead timeout: its VMs run elsewhere.
    Dead,
}

/// What an operator sees of a node (`allod node show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    #[default]
    Healthy,
    Suspect,
    Dead,
    Draining,
    Maintenance,
}

impl NodeHealth {
    pub fn of(node: &NodeRecord) -> Self {
        match node.liveness {
            Liveness::Dead => NodeHealth::Dead,
            Liveness::Suspect => NodeHealth::Suspect,
            Liveness::Healthy if node.draining => NodeHealth::Draining,
            Liveness::Healthy if node.maintenance => NodeHealth::Maintenance,
            Liveness::Healthy => NodeHealth::Healthy,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Healthy => "healthy",
            NodeHealth::Suspect => "suspect",
            NodeHealth::Dead => "dead",
            NodeHealth::Draining => "draining",
            NodeHealth::Maintenance => "maintenance",
        }
    }
}

/// What happens to a VM when its node dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restarted on another node; waits for room if none has it.
    #[default]
    Always,
    /// Restarted on another node if one has room then; else stopped.
    BestEffort,
    /// Stopped; its owner starts it again.
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::BestEffort => "best-effort",
            RestartPolicy::Never => "never",
        }
    }
}

/// A VM's restart on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Restart {
    /// When it was placed again (milliseconds since the epoch).
    pub at_ms: u64,
    /// The node it ran on.
    pub from_node: NodeId,
    /// The node it runs on now.
    pub to_node: NodeId,
    /// Why, in words.
    pub reason: String,
}

/// A move a drain asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Relocation {
    /// The node it goes to.
    pub to: NodeId,
    /// When the drain asked (milliseconds since the epoch).
    pub asked_at_ms: u64,
}

/// Commands of the failure detection and of VM mobility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HaCommand {
    /// The leader's failure detection saw a node change; only transitions
    /// are written. `dead` fails the node's VMs over.
    SetNodeLiveness {
        id: NodeId,
        liveness: Liveness,
        at_ms: u64,
        overcommit_cpu_percent: u32,
        overcommit_memory_percent: u32,
    },
    /// Places the VMs waiting for room, highest priority first.
    PlaceWaiting {
        at_ms: u64,
        overcommit_cpu_percent: u32,
        overcommit_memory_percent: u32,
    },
    /// Cordons a node and moves its VMs to others: refused, naming the VM
    /// and why, unless every VM it runs has a place. Running VMs restart
    /// there (their node stops them first), which needs
    /// `restart_unmovable`.
    Drain {
        id: NodeId,
        restart_unmovable: bool,
        at_ms: u64,
        overcommit_cpu_percent: u32,
        overcommit_memory_percent: u32,
    },
    /// Takes a node out of maintenance: it takes VMs again.
    Resume { id: NodeId },
}

pub fn apply(kv: &mut KvWrite<'_>, command: HaCommand) -> KvResult<Outcome> {
    match command {
        HaCommand::SetNodeLiveness {
            id,
            liveness,
            at_ms,
            overcommit_cpu_percent,
            overcommit_memory_percent,
        } => {
            let mut changed = false;
            let outcome = super::nodes::update_node(kv, id, |_, node| {
                if node.liveness != liveness {
                    node.liveness = liveness;
                    node.liveness_since_ms = at_ms;
                    changed = true;
                }
                Ok(Ok(()))
            })?;
            if outcome.is_ok() && changed {
                let overcommit =
                    Overcommit::from_percent(overcommit_cpu_percent, overcommit_memory_percent);
                if liveness == Liveness::Dead {
                    fail_over(kv, id, at_ms, overcommit)?;
                } else if liveness == Liveness::Healthy {
                    place_waiting(kv, at_ms, overcommit)?;
                }
            }
            Ok(outcome)
        }
        HaCommand::Drain {
            id,
            restart_unmovable,
            at_ms,
            overcommit_cpu_percent,
            overcommit_memory_percent,
        } => drain(
            kv,
            id,
            restart_unmovable,
            at_ms,
            Overcommit::from_percent(overcommit_cpu_percent, overcommit_memory_percent),
        ),
        HaCommand::Resume { id } => super::nodes::update_node(kv, id, |_, node| {
            node.maintenance = false;
            node.draining = false;
            Ok(Ok(()))
        }),
        HaCommand::PlaceWaiting {
            at_ms,
            overcommit_cpu_percent,
            overcommit_memory_percent,
        } => {
            let placed = place_waiting(
                kv,
                at_ms,
                Overcommit::from_percent(overcommit_cpu_percent, overcommit_memory_percent),
            )?;
            Ok(Ok(serde_json::json!({ "placed": placed })))
        }
    }
}

fn node_name(kv: &impl KvRead, id: NodeId) -> KvResult<String> {
    Ok(
        get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{id:020}"))?.map_or_else(
            || format!("node {id}"),
            |n| format!("{} (node {id})", n.name),
        ),
    )
}

/// Every VM record `keep` keeps, with its key.
pub(super) fn vms_where(
    kv: &impl KvRead,
    keep: impl Fn(&VmRecord) -> bool,
) -> KvResult<Vec<(String, VmRecord)>> {
    Ok(kv
        .scan(PREFIX_VMS)?
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_slice::<VmRecord>(&v).ok()?)))
        .filter(|(_, vm)| keep(vm))
        .collect())
}

/// VMs in restart order: highest priority first, then oldest first.
fn in_restart_order(mut vms: Vec<(String, VmRecord)>) -> Vec<(String, VmRecord)> {
    vms.sort_by(|(ka, a), (kb, b)| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at_ms.cmp(&b.created_at_ms))
            .then(ka.cmp(kb))
    });
    vms
}

fn request_of(vm: &VmRecord) -> Request {
    Request {
        zone: vm.zone,
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        anti_affinity: vm.anti_affinity.clone(),
    }
}

/// A node to run `vm` on, other than its own, or why none fits. A stopped
/// VM needs only a node it fits on empty, as at create.
pub(super) fn place(
    kv: &impl KvRead,
    vm: &VmRecord,
    overcommit: Overcommit,
) -> KvResult<Result<NodeId, String>> {
    let mut nodes = super::vms::candidates(kv)?;
    nodes.retain(|n| n.id != vm.node_id);
    if vm.power == PowerState::Stopped {
        for n in &mut nodes {
            n.used_vcpus = 0;
            n.used_memory_bytes = 0;
        }
    }
    Ok(super::scheduler::place(&nodes, &request_of(vm), overcommit).map_err(|r| r.to_string()))
}

/// Moves a VM's record to `to`: its NICs' ports follow it, and every volume
/// attached to it gets a new writer epoch held by `to`, which fences the
/// writer on the old node.
pub(super) fn move_vm(kv: &mut KvWrite<'_>, vm: &mut VmRecord, to: NodeId) -> KvResult<()> {
    vm.node_id = to;
    for nic in &vm.nics {
        super::network::move_port(kv, &vm.project, &nic.port, to)?;
    }
    for attachment in &vm.volumes {
        super::volumes::hand_over_lease(kv, &attachment.volume_id, Some(to))?;
    }
    Ok(())
}

/// What a node's death does to its VMs (see the module's description).
fn fail_over(
    kv: &mut KvWrite<'_>,
    dead: NodeId,
    at_ms: u64,
    overcommit: Overcommit,
) -> KvResult<()> {
    let dead_name = node_name(kv, dead)?;
    let vms = vms_where(kv, |vm| vm.node_id == dead)?;
    for (key, mut vm) in in_restart_order(vms) {
        if let Some(m) = vm.migration.as_mut().filter(|m| m.active()) {
            m.fail(format!("its node {dead_name} died"), at_ms);
        }
        // Whatever happens next, the dead node's writer is fenced now.
        for attachment in &vm.volumes {
            super::volumes::hand_over_lease(kv, &attachment.volume_id, None)?;
        }
        let placed = place(kv, &vm, overcommit)?;
        if vm.power == PowerState::Stopped {
            if let Ok(to) = placed {
                move_vm(kv, &mut vm, to)?;
                vm.state = VmState::Stopped;
                vm.reason = None;
            }
        } else {
            match (vm.restart_policy, placed) {
                (RestartPolicy::Never, _) => {
                    vm.power = PowerState::Stopped;
                    vm.state = VmState::Stopped;
                    vm.reason = Some(format!(
                        "its node {dead_name} died; its restart policy is never: `allod vm start` runs it on another node"
                    ));
                }
                (_, Ok(to)) => {
                    let reason = format!("its node {dead_name} died");
                    restart_on(kv, &mut vm, to, at_ms, reason)?;
                }
                (RestartPolicy::BestEffort, Err(why)) => {
                    vm.power = PowerState::Stopped;
                    vm.state = VmState::Stopped;
                    vm.reason = Some(format!(
                        "its node {dead_name} died and its restart policy is best-effort, but {why}"
                    ));
                }
                (RestartPolicy::Always, Err(why)) => {
                    vm.state = VmState::Waiting;
                    vm.reason = Some(format!(
                        "its node {dead_name} died; waiting for a node with room: {why}"
                    ));
                }
            }
        }
        put_json(kv, &key, &vm)?;
    }
    Ok(())
}

fn restart_on(
    kv: &mut KvWrite<'_>,
    vm: &mut VmRecord,
    to: NodeId,
    at_ms: u64,
    reason: String,
) -> KvResult<()> {
    let from = vm.node_id;
    move_vm(kv, vm, to)?;
    vm.state = VmState::Creating;
    vm.reason = None;
    vm.relocation = None;
    vm.last_restart = Some(Restart {
        at_ms,
        from_node: from,
        to_node: to,
        reason,
    });
    Ok(())
}

/// Cordons node `id` and moves its VMs (see [`HaCommand::Drain`]). The
/// placements are decided first, on a copy of the scheduler's view, so a
/// refusal changes nothing.
fn drain(
    kv: &mut KvWrite<'_>,
    id: NodeId,
    restart_unmovable: bool,
    at_ms: u64,
    overcommit: Overcommit,
) -> KvResult<Outcome> {
    let refuse = |message: String| {
        Ok(Err(super::domain(
            super::ErrorCode::FailedPrecondition,
            message,
        )))
    };
    let Some(record) = get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{id:020}"))? else {
        return Ok(Err(super::domain(
            super::ErrorCode::NotFound,
            format!("node {id} is not a member of this cluster"),
        )));
    };
    if record.liveness != Liveness::Healthy {
        return refuse(format!(
            "node {} is {}: its VMs are restarted elsewhere by the failure detection, not by a drain",
            record.name,
            NodeHealth::of(&record).as_str()
        ));
    }
    let vms = vms_where(kv, |vm| {
        vm.node_id == id && vm.relocation.is_none() && !super::migration::migrating(vm)
    })?;
    // Running guests migrate live when this node takes part in migration;
    // else they can move only by restarting.
    let live = super::migration::takes_part(kv, id)?;
    let running: Vec<&VmRecord> = vms
        .iter()
        .map(|(_, vm)| vm)
        .filter(|vm| vm.power == PowerState::Running)
        .collect();
    if !live && !running.is_empty() && !restart_unmovable {
        let names: Vec<String> = running
            .iter()
            .map(|vm| format!("{}/{}", vm.project, vm.name))
            .collect();
        return refuse(format!(
            "node {} runs {} VM(s) that can move only by restarting on another node (their guests reboot; \
             the node takes no part in live migration): {}; drain with --restart-unmovable to do that",
            record.name,
            running.len(),
            names.join(", ")
        ));
    }
    // Where each running VM goes, highest priority first, each placement
    // taking its room before the next is decided.
    let mut nodes = super::vms::candidates(kv)?;
    nodes.retain(|n| n.id != id);
    let mut migrating_to = Vec::new();
    for n in &nodes {
        if live && super::migration::takes_part(kv, n.id)? {
            migrating_to.push(n.id);
        }
    }
    let mut plan = Vec::new();
    for (key, vm) in in_restart_order(vms) {
        if vm.power != PowerState::Running {
            plan.push((key, vm, None));
            continue;
        }
        let how = if matches!(
            vm.state,
            VmState::Stopped | VmState::Crashed | VmState::Failed | VmState::Waiting
        ) {
            Move::Now
        } else if live {
            Move::Live
        } else {
            Move::Restart
        };
        let mut eligible = nodes.clone();
        if how == Move::Live {
            eligible.retain(|n| migrating_to.contains(&n.id));
        }
        match super::scheduler::place(&eligible, &request_of(&vm), overcommit) {
            Ok(to) => {
                nodes
                    .iter_mut()
                    .find(|n| n.id == to)
                    .expect("placed there")
                    .hold(&vm);
                plan.push((key, vm, Some((to, how))));
            }
            Err(why) => {
                return refuse(format!(
                    "cannot drain node {}: VM {}/{} fits on no other node: {why}",
                    record.name, vm.project, vm.name
                ))
            }
        }
    }
    let mut moving = 0;
    for (key, mut vm, to) in plan {
        match to {
            // Not running there (crashed, failed): it starts on its new
            // node at once.
            Some((to, Move::Now)) => {
                let relocation = Relocation {
                    to,
                    asked_at_ms: at_ms,
                };
                relocated(kv, &mut vm, relocation)?;
            }
            // Without live migration: stopped here, started there.
            Some((to, Move::Restart)) => {
                vm.relocation = Some(Relocation {
                    to,
                    asked_at_ms: at_ms,
                });
                moving += 1;
            }
            Some((to, Move::Live)) => {
                let why = format!("its node {} was drained", record.name);
                super::migration::begin(&mut vm, to, why, at_ms);
                moving += 1;
            }
            // A stopped VM moves at once where it would fit, so that it
            // can start while this node is away; else it stays.
            None => match place(kv, &vm, overcommit)? {
                Ok(to) => move_vm(kv, &mut vm, to)?,
                Err(_) => continue,
            },
        }
        put_json(kv, &key, &vm)?;
    }
    super::nodes::update_node(kv, id, |_, node| {
        node.maintenance = true;
        node.draining = moving > 0;
        Ok(Ok(()))
    })
}

/// How a drain moves a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// It does not run there (crashed, failed): it starts on its new node
    /// at once.
    Now,
    /// Stopped on its node, then started on the new one.
    Restart,
    /// Live migration: its guest runs on.
    Live,
}

/// A VM a drain moves has stopped on its node: it starts on `to`.
pub(super) fn relocated(
    kv: &mut KvWrite<'_>,
    vm: &mut VmRecord,
    relocation: Relocation,
) -> KvResult<()> {
    let from = node_name(kv, vm.node_id)?;
    let reason = format!("its node {from} was drained");
    // Its power stays as its owner wants it: one stopped during the drain
    // is only defined on its new node.
    restart_on(kv, vm, relocation.to, relocation.asked_at_ms, reason)
}

/// Ends node `id`'s drain once none of its VMs is still moving.
pub(super) fn finish_drain(kv: &mut KvWrite<'_>, id: NodeId) -> KvResult<()> {
    let moving = |vm: &VmRecord| {
        vm.node_id == id && (vm.relocation.is_some() || super::migration::migrating(vm))
    };
    if vms_where(kv, moving)?.is_empty() {
        // The node may have been removed meanwhile: nothing to end then.
        let _ = super::nodes::update_node(kv, id, |_, node| {
            node.draining = false;
            Ok(Ok(()))
        })?;
    }
    Ok(())
}

/// Places every VM waiting for room that now fits somewhere, highest
/// priority first; the number placed.
fn place_waiting(kv: &mut KvWrite<'_>, at_ms: u64, overcommit: Overcommit) -> KvResult<usize> {
    let waiting = vms_where(kv, |vm| {
        vm.state == VmState::Waiting && vm.power == PowerState::Running
    })?;
    let mut placed = 0;
    for (key, mut vm) in in_restart_order(waiting) {
        let own = get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{:020}", vm.node_id))?;
        if own.is_some_and(|n| n.liveness == Liveness::Healthy) {
            // Its node came back: it runs there again.
            vm.state = VmState::Creating;
            vm.reason = None;
        } else if let Ok(to) = place(kv, &vm, overcommit)? {
            let reason = vm.reason.take().unwrap_or_default();
            let reason = reason
                .split_once(';')
                .map_or(reason.as_str(), |(died, _)| died)
                .to_string();
            restart_on(kv, &mut vm, to, at_ms, reason)?;
        } else {
            continue;
        }
        placed += 1;
        put_json(kv, &key, &vm)?;
    }
    Ok(placed)
}

impl super::StateView {
    /// Whether some VM waits for a node with room.
    pub fn any_vm_waiting(&self) -> Result<bool, super::ReadError> {
        Ok(self
            .list::<VmRecord>(PREFIX_VMS)?
            .iter()
            .any(|vm| vm.state == VmState::Waiting))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::state::network::PortRecord;
    use crate::state::vms::{sample_record, Attachment, VmNic};
    use crate::state::volumes::{VolumeRecord, PREFIX_VOLUME_IDS};
    use crate::state::PREFIX_VOLUMES;

    const GIB: u64 = 1 << 30;
    /// No overcommit, so that room is easy to reason about.
    pub(in crate::state) const EXACT: (u32, u32) = (100, 100);

    pub(in crate::state) fn add_node(kv: &mut KvWrite<'_>, id: NodeId, vcpus: u64) {
        let node: NodeRecord = serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("n{id}"), "joined_at_ms": 0,
            "vcpus": vcpus, "memory_bytes": 64 * GIB,
        }))
        .unwrap();
        put_json(kv, &format!("{PREFIX_NODES}{id:020}"), &node).unwrap();
    }

    /// A VM running on `node` with one volume (`<name>-disk`, written by
    /// `node` at epoch 3) and one NIC port.
    pub(in crate::state) fn add_vm(
        kv: &mut KvWrite<'_>,
        name: &str,
        node: NodeId,
        vcpus: u64,
        policy: RestartPolicy,
        priority: i32,
    ) {
        let mut vm = sample_record(PowerState::Running, VmState::Running);
        vm.id = format!("id-{name}");
        vm.name = name.into();
        vm.node_id = node;
        vm.vcpus = vcpus;
        vm.restart_policy = policy;
        vm.priority = priority;
        let volume: VolumeRecord = serde_json::from_value(serde_json::json!({
            "id": format!("vol-{name}"), "name": format!("{name}-disk"), "project": "p",
            "size_bytes": GIB, "replicas": 2, "object_size_bytes": 4 << 20,
            "state": "in-use", "zone": "OFFICIAL", "created_at_ms": 0,
            "attached_to": vm.id, "lease": { "node": node, "epoch": 3 },
        }))
        .unwrap();
        put_json(
            kv,
            &format!("{PREFIX_VOLUME_IDS}{}", volume.id),
            &format!("p/{}", volume.name),
        )
        .unwrap();
        put_json(kv, &format!("{PREFIX_VOLUMES}p/{}", volume.name), &volume).unwrap();
        vm.volumes.push(Attachment {
            project: "p".into(),
            volume: volume.name.clone(),
            volume_id: volume.id.clone(),
        });
        let port: PortRecord = serde_json::from_value(serde_json::json!({
            "id": format!("port-{name}"), "name": format!("{name}-nic0"), "project": "p",
            "vpc": "v", "subnet": "s", "mac": "02:00:00:00:00:01", "ip": "10.0.0.5",
            "security_groups": [], "node": node, "vm": name, "host_interface": "tap0",
        }))
        .unwrap();
        put_json(kv, &format!("net/ports/p/{}", port.name), &port).unwrap();
        vm.nics.push(VmNic {
            port: port.name,
            vpc: "v".into(),
            subnet: "s".into(),
            mac: port.mac,
            ip: "10.0.0.5".into(),
        });
        put_json(kv, &format!("{PREFIX_VMS}p/{name}"), &vm).unwrap();
    }

    pub(in crate::state) fn vm(kv: &KvWrite<'_>, name: &str) -> VmRecord {
        get_json(kv, &format!("{PREFIX_VMS}p/{name}"))
            .unwrap()
            .unwrap()
    }

    pub(in crate::state) fn lease(kv: &KvWrite<'_>, name: &str) -> (NodeId, u64) {
        let v: VolumeRecord = get_json(kv, &format!("{PREFIX_VOLUMES}p/{name}-disk"))
            .unwrap()
            .unwrap();
        let l = v.lease.unwrap();
        (l.node, l.epoch)
    }

    pub(in crate::state) fn port_node(kv: &KvWrite<'_>, name: &str) -> NodeId {
        get_json::<PortRecord>(kv, &format!("net/ports/p/{name}-nic0"))
            .unwrap()
            .unwrap()
            .node
    }

    pub(in crate::state) fn set(
        kv: &mut KvWrite<'_>,
        id: NodeId,
        liveness: Liveness,
        at_ms: u64,
    ) -> Outcome {
        apply(
            kv,
            HaCommand::SetNodeLiveness {
                id,
                liveness,
                at_ms,
                overcommit_cpu_percent: EXACT.0,
                overcommit_memory_percent: EXACT.1,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_dead_nodes_vms_restart_elsewhere_by_priority_and_their_old_writer_is_fenced() {
        allod_raft::scratch_kv(|kv| {
            for id in 1..=3 {
                add_node(kv, id, 2);
            }
            // Nodes 2 and 3 have room for one 2-vCPU VM each.
            add_vm(kv, "low", 1, 2, RestartPolicy::Always, 0);
            add_vm(kv, "high", 1, 2, RestartPolicy::Always, 10);
            add_vm(kv, "mid", 1, 2, RestartPolicy::BestEffort, 5);
            add_vm(kv, "pet", 1, 1, RestartPolicy::Never, 100);
            let mut off = sample_record(PowerState::Stopped, VmState::Stopped);
            (off.id, off.name, off.node_id, off.vcpus) = ("id-off".into(), "off".into(), 1, 2);
            put_json(kv, &format!("{PREFIX_VMS}p/off"), &off).unwrap();

            set(kv, 1, Liveness::Suspect, 1_000).unwrap();
            // Suspect: nothing moves yet.
            assert_eq!(vm(kv, "high").node_id, 1);
            let node = set(kv, 1, Liveness::Dead, 2_000).unwrap();
            assert_eq!(node["health"], "dead");
            assert_eq!(node["liveness_since_ms"], 2_000);

            let high = vm(kv, "high");
            assert_eq!((high.node_id, high.state), (2, VmState::Creating));
            let restart = high.last_restart.unwrap();
            assert_eq!(
                (restart.from_node, restart.to_node, restart.at_ms),
                (1, 2, 2_000)
            );
            assert!(
                restart.reason.contains("n1 (node 1) died"),
                "{}",
                restart.reason
            );
            assert_eq!(port_node(kv, "high"), 2);
            let (holder, epoch) = lease(kv, "high");
            assert_eq!(holder, 2);
            assert!(epoch > 3, "the old writer's epoch 3 is fenced: {epoch}");

            let mid = vm(kv, "mid");
            assert_eq!(
                (mid.node_id, mid.state, mid.power),
                (3, VmState::Creating, PowerState::Running)
            );
            assert_eq!(port_node(kv, "mid"), 3);

            // No room left: `always` waits, saying why, and its writer is
            // fenced all the same.
            let low = vm(kv, "low");
            assert_eq!(
                (low.node_id, low.state, low.power),
                (1, VmState::Waiting, PowerState::Running)
            );
            assert!(
                low.reason
                    .as_deref()
                    .unwrap()
                    .contains("without enough free vCPUs"),
                "{:?}",
                low.reason
            );
            assert_eq!(lease(kv, "low"), (0, 4));

            let pet = vm(kv, "pet");
            assert_eq!(
                (pet.state, pet.power),
                (VmState::Stopped, PowerState::Stopped)
            );
            assert!(pet
                .reason
                .as_deref()
                .unwrap()
                .contains("restart policy is never"));
            assert!(pet.last_restart.is_none());
            assert_eq!(lease(kv, "pet"), (0, 4));

            // A stopped VM only needs a node it would fit empty.
            assert_ne!(vm(kv, "off").node_id, 1);

            // Written again (a new leader repeating it): nothing changes.
            let before = vm(kv, "high");
            set(kv, 1, Liveness::Dead, 3_000).unwrap();
            assert_eq!(vm(kv, "high"), before);
            assert_eq!(lease(kv, "low"), (0, 4));

            // The node comes back: the waiting VM runs there again.
            set(kv, 1, Liveness::Healthy, 4_000).unwrap();
            let low = vm(kv, "low");
            assert_eq!((low.node_id, low.state), (1, VmState::Creating));
        });
    }

    #[test]
    fn a_waiting_vm_is_placed_once_a_node_has_room_and_a_best_effort_one_is_stopped() {
        allod_raft::scratch_kv(|kv| {
            add_node(kv, 1, 4);
            add_node(kv, 2, 1);
            add_vm(kv, "big", 1, 2, RestartPolicy::Always, 0);
            add_vm(kv, "maybe", 1, 2, RestartPolicy::BestEffort, 0);
            set(kv, 1, Liveness::Dead, 1_000).unwrap();
            assert_eq!(vm(kv, "big").state, VmState::Waiting);
            let maybe = vm(kv, "maybe");
            assert_eq!(
                (maybe.state, maybe.power),
                (VmState::Stopped, PowerState::Stopped)
            );
            assert!(maybe.reason.unwrap().contains("best-effort"));

            let place = |kv: &mut KvWrite<'_>, at_ms| {
                apply(
                    kv,
                    HaCommand::PlaceWaiting {
                        at_ms,
                        overcommit_cpu_percent: EXACT.0,
                        overcommit_memory_percent: EXACT.1,
                    },
                )
                .unwrap()
                .unwrap()
            };
            assert_eq!(place(kv, 2_000)["placed"], 0);
            // A suspect node with room takes nothing.
            add_node(kv, 3, 8);
            set(kv, 3, Liveness::Suspect, 2_500).unwrap();
            assert_eq!(place(kv, 3_000)["placed"], 0);
            set(kv, 3, Liveness::Healthy, 3_500).unwrap();
            let big = vm(kv, "big");
            assert_eq!((big.node_id, big.state), (3, VmState::Creating));
            let restart = big.last_restart.unwrap();
            assert_eq!((restart.from_node, restart.at_ms), (1, 3_500));
            assert_eq!(restart.reason, "its node n1 (node 1) died");
            assert_eq!(lease(kv, "big").0, 3);
        });
    }

    #[test]
    fn starting_a_stopped_vm_whose_node_is_dead_starts_it_on_another() {
        allod_raft::scratch_kv(|kv| {
            add_node(kv, 1, 2);
            add_node(kv, 2, 2);
            add_vm(kv, "pet", 1, 1, RestartPolicy::Never, 0);
            set(kv, 1, Liveness::Dead, 1_000).unwrap();
            assert_eq!(vm(kv, "pet").power, PowerState::Stopped);
            crate::state::vms::set_power(
                kv,
                "p",
                "pet",
                PowerState::Running,
                false,
                Overcommit::from_percent(EXACT.0, EXACT.1),
            )
            .unwrap()
            .unwrap();
            let pet = vm(kv, "pet");
            assert_eq!(
                (pet.node_id, pet.power, pet.state),
                (2, PowerState::Running, VmState::Creating)
            );
            assert_eq!(lease(kv, "pet").0, 2);
            assert_eq!(port_node(kv, "pet"), 2);
        });
    }

    fn drain(kv: &mut KvWrite<'_>, id: NodeId, restart_unmovable: bool) -> Outcome {
        apply(
            kv,
            HaCommand::Drain {
                id,
                restart_unmovable,
                at_ms: 7_000,
                overcommit_cpu_percent: EXACT.0,
                overcommit_memory_percent: EXACT.1,
            },
        )
        .unwrap()
    }

    fn node_health(kv: &KvWrite<'_>, id: NodeId) -> NodeHealth {
        get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{id:020}"))
            .unwrap()
            .unwrap()
            .health
    }

    #[test]
    fn a_drain_is_refused_naming_the_vm_that_has_no_place_and_changes_nothing() {
        allod_raft::scratch_kv(|kv| {
            add_node(kv, 1, 4);
            add_node(kv, 2, 2);
            add_vm(kv, "a", 1, 2, RestartPolicy::Always, 0);
            add_vm(kv, "b", 1, 2, RestartPolicy::Always, 0);
            let e = drain(kv, 1, false).unwrap_err();
            assert!(e.message.contains("p/a, p/b"), "{}", e.message);
            assert!(e.message.contains("--restart-unmovable"), "{}", e.message);
            let e = drain(kv, 1, true).unwrap_err();
            assert!(
                e.message.contains("VM p/b fits on no other node")
                    && e.message.contains("without enough free vCPUs"),
                "{}",
                e.message
            );
            assert!(vm(kv, "a").relocation.is_none(), "nothing changed");
            assert_eq!(node_health(kv, 1), NodeHealth::Healthy);
        });
    }

    #[test]
    fn a_drain_stops_each_vm_on_its_node_then_starts_it_on_the_next() {
        allod_raft::scratch_kv(|kv| {
            add_node(kv, 1, 4);
            add_node(kv, 2, 2);
            add_node(kv, 3, 2);
            add_vm(kv, "a", 1, 2, RestartPolicy::Always, 0);
            add_vm(kv, "b", 1, 2, RestartPolicy::Never, 0);
            let node = drain(kv, 1, true).unwrap();
            assert_eq!(node["health"], "draining");
            let (a, b) = (vm(kv, "a"), vm(kv, "b"));
            let (to_a, to_b) = (a.relocation.unwrap().to, b.relocation.unwrap().to);
            assert_eq!(
                std::collections::BTreeSet::from([to_a, to_b]),
                [2, 3].into(),
                "each has its own room"
            );
            // Still on node 1 until it has stopped there.
            assert_eq!((a.node_id, lease(kv, "a")), (1, (1, 3)));
            // Its node reports it stopping, then stopped.
            let report = |kv: &mut KvWrite<'_>, name: &str, state| {
                crate::state::vms::report_vm(kv, "p", name, 1, state, None, 2)
                    .unwrap()
                    .unwrap()
            };
            report(kv, "a", VmState::Stopping);
            assert_eq!(vm(kv, "a").node_id, 1);
            report(kv, "a", VmState::Stopped);
            let a = vm(kv, "a");
            assert_eq!(
                (a.node_id, a.state, a.power),
                (to_a, VmState::Creating, PowerState::Running),
                "a stop for a move is not the guest powering off"
            );
            assert!(a.relocation.is_none());
            assert_eq!(a.last_restart.unwrap().at_ms, 7_000);
            assert_eq!(lease(kv, "a").0, to_a);
            assert_eq!(port_node(kv, "a"), to_a);
            assert_eq!(node_health(kv, 1), NodeHealth::Draining);
            report(kv, "b", VmState::Stopped);
            assert_eq!(vm(kv, "b").node_id, to_b);
            assert_eq!(node_health(kv, 1), NodeHealth::Maintenance);
            // In maintenance it takes nothing until resumed.
            let e = drain(kv, 2, true).unwrap_err();
            assert!(e.message.contains("1 in maintenance"), "{}", e.message);
            apply(kv, HaCommand::Resume { id: 1 }).unwrap().unwrap();
            assert_eq!(node_health(kv, 1), NodeHealth::Healthy);
        });
    }
}
