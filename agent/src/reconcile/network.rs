//! The node's network reconciler: registers this node's underlay address,
//! then after every commit that changes resources (and every 30 s, to mend
//! drift) hands netfabric this node's share of the network state and runs
//! DHCP for the local ports.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::cluster::node::ClusterNode;
use crate::state::network::NetCommand;
use crate::state::Command;

#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// This node's VTEP address; default: the address of its peer port.
    pub underlay: Option<Ipv4Addr>,
    pub underlay_mtu: u32,
    /// Interface for egress NAT and floating IPs; none: no outside access.
    pub uplink: Option<String>,
    /// Where router namespaces are pinned (`/run/netns`).
    pub netns_dir: PathBuf,
}

/// The interface of the default route, from `/proc/net/route`.
pub fn default_route_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
            .then(|| fields[0].to_string())
    })
}

/// The MTU of `interface`, or 1500.
pub fn interface_mtu(interface: Option<&str>) -> u32 {
    interface
        .and_then(|i| std::fs::read_to_string(format!("/sys/class/net/{i}/mtu")).ok())
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(1500)
}

pub async fn run(node: Weak<ClusterNode>, options: NetworkOptions, peer_address: Option<Ipv4Addr>) {
    let Some(n) = node.upgrade() else { return };
    let mut applied = n.applied.subscribe();
    let me = n.id;
    drop(n);
    let underlay = options.underlay.or(peer_address);
    let mut fabric = netfabric::Fabric::new(&options.netns_dir);
    let mut dhcp = netfabric::dhcp::Dhcp::new();
    let mut last: Option<netfabric::NodeNetwork> = None;
    let mut last_full = Instant::now();
    let mut registered = false;
    let mut checked = false;
    loop {
        let Some(n) = node.upgrade() else { return };
        if !registered {
            match underlay {
                Some(address) => {
                    let command = Command::Network {
                        command: NetCommand::SetUnderlay { node: me, address },
                    };
                    if let Ok(Ok(_)) = n.write(&command).await {
                        tracing::info!(%address, "registered this node's underlay address");
                        registered = true;
                    }
                }
                None => {
                    tracing::warn!("no IPv4 underlay address (--underlay-address): this node hosts no VPC ports");
                    registered = true;
                }
            }
        }
        match n
            .state
            .node_network(me, options.underlay_mtu, options.uplink.clone())
        {
            Ok(network) => {
                // VM taps come and go without a commit (libvirt makes them
                // when a VM starts): with local ports, look every 5 s.
                let has_ports = network.vpcs.iter().any(|v| {
                    v.ports
                        .iter()
                        .any(|p| matches!(p.location, netfabric::Location::Local { .. }))
                });
                let every = if has_ports { 5 } else { 30 };
                let due = last.as_ref() != Some(&network)
                    || last_full.elapsed() > Duration::from_secs(every);
                if due {
                    match fabric.apply(&network).await {
                        Ok(report) => {
                            if !report.actions.is_empty() || report.firewall_changes > 0 {
                                tracing::info!(
                                    actions = report.actions.len(),
                                    firewall = report.firewall_changes,
                                    "network brought in line"
                                );
                            }
                            if !checked {
                                checked = true;
                                tracing::info!(
                                    changes = report.actions.len() + report.firewall_changes,
                                    "network checked against the kernel after start"
                                );
                            }
                            dhcp.update(&network);
                            last = Some(network);
                            last_full = Instant::now();
                        }
                        Err(e) => {
                            tracing::warn!(
                                "cannot bring the network in line, retrying: {}",
                                crate::error_chain(&e)
                            );
                            last = None;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the network state: {e}"),
        }
        drop(n);
        let wait = if last.is_none() {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        };
        let _ = tokio::time::timeout(wait, applied.changed()).await;
    }
}
