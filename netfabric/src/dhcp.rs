//! DHCP for the ports of this node: one server per VPC bridge, answering
//! only the MACs of ports that live here with the address IPAM gave them,
//! the subnet's router and DNS servers, and the segment's MTU.
//!
//! Replies are broadcast on the bridge (a client has no address yet); other
//! nodes hear the discover too and stay silent, as the MAC is not theirs.
//! Renewals sent to the gateway go unanswered until the client rebinds by
//! broadcast, which is answered.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder, Encodable};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::{names, Location, Mac, NodeNetwork};

/// Lease time offered: clients renew long before, and the address never
/// changes while the port exists.
const LEASE_SECONDS: u32 = 86_400;

/// What a port on this node is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u16,
    pub hostname: String,
}

type Leases = HashMap<u32, HashMap<Mac, Lease>>;

/// The leases `network` implies, by VNI and MAC.
pub fn leases(network: &NodeNetwork) -> Leases {
    let mut all = Leases::new();
    for vpc in &network.vpcs {
        for port in &vpc.ports {
            let Location::Local { hostname, .. } = &port.location else {
                continue;
            };
            let Some(subnet) = vpc.subnets.iter().find(|s| s.cidr.contains(&port.ip)) else {
                continue;
            };
            all.entry(vpc.vni).or_default().insert(
                port.mac,
                Lease {
                    ip: port.ip,
                    prefix: subnet.cidr.prefix_len(),
                    router: subnet.gateway,
                    dns: subnet.dns.clone(),
                    mtu: network.inner_mtu().min(u16::MAX as u32) as u16,
                    hostname: hostname.clone(),
                },
            );
        }
    }
    all
}

/// The DHCP servers of a node; [`Dhcp::update`] after each fabric apply.
pub struct Dhcp {
    leases: watch::Sender<Arc<Leases>>,
    servers: HashMap<u32, tokio::task::JoinHandle<()>>,
}

impl Default for Dhcp {
    fn default() -> Self {
        Self::new()
    }
}

impl Dhcp {
    pub fn new() -> Self {
        Self {
            leases: watch::channel(Arc::new(Leases::new())).0,
            servers: HashMap::new(),
        }
    }

    /// Serves the leases of `network`: starts a server on each bridge that
    /// has local ports, stops those whose VPC left.
    pub fn update(&mut self, network: &NodeNetwork) {
        let leases = leases(network);
        self.servers.retain(|vni, task| {
            let keep = leases.contains_key(vni) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for vni in leases.keys() {
            if self.servers.contains_key(vni) {
                continue;
            }
            match open(&names::bridge(*vni)) {
                Ok(socket) => {
                    let rx = self.leases.subscribe();
                    self.servers
                        .insert(*vni, tokio::spawn(serve(*vni, socket, rx)));
                }
                Err(e) => {
                    tracing::warn!(vni, error = %e, "cannot listen for DHCP on the VPC bridge; will retry")
                }
            }
        }
        self.leases.send_replace(Arc::new(leases));
    }
}

impl Drop for Dhcp {
    fn drop(&mut self) {
        for task in self.servers.values() {
            task.abort();
        }
    }
}

fn open(bridge: &str) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.bind_device(Some(bridge.as_bytes()))?;
    socket.set_broadcast(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67).into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

async fn serve(vni: u32, socket: tokio::net::UdpSocket, leases: watch::Receiver<Arc<Leases>>) {
    let mut buffer = vec![0u8; 1500];
    loop {
        let (len, from) = match socket.recv_from(&mut buffer).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(vni, error = %e, "DHCP receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let table = leases.borrow().clone();
        match handle_packet(&buffer[..len], table.get(&vni)) {
            Ok(Some(bytes)) => {
                let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
                if let Err(e) = socket.send_to(&bytes, to).await {
                    tracing::warn!(vni, error = %e, "DHCP reply not sent");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(vni, %from, "ignoring a packet: {e}"),
        }
    }
}

/// The reply, encoded, to one received packet: `Ok(None)` when none is
/// due, an error saying what was wrong when the packet is not DHCP or the
/// reply does not encode.
pub fn handle_packet(
    packet: &[u8],
    leases: Option<&HashMap<Mac, Lease>>,
) -> Result<Option<Vec<u8>>, String> {
    // dhcproto checks some option lengths with debug assertions only: in a
    // build with them, a guest's malformed option would panic the server
    // of its VPC. Such a packet is refused like any other that is not DHCP.
    let decoded = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(packet)))
        .map_err(|_| "it is not DHCP: an option has an impossible length".to_string())?;
    let request = decoded.map_err(|e| format!("it is not DHCP: {e}"))?;
    let Some(reply) = answer(&request, leases) else {
        return Ok(None);
    };
    reply
        .to_vec()
        .map(Some)
        .map_err(|e| format!("the reply does not encode: {e}"))
}

/// The reply to `request` from a server holding `leases`, if one is due.
pub fn answer(request: &Message, leases: Option<&HashMap<Mac, Lease>>) -> Option<Message> {
    if request.opcode() != Opcode::BootRequest || request.hlen() != 6 {
        return None;
    }
    let mac: Mac = request.chaddr().get(..6)?.try_into().ok()?;
    let lease = leases?.get(&mac)?;
    let kind = match request.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            let asked = match request
                .opts()
                .get(dhcproto::v4::OptionCode::RequestedIpAddress)
            {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ => request.ciaddr(),
            };
            let server = match request
                .opts()
                .get(dhcproto::v4::OptionCode::ServerIdentifier)
            {
                Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
                _ => None,
            };
            if server.is_some_and(|s| s != lease.router) {
                // The client chose another server's offer.
                return None;
            }
            if asked == lease.ip {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        MessageType::Inform => MessageType::Ack,
        _ => return None,
    };
    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_xid(request.xid())
        .set_flags(request.flags())
        .set_chaddr(&mac)
        .set_giaddr(request.giaddr());
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(lease.router));
    if kind != MessageType::Nak {
        if request.opts().msg_type() != Some(MessageType::Inform) {
            reply.set_yiaddr(lease.ip);
            reply
                .opts_mut()
                .insert(DhcpOption::AddressLeaseTime(LEASE_SECONDS));
        }
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - lease.prefix as u32).unwrap_or(0));
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::SubnetMask(mask));
        opts.insert(DhcpOption::Router(vec![lease.router]));
        if !lease.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
        }
        opts.insert(DhcpOption::InterfaceMtu(lease.mtu));
        if !lease.hostname.is_empty() {
            opts.insert(DhcpOption::Hostname(lease.hostname.clone()));
        }
    }
    Some(reply)
}
