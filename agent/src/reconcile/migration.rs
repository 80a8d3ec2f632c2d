//! Live migration on the nodes (`state::migration` holds the record).
//!
//! The source node drives it: it rewrites the domain's definition for the
//! destination (its node key, NBD socket and console log), has its libvirt
//! send the guest there, reports progress about once a second, and watches
//! for the moment its guest pauses for the switch. When libvirt reports the
//! guest handed over, the source records the switch, which moves the VM and
//! its disks' writer to the destination; when it fails, the failure. It is
//! the only node that decides how a migration ended: libvirt on the
//! destination holds the guest paused until the destination's compute
//! reconciler sees the switch recorded and resumes it.
//!
//! An agent restarted mid-way finds the record again: a job still running
//! is watched to its end; a domain that is gone from this node went over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::lifecycle::{Hypervisor, Power};

use crate::cluster::join::now_ms;
use crate::cluster::node::ClusterNode;
use crate::state::migration::{Endpoint, MigrationCommand, Phase};
use crate::state::vms::VmRecord;
use crate::state::Command;

use super::compute::blocking;

/// The pause libvirt aims for at the switch; the guest is paused longer by
/// the commit of the switch and the resume on the destination.
const MAX_DOWNTIME_MS: u64 = 100;

/// How often the source looks whether its guest paused for the switch.
const PAUSE_POLL: Duration = Duration::from_millis(10);

/// Whether this node is to send `vm` away now.
pub fn outgoing(vm: &VmRecord, me: u64) -> bool {
    vm.node_id == me
        && vm
            .migration
            .as_ref()
            .is_some_and(|m| m.phase == Phase::Copying && m.from == me)
}

/// Whether `vm` is on its way to this node (its incoming domain is left
/// alone).
pub fn incoming(vm: &VmRecord, me: u64) -> bool {
    vm.migration
        .as_ref()
        .is_some_and(|m| m.active() && m.to == me)
}

/// Records how migrating VMs reach this node until the record says so.
pub async fn register(node: std::sync::Weak<ClusterNode>, endpoint: Option<Endpoint>) {
    loop {
        let Some(n) = node.upgrade() else { return };
        match n.own_record() {
            Some(r) if r.migration == endpoint => return,
            None => {}
            Some(_) => {
                let command = Command::Migration {
                    command: MigrationCommand::SetEndpoint {
                        id: n.id,
                        endpoint: endpoint.clone(),
                    },
                };
                match n.write(&command).await {
                    Ok(Ok(_)) => {
                        match &endpoint {
                            Some(e) => {
                                tracing::info!(uri = %e.libvirt_uri, "VMs migrate to and from this node")
                            }
                            None => tracing::info!("this node takes no part in live migration"),
                        }
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "migration endpoint not recorded yet")
                    }
                    Err(e) => tracing::debug!(error = %e, "migration endpoint not recorded yet"),
                }
            }
        }
        drop(n);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes a command until it is applied (the migration's outcome must not
/// be lost to a leader change); gives up only when the node shuts down.
async fn record(node: &ClusterNode, command: MigrationCommand) {
    let command = Command::Migration { command };
    let mut wait = Duration::from_millis(100);
    loop {
        match node.write(&command).await {
            Ok(Ok(_)) => return,
            Ok(Err(refused)) => {
                tracing::warn!("a migration step was refused: {}", refused.message);
                return;
            }
            Err(e) => {
                tracing::warn!("cannot record a migration step yet, retrying: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The domain definition the destination receives.
fn destination_xml(
    node: &ClusterNode,
    vm: &VmRecord,
    xml: &str,
    to: u64,
    endpoint: &Endpoint,
) -> Result<String, String> {
    let read = |e: crate::state::ReadError| e.to_string();
    let here = node
        .state
        .nbd_socket(node.id)
        .map_err(read)?
        .ok_or("this node's block store has not registered its NBD socket")?;
    let there = node
        .state
        .nbd_socket(to)
        .map_err(read)?
        .ok_or_else(|| format!("node {to}'s block store has not registered its NBD socket"))?;
    let my_key = super::compute::node_key(node);
    let their_key = format!("{}-{to}", node.config.cluster_id);
    let my_log = super::compute::console_log(node, &vm.id)
        .display()
        .to_string();
    let their_log = std::path::Path::new(&endpoint.console_dir)
        .join(format!("{}.log", vm.id))
        .display()
        .to_string();
    let mut pairs = vec![(my_key.as_str(), their_key.as_str())];
    if !vm.volumes.is_empty() {
        pairs.push((here.as_str(), there.as_str()));
    }
    if xml.contains(&my_log) {
        pairs.push((my_log.as_str(), their_log.as_str()));
    }
    hypervisor::migrate::retarget(xml, &pairs)
}

/// Sends `vm` to its migration's destination and records how it ended.
pub async fn send(node: Arc<ClusterNode>, hv: Arc<Hypervisor>, vm: VmRecord) {
    let Some(m) = vm.migration.clone() else {
        return;
    };
    let id = vm.id.clone();
    let failed = |error: String| MigrationCommand::Failed {
        vm_id: id.clone(),
        node: node.id,
        error,
        at_ms: now_ms(),
    };
    let id2 = id.clone();
    let already_running = blocking(&hv, move |h| h.progress(&id2)).await;
    let id2 = id.clone();
    let defined = blocking(&hv, move |h| h.power_of(&id2)).await;
    match (&already_running, &defined) {
        // Handed over before this agent could record it.
        (_, Ok(None)) => {
            tracing::info!(vm = %id, "the VM's domain left this node: its migration went through");
            let switched = MigrationCommand::Switched {
                vm_id: id.clone(),
                node: node.id,
                paused_at_ms: now_ms(),
            };
            record(&node, switched).await;
            return;
        }
        (Ok(Some(_)), _) => {
            tracing::info!(vm = %id, "a migration of this VM is under way: following it");
        }
        _ => {}
    }
    let started = if matches!(already_running, Ok(Some(_))) {
        None
    } else {
        let endpoint = node
            .state
            .nodes()
            .ok()
            .and_then(|all| all.into_iter().find(|n| n.id == m.to))
            .and_then(|n| n.migration);
        let Some(endpoint) = endpoint else {
            let why = format!("node {} takes no part in live migration any more", m.to);
            record(&node, failed(why)).await;
            return;
        };
        let id2 = id.clone();
        let xml = match blocking(&hv, move |h| h.migratable_xml(&id2)).await {
            Ok(xml) => xml,
            Err(e) => return record(&node, failed(e)).await,
        };
        let dest_xml = match destination_xml(&node, &vm, &xml, m.to, &endpoint) {
            Ok(x) => x,
            Err(e) => return record(&node, failed(e)).await,
        };
        tracing::info!(vm = %id, name = %vm.name, to = m.to, "live migration: started");
        let (hv2, id2, uri) = (hv.clone(), id.clone(), endpoint.libvirt_uri.clone());
        Some(tokio::task::spawn_blocking(move || {
            hv2.migrate(&id2, &uri, &dest_xml, MAX_DOWNTIME_MS)
        }))
    };
    let result = follow(&node, &hv, &id, started).await;
    // Gone from this node: libvirt handed it over, whatever it said.
    let id2 = id.clone();
    let gone = matches!(blocking(&hv, move |h| h.power_of(&id2)).await, Ok(None));
    let outcome = match (result, gone) {
        (Ok(paused_at), _) => Ok(paused_at),
        (Err(_), true) => Ok(None),
        (Err(e), false) => Err(e),
    };
    match outcome {
        Ok(paused_at) => {
            let paused_at_ms = paused_at.unwrap_or_else(now_ms);
            tracing::info!(vm = %id, name = %vm.name, to = m.to, paused_at_ms, "live migration: the guest is handed over");
            let switched = MigrationCommand::Switched {
                vm_id: id.clone(),
                node: node.id,
                paused_at_ms,
            };
            record(&node, switched).await;
            tracing::info!(vm = %id, name = %vm.name, to = m.to, "live migration: the switch is recorded");
        }
        Err(e) => {
            tracing::warn!(vm = %id, name = %vm.name, to = m.to, "live migration failed, the guest runs on here: {e}");
            record(&node, failed(e)).await;
        }
    }
}

/// Follows the migration until it ends: its progress, recorded about once
/// a second, and the moment the guest paused here. `Ok` with that moment
/// when libvirt says it worked.
async fn follow(
    node: &Arc<ClusterNode>,
    hv: &Arc<Hypervisor>,
    id: &str,
    started: Option<tokio::task::JoinHandle<Result<(), hypervisor::lifecycle::HvError>>>,
) -> Result<Option<u64>, String> {
    let mut paused_at = None;
    let mut last_progress: Option<Instant> = None;
    let mut reported = None;
    let mut job = started;
    loop {
        if let Some(j) = job.as_ref() {
            if j.is_finished() {
                let j = job.take().expect("checked");
                return match j.await {
                    Ok(Ok(())) => Ok(paused_at),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("the migration's thread failed: {e}")),
                };
            }
        }
        // The guest pauses here for the switch; once its domain is gone
        // (libvirt removes it only when the destination has taken the
        // guest), the switch is done, though libvirt's call may take a
        // second more to return while the old QEMU exits.
        let id2 = id.to_string();
        let now = if paused_at.is_none() {
            blocking(hv, move |h| h.power_of(&id2)).await
        } else {
            blocking(hv, move |h| h.defined(&id2))
                .await
                .map(|here| here.then_some(Power::Paused))
        };
        match now {
            Ok(Some(Power::Paused)) if paused_at.is_none() => paused_at = Some(now_ms()),
            Ok(None) if job.as_ref().is_some_and(|j| !j.is_finished()) => {
                if let Some(j) = job.take() {
                    let id = id.to_string();
                    tokio::spawn(async move {
                        if let Ok(Err(e)) = j.await {
                            tracing::info!(vm = %id, "libvirt's migration call ended with: {e}, after the guest was handed over");
                        }
                    });
                }
                return Ok(paused_at);
            }
            _ => {}
        }
        if last_progress.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            last_progress = Some(Instant::now());
            let id2 = id.to_string();
            match blocking(hv, move |h| h.progress(&id2)).await {
                Ok(Some(p)) if reported != Some(p) => {
                    reported = Some(p);
                    let progress = Command::Migration {
                        command: MigrationCommand::Progress {
                            vm_id: id.to_string(),
                            node: node.id,
                            bytes_total: p.total,
                            bytes_sent: p.sent,
                            bytes_remaining: p.remaining,
                        },
                    };
                    if let Err(e) = node.write(&progress).await {
                        tracing::debug!("migration progress not recorded: {e}");
                    }
                }
                // A job this agent did not start ended (it was restarted
                // mid-way): whether the domain is still here tells.
                Ok(None) if job.is_none() => return Err("the migration ended".into()),
                _ => {}
            }
        }
        tokio::time::sleep(PAUSE_POLL).await;
    }
}
