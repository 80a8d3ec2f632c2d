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
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
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
        get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{id:020}"))?
            .map_or_else(|| format!("node {id}"), |n| format!("{} (node {id})", n.name)),
    )
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
    let vms: Vec<(String, VmRecord)> = kv
        .scan(PREFIX_VMS)?
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_slice::<VmRecord>(&v).ok()?)))
        .filter(|(_, vm)| vm.node_id == dead)
        .collect();
    for (key, mut vm) in in_restart_order(vms) {
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
    vm.last_restart = Some(Restart {
        at_ms,
        from_node: from,
        to_node: to,
        reason,
    });
    Ok(())
}

/// Places every VM waiting for room that now fits somewhere, highest
/// priority first; the number placed.
fn place_waiting(kv: &mut KvWrite<'_>, at_ms: u64, overcommit: Overcommit) -> KvResult<usize> {
    let waiting: Vec<(String, VmRecord)> = kv
        .scan(PREFIX_VMS)?
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_slice::<VmRecord>(&v).ok()?)))
        .filter(|(_, vm)| vm.state == VmState::Waiting && vm.power == PowerState::Running)
        .collect();
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
