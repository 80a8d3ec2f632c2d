//! The planner: desired and observed kernel state in, the ordered actions
//! that turn one into the other out. Pure and deterministic; what is already
//! right is never touched, so applying an unchanged network twice does
//! nothing the second time.

use std::fmt;
use std::net::Ipv4Addr;

use crate::kernel::{KernelState, Link, LinkKind, Ns, Route};
use crate::{format_mac, names, Ipv4Net, Mac};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CreateNamespace(String),
    DeleteNamespace(String),
    CreateLink {
        ns: Ns,
        name: String,
        kind: LinkKind,
    },
    DeleteLink {
        ns: Ns,
        name: String,
    },
    /// Takes an interface Allod does not know off one of its bridges.
    Detach {
        ns: Ns,
        name: String,
        bridge: String,
    },
    /// Brings attributes in line; `None` fields are left alone.
    SetLink {
        ns: Ns,
        name: String,
        master: Option<String>,
        mtu: Option<u32>,
        mac: Option<Mac>,
        learning: Option<bool>,
        up: bool,
    },
    AddAddress {
        ns: Ns,
        dev: String,
        address: Ipv4Net,
    },
    DeleteAddress {
        ns: Ns,
        dev: String,
        address: Ipv4Net,
    },
    AddRoute {
        ns: Ns,
        route: Route,
    },
    DeleteRoute {
        ns: Ns,
        route: Route,
    },
    AddNeighbour {
        ns: Ns,
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    DeleteNeighbour {
        ns: Ns,
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    AddFdb {
        dev: String,
        mac: Mac,
        vtep: Ipv4Addr,
    },
    DeleteFdb {
        dev: String,
        mac: Mac,
        vtep: Ipv4Addr,
    },
    AddBridgeFdb {
        port: String,
        mac: Mac,
    },
    DeleteBridgeFdb {
        port: String,
        mac: Mac,
    },
    AddProxy {
        dev: String,
        ip: Ipv4Addr,
    },
    DeleteProxy {
        dev: String,
        ip: Ipv4Addr,
    },
}

fn ns_name(ns: &Ns) -> &str {
    ns.as_deref().unwrap_or("node")
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateNamespace(n) => write!(f, "create namespace {n}"),
            Action::DeleteNamespace(n) => write!(f, "delete namespace {n}"),
            Action::CreateLink { ns, name, kind } => {
                write!(f, "create {kind:?} {name} in {}", ns_name(ns))
            }
            Action::DeleteLink { ns, name } => write!(f, "delete link {name} in {}", ns_name(ns)),
            Action::Detach { ns, name, bridge } => {
                write!(f, "detach {name} from {bridge} in {}", ns_name(ns))
            }
            Action::SetLink {
                ns,
                name,
                master,
                mtu,
                mac,
                learning,
                up,
            } => {
                write!(f, "set {name} in {}:", ns_name(ns))?;
                if let Some(l) = learning {
                    write!(f, " learning {}", if *l { "on" } else { "off" })?;
                }
                if let Some(m) = master {
                    write!(f, " master {m}")?;
                }
                if let Some(m) = mtu {
                    write!(f, " mtu {m}")?;
                }
                if let Some(m) = mac {
                    write!(f, " address {}", format_mac(m))?;
                }
                write!(f, " {}", if *up { "up" } else { "down" })
            }
            Action::AddAddress { ns, dev, address } => {
                write!(f, "add address {address} to {dev} in {}", ns_name(ns))
            }
            Action::DeleteAddress { ns, dev, address } => {
                write!(f, "delete address {address} from {dev} in {}", ns_name(ns))
            }
            Action::AddRoute { ns, route } => {
                write!(f, "add route {} in {}", show_route(route), ns_name(ns))
            }
            Action::DeleteRoute { ns, route } => {
                write!(f, "delete route {} in {}", show_route(route), ns_name(ns))
            }
            Action::AddNeighbour { ns, dev, ip, mac } => write!(
                f,
                "add neighbour {ip} lladdr {} on {dev} in {}",
                format_mac(mac),
                ns_name(ns)
            ),
            Action::DeleteNeighbour { ns, dev, ip, mac } => write!(
                f,
                "delete neighbour {ip} lladdr {} on {dev} in {}",
                format_mac(mac),
                ns_name(ns)
            ),
            Action::AddFdb { dev, mac, vtep } => {
                write!(f, "add fdb {} dst {vtep} on {dev}", format_mac(mac))
            }
            Action::DeleteFdb { dev, mac, vtep } => {
                write!(f, "delete fdb {} dst {vtep} on {dev}", format_mac(mac))
            }
            Action::AddBridgeFdb { port, mac } => {
                write!(f, "add bridge fdb {} on {port}", format_mac(mac))
            }
            Action::DeleteBridgeFdb { port, mac } => {
                write!(f, "delete bridge fdb {} on {port}", format_mac(mac))
            }
            Action::AddProxy { dev, ip } => write!(f, "add proxy ARP for {ip} on {dev}"),
            Action::DeleteProxy { dev, ip } => write!(f, "delete proxy ARP for {ip} on {dev}"),
        }
    }
}

fn show_route(route: &Route) -> String {
    match route.via {
        Some(via) => format!("{} via {via} dev {}", route.destination, route.dev),
        None => format!("{} dev {}", route.destination, route.dev),
    }
}

/// Creation order of link kinds: bridges before their ports.
fn rank(kind: &LinkKind) -> u8 {
    match kind {
        LinkKind::Bridge => 0,
        _ => 1,
    }
}

fn same_kind(desired: &LinkKind, observed: &LinkKind) -> bool {
    match (desired, observed) {
        // The observer cannot see a veth's far end by name; the planner
        // checks the far end exists instead.
        (LinkKind::Veth { .. }, LinkKind::Veth { .. }) => true,
        (LinkKind::VethPeer, LinkKind::Veth { .. } | LinkKind::VethPeer) => true,
        (LinkKind::Foreign, _) => true,
        (d, o) => d == o,
    }
}

/// The actions that turn `observed` into `desired`. `observed` holds only
/// objects the fabric owns or names (see [`crate::netlink`]); anything else
/// in the kernel is outside the comparison and never touched.
pub fn plan(desired: &KernelState, observed: &KernelState) -> Vec<Action> {
    let mut actions = Vec::new();
    // Namespaces that go take their contents with them.
    let dropped_ns: Vec<&String> = observed
        .namespaces
        .difference(&desired.namespaces)
        .collect();
    let in_dropped = |ns: &Ns| ns.as_ref().is_some_and(|n| dropped_ns.contains(&n));

    // Links to recreate: wrong kind, or a veth whose far end is missing.
    let mut recreate = Vec::new();
    for (key, want) in &desired.links {
        let Some(have) = observed.links.get(key) else {
            continue;
        };
        if !same_kind(&want.kind, &have.kind) {
            recreate.push(key.clone());
        }
        if let LinkKind::Veth { peer, peer_ns } = &want.kind {
            if !observed
                .links
                .contains_key(&(Some(peer_ns.clone()), peer.clone()))
            {
                recreate.push(key.clone());
            }
        }
    }
    // A veth's far end without its near end is an orphan of a broken pair.
    for (key, want) in &desired.links {
        if let LinkKind::Veth { peer, peer_ns } = &want.kind {
            let far = (Some(peer_ns.clone()), peer.clone());
            if !observed.links.contains_key(key) && observed.links.contains_key(&far) {
                recreate.push(far);
            }
        }
    }

    // Removals first, innermost objects first.
    for (ns, route) in observed.routes.difference(&desired.routes) {
        if !in_dropped(ns) {
            actions.push(Action::DeleteRoute {
                ns: ns.clone(),
                route: route.clone(),
            });
        }
    }
    for (ns, dev, ip, mac) in observed.neighbours.difference(&desired.neighbours) {
        if !in_dropped(ns) {
            actions.push(Action::DeleteNeighbour {
                ns: ns.clone(),
                dev: dev.clone(),
                ip: *ip,
                mac: *mac,
            });
        }
    }
    for (dev, mac, vtep) in observed.fdb.difference(&desired.fdb) {
        actions.push(Action::DeleteFdb {
            dev: dev.clone(),
            mac: *mac,
            vtep: *vtep,
        });
    }
    for (port, mac) in observed.bridge_fdb.difference(&desired.bridge_fdb) {
        actions.push(Action::DeleteBridgeFdb {
            port: port.clone(),
            mac: *mac,
        });
    }
    for (dev, ip) in observed.proxies.difference(&desired.proxies) {
        actions.push(Action::DeleteProxy {
            dev: dev.clone(),
            ip: *ip,
        });
    }
    for (ns, dev, address) in observed.addresses.difference(&desired.addresses) {
        if !in_dropped(ns) {
            actions.push(Action::DeleteAddress {
                ns: ns.clone(),
                dev: dev.clone(),
                address: *address,
            });
        }
    }
    let mut doomed: Vec<(&(Ns, String), &Link)> = observed
        .links
        .iter()
        .filter(|(key, link)| {
            let (ns, name) = key;
            if in_dropped(ns) {
                return false;
            }
            let owned = match ns {
                None => names::owned_link(name),
                Some(_) => link.kind != LinkKind::Foreign && name != "lo",
            };
            owned && (!desired.links.contains_key(*key) || recreate.contains(*key))
        })
        .collect();
    // An interface on an Allod bridge that is no port of Allod's (a tap
    // left by a deleted port, one attached by hand) would bypass the
    // firewall: it comes off the bridge (unless the bridge itself goes).
    for ((ns, name), link) in &observed.links {
        let on_ours = link.master.as_deref().is_some_and(|m| {
            m.starts_with("albr-") && desired.links.contains_key(&(ns.clone(), m.to_string()))
        });
        if ns.is_none()
            && on_ours
            && !names::owned_link(name)
            && !desired.links.contains_key(&(ns.clone(), name.clone()))
        {
            actions.push(Action::Detach {
                ns: ns.clone(),
                name: name.clone(),
                bridge: link.master.clone().unwrap_or_default(),
            });
        }
    }
    // Ports before their bridges.
    doomed.sort_by_key(|(key, link)| (std::cmp::Reverse(rank(&link.kind)), (*key).clone()));
    for ((ns, name), _) in doomed {
        actions.push(Action::DeleteLink {
            ns: ns.clone(),
            name: name.clone(),
        });
    }
    for ns in &dropped_ns {
        actions.push(Action::DeleteNamespace((*ns).clone()));
    }

    // Then creations, outermost first.
    let mut fresh = std::collections::BTreeSet::new();
    for ns in desired.namespaces.difference(&observed.namespaces) {
        actions.push(Action::CreateNamespace(ns.clone()));
        // A new namespace comes with its loopback, down.
        fresh.insert((Some(ns.clone()), "lo".to_string()));
    }
    let mut created: Vec<(&(Ns, String), &Link)> = desired
        .links
        .iter()
        .filter(|(key, link)| {
            matches!(
                link.kind,
                LinkKind::Bridge | LinkKind::Vxlan { .. } | LinkKind::Veth { .. }
            ) && (!observed.links.contains_key(*key) || recreate.contains(*key))
        })
        .collect();
    created.sort_by_key(|(key, link)| (rank(&link.kind), (*key).clone()));
    for ((ns, name), link) in created {
        actions.push(Action::CreateLink {
            ns: ns.clone(),
            name: name.clone(),
            kind: link.kind.clone(),
        });
        fresh.insert((ns.clone(), name.clone()));
        if let LinkKind::Veth { peer, peer_ns } = &link.kind {
            fresh.insert((Some(peer_ns.clone()), peer.clone()));
        }
    }
    let mut settings: Vec<(&(Ns, String), &Link)> = desired.links.iter().collect();
    settings.sort_by_key(|(key, link)| (rank(&link.kind), (*key).clone()));
    for (key, want) in settings {
        let have = if fresh.contains(key) {
            None
        } else {
            match observed.links.get(key) {
                Some(have) => Some(have),
                // A foreign link that is not there (a VM not started yet)
                // is waited for, not made.
                None if want.kind == LinkKind::Foreign => continue,
                None => None,
            }
        };
        let master_ok = have.is_some_and(|h| h.master == want.master);
        let mtu_ok = want.mtu.is_none() || have.is_some_and(|h| h.mtu == want.mtu);
        let mac_ok = want.mac.is_none() || have.is_some_and(|h| h.mac == want.mac);
        let up_ok = have.is_some_and(|h| h.up == want.up);
        let learning_ok =
            want.learning.is_none() || have.is_some_and(|h| h.learning == want.learning);
        if master_ok && mtu_ok && mac_ok && up_ok && learning_ok {
            continue;
        }
        actions.push(Action::SetLink {
            ns: key.0.clone(),
            name: key.1.clone(),
            master: if master_ok { None } else { want.master.clone() },
            mtu: if mtu_ok { None } else { want.mtu },
            mac: if mac_ok { None } else { want.mac },
            learning: if learning_ok { None } else { want.learning },
            up: want.up,
        });
    }
    // Objects on a link just made are gone with the old one: add them all.
    let on_fresh = |ns: &Ns, dev: &String| fresh.contains(&(ns.clone(), dev.clone()));
    for (ns, dev, address) in &desired.addresses {
        if !observed
            .addresses
            .contains(&(ns.clone(), dev.clone(), *address))
            || on_fresh(ns, dev)
        {
            actions.push(Action::AddAddress {
                ns: ns.clone(),
                dev: dev.clone(),
                address: *address,
            });
        }
    }
    // Device routes before routes through a gateway they reach.
    let mut routes: Vec<&(Ns, Route)> = desired
        .routes
        .iter()
        .filter(|entry| !observed.routes.contains(entry) || on_fresh(&entry.0, &entry.1.dev))
        .collect();
    routes.sort_by_key(|(ns, route)| (route.via.is_some(), ns.clone(), route.clone()));
    for (ns, route) in routes {
        actions.push(Action::AddRoute {
            ns: ns.clone(),
            route: route.clone(),
        });
    }
    for entry @ (ns, dev, ip, mac) in &desired.neighbours {
        if !observed.neighbours.contains(entry) || on_fresh(ns, dev) {
            actions.push(Action::AddNeighbour {
                ns: ns.clone(),
                dev: dev.clone(),
                ip: *ip,
                mac: *mac,
            });
        }
    }
    for entry @ (dev, mac, vtep) in &desired.fdb {
        if !observed.fdb.contains(entry) || on_fresh(&None, dev) {
            actions.push(Action::AddFdb {
                dev: dev.clone(),
                mac: *mac,
                vtep: *vtep,
            });
        }
    }
    for entry @ (port, mac) in &desired.bridge_fdb {
        if !observed.bridge_fdb.contains(entry) || on_fresh(&None, port) {
            actions.push(Action::AddBridgeFdb {
                port: port.clone(),
                mac: *mac,
            });
        }
    }
    for entry @ (dev, ip) in &desired.proxies {
        if !observed.proxies.contains(entry) {
            actions.push(Action::AddProxy {
                dev: dev.clone(),
                ip: *ip,
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::desired;
    use crate::{Location, NodeNetwork, Port, Subnet, Vpc};

    fn network(remote_vtep: &str, with_port: bool) -> NodeNetwork {
        let mut ports = vec![Port {
            id: "b".into(),
            mac: [2, 0, 0, 0, 0, 2],
            ip: "10.0.0.3".parse().unwrap(),
            location: Location::Remote {
                vtep: remote_vtep.parse().unwrap(),
            },
        }];
        if with_port {
            ports.push(Port {
                id: "a".into(),
                mac: [2, 0, 0, 0, 0, 1],
                ip: "10.0.0.2".parse().unwrap(),
                location: Location::Local {
                    ifname: "alpa".into(),
                    security_groups: vec![],
                    floating_ip: None,
                    hostname: "a".into(),
                },
            });
        }
        NodeNetwork {
            underlay: Some("192.0.2.1".parse().unwrap()),
            underlay_mtu: 1500,
            vpcs: vec![Vpc {
                vni: 7,
                subnets: vec![Subnet {
                    cidr: "10.0.0.0/24".parse().unwrap(),
                    gateway: "10.0.0.1".parse().unwrap(),
                    dns: vec![],
                }],
                remote_vteps: vec![remote_vtep.parse().unwrap()],
                ports,
            }],
            ..Default::default()
        }
    }

    /// What the kernel looks like once `state` was built (the tap exists).
    fn built(state: &KernelState) -> KernelState {
        state.clone()
    }

    fn check(desired: &KernelState, observed: &KernelState, expect: &[&str]) {
        let got: Vec<String> = plan(desired, observed)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn an_empty_node_gets_everything_in_order() {
        let got: Vec<String> = plan(
            &desired(&network("192.0.2.2", true)),
            &KernelState::default(),
        )
        .iter()
        .map(|a| a.to_string())
        .collect();
        let position = |prefix: &str| {
            got.iter()
                .position(|a| a.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in {got:#?}"))
        };
        assert_eq!(got[0], "create namespace alrt-7");
        assert!(position("create Bridge albr-7") < position("create Vxlan"));
        assert!(
            position("create Vxlan") < position("set alvx-7 in node: learning off master albr-7")
        );
        assert!(
            position("add route 169.254.0.1/32 dev alrx-7") < position("add route 0.0.0.0/0 via")
        );
        assert!(got.contains(&"add fdb 00:00:00:00:00:00 dst 192.0.2.2 on alvx-7".to_string()));
        assert!(got.contains(&"add fdb 02:00:00:00:00:02 dst 192.0.2.2 on alvx-7".to_string()));
        assert!(got.contains(
            &"add neighbour 10.0.0.3 lladdr 02:00:00:00:00:02 on alrg-7 in alrt-7".to_string()
        ));
        assert!(got.contains(&"add address 10.0.0.1/24 to alrg-7 in alrt-7".to_string()));
    }

    #[test]
    fn a_built_node_needs_nothing() {
        let want = desired(&network("192.0.2.2", true));
        check(&want, &built(&want), &[]);
    }

    #[test]
    fn a_remote_port_that_moves_changes_only_its_forwarding_entries() {
        let before = desired(&network("192.0.2.2", true));
        let after = desired(&network("192.0.2.3", true));
        check(
            &after,
            &built(&before),
            &[
                "delete fdb 00:00:00:00:00:00 dst 192.0.2.2 on alvx-7",
                "delete fdb 02:00:00:00:00:02 dst 192.0.2.2 on alvx-7",
                "add fdb 00:00:00:00:00:00 dst 192.0.2.3 on alvx-7",
                "add fdb 02:00:00:00:00:02 dst 192.0.2.3 on alvx-7",
            ],
        );
    }

    #[test]
    fn the_last_local_port_going_takes_the_vpc_off_the_node() {
        let before = desired(&network("192.0.2.2", true));
        let after = desired(&network("192.0.2.2", false));
        let got: Vec<String> = plan(&after, &built(&before))
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert!(
            got.contains(&"delete namespace alrt-7".to_string()),
            "{got:#?}"
        );
        assert!(got.contains(&"delete link albr-7 in node".to_string()));
        // The tap is the VM's: detached by libvirt, never deleted here.
        assert!(!got.iter().any(|a| a.contains("alpa")), "{got:#?}");
        // Bridge ports go before the bridge.
        let bridge = got
            .iter()
            .position(|a| a == "delete link albr-7 in node")
            .unwrap();
        let vxlan = got
            .iter()
            .position(|a| a == "delete link alvx-7 in node")
            .unwrap();
        assert!(vxlan < bridge);
    }

    #[test]
    fn a_tap_not_there_yet_is_waited_for_and_attached_when_it_appears() {
        let want = desired(&network("192.0.2.2", true));
        let mut observed = built(&want);
        observed.links.remove(&(None, "alpa".to_string()));
        check(&want, &observed, &[]);
        let mut tap = want.links[&(None, "alpa".to_string())].clone();
        tap.master = None;
        tap.up = false;
        observed.links.insert((None, "alpa".into()), tap);
        check(&want, &observed, &["set alpa in node: master albr-7 up"]);
    }

    #[test]
    fn an_interface_allod_does_not_know_comes_off_its_bridge() {
        let want = desired(&network("192.0.2.2", true));
        let mut observed = built(&want);
        let mut stray = want.links[&(None, "alpa".to_string())].clone();
        stray.master = Some("albr-7".into());
        observed.links.insert((None, "vnet3".into()), stray.clone());
        // On someone else's bridge it is none of Allod's business.
        stray.master = Some("br0".into());
        observed.links.insert((None, "vnet4".into()), stray);
        check(&want, &observed, &["detach vnet3 from albr-7 in node"]);
    }
}
