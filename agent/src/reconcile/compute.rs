//! The per-node compute reconciler: makes libvirt run exactly the VMs the
//! cluster assigns to this node, as their records say, and reports what it
//! sees back through the cluster.
//!
//! Each pass observes (the VM records for this node, libvirt's domains),
//! plans with a pure function ([`plan_vm`]: record, domain and what it
//! remembers in, libvirt calls and the state to report out) and executes
//! the plan, each VM in a task of its own so a slow start never holds up
//! another. One task owns everything it remembers between passes; the VM
//! tasks hand their results back to it. It never writes desired state: it
//! reports what it sees, and the state machine's rule
//! ([`crate::state::vms::observe`]) decides what a guest that powered
//! itself off means.
//!
//! Everything it does is derived from the records and from libvirt, so it
//! survives its own restart at any point (a domain defined but not started
//! is started on the next pass; one defined twice is still one domain) and
//! libvirtd restarts (it reconnects).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hypervisor::lifecycle::{HvError, Hypervisor, Observed, Power};
use hypervisor::spec::{Disk, DomainSpec, Nic, VirtType};
use tokio::task::JoinSet;

use crate::cluster::node::ClusterNode;
use crate::state::migration::{Endpoint, MigrationCommand, Phase};
use crate::state::vms::{PowerState, VmRecord, VmState};
use crate::state::{Command, PREFIX_VMS};

#[derive(Debug, Clone)]
pub struct ComputeOptions {
    pub virt_type: VirtType,
    /// e.g. `qemu:///system`.
    pub libvirt_uri: String,
    /// How long a guest gets to power off after an ACPI request before the
    /// plug is pulled.
    pub stop_timeout: Duration,
    /// Out of touch with a quorum this long, the node stops its VMs.
    pub fence_after: Duration,
    /// The URI other nodes' libvirt daemons reach this node's at, for live
    /// migration; `None`: VMs do not migrate to or from this node.
    pub migration_uri: Option<String>,
}

/// How this node names itself in domain metadata: cluster and node id, so
/// that nodes of different clusters sharing one libvirtd (as in tests) never
/// take each other's domains for their own.
pub fn node_key(node: &ClusterNode) -> String {
    format!("{}-{}", node.config.cluster_id, node.id)
}

/// The domain a VM record asks for on this node, with `nics` resolved by
/// [`nics_of`].
pub fn domain_spec(
    node: &ClusterNode,
    vm: &VmRecord,
    nics: Vec<Nic>,
    virt_type: VirtType,
) -> Result<DomainSpec, String> {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(vm.id.as_bytes()));
    let uuid = format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    );
    // Each disk is reached through this node's NBD socket with its
    // attachment's credential, which only this node (the VM's) accepts.
    let socket = node
        .state
        .nbd_socket(node.id)
        .map_err(|e| e.to_string())?
        .ok_or("this node's block store has not registered its NBD socket yet")?;
    let key = node
        .state
        .export_key()
        .map_err(|e| e.to_string())?
        .ok_or("the cluster has no export key yet")?;
    let targets = (b'a'..=b'z').map(|c| format!("vd{}", c as char));
    Ok(DomainSpec {
        id: vm.id.clone(),
        uuid,
        virt_type,
        vcpus: vm.vcpus as u32,
        memory_bytes: vm.memory_bytes,
        disks: vm
            .volumes
            .iter()
            .zip(targets)
            .map(|(a, target)| Disk {
                export: crate::state::exports::attachment_name(
                    &key,
                    &a.volume_id,
                    crate::state::exports::Holder::Vm(&vm.id),
                ),
                socket: socket.clone(),
                target,
                read_only: false,
            })
            .collect(),
        nics,
        node: node_key(node),
        project: vm.project.clone(),
        name: vm.name.clone(),
        generation: vm.generation,
        console_log: Some(console_log(node, &vm.id).display().to_string()),
    })
}

/// A VM's NICs as libvirt must plug them: each port's tap on its VPC's
/// bridge. Refused while a bridge is missing (the network reconciler builds
/// it once the port is in the state), so a guest never starts without a
/// NIC it was given.
pub fn nics_of(node: &ClusterNode, vm: &VmRecord) -> Result<Vec<Nic>, String> {
    let mut nics = Vec::new();
    for nic in &vm.nics {
        let port = node
            .state
            .port(&vm.project, &nic.port)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("its port {:?} is gone", nic.port))?;
        let vpc = node
            .state
            .vpc(&vm.project, &port.vpc)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the VPC {:?} of its port is gone", port.vpc))?;
        let bridge = netfabric::names::bridge(vpc.vni);
        if !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists()
        {
            return Err(format!(
                "waiting for the network fabric to build bridge {bridge} for VPC {:?} on this node",
                port.vpc
            ));
        }
        nics.push(Nic {
            bridge,
            tap: port.host_interface,
            mac: port.mac,
        });
    }
    Ok(nics)
}

/// The data directory as an absolute path (QEMU resolves paths itself).
fn data_dir(node: &ClusterNode) -> std::path::PathBuf {
    std::fs::canonicalize(node.data_dir.path())
        .unwrap_or_else(|_| node.data_dir.path().to_path_buf())
}

pub fn console_log(node: &ClusterNode, id: &str) -> std::path::PathBuf {
    data_dir(node).join("console").join(format!("{id}.log"))
}

/// One libvirt call a plan asks for, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Defines (or redefines, for a new generation) the VM's domain.
    Define(Box<DomainSpec>),
    Start,
    /// Asks the guest to power off (ACPI).
    Shutdown,
    /// Pulls the plug.
    Destroy,
    Reboot,
    /// Runs a paused guest again (one that arrived by live migration).
    Resume,
}

/// What the reconciler remembers of a VM between passes. Losing it (an
/// agent restart) only means a reboot request seen before is not replayed
/// and a stop already asked for is asked for again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmMemory {
    /// The reboot count already acted on.
    pub reboots_seen: Option<u64>,
    /// When the guest was asked to power off.
    pub stop_asked_at: Option<Instant>,
}

/// What one VM needs in this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct VmPlan {
    pub actions: Vec<Action>,
    /// What the node will see once the actions succeed; a failing action
    /// makes it `failed`, with the error as the reason.
    pub state: VmState,
    pub reason: Option<String>,
    /// What to remember of the VM after this pass.
    pub memory: VmMemory,
}

/// Plans one VM: its record, its domain as libvirt has it (if any), the
/// domain spec when the domain must be (re)defined (or why it cannot be
/// yet), and what was remembered. Pure: the same inputs give the same plan.
pub fn plan_vm(
    vm: &VmRecord,
    observed: Option<&Observed>,
    spec: impl FnOnce() -> Result<DomainSpec, String>,
    memory: VmMemory,
    now: Instant,
    stop_timeout: Duration,
) -> VmPlan {
    let mut memory = memory;
    let mut actions = Vec::new();
    if observed.is_none_or(|o| o.generation != vm.generation) {
        match spec() {
            Ok(spec) => actions.push(Action::Define(Box::new(spec))),
            Err(waiting) => {
                return VmPlan {
                    actions,
                    state: VmState::Creating,
                    reason: Some(waiting),
                    memory,
                }
            }
        }
    }
    // A domain defined in this pass is off.
    let power = observed.map_or(Power::Stopped, |o| o.power);
    let reboots_seen = *memory.reboots_seen.get_or_insert(vm.reboots);
    let state = match vm.power {
        PowerState::Running => {
            memory.stop_asked_at = None;
            match power {
                Power::Running => {
                    if vm.reboots > reboots_seen {
                        actions.push(Action::Reboot);
                        memory.reboots_seen = Some(vm.reboots);
                    }
                    VmState::Running
                }
                // Last seen running and now off, with no start asked for
                // since: the guest powered itself off (or crashed), maybe
                // while this agent was down. Reported; it stays off.
                Power::Stopped | Power::Crashed
                    if observed.is_some()
                        && matches!(vm.state, VmState::Running | VmState::Paused) =>
                {
                    VmState::Stopped
                }
                Power::Stopped | Power::Crashed => {
                    actions.push(Action::Start);
                    memory.reboots_seen = Some(vm.reboots);
                    VmState::Running
                }
                Power::ShuttingDown => VmState::Stopping,
                // Arrived by live migration, and the switch is recorded:
                // its disks' writer is this node now.
                Power::Paused
                    if vm
                        .migration
                        .as_ref()
                        .is_some_and(|m| m.phase == Phase::Resuming && m.to == vm.node_id) =>
                {
                    actions.push(Action::Resume);
                    VmState::Running
                }
                Power::Paused => VmState::Paused,
            }
        }
        PowerState::Stopped => match power {
            Power::Stopped | Power::Crashed => {
                memory.stop_asked_at = None;
                VmState::Stopped
            }
            Power::Running | Power::Paused | Power::ShuttingDown => {
                let timed_out = memory
                    .stop_asked_at
                    .is_some_and(|asked| now.saturating_duration_since(asked) >= stop_timeout);
                if vm.force_stop || timed_out {
                    actions.push(Action::Destroy);
                    memory.stop_asked_at = None;
                    VmState::Stopped
                } else {
                    if memory.stop_asked_at.is_none() {
                        actions.push(Action::Shutdown);
                        memory.stop_asked_at = Some(now);
                    }
                    VmState::Stopping
                }
            }
        },
    };
    VmPlan {
        actions,
        state,
        reason: None,
        memory,
    }
}

/// The spec generation a report carries: what the domain has. A failure
/// leaves the domain at the generation last reported.
fn reported_generation(vm: &VmRecord, state: VmState) -> u64 {
    if state == VmState::Failed {
        vm.observed_generation
    } else {
        vm.generation
    }
}

/// Whether to tell the cluster: only a change, and at most once a second
/// per VM.
pub fn should_report(
    vm: &VmRecord,
    state: VmState,
    reason: &Option<String>,
    last_report: Option<Instant>,
    now: Instant,
) -> bool {
    let unchanged = vm.state == state
        && vm.reason == *reason
        && vm.observed_generation == reported_generation(vm, state);
    let recent =
        last_report.is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1));
    !unchanged && !recent
}

/// What a VM's task hands back to the task that owns the reconciler.
enum Done {
    /// The plan ran; the VM is now seen as `state`.
    Converged {
        vm: Box<VmRecord>,
        state: VmState,
        reason: Option<String>,
    },
    /// A report was sent (or failed, and is retried on a later pass).
    Reported,
}

/// Everything the reconciler remembers, owned by the one task that runs it.
struct Reconciler {
    options: ComputeOptions,
    memory: HashMap<String, VmMemory>,
    reported_at: HashMap<String, Instant>,
    /// VMs whose task is running, by task.
    in_flight: HashMap<tokio::task::Id, String>,
    /// VMs last seen in transition (starting, stopping).
    transient: HashSet<String>,
    work: JoinSet<(String, Done)>,
}

pub async fn run(node: Weak<ClusterNode>, options: ComputeOptions) {
    let Some(n) = node.upgrade() else { return };
    let mut applied = n.applied.subscribe();
    let _ = std::fs::create_dir_all(n.data_dir.path().join("console"));
    let me = node_key(&n);
    let endpoint = options.migration_uri.clone().map(|uri| Endpoint {
        libvirt_uri: uri,
        console_dir: data_dir(&n).join("console").display().to_string(),
    });
    tokio::spawn(super::migration::register(node.clone(), endpoint));
    drop(n);
    let mut hv: Option<Arc<Hypervisor>> = None;
    let mut reconciler = Reconciler {
        options,
        memory: HashMap::new(),
        reported_at: HashMap::new(),
        in_flight: HashMap::new(),
        transient: HashSet::new(),
        work: JoinSet::new(),
    };
    let mut fence = crate::reconcile::ha::Fence::default();
    loop {
        let Some(n) = node.upgrade() else { return };
        if hv.as_ref().is_none_or(|h| !h.alive()) {
            let (uri, me) = (reconciler.options.libvirt_uri.clone(), me.clone());
            match tokio::task::spawn_blocking(move || Hypervisor::connect(&uri, &me)).await {
                Ok(Ok(h)) => {
                    tracing::info!(uri = %reconciler.options.libvirt_uri, "connected to libvirt");
                    hv = Some(Arc::new(h));
                }
                Ok(Err(e)) => {
                    hv = None;
                    tracing::warn!("{e}; VMs on this node cannot run until it answers");
                    reconciler
                        .report_all_failed(&n, &format!("this node cannot reach libvirt: {e}"))
                        .await;
                    drop(n);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
                Err(_) => return,
            }
        }
        let h = hv.clone().expect("connected");
        // Self-fencing (see `reconcile::ha`): no pass while cut off.
        let stopped = fence.check(&n, &h, reconciler.options.fence_after).await;
        if let Some(stopped) = stopped {
            for id in stopped {
                reconciler.forget(&id);
            }
            drop(n);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        h.set_replaceable(crate::reconcile::ha::dead_node_keys(&n));
        reconciler.pass(&n, &h).await;
        let wait = if reconciler.in_flight.is_empty() && reconciler.transient.is_empty() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(500)
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                // Cancel-safe: a finished task stays in the set until taken.
                Some(finished) = reconciler.work.join_next_with_id() => {
                    reconciler.finished(&n, finished);
                }
                // Cancel-safe: the value is marked seen only when this returns.
                _ = applied.changed() => break,
                () = &mut sleep => break,
            }
        }
        drop(n);
    }
}

pub(super) async fn blocking<T: Send + 'static>(
    hv: &Arc<Hypervisor>,
    f: impl FnOnce(&Hypervisor) -> Result<T, HvError> + Send + 'static,
) -> Result<T, String> {
    let hv = hv.clone();
    match tokio::task::spawn_blocking(move || f(&hv)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("libvirt call failed: {e}")),
    }
}

/// The VMs placed on this node; one a drain moves elsewhere is to be
/// stopped here (its stop's report places it on its next node).
fn my_vms(node: &ClusterNode) -> Vec<VmRecord> {
    mine(
        node.id,
        node.state.list::<VmRecord>(PREFIX_VMS).unwrap_or_default(),
    )
}

/// The VMs of `all` placed on node `me`, as [`my_vms`] gives them.
fn mine(me: u64, all: Vec<VmRecord>) -> Vec<VmRecord> {
    all.into_iter()
        .filter(|vm| vm.node_id == me)
        .map(|mut vm| {
            if vm.relocation.is_some() {
                vm.power = PowerState::Stopped;
            }
            vm
        })
        .collect()
}

/// Carries out one VM's plan; the state it ends in.
async fn execute(hv: &Arc<Hypervisor>, vm: &VmRecord, plan: VmPlan) -> (VmState, Option<String>) {
    for action in plan.actions {
        let id = vm.id.clone();
        let (result, what) = match action {
            Action::Define(spec) => (
                blocking(hv, move |h| h.define(&spec)).await,
                "define the domain",
            ),
            Action::Start => (
                blocking(hv, move |h| h.start(&id).map(|_| ())).await,
                "start",
            ),
            Action::Shutdown => (blocking(hv, move |h| h.shutdown(&id)).await, "stop"),
            Action::Destroy => (blocking(hv, move |h| h.destroy(&id)).await, "stop"),
            Action::Reboot => (blocking(hv, move |h| h.reboot(&id)).await, "reboot"),
            Action::Resume => (blocking(hv, move |h| h.resume(&id)).await, "resume"),
        };
        if let Err(e) = result {
            return (VmState::Failed, Some(format!("cannot {what}: {e}")));
        }
        tracing::info!(vm = %vm.id, name = %vm.name, "{what}: done");
    }
    (plan.state, plan.reason)
}

impl Reconciler {
    /// One pass: plans every VM of this node whose task is not running and
    /// starts its task; removes domains whose VM is gone or went elsewhere.
    async fn pass(&mut self, node: &Arc<ClusterNode>, hv: &Arc<Hypervisor>) {
        let all = node.state.list::<VmRecord>(PREFIX_VMS).unwrap_or_default();
        // VMs arriving by live migration keep their incoming domains.
        let arriving: Vec<String> = all
            .iter()
            .filter(|vm| super::migration::incoming(vm, node.id))
            .map(|vm| vm.id.clone())
            .collect();
        let desired = mine(node.id, all);
        let observed: HashMap<String, Observed> = match blocking(hv, |h| h.list()).await {
            Ok(list) => list.into_iter().map(|o| (o.id.clone(), o)).collect(),
            Err(e) => {
                tracing::warn!("cannot list domains: {e}");
                return;
            }
        };
        let busy: HashSet<String> = self.in_flight.values().cloned().collect();
        let now = Instant::now();
        for vm in desired.iter().filter(|vm| !busy.contains(&vm.id)) {
            if super::migration::outgoing(vm, node.id) {
                let (node, hv, vm) = (node.clone(), hv.clone(), vm.clone());
                let vm_id = vm.id.clone();
                let task = self.work.spawn(async move {
                    let id = vm.id.clone();
                    super::migration::send(node, hv, vm).await;
                    (id, Done::Reported)
                });
                self.in_flight.insert(task.id(), vm_id);
                continue;
            }
            let remembered = self.memory.get(&vm.id).copied().unwrap_or_default();
            let plan = plan_vm(
                vm,
                observed.get(&vm.id),
                || {
                    nics_of(node, vm)
                        .and_then(|nics| domain_spec(node, vm, nics, self.options.virt_type))
                },
                remembered,
                now,
                self.options.stop_timeout,
            );
            self.memory.insert(vm.id.clone(), plan.memory);
            let vm_id = vm.id.clone();
            let (hv, vm) = (hv.clone(), vm.clone());
            let task = self.work.spawn(async move {
                let (state, reason) = execute(&hv, &vm, plan).await;
                let id = vm.id.clone();
                (
                    id,
                    Done::Converged {
                        vm: Box::new(vm),
                        state,
                        reason,
                    },
                )
            });
            self.in_flight.insert(task.id(), vm_id);
        }
        let wanted: HashSet<&str> = desired
            .iter()
            .map(|v| v.id.as_str())
            .chain(arriving.iter().map(String::as_str))
            .collect();
        for id in observed.keys().filter(|id| !wanted.contains(id.as_str())) {
            if busy.contains(id) {
                continue;
            }
            let id2 = id.clone();
            match blocking(hv, move |h| h.undefine(&id2)).await {
                Ok(()) => {
                    tracing::info!(vm = %id, "removed the domain of a VM this node no longer runs")
                }
                Err(e) => tracing::warn!(vm = %id, "cannot remove a domain: {e}"),
            }
            self.forget(id);
        }
    }

    fn forget(&mut self, id: &str) {
        self.memory.remove(id);
        self.reported_at.remove(id);
        self.transient.remove(id);
    }

    /// A VM's task ended: remember what it saw, and report it when that is
    /// news (the VM stays in flight until the report is made, so its
    /// reports never overtake each other).
    fn finished(
        &mut self,
        node: &Arc<ClusterNode>,
        finished: Result<(tokio::task::Id, (String, Done)), tokio::task::JoinError>,
    ) {
        let (task, id, done) = match finished {
            Ok((task, (id, done))) => (task, id, done),
            Err(e) => {
                tracing::error!(error = %e, "a VM task of the compute reconciler failed");
                self.in_flight.remove(&e.id());
                return;
            }
        };
        self.in_flight.remove(&task);
        let Done::Converged { vm, state, reason } = done else {
            return;
        };
        if state == VmState::Running
            && vm
                .migration
                .as_ref()
                .is_some_and(|m| m.phase == Phase::Resuming && m.to == node.id)
        {
            let node = node.clone();
            let resumed = Command::Migration {
                command: MigrationCommand::Resumed {
                    vm_id: vm.id.clone(),
                    node: node.id,
                    at_ms: crate::cluster::join::now_ms(),
                },
            };
            tracing::info!(vm = %vm.id, name = %vm.name, "live migration: the guest runs on this node");
            tokio::spawn(async move {
                if let Err(e) = node.write(&resumed).await {
                    tracing::warn!("cannot record that a migrated guest resumed: {e}");
                }
            });
        }
        if state.is_transient() {
            self.transient.insert(id.clone());
        } else {
            self.transient.remove(&id);
        }
        let now = Instant::now();
        if !should_report(&vm, state, &reason, self.reported_at.get(&id).copied(), now) {
            return;
        }
        if vm.power == PowerState::Running && state == VmState::Stopped {
            tracing::info!(vm = %vm.id, name = %vm.name, "the guest powered itself off; it stays off until started");
        }
        self.reported_at.insert(id.clone(), now);
        let node = node.clone();
        let vm_id = id.clone();
        let task = self.work.spawn(async move {
            report(&node, &vm, state, reason).await;
            (id, Done::Reported)
        });
        self.in_flight.insert(task.id(), vm_id);
    }

    async fn report_all_failed(&mut self, node: &ClusterNode, why: &str) {
        let now = Instant::now();
        for vm in my_vms(node) {
            let reason = Some(why.to_string());
            if should_report(
                &vm,
                VmState::Failed,
                &reason,
                self.reported_at.get(&vm.id).copied(),
                now,
            ) {
                self.reported_at.insert(vm.id.clone(), now);
                report(node, &vm, VmState::Failed, reason).await;
            }
        }
    }
}

/// Tells the cluster what this node sees of one VM.
async fn report(node: &ClusterNode, vm: &VmRecord, state: VmState, reason: Option<String>) {
    if let Some(r) = &reason {
        if state == VmState::Failed {
            tracing::warn!(vm = %vm.id, name = %vm.name, "VM failed: {r}");
        }
    }
    let command = Command::ReportVmState {
        project: vm.project.clone(),
        name: vm.name.clone(),
        node: node.id,
        state,
        reason,
        generation: reported_generation(vm, state),
    };
    if let Err(e) = node.write(&command).await {
        tracing::debug!("VM state not reported yet: {e}");
    }
}

#[cfg(test)]
mod tests;
