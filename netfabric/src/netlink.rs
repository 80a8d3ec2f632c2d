//! The executor: observes what the fabric owns in the kernel and carries
//! out the planner's actions, through rtnetlink in the node's namespace and
//! in each router namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::kernel::{KernelState, Link, LinkKind, Ns, Route};
use crate::plan::Action;
use crate::{names, netns, Error, Ipv4Net, Mac, NodeNetwork};

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// One rtnetlink connection per namespace, opened when first needed.
pub struct Connections {
    dir: PathBuf,
    root: Option<Handle>,
    namespaces: HashMap<String, Handle>,
}

impl Connections {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            root: None,
            namespaces: HashMap::new(),
        }
    }

    fn handle(&mut self, ns: &Ns) -> Result<Handle, Error> {
        let open_error = |name: &str, source| Error::Namespace {
            name: name.to_string(),
            what: "cannot open a netlink socket",
            source,
        };
        match ns {
            None => {
                if self.root.is_none() {
                    let (connection, handle, _) =
                        rtnetlink::new_connection().map_err(|e| open_error("node", e))?;
                    tokio::spawn(connection);
                    self.root = Some(handle);
                }
                Ok(self.root.clone().expect("just set"))
            }
            Some(name) => {
                if let Some(handle) = self.namespaces.get(name) {
                    return Ok(handle.clone());
                }
                let runtime = tokio::runtime::Handle::current();
                let (connection, handle, _) =
                    netns::run_in(&netns::path(&self.dir, name), move || {
                        // The socket registers with the runtime's reactor.
                        let _guard = runtime.enter();
                        rtnetlink::new_connection()
                    })
                    .map_err(|e| open_error(name, e))?;
                tokio::spawn(connection);
                self.namespaces.insert(name.clone(), handle.clone());
                Ok(handle)
            }
        }
    }

    /// What the fabric owns in the kernel now: router namespaces in `dir`,
    /// the `al…` links of the node and everything in router namespaces,
    /// the addresses, routes and neighbours on them, the FDB of the VXLAN
    /// devices and proxy ARP entries for floating-IP pool addresses.
    pub async fn observe(
        &mut self,
        network: &NodeNetwork,
        dir: &Path,
    ) -> Result<KernelState, Error> {
        let mut state = KernelState::default();
        let namespaces = netns::list(dir);
        self.namespaces.retain(|name, _| namespaces.contains(name));
        state.namespaces = namespaces.iter().cloned().collect();
        let mut scopes: Vec<Ns> = vec![None];
        scopes.extend(namespaces.into_iter().map(Some));
        for ns in scopes {
            let handle = self.handle(&ns)?;
            let links = dump_links(&handle).await?;
            let by_index: HashMap<u32, &LinkMessage> =
                links.iter().map(|l| (l.header.index, l)).collect();
            let name_of = |index: u32| by_index.get(&index).and_then(|l| link_name(l));
            let mine = |name: &str| ns.is_some() || name.starts_with("al");
            for message in &links {
                let Some(name) = link_name(message) else {
                    continue;
                };
                let master = message.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Controller(i) => name_of(*i),
                    _ => None,
                });
                // Links of Allod's, and whatever is plugged into its bridges.
                let on_ours = master.as_deref().is_some_and(|m| m.starts_with("albr-"));
                if !mine(&name) && !on_ours {
                    continue;
                }
                let mtu = message.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                });
                let mac = message.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
                    _ => None,
                });
                let kind = link_kind(message, ns.is_some(), &name);
                let learning = port_learning(message);
                state.links.insert(
                    (ns.clone(), name),
                    Link {
                        kind,
                        master,
                        mtu,
                        mac,
                        learning,
                        up: message.header.flags.contains(LinkFlags::Up),
                    },
                );
            }

            let addresses: Vec<AddressMessage> = handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("list addresses"))?;
            for a in addresses {
                let Some(dev) = name_of(a.header.index) else {
                    continue;
                };
                if !mine(&dev) || dev == "lo" {
                    continue;
                }
                let ip = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                if let Some(net) = ip.and_then(|ip| Ipv4Net::new(ip, a.header.prefix_len).ok()) {
                    state.addresses.insert((ns.clone(), dev, net));
                }
            }

            let routes: Vec<RouteMessage> = handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl("list routes"))?;
            for r in routes {
                if r.header.table != 254
                    || r.header.protocol == RouteProtocol::Kernel
                    || r.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let mut destination = Ipv4Addr::UNSPECIFIED;
                let mut via = None;
                let mut dev = None;
                for attribute in &r.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => destination = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                        RouteAttribute::Oif(i) => dev = name_of(*i),
                        _ => {}
                    }
                }
                let Some(dev) = dev else { continue };
                if !mine(&dev) {
                    continue;
                }
                if let Ok(destination) =
                    Ipv4Net::new(destination, r.header.destination_prefix_length)
                {
                    state.routes.insert((
                        ns.clone(),
                        Route {
                            destination,
                            via,
                            dev,
                        },
                    ));
                }
            }

            if ns.is_some() {
                for n in dump_neighbours(&handle, AddressFamily::Inet, false).await? {
                    if n.header.state != NeighbourState::Permanent {
                        continue;
                    }
                    let Some(dev) = name_of(n.header.ifindex) else {
                        continue;
                    };
                    if let (Some(IpAddr::V4(ip)), Some(mac)) = (neighbour_ip(&n), neighbour_mac(&n))
                    {
                        state.neighbours.insert((ns.clone(), dev, ip, mac));
                    }
                }
            } else {
                for n in dump_neighbours(&handle, AddressFamily::Bridge, false).await? {
                    let Some(dev) = name_of(n.header.ifindex) else {
                        continue;
                    };
                    if !dev.starts_with("alvx-") {
                        continue;
                    }
                    match (neighbour_ip(&n), neighbour_mac(&n)) {
                        (Some(IpAddr::V4(vtep)), Some(mac)) => {
                            state.fdb.insert((dev, mac, vtep));
                        }
                        (None, Some(mac))
                            if n.header.state == NeighbourState::Noarp
                                && n.attributes
                                    .iter()
                                    .any(|a| matches!(a, NeighbourAttribute::Controller(_))) =>
                        {
                            state.bridge_fdb.insert((dev, mac));
                        }
                        _ => {}
                    }
                }
                if let Some(uplink) = &network.uplink {
                    for n in dump_neighbours(&handle, AddressFamily::Inet, true).await? {
                        if name_of(n.header.ifindex).as_deref() != Some(uplink.as_str()) {
                            continue;
                        }
                        if let Some(IpAddr::V4(ip)) = neighbour_ip(&n) {
                            if network.fip_pools.iter().any(|pool| pool.contains(&ip)) {
                                state.proxies.insert((uplink.clone(), ip));
                            }
                        }
                    }
                }
            }
        }
        Ok(state)
    }

    async fn index(&mut self, ns: &Ns, name: &str) -> Result<u32, Error> {
        let handle = self.handle(ns)?;
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        match links
            .try_next()
            .await
            .map_err(nl(format!("find link {name}")))?
        {
            Some(link) => Ok(link.header.index),
            None => Err(Error::Netlink {
                what: format!("find link {name}"),
                source: rtnetlink::Error::RequestFailed,
            }),
        }
    }

    /// Carries out one planned action.
    pub async fn execute(&mut self, action: &Action) -> Result<(), Error> {
        let what = action.to_string();
        match action {
            Action::CreateNamespace(name) => netns::create(&self.dir, name)?,
            Action::DeleteNamespace(name) => {
                self.namespaces.remove(name);
                netns::delete(&self.dir, name)?;
            }
            Action::CreateLink { ns, name, kind } => {
                let handle = self.handle(ns)?;
                let message = match kind {
                    LinkKind::Bridge => LinkBridge::new(name).nf_call_iptables(true).build(),
                    LinkKind::Vxlan { vni, local, port } => LinkVxlan::new(name, *vni)
                        .local(*local)
                        .port(*port)
                        .learning(false)
                        .build(),
                    LinkKind::Veth { peer, .. } => LinkVeth::new(name, peer).build(),
                    LinkKind::VethPeer | LinkKind::Foreign => return Ok(()),
                };
                handle
                    .link()
                    .add(message)
                    .execute()
                    .await
                    .map_err(nl(&what))?;
                if let LinkKind::Veth { peer, peer_ns } = kind {
                    let index = self.index(&None, peer).await?;
                    let file =
                        std::fs::File::open(netns::path(&self.dir, peer_ns)).map_err(|e| {
                            Error::Namespace {
                                name: peer_ns.clone(),
                                what: "cannot open",
                                source: e,
                            }
                        })?;
                    use std::os::fd::AsRawFd;
                    handle
                        .link()
                        .set(
                            LinkUnspec::new_with_index(index)
                                .setns_by_fd(file.as_raw_fd())
                                .build(),
                        )
                        .execute()
                        .await
                        .map_err(nl(&what))?;
                }
            }
            Action::DeleteLink { ns, name } => {
                let index = self.index(ns, name).await?;
                let handle = self.handle(ns)?;
                handle
                    .link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
            Action::Detach { ns, name, .. } => {
                let index = self.index(ns, name).await?;
                let link = LinkUnspec::new_with_index(index).nocontroller().build();
                let handle = self.handle(ns)?;
                handle.link().set(link).execute().await.map_err(nl(&what))?;
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
                let index = self.index(ns, name).await?;
                let mut builder = LinkUnspec::new_with_index(index);
                if let Some(master) = master {
                    let master = self.index(ns, master).await?;
                    builder = builder.controller(master);
                }
                if let Some(mtu) = mtu {
                    builder = builder.mtu(*mtu);
                }
                if let Some(mac) = mac {
                    builder = builder.address(mac.to_vec());
                }
                builder = if *up { builder.up() } else { builder.down() };
                let handle = self.handle(ns)?;
                handle
                    .link()
                    .set(builder.build())
                    .execute()
                    .await
                    .map_err(nl(&what))?;
                if let Some(learning) = learning {
                    let port = rtnetlink::LinkBridgePort::new(index)
                        .append_info_data(InfoBridgePort::Learning(*learning))
                        .build();
                    handle
                        .link()
                        .set_port(port)
                        .execute()
                        .await
                        .map_err(nl(&what))?;
                }
            }
            Action::AddAddress { ns, dev, address } => {
                let index = self.index(ns, dev).await?;
                let handle = self.handle(ns)?;
                handle
                    .address()
                    .add(index, IpAddr::V4(address.addr()), address.prefix_len())
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
            Action::DeleteAddress { ns, dev, address } => {
                let index = self.index(ns, dev).await?;
                let handle = self.handle(ns)?;
                let mut found = handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .set_address_filter(IpAddr::V4(address.addr()))
                    .execute();
                while let Some(message) = found.try_next().await.map_err(nl(&what))? {
                    handle
                        .address()
                        .del(message)
                        .execute()
                        .await
                        .map_err(nl(&what))?;
                }
            }
            Action::AddRoute { ns, route } | Action::DeleteRoute { ns, route } => {
                let index = self.index(ns, &route.dev).await?;
                let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(route.destination.addr(), route.destination.prefix_len())
                    .output_interface(index)
                    .protocol(RouteProtocol::Static);
                builder = match route.via {
                    Some(via) => builder.gateway(via).onlink(),
                    None => builder.scope(RouteScope::Link),
                };
                let handle = self.handle(ns)?;
                if matches!(action, Action::AddRoute { .. }) {
                    handle
                        .route()
                        .add(builder.build())
                        .replace()
                        .execute()
                        .await
                } else {
                    handle.route().del(builder.build()).execute().await
                }
                .map_err(nl(&what))?;
            }
            Action::AddNeighbour { ns, dev, ip, mac } => {
                let index = self.index(ns, dev).await?;
                let handle = self.handle(ns)?;
                handle
                    .neighbours()
                    .add(index, IpAddr::V4(*ip))
                    .link_layer_address(mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
            Action::DeleteNeighbour { ns, dev, ip, .. } => {
                let index = self.index(ns, dev).await?;
                let mut message = NeighbourMessage::default();
                message.header.family = AddressFamily::Inet;
                message.header.ifindex = index;
                message
                    .attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
                let handle = self.handle(ns)?;
                handle
                    .neighbours()
                    .del(message)
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
            Action::AddFdb { dev, mac, vtep } => {
                let index = self.index(&None, dev).await?;
                let message = fdb_message(index, mac, *vtep);
                // The all-zero entry needs one destination per remote node:
                // NLM_F_APPEND adds to the list instead of replacing it.
                let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message));
                request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
                send(self.handle(&None)?, request, &what).await?;
            }
            Action::DeleteFdb { dev, mac, vtep } => {
                let index = self.index(&None, dev).await?;
                let handle = self.handle(&None)?;
                handle
                    .neighbours()
                    .del(fdb_message(index, mac, *vtep))
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
            Action::AddBridgeFdb { port, mac } | Action::DeleteBridgeFdb { port, mac } => {
                let index = self.index(&None, port).await?;
                let mut message = NeighbourMessage::default();
                message.header.family = AddressFamily::Bridge;
                message.header.ifindex = index;
                message.header.state = NeighbourState::Noarp;
                message.header.flags = NeighbourFlags::Controller;
                message
                    .attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
                let handle = self.handle(&None)?;
                if matches!(action, Action::AddBridgeFdb { .. }) {
                    let mut request =
                        NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message));
                    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
                    send(handle, request, &what).await?;
                } else {
                    handle
                        .neighbours()
                        .del(message)
                        .execute()
                        .await
                        .map_err(nl(&what))?;
                }
            }
            Action::AddProxy { dev, ip } => {
                let index = self.index(&None, dev).await?;
                let handle = self.handle(&None)?;
                handle
                    .neighbours()
                    .add(index, IpAddr::V4(*ip))
                    .flags(NeighbourFlags::Proxy)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
            Action::DeleteProxy { dev, ip } => {
                let index = self.index(&None, dev).await?;
                let mut message = NeighbourMessage::default();
                message.header.family = AddressFamily::Inet;
                message.header.ifindex = index;
                message.header.flags = NeighbourFlags::Proxy;
                message
                    .attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
                let handle = self.handle(&None)?;
                handle
                    .neighbours()
                    .del(message)
                    .execute()
                    .await
                    .map_err(nl(&what))?;
            }
        }
        Ok(())
    }

    /// Forwarding on in every router namespace, and in the node's namespace
    /// when it has an uplink for NAT and floating IPs.
    pub async fn sysctls(&mut self, network: &NodeNetwork) -> Result<(), Error> {
        let set = |path: &str| -> std::io::Result<()> {
            if std::fs::read_to_string(path)?.trim() != "1" {
                std::fs::write(path, "1")?;
            }
            Ok(())
        };
        const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
        let sysctl = |source| Error::Sysctl {
            path: FORWARD.into(),
            source,
        };
        if network.uplink.is_some() && network.vpcs.iter().any(has_local) {
            set(FORWARD).map_err(sysctl)?;
        }
        for name in netns::list(&self.dir) {
            netns::run_in(&netns::path(&self.dir, &name), move || set(FORWARD)).map_err(sysctl)?;
        }
        Ok(())
    }
}

/// Sends a request built by hand and waits for its acknowledgement.
async fn send(
    mut handle: Handle,
    request: NetlinkMessage<RouteNetlinkMessage>,
    what: &str,
) -> Result<(), Error> {
    let mut response = handle.request(request).map_err(nl(what))?;
    while let Some(reply) = futures_util::StreamExt::next(&mut response).await {
        if let NetlinkPayload::Error(e) = reply.payload {
            if e.code.is_some() {
                return Err(nl(what)(rtnetlink::Error::NetlinkError(e)));
            }
        }
    }
    Ok(())
}

fn port_learning(message: &LinkMessage) -> Option<bool> {
    let infos = message.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    })?;
    infos.iter().find_map(|i| match i {
        LinkInfo::PortData(InfoPortData::BridgePort(data)) => data.iter().find_map(|d| match d {
            InfoBridgePort::Learning(l) => Some(*l),
            _ => None,
        }),
        _ => None,
    })
}

fn has_local(vpc: &crate::Vpc) -> bool {
    vpc.ports
        .iter()
        .any(|p| matches!(p.location, crate::Location::Local { .. }))
}

fn fdb_message(index: u32, mac: &Mac, vtep: Ipv4Addr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message.header.flags = NeighbourFlags::Own;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    message
        .attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            vtep,
        )));
    message
}

async fn dump_links(handle: &Handle) -> Result<Vec<LinkMessage>, Error> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))
}

async fn dump_neighbours(
    handle: &Handle,
    family: AddressFamily,
    proxies: bool,
) -> Result<Vec<NeighbourMessage>, Error> {
    let mut request = handle.neighbours().get().set_address_family(family);
    if proxies {
        request = request.proxies();
    }
    request
        .execute()
        .try_collect()
        .await
        .map_err(nl("list neighbours"))
}

fn link_name(message: &LinkMessage) -> Option<String> {
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_kind(message: &LinkMessage, in_router: bool, name: &str) -> LinkKind {
    let infos = message.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    });
    let Some(infos) = infos else {
        return LinkKind::Foreign;
    };
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    });
    match kind {
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Vxlan) => {
            let mut vni = 0;
            let mut local = Ipv4Addr::UNSPECIFIED;
            let mut port = 0;
            for info in infos {
                if let LinkInfo::Data(InfoData::Vxlan(data)) = info {
                    for d in data {
                        match d {
                            InfoVxlan::Id(v) => vni = *v,
                            InfoVxlan::Local(l) => local = *l,
                            InfoVxlan::Port(p) => port = *p,
                            _ => {}
                        }
                    }
                }
            }
            LinkKind::Vxlan { vni, local, port }
        }
        Some(InfoKind::Veth) if in_router => LinkKind::VethPeer,
        Some(InfoKind::Veth) if names::owned_link(name) => LinkKind::Veth {
            peer: String::new(),
            peer_ns: String::new(),
        },
        _ => LinkKind::Foreign,
    }
}

fn neighbour_ip(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        // Bridge-family entries (VXLAN FDB) carry the VTEP as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(|b| IpAddr::V4(Ipv4Addr::from(b)))
        }
        _ => None,
    })
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => m.as_slice().try_into().ok(),
        _ => None,
    })
}
