//! Live migration: a running VM moves to another node while its guest runs.
//!
//! The record of a migration lives on its VM (`migration`), through these
//! phases:
//! - `copying`: the source node's libvirt sends the guest's memory to the
//!   destination's, which holds the incoming guest paused and serves its
//!   disks in standby (it takes no writer lease); progress is recorded
//!   about once a second.
//! - `resuming`: the source paused the guest and its libvirt handed it
//!   over. The source node alone decides this ([`MigrationCommand::Switched`]):
//!   in the same transaction the VM moves to the destination, its ports
//!   follow and every attached volume gets a new writer epoch held by the
//!   destination, which fences the source's writer. Only then does the
//!   destination resume the guest; its first disk request takes the lease.
//! - `done`, with the downtime (from the pause on the source to the resume
//!   on the destination), or `failed`, with why: the guest then runs on as
//!   before, on its node.
//!
//! A node takes part only if its agent says how other nodes' libvirt
//! reaches its own (`migration` on its record).

use allod_raft::{KvError, KvRead, KvWrite, NodeId};
use serde::{Deserialize, Serialize};

use super::nodes::NodeRecord;
use super::scheduler::Overcommit;
use super::vms::{PowerState, VmRecord, VmState};
use super::{domain, get_json, put_json, ErrorCode, Outcome, PREFIX_NODES, PREFIX_VMS};

type KvResult<T> = Result<T, KvError>;

/// Where a migration is (see the module's description).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Copying,
    Resuming,
    Done,
    Failed,
}

/// A VM's live migration: the one running, or the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Migration {
    pub from: NodeId,
    pub to: NodeId,
    /// `copying`, `resuming`, `done` or `failed`.
    #[schema(value_type = String)]
    pub phase: Phase,
    /// Who or what asked for it, in words.
    pub why: String,
    pub started_at_ms: u64,
    /// The guest's memory, and how much of it was sent and is left (sent
    /// grows past the total when pages the guest wrote again are resent).
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_remaining: u64,
    /// When the source paused the guest for the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_ms: Option<u64>,
    /// How long the guest was paused, once it runs on the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Migration {
    /// Still under way.
    pub fn active(&self) -> bool {
        matches!(self.phase, Phase::Copying | Phase::Resuming)
    }

    /// Ends it as failed.
    pub fn fail(&mut self, error: String, at_ms: u64) {
        self.phase = Phase::Failed;
        self.error = Some(error);
        self.finished_at_ms = Some(at_ms);
    }
}

/// How a migrating VM reaches a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoint {
    /// The URI other nodes' libvirt daemons reach this node's at.
    pub libvirt_uri: String,
    /// Where this node keeps its guests' console logs.
    pub console_dir: String,
}

/// Whether a VM is being migrated.
pub fn migrating(vm: &VmRecord) -> bool {
    vm.migration.as_ref().is_some_and(|m| m.active())
}

/// The refusal of a change a migration in progress does not allow.
pub fn refuse_while_migrating(vm: &VmRecord) -> Result<(), super::DomainError> {
    match &vm.migration {
        Some(m) if m.active() => Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "VM {:?} is being migrated from node {} to node {} ({}); try again once `allod vm show` says it is done",
                vm.name,
                m.from,
                m.to,
                match m.phase {
                    Phase::Copying => "copying its memory",
                    _ => "resuming on its new node",
                }
            ),
        )),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MigrationCommand {
    /// An operator moves a running VM to node `to`, or to the node the
    /// scheduler picks among those that take part.
    Start {
        project: String,
        name: String,
        to: Option<NodeId>,
        at_ms: u64,
        overcommit_cpu_percent: u32,
        overcommit_memory_percent: u32,
    },
    /// The source node's view of how far it is.
    Progress {
        vm_id: String,
        node: NodeId,
        bytes_total: u64,
        bytes_sent: u64,
        bytes_remaining: u64,
    },
    /// The source node's libvirt handed the paused guest over: the VM,
    /// its ports and its disks' writer move to the destination.
    Switched {
        vm_id: String,
        node: NodeId,
        paused_at_ms: u64,
    },
    /// The migration failed; the guest runs on where it ran.
    Failed {
        vm_id: String,
        node: NodeId,
        error: String,
        at_ms: u64,
    },
    /// The destination resumed the guest.
    Resumed {
        vm_id: String,
        node: NodeId,
        at_ms: u64,
    },
    /// How a migrating VM reaches node `id` (`None`: it takes no part in
    /// migrations).
    SetEndpoint {
        id: NodeId,
        endpoint: Option<Endpoint>,
    },
}

pub fn apply(kv: &mut KvWrite<'_>, command: MigrationCommand) -> KvResult<Outcome> {
    match command {
        MigrationCommand::Start {
            project,
            name,
            to,
            at_ms,
            overcommit_cpu_percent,
            overcommit_memory_percent,
        } => {
            let overcommit =
                Overcommit::from_percent(overcommit_cpu_percent, overcommit_memory_percent);
            start(kv, &project, &name, to, at_ms, overcommit)
        }
        MigrationCommand::Progress {
            vm_id,
            node,
            bytes_total,
            bytes_sent,
            bytes_remaining,
        } => update(kv, &vm_id, |vm| {
            let Some(m) = vm.migration.as_mut() else {
                return Ok(());
            };
            if m.phase == Phase::Copying && m.from == node && vm.node_id == node {
                m.bytes_total = bytes_total;
                m.bytes_sent = bytes_sent;
                m.bytes_remaining = bytes_remaining;
            }
            Ok(())
        }),
        MigrationCommand::Switched {
            vm_id,
            node,
            paused_at_ms,
        } => switched(kv, &vm_id, node, paused_at_ms),
        MigrationCommand::Failed {
            vm_id,
            node,
            error,
            at_ms,
        } => {
            let mut from = None;
            let outcome = update(kv, &vm_id, |vm| {
                let on_node = vm.node_id == node;
                if let Some(m) = vm.migration.as_mut().filter(|m| m.active() && on_node) {
                    from = Some(m.from);
                    m.fail(error, at_ms);
                }
                Ok(())
            })?;
            if let Some(from) = from {
                super::ha::finish_drain(kv, from)?;
            }
            Ok(outcome)
        }
        MigrationCommand::Resumed { vm_id, node, at_ms } => update(kv, &vm_id, |vm| {
            let on_node = vm.node_id == node;
            if let Some(m) = vm
                .migration
                .as_mut()
                .filter(|m| m.phase == Phase::Resuming && m.to == node && on_node)
            {
                m.phase = Phase::Done;
                m.downtime_ms = m.paused_at_ms.map(|p| at_ms.saturating_sub(p));
                m.finished_at_ms = Some(at_ms);
            }
            Ok(())
        }),
        MigrationCommand::SetEndpoint { id, endpoint } => {
            super::nodes::update_node(kv, id, |_, node| {
                node.migration = endpoint;
                Ok(Ok(()))
            })
        }
    }
}

/// Changes the VM with id `vm_id` (nothing if it is gone).
fn update(
    kv: &mut KvWrite<'_>,
    vm_id: &str,
    change: impl FnOnce(&mut VmRecord) -> Result<(), super::DomainError>,
) -> KvResult<Outcome> {
    let Some((key, mut vm)) = vm_by_id(kv, vm_id)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("no VM has the id {vm_id:?}"),
        )));
    };
    if let Err(refused) = change(&mut vm) {
        return Ok(Err(refused));
    }
    put_json(kv, &key, &vm)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

fn vm_by_id(kv: &impl KvRead, vm_id: &str) -> KvResult<Option<(String, VmRecord)>> {
    Ok(super::ha::vms_where(kv, |vm| vm.id == vm_id)?
        .into_iter()
        .next())
}

fn node_record(kv: &impl KvRead, id: NodeId) -> KvResult<Option<NodeRecord>> {
    get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{id:020}"))
}

/// The scheduler's view of the nodes `vm` may migrate to: those that take
/// part in migrations, other than its own.
pub(super) fn targets(
    kv: &impl KvRead,
    vm: &VmRecord,
) -> KvResult<Vec<super::scheduler::Candidate>> {
    let mut nodes = super::vms::candidates(kv)?;
    let mut keep = Vec::new();
    for n in nodes.drain(..) {
        let takes_part = node_record(kv, n.id)?.is_some_and(|r| r.migration.is_some());
        if n.id != vm.node_id && takes_part {
            keep.push(n);
        }
    }
    Ok(keep)
}

/// Whether VMs can migrate off node `id` at all.
pub(super) fn takes_part(kv: &impl KvRead, id: NodeId) -> KvResult<bool> {
    Ok(node_record(kv, id)?.is_some_and(|r| r.migration.is_some()))
}

/// A new migration record for `vm`, to `to`.
pub(super) fn begin(vm: &mut VmRecord, to: NodeId, why: String, at_ms: u64) {
    vm.migration = Some(Box::new(Migration {
        from: vm.node_id,
        to,
        phase: Phase::Copying,
        why,
        started_at_ms: at_ms,
        bytes_total: 0,
        bytes_sent: 0,
        bytes_remaining: 0,
        paused_at_ms: None,
        downtime_ms: None,
        finished_at_ms: None,
        error: None,
    }));
}

/// [`begin`], for other modules' tests.
#[cfg(test)]
pub fn begin_for_tests(vm: &mut VmRecord, to: NodeId) {
    begin(vm, to, "a test".into(), 0);
}

fn start(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    to: Option<NodeId>,
    at_ms: u64,
    overcommit: Overcommit,
) -> KvResult<Outcome> {
    let refuse = |message: String| Ok(Err(domain(ErrorCode::FailedPrecondition, message)));
    let key = format!("{PREFIX_VMS}{project}/{name}");
    let Some(mut vm) = get_json::<VmRecord>(kv, &key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("VM {name:?} does not exist in project {project:?}"),
        )));
    };
    if let Err(refused) = refuse_while_migrating(&vm) {
        return Ok(Err(refused));
    }
    if vm.relocation.is_some() {
        return refuse(format!(
            "VM {name:?} is being moved by a drain (stopped here, started on its new node)"
        ));
    }
    if vm.power != PowerState::Running || vm.state != VmState::Running {
        return refuse(format!(
            "VM {name:?} is {} (wanted {}): only a running VM migrates live; a stopped one starts wherever it fits",
            vm.state.as_str(),
            match vm.power {
                PowerState::Running => "running",
                PowerState::Stopped => "stopped",
            }
        ));
    }
    let Some(source) = node_record(kv, vm.node_id)? else {
        return refuse(format!("VM {name:?}'s node {} is gone", vm.node_id));
    };
    if source.migration.is_none() {
        return refuse(format!(
            "VM {name:?}'s node {} takes no part in live migration: its agent runs without --migration-uri",
            source.name
        ));
    }
    let mut nodes = targets(kv, &vm)?;
    if let Some(to) = to {
        let Some(target) = node_record(kv, to)? else {
            return Ok(Err(domain(
                ErrorCode::NotFound,
                format!("node {to} is not a member of this cluster"),
            )));
        };
        if to == vm.node_id {
            return refuse(format!("VM {name:?} already runs on node {}", target.name));
        }
        if target.migration.is_none() {
            return refuse(format!(
                "node {} takes no part in live migration: its agent runs without --migration-uri",
                target.name
            ));
        }
        nodes.retain(|n| n.id == to);
    }
    let request = super::scheduler::Request {
        zone: vm.zone,
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        anti_affinity: vm.anti_affinity.clone(),
    };
    let to = match super::scheduler::place(&nodes, &request, overcommit) {
        Ok(to) => to,
        Err(why) => {
            return refuse(format!(
                "VM {name:?} cannot migrate{}: {why}",
                to.map(|t| format!(" to node {t}")).unwrap_or_default()
            ))
        }
    };
    begin(&mut vm, to, "asked by an operator".into(), at_ms);
    put_json(kv, &key, &vm)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

/// The switch: see [`MigrationCommand::Switched`]. A second report of it,
/// or one for a migration that already ended, changes nothing.
fn switched(
    kv: &mut KvWrite<'_>,
    vm_id: &str,
    node: NodeId,
    paused_at_ms: u64,
) -> KvResult<Outcome> {
    let Some((key, mut vm)) = vm_by_id(kv, vm_id)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("no VM has the id {vm_id:?}"),
        )));
    };
    let Some(m) = vm.migration.clone() else {
        return Ok(Ok(serde_json::to_value(&vm).expect("serialisable")));
    };
    if m.phase != Phase::Copying || m.from != node || vm.node_id != node {
        return Ok(Ok(serde_json::to_value(&vm).expect("serialisable")));
    }
    super::ha::move_vm(kv, &mut vm, m.to)?;
    let m = vm.migration.as_mut().expect("checked");
    m.phase = Phase::Resuming;
    m.paused_at_ms = Some(paused_at_ms);
    m.bytes_remaining = 0;
    put_json(kv, &key, &vm)?;
    super::ha::finish_drain(kv, node)?;
    Ok(Ok(serde_json::to_value(&vm).expect("serialisable")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ha::tests::{add_node, add_vm, lease, port_node, set, vm, EXACT};
    use crate::state::ha::{HaCommand, Liveness, RestartPolicy};

    fn take_part(kv: &mut KvWrite<'_>, id: NodeId) {
        let endpoint = Some(Endpoint {
            libvirt_uri: format!("qemu+tls://n{id}/system"),
            console_dir: format!("/var/lib/allod/n{id}/console"),
        });
        apply(kv, MigrationCommand::SetEndpoint { id, endpoint })
            .unwrap()
            .unwrap();
    }

    fn start(kv: &mut KvWrite<'_>, name: &str, to: Option<NodeId>) -> Outcome {
        apply(
            kv,
            MigrationCommand::Start {
                project: "p".into(),
                name: name.into(),
                to,
                at_ms: 1_000,
                overcommit_cpu_percent: EXACT.0,
                overcommit_memory_percent: EXACT.1,
            },
        )
        .unwrap()
    }

    fn refusal(outcome: Outcome) -> String {
        outcome.expect_err("refused").message
    }

    #[test]
    fn a_migration_copies_then_moves_the_vm_its_ports_and_its_writer_in_one_step() {
        allod_raft::scratch_kv(|kv| {
            for id in 1..=3 {
                add_node(kv, id, 8);
            }
            add_vm(kv, "a", 1, 2, RestartPolicy::Always, 0);
            let why = refusal(start(kv, "a", None));
            assert!(why.contains("without --migration-uri"), "{why}");
            // Node 3 takes no part: the scheduler picks node 2.
            take_part(kv, 1);
            take_part(kv, 2);
            let why = refusal(start(kv, "a", Some(3)));
            assert!(why.contains("node n3 takes no part"), "{why}");
            let why = refusal(start(kv, "a", Some(1)));
            assert!(why.contains("already runs on node n1"), "{why}");
            start(kv, "a", None).unwrap();
            let m = vm(kv, "a").migration.unwrap();
            assert_eq!((m.from, m.to, m.phase), (1, 2, Phase::Copying));
            // While it copies: nothing else changes the VM.
            let why = refusal(start(kv, "a", None));
            assert!(
                why.contains("is being migrated from node 1 to node 2"),
                "{why}"
            );
            let stop = crate::state::vms::set_power(
                kv,
                "p",
                "a",
                PowerState::Stopped,
                false,
                Overcommit::from_percent(EXACT.0, EXACT.1),
            )
            .unwrap();
            assert!(refusal(stop).contains("try again once"));
            // Progress only from the source.
            for node in [2, 1] {
                apply(
                    kv,
                    MigrationCommand::Progress {
                        vm_id: "id-a".into(),
                        node,
                        bytes_total: 100,
                        bytes_sent: u64::from(node == 1) * 60,
                        bytes_remaining: 40,
                    },
                )
                .unwrap()
                .unwrap();
            }
            assert_eq!(vm(kv, "a").migration.unwrap().bytes_sent, 60);
            assert_eq!((vm(kv, "a").node_id, lease(kv, "a")), (1, (1, 3)));
            // Only the source reports the switch; a repeat changes nothing.
            for node in [2, 1, 1] {
                apply(
                    kv,
                    MigrationCommand::Switched {
                        vm_id: "id-a".into(),
                        node,
                        paused_at_ms: 5_000,
                    },
                )
                .unwrap()
                .unwrap();
            }
            let a = vm(kv, "a");
            assert_eq!(a.node_id, 2);
            assert_eq!(a.migration.as_ref().unwrap().phase, Phase::Resuming);
            assert_eq!(lease(kv, "a"), (2, 4), "the new node writes at a new epoch");
            assert_eq!(port_node(kv, "a"), 2);
            apply(
                kv,
                MigrationCommand::Resumed {
                    vm_id: "id-a".into(),
                    node: 2,
                    at_ms: 5_120,
                },
            )
            .unwrap()
            .unwrap();
            let m = vm(kv, "a").migration.unwrap();
            assert_eq!((m.phase, m.downtime_ms), (Phase::Done, Some(120)));
            assert_eq!(lease(kv, "a"), (2, 4), "one epoch per move");
        });
    }

    #[test]
    fn a_failed_migration_leaves_the_vm_and_its_writer_where_they_were() {
        allod_raft::scratch_kv(|kv| {
            for id in 1..=3 {
                add_node(kv, id, 8);
                take_part(kv, id);
            }
            add_vm(kv, "a", 1, 2, RestartPolicy::Always, 0);
            start(kv, "a", Some(3)).unwrap();
            let failed = |node| MigrationCommand::Failed {
                vm_id: "id-a".into(),
                node,
                error: "the destination's libvirt hung up".into(),
                at_ms: 2_000,
            };
            // Not the destination's to say.
            apply(kv, failed(3)).unwrap().unwrap();
            assert!(migrating(&vm(kv, "a")));
            apply(kv, failed(1)).unwrap().unwrap();
            let a = vm(kv, "a");
            let m = a.migration.as_ref().unwrap();
            assert_eq!(
                (m.phase, m.error.as_deref()),
                (Phase::Failed, Some("the destination's libvirt hung up"))
            );
            assert_eq!(
                (a.node_id, lease(kv, "a"), port_node(kv, "a")),
                (1, (1, 3), 1)
            );
            // A new one may start; its source dying ends it and the VM
            // restarts elsewhere as any other.
            start(kv, "a", Some(2)).unwrap();
            set(kv, 1, Liveness::Dead, 9_000).unwrap();
            let a = vm(kv, "a");
            let m = a.migration.unwrap();
            assert_eq!(m.phase, Phase::Failed);
            assert!(m.error.unwrap().contains("died"));
            assert_ne!(a.node_id, 1);
        });
    }

    #[test]
    fn a_drain_migrates_running_vms_live_when_its_node_takes_part() {
        allod_raft::scratch_kv(|kv| {
            for id in 1..=3 {
                add_node(kv, id, 8);
            }
            add_vm(kv, "a", 1, 2, RestartPolicy::Always, 0);
            take_part(kv, 1);
            take_part(kv, 3);
            let drain = HaCommand::Drain {
                id: 1,
                restart_unmovable: false,
                at_ms: 3_000,
                overcommit_cpu_percent: EXACT.0,
                overcommit_memory_percent: EXACT.1,
            };
            crate::state::ha::apply(kv, drain).unwrap().unwrap();
            let a = vm(kv, "a");
            assert!(a.relocation.is_none(), "no restart: {a:?}");
            let m = a.migration.unwrap();
            assert_eq!(
                (m.to, m.phase),
                (3, Phase::Copying),
                "only node 3 takes part"
            );
            assert!(m.why.contains("drained"), "{}", m.why);
            let node = |kv: &KvWrite<'_>| {
                get_json::<NodeRecord>(kv, &format!("{PREFIX_NODES}{:020}", 1))
                    .unwrap()
                    .unwrap()
            };
            assert!(node(kv).draining);
            let switched = MigrationCommand::Switched {
                vm_id: "id-a".into(),
                node: 1,
                paused_at_ms: 4_000,
            };
            apply(kv, switched).unwrap().unwrap();
            let n = node(kv);
            assert!(!n.draining && n.maintenance, "{n:?}");
        });
    }
}
