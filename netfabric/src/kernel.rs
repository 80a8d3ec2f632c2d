//! The kernel objects a node network implies, in the same shape the netlink
//! observer reports what exists, so the planner compares like with like.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::{gateway_mac, names, transit_router, Location, Mac, NodeNetwork, TRANSIT_NODE};

/// A network namespace: the node's own (`None`) or a router namespace.
pub type Ns = Option<String>;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkKind {
    Bridge,
    Vxlan {
        vni: u32,
        local: Ipv4Addr,
        port: u16,
    },
    /// A veth whose other end is `peer` in namespace `peer_ns`; both ends
    /// are created together.
    Veth {
        peer: String,
        peer_ns: String,
    },
    /// The far end of a [`LinkKind::Veth`].
    VethPeer,
    /// Made by someone else (a VM's tap, the loopback): never created or
    /// deleted, only attached and brought up.
    Foreign,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub kind: LinkKind,
    /// Bridge the link is a port of.
    pub master: Option<String>,
    /// None: left as it is.
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    /// Bridge-port MAC learning; None: left as it is.
    pub learning: Option<bool>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub destination: crate::Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub dev: String,
}

/// Everything the fabric owns in the kernel of one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelState {
    pub namespaces: BTreeSet<String>,
    pub links: BTreeMap<(Ns, String), Link>,
    /// (namespace, device, address with prefix).
    pub addresses: BTreeSet<(Ns, String, crate::Ipv4Net)>,
    pub routes: BTreeSet<(Ns, Route)>,
    /// Permanent ARP entries: (namespace, device, address, MAC).
    pub neighbours: BTreeSet<(Ns, String, Ipv4Addr, Mac)>,
    /// VXLAN forwarding entries: (device, MAC, remote VTEP); the all-zero
    /// MAC floods broadcast and unknown traffic to that VTEP.
    pub fdb: BTreeSet<(String, Mac, Ipv4Addr)>,
    /// Static bridge entries sending a remote MAC to the VXLAN port:
    /// (port, MAC). The VXLAN port does not learn, so a remote node's
    /// gateway (same MAC as ours) is never learned behind it.
    pub bridge_fdb: BTreeSet<(String, Mac)>,
    /// Proxy ARP entries: (device, address).
    pub proxies: BTreeSet<(String, Ipv4Addr)>,
}

fn host(addr: Ipv4Addr) -> crate::Ipv4Net {
    crate::Ipv4Net::new(addr, 32).expect("/32 is a valid prefix")
}

/// The kernel objects `network` needs on this node.
pub fn desired(network: &NodeNetwork) -> KernelState {
    let mut state = KernelState::default();
    let Some(underlay) = network.underlay else {
        return state;
    };
    let mtu = network.inner_mtu();
    for vpc in &network.vpcs {
        let local_ports: Vec<_> = vpc
            .ports
            .iter()
            .filter(|p| matches!(p.location, Location::Local { .. }))
            .collect();
        if local_ports.is_empty() {
            continue;
        }
        let v = vpc.vni;
        let ns: Ns = Some(names::router_namespace(v));
        let router_ns = names::router_namespace(v);
        state.namespaces.insert(router_ns.clone());
        let bridge = names::bridge(v);
        let mut link = |ns: &Ns, name: String, kind, master: Option<String>, mtu, mac| {
            state.links.insert(
                (ns.clone(), name),
                Link {
                    kind,
                    master,
                    mtu,
                    mac,
                    learning: None,
                    up: true,
                },
            );
        };
        link(
            &None,
            bridge.clone(),
            LinkKind::Bridge,
            None,
            Some(mtu),
            None,
        );
        link(
            &None,
            names::vxlan(v),
            LinkKind::Vxlan {
                vni: v,
                local: underlay,
                port: 4789,
            },
            Some(bridge.clone()),
            Some(mtu),
            None,
        );
        link(
            &None,
            names::gateway_leg(v),
            LinkKind::Veth {
                peer: names::router_gateway(v),
                peer_ns: router_ns.clone(),
            },
            Some(bridge.clone()),
            Some(mtu),
            None,
        );
        link(
            &ns,
            names::router_gateway(v),
            LinkKind::VethPeer,
            None,
            Some(mtu),
            Some(gateway_mac(v)),
        );
        link(
            &None,
            names::transit_leg(v),
            LinkKind::Veth {
                peer: names::router_transit(v),
                peer_ns: router_ns.clone(),
            },
            None,
            None,
            None,
        );
        link(
            &ns,
            names::router_transit(v),
            LinkKind::VethPeer,
            None,
            None,
            None,
        );
        link(&ns, "lo".into(), LinkKind::Foreign, None, None, None);
        for port in &local_ports {
            if let Location::Local { ifname, .. } = &port.location {
                link(
                    &None,
                    ifname.clone(),
                    LinkKind::Foreign,
                    Some(bridge.clone()),
                    None,
                    None,
                );
            }
        }
        if let Some(l) = state.links.get_mut(&(None, names::vxlan(v))) {
            l.learning = Some(false);
        }

        for subnet in &vpc.subnets {
            let gateway = crate::Ipv4Net::new(subnet.gateway, subnet.cidr.prefix_len())
                .expect("prefix of a valid network");
            state
                .addresses
                .insert((ns.clone(), names::router_gateway(v), gateway));
        }
        state.addresses.insert((
            ns.clone(),
            names::router_transit(v),
            host(transit_router(v)),
        ));
        state
            .addresses
            .insert((None, names::transit_leg(v), host(TRANSIT_NODE)));
        state.routes.insert((
            ns.clone(),
            Route {
                destination: host(TRANSIT_NODE),
                via: None,
                dev: names::router_transit(v),
            },
        ));
        state.routes.insert((
            ns.clone(),
            Route {
                destination: crate::Ipv4Net::default(),
                via: Some(TRANSIT_NODE),
                dev: names::router_transit(v),
            },
        ));
        state.routes.insert((
            None,
            Route {
                destination: host(transit_router(v)),
                via: None,
                dev: names::transit_leg(v),
            },
        ));

        for port in &vpc.ports {
            state
                .neighbours
                .insert((ns.clone(), names::router_gateway(v), port.ip, port.mac));
            match &port.location {
                Location::Remote { vtep } => {
                    state.fdb.insert((names::vxlan(v), port.mac, *vtep));
                    state.bridge_fdb.insert((names::vxlan(v), port.mac));
                }
                Location::Local {
                    floating_ip: Some(fip),
                    ..
                } => {
                    state.routes.insert((
                        None,
                        Route {
                            destination: host(*fip),
                            via: Some(transit_router(v)),
                            dev: names::transit_leg(v),
                        },
                    ));
                    if let Some(uplink) = &network.uplink {
                        state.proxies.insert((uplink.clone(), *fip));
                    }
                }
                Location::Local { .. } => {}
            }
        }
        for vtep in &vpc.remote_vteps {
            if *vtep != underlay {
                state.fdb.insert((names::vxlan(v), [0; 6], *vtep));
            }
        }
    }
    state
}
