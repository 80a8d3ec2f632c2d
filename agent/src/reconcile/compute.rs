//! The per-node compute reconciler: makes libvirt run exactly the VMs the
//! cluster assigns to this node, as their records say, and reports what it
//! sees back through the cluster.
//!
//! Everything it does is derived from the records and from libvirt, so it
//! survives its own restart at any point (a domain defined but not started
//! is started on the next pass; one defined twice is still one domain) and
//! libvirtd restarts (it reconnects).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hypervisor::lifecycle::{HvError, Hypervisor, Observed, Power};
use hypervisor::spec::{Disk, DomainSpec, Nic, VirtType};

use crate::cluster::node::ClusterNode;
use crate::state::vms::VmRecord;
use crate::state::{Command, PREFIX_VMS};

#[derive(Debug, Clone)]
pub struct ComputeOptions {
    pub virt_type: VirtType,
    /// e.g. `qemu:///system`.
    pub libvirt_uri: String,
    /// How long a guest gets to power off after an ACPI request before the
    /// plug is pulled.
    pub stop_timeout: Duration,
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
) -> DomainSpec {
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
    let socket = data_dir(node).join("nbd.sock").display().to_string();
    let targets = (b'a'..=b'z').map(|c| format!("vd{}", c as char));
    DomainSpec {
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
                export: a.volume_id.clone(),
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
    }
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

/// State kept between passes (all of it can be rebuilt; losing it only
/// means a reboot request seen before a restart is not replayed).
#[derive(Default)]
struct Memory {
    reboots_seen: HashMap<String, u64>,
    stop_asked: HashMap<String, Instant>,
    seen_running: HashSet<String>,
    reported: HashMap<String, Instant>,
    /// VMs whose converge task is running.
    in_flight: HashSet<String>,
    /// VMs last seen in transition (starting, stopping).
    transient: HashSet<String>,
}

pub async fn run(node: Weak<ClusterNode>, options: ComputeOptions) {
    let Some(n) = node.upgrade() else { return };
    let mut applied = n.applied.subscribe();
    let _ = std::fs::create_dir_all(n.data_dir.path().join("console"));
    let me = node_key(&n);
    drop(n);
    let mut hv: Option<Arc<Hypervisor>> = None;
    let memory = Arc::new(Mutex::new(Memory::default()));
    loop {
        let Some(n) = node.upgrade() else { return };
        if hv.as_ref().is_none_or(|h| !h.alive()) {
            let (uri, me) = (options.libvirt_uri.clone(), me.clone());
            match tokio::task::spawn_blocking(move || Hypervisor::connect(&uri, &me)).await {
                Ok(Ok(h)) => {
                    tracing::info!(uri = %options.libvirt_uri, "connected to libvirt");
                    hv = Some(Arc::new(h));
                }
                Ok(Err(e)) => {
                    hv = None;
                    tracing::warn!("{e}; VMs on this node cannot run until it answers");
                    report_all_failed(&n, &format!("this node cannot reach libvirt: {e}"), &memory)
                        .await;
                    drop(n);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
                Err(_) => return,
            }
        }
        let h = hv.clone().expect("connected");
        let busy = pass(&n, &h, &options, &memory).await;
        drop(n);
        let wait = if busy {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        };
        let _ = tokio::time::timeout(wait, applied.changed()).await;
    }
}

async fn blocking<T: Send + 'static>(
    hv: &Arc<Hypervisor>,
    f: impl FnOnce(&Hypervisor) -> Result<T, HvError> + Send + 'static,
) -> Result<T, String> {
    let hv = hv.clone();
    match tokio::task::spawn_blocking(move || f(&hv)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("libvirt call failed: {e}")),
    }
}

fn my_vms(node: &ClusterNode) -> Vec<VmRecord> {
    node.state
        .list::<VmRecord>(PREFIX_VMS)
        .unwrap_or_default()
        .into_iter()
        .filter(|vm| vm.node_id == node.id)
        .collect()
}

/// One reconciliation pass; true while something is in transition.
async fn pass(
    node: &Arc<ClusterNode>,
    hv: &Arc<Hypervisor>,
    options: &ComputeOptions,
    memory: &Arc<Mutex<Memory>>,
) -> bool {
    let desired = my_vms(node);
    let observed: HashMap<String, Observed> = match blocking(hv, |h| h.list()).await {
        Ok(list) => list.into_iter().map(|o| (o.id.clone(), o)).collect(),
        Err(e) => {
            tracing::warn!("cannot list domains: {e}");
            return true;
        }
    };
    // Each VM converges in a task of its own, so a slow start of one never
    // holds up another; a VM whose task still runs is left to it.
    for vm in &desired {
        if !memory.lock().unwrap().in_flight.insert(vm.id.clone()) {
            continue;
        }
        let (node, hv, options, memory) =
            (node.clone(), hv.clone(), options.clone(), memory.clone());
        let (vm, observed) = (vm.clone(), observed.get(&vm.id).cloned());
        tokio::spawn(async move {
            let transient =
                converge_and_report(&node, &hv, &options, &memory, &vm, observed.as_ref()).await;
            let mut m = memory.lock().unwrap();
            m.in_flight.remove(&vm.id);
            if transient {
                m.transient.insert(vm.id.clone());
            } else {
                m.transient.remove(&vm.id);
            }
        });
    }
    // Domains whose VM was deleted or went elsewhere.
    let wanted: HashSet<&str> = desired.iter().map(|v| v.id.as_str()).collect();
    for id in observed.keys().filter(|id| !wanted.contains(id.as_str())) {
        if memory.lock().unwrap().in_flight.contains(id) {
            continue;
        }
        let id2 = id.clone();
        match blocking(hv, move |h| h.undefine(&id2)).await {
            Ok(()) => {
                tracing::info!(vm = %id, "removed the domain of a VM this node no longer runs")
            }
            Err(e) => tracing::warn!(vm = %id, "cannot remove a domain: {e}"),
        }
        let mut m = memory.lock().unwrap();
        m.seen_running.remove(id);
        m.stop_asked.remove(id);
        m.reboots_seen.remove(id);
        m.transient.remove(id);
    }
    let m = memory.lock().unwrap();
    !m.in_flight.is_empty() || !m.transient.is_empty()
}

/// Converges one VM and reports it; true while it is in transition.
async fn converge_and_report(
    node: &ClusterNode,
    hv: &Arc<Hypervisor>,
    options: &ComputeOptions,
    memory: &Mutex<Memory>,
    vm: &VmRecord,
    observed: Option<&Observed>,
) -> bool {
    let (state, reason) = converge(node, hv, options, memory, vm, observed).await;
    let transient = state != "running" && state != "stopped" && state != "failed";
    report(node, memory, vm, state, reason).await;
    transient
}

async fn converge(
    node: &ClusterNode,
    hv: &Arc<Hypervisor>,
    options: &ComputeOptions,
    memory: &Mutex<Memory>,
    vm: &VmRecord,
    observed: Option<&Observed>,
) -> (String, Option<String>) {
    let id = vm.id.clone();
    if observed.is_none_or(|o| o.generation != vm.generation) {
        let nics = match nics_of(node, vm) {
            Ok(nics) => nics,
            Err(waiting) => return ("creating".into(), Some(waiting)),
        };
        let spec = domain_spec(node, vm, nics, options.virt_type);
        if let Err(e) = blocking(hv, move |h| h.define(&spec)).await {
            return (
                "failed".into(),
                Some(format!("cannot define the domain: {e}")),
            );
        }
    }
    let id2 = id.clone();
    let power = match blocking(hv, move |h| h.power_of(&id2)).await {
        Ok(Some(p)) => p,
        Ok(None) => return ("creating".into(), None),
        Err(e) => return ("failed".into(), Some(e)),
    };
    let seen = *memory
        .lock()
        .unwrap()
        .reboots_seen
        .entry(id.clone())
        .or_insert(vm.reboots);
    if vm.power == "running" {
        memory.lock().unwrap().stop_asked.remove(&id);
        match power {
            Power::Running => {
                memory.lock().unwrap().seen_running.insert(id.clone());
                if vm.reboots > seen {
                    memory
                        .lock()
                        .unwrap()
                        .reboots_seen
                        .insert(id.clone(), vm.reboots);
                    let id2 = id.clone();
                    if let Err(e) = blocking(hv, move |h| h.reboot(&id2)).await {
                        return ("failed".into(), Some(format!("cannot reboot: {e}")));
                    }
                    tracing::info!(vm = %id, "rebooted");
                }
                ("running".into(), None)
            }
            Power::Stopped | Power::Crashed if memory.lock().unwrap().seen_running.remove(&id) => {
                // It stopped by itself (the guest powered off): it stays off.
                tracing::info!(vm = %id, "the guest powered itself off");
                let _ = node
                    .write(&Command::SetVmPower {
                        project: vm.project.clone(),
                        name: vm.name.clone(),
                        power: "stopped".into(),
                        force: false,
                        overcommit_cpu_percent: crate::state::scheduler::default_cpu_percent(),
                        overcommit_memory_percent: crate::state::scheduler::default_memory_percent(
                        ),
                    })
                    .await;
                ("stopped".into(), None)
            }
            Power::Stopped | Power::Crashed => {
                memory
                    .lock()
                    .unwrap()
                    .reboots_seen
                    .insert(id.clone(), vm.reboots);
                let id2 = id.clone();
                match blocking(hv, move |h| h.start(&id2)).await {
                    Ok(_) => {
                        tracing::info!(vm = %id, "started");
                        memory.lock().unwrap().seen_running.insert(id.clone());
                        ("running".into(), None)
                    }
                    Err(e) => ("failed".into(), Some(format!("cannot start: {e}"))),
                }
            }
            Power::ShuttingDown => ("stopping".into(), None),
            Power::Paused => ("paused".into(), None),
        }
    } else {
        memory.lock().unwrap().seen_running.remove(&id);
        match power {
            Power::Stopped | Power::Crashed => {
                memory.lock().unwrap().stop_asked.remove(&id);
                ("stopped".into(), None)
            }
            _ => {
                let asked = *memory
                    .lock()
                    .unwrap()
                    .stop_asked
                    .entry(id.clone())
                    .or_insert_with(Instant::now);
                let force = vm.force_stop || asked.elapsed() >= options.stop_timeout;
                let first = asked.elapsed() < Duration::from_millis(10);
                let id2 = id.clone();
                let result = if force {
                    blocking(hv, move |h| h.destroy(&id2)).await
                } else if first {
                    blocking(hv, move |h| h.shutdown(&id2)).await
                } else {
                    Ok(())
                };
                match result {
                    Ok(()) if force => {
                        tracing::info!(vm = %id, "stopped (forced)");
                        ("stopped".into(), None)
                    }
                    Ok(()) => ("stopping".into(), None),
                    Err(e) => ("failed".into(), Some(format!("cannot stop: {e}"))),
                }
            }
        }
    }
}

/// Tells the cluster what this node sees, when it changed (at most once a
/// second per VM).
async fn report(
    node: &ClusterNode,
    memory: &Mutex<Memory>,
    vm: &VmRecord,
    state: String,
    reason: Option<String>,
) {
    let generation = if state == "failed" {
        vm.observed_generation
    } else {
        vm.generation
    };
    if vm.state == state && vm.reason == reason && vm.observed_generation == generation {
        return;
    }
    if memory
        .lock()
        .unwrap()
        .reported
        .get(&vm.id)
        .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
    {
        return;
    }
    memory
        .lock()
        .unwrap()
        .reported
        .insert(vm.id.clone(), Instant::now());
    if let Some(r) = &reason {
        tracing::warn!(vm = %vm.id, name = %vm.name, "VM failed: {r}");
    }
    let command = Command::ReportVmState {
        project: vm.project.clone(),
        name: vm.name.clone(),
        node: node.id,
        state,
        reason,
        generation,
    };
    if let Err(e) = node.write(&command).await {
        tracing::debug!("VM state not reported yet: {e}");
    }
}

async fn report_all_failed(node: &ClusterNode, why: &str, memory: &Mutex<Memory>) {
    for vm in my_vms(node) {
        report(node, memory, &vm, "failed".into(), Some(why.to_string())).await;
    }
}
