//! Per-node network plumbing: tenant VPCs as VXLAN segments, a distributed
//! router per VPC, security groups, NAT and floating IPs in nftables, and DHCP
//! for the ports of this node.
//!
//! The agent hands it one [`NodeNetwork`]: everything this node must know,
//! already decided (VNIs, addresses, MACs, which node hosts which port). This
//! crate knows nothing of Raft or of the cluster's records, and decides
//! nothing of its own: [`kernel::desired`] turns the document into the kernel
//! objects it implies, [`plan::plan`] compares them with what the kernel has
//! (pure, unit-tested), [`netlink`] observes and executes through rtnetlink,
//! [`firewall`] renders and applies the nftables tables, [`dhcp`] answers
//! DHCP on each segment.
//!
//! Per VPC with a port on this node (VNI `V`):
//! - bridge `albr-V` and VXLAN device `alvx-V` (learning off, head-end
//!   replication to every other node hosting the VPC, a static FDB entry per
//!   remote MAC);
//! - a router namespace `alrt-V` joined to the bridge by the veth pair
//!   `algw-V`/`alrg-V`, which holds every subnet's gateway address with the
//!   same MAC on every node, so the gateway answers locally everywhere;
//! - a transit veth pair `alex-V`/`alrx-V` to the node's own namespace for
//!   egress NAT and floating IPs.
//!
//! Security groups live in the node's namespace: bridged IPv4 passes the
//! `inet allod` table (br_netfilter, enabled per bridge), in a conntrack zone
//! per VPC so equal addresses of two VPCs never meet.

pub mod dhcp;
pub mod firewall;
pub mod kernel;
pub mod netlink;
pub mod netns;
pub mod plan;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub use ipnet::Ipv4Net;

/// A MAC address.
pub type Mac = [u8; 6];

/// Highest VNI the fabric hands out: conntrack zones are 16 bits and the
/// transit addresses of the router namespaces live in 169.254.0.0/16.
pub const MAX_VNI: u32 = 65_000;

/// VXLAN overhead on an IPv4 underlay: outer IPv4 (20), UDP (8), VXLAN (8)
/// and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Everything one node must build, decided by the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeNetwork {
    /// This node's VTEP address on the underlay.
    pub underlay: Option<Ipv4Addr>,
    /// MTU of the underlay; tenant segments get this minus 50.
    pub underlay_mtu: u32,
    /// The interface egress NAT and floating IPs leave and arrive by; none
    /// means no outside access from this node.
    pub uplink: Option<String>,
    /// Every floating-IP pool: proxy ARP entries for these addresses on the
    /// uplink are Allod's own.
    pub fip_pools: Vec<Ipv4Net>,
    pub vpcs: Vec<Vpc>,
    /// Security groups referenced by this node's ports, by id.
    pub security_groups: BTreeMap<String, SecurityGroup>,
}

impl NodeNetwork {
    pub fn inner_mtu(&self) -> u32 {
        self.underlay_mtu.max(576 + VXLAN_OVERHEAD) - VXLAN_OVERHEAD
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vpc {
    pub vni: u32,
    pub subnets: Vec<Subnet>,
    /// Underlay addresses of the other nodes that host ports of this VPC.
    pub remote_vteps: Vec<Ipv4Addr>,
    /// Every port of the VPC, on this node and elsewhere.
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    pub cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub id: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// On this node, behind the host interface `ifname` (a VM's tap).
    Local {
        ifname: String,
        security_groups: Vec<String>,
        floating_ip: Option<Ipv4Addr>,
        /// DHCP host name.
        hostname: String,
    },
    /// On another node, reached through its VTEP.
    Remote { vtep: Ipv4Addr },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecurityGroup {
    pub rules: Vec<Rule>,
    /// Addresses of the ports that carry this group, for rules naming it as
    /// their peer.
    pub members: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Cidr(Ipv4Net),
    /// Members of the security group with this id.
    Group(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub direction: Direction,
    pub protocol: Protocol,
    /// Inclusive port range, TCP and UDP only; none means every port.
    pub ports: Option<(u16, u16)>,
    pub peer: Peer,
}

/// Names of the kernel objects of VPC `vni`.
pub mod names {
    pub fn bridge(vni: u32) -> String {
        format!("albr-{vni}")
    }
    pub fn vxlan(vni: u32) -> String {
        format!("alvx-{vni}")
    }
    /// The node-side end of the gateway veth, a bridge port.
    pub fn gateway_leg(vni: u32) -> String {
        format!("algw-{vni}")
    }
    /// The router-side end of the gateway veth, holding the gateways.
    pub fn router_gateway(vni: u32) -> String {
        format!("alrg-{vni}")
    }
    /// The node-side end of the transit veth.
    pub fn transit_leg(vni: u32) -> String {
        format!("alex-{vni}")
    }
    /// The router-side end of the transit veth.
    pub fn router_transit(vni: u32) -> String {
        format!("alrx-{vni}")
    }
    pub fn router_namespace(vni: u32) -> String {
        format!("alrt-{vni}")
    }
    /// Whether `name` is one of the links this crate creates and may delete
    /// (VM taps, named by the agent, are only ever attached).
    pub fn owned_link(name: &str) -> bool {
        ["albr-", "alvx-", "algw-", "alex-"].iter().any(|p| {
            name.strip_prefix(p)
                .is_some_and(|v| v.parse::<u32>().is_ok())
        })
    }
    pub fn vni_of_namespace(name: &str) -> Option<u32> {
        name.strip_prefix("alrt-")?.parse().ok()
    }
}

/// The gateway MAC of VPC `vni`, the same on every node.
pub fn gateway_mac(vni: u32) -> Mac {
    let v = vni.to_be_bytes();
    [0x02, 0xa1, 0x00, v[1], v[2], v[3]]
}

/// The node-side transit address, the same on every transit leg.
pub const TRANSIT_NODE: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

/// The router namespace's transit address of VPC `vni`, unique on the node.
pub fn transit_router(vni: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(TRANSIT_NODE) + vni)
}

pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Errors of applying a node network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink request failed: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network namespace {name}: {what}")]
    Namespace {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nftables refused the ruleset for {scope}: {message}")]
    Nft { scope: String, message: String },
    #[error("cannot run nft for {scope}")]
    NftSpawn {
        scope: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Applies node networks: observes the kernel, plans, executes, and brings
/// the firewall in line. Holds the netlink connections between applies.
pub struct Fabric {
    netns_dir: std::path::PathBuf,
    links: netlink::Connections,
    firewall: firewall::Firewall,
}

/// What one apply did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub actions: Vec<plan::Action>,
    pub firewall_changes: usize,
}

impl Fabric {
    /// `netns_dir` is where router namespaces are pinned (`/run/netns`, so
    /// `ip netns exec alrt-V …` works).
    pub fn new(netns_dir: impl Into<std::path::PathBuf>) -> Self {
        let netns_dir = netns_dir.into();
        Self {
            links: netlink::Connections::new(netns_dir.clone()),
            firewall: firewall::Firewall::new(netns_dir.clone()),
            netns_dir,
        }
    }

    /// Brings the kernel to `network`: only what differs is touched.
    pub async fn apply(&mut self, network: &NodeNetwork) -> Result<Report, Error> {
        let desired = kernel::desired(network);
        let observed = self.links.observe(network, &self.netns_dir).await?;
        let actions = plan::plan(&desired, &observed);
        for action in &actions {
            tracing::info!(%action, "network change");
            self.links.execute(action).await?;
        }
        self.links.sysctls(network).await?;
        let firewall_changes = self.firewall.apply(network).await?;
        Ok(Report {
            actions,
            firewall_changes,
        })
    }
}
