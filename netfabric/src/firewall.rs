//! Security groups, anti-spoofing, NAT and floating IPs as nftables tables
//! named `allod`, applied with `nft -f` so each change is one atomic
//! transaction. Tables that are not Allod's are never touched.
//!
//! In the node's namespace:
//! - `bridge allod` drops frames a port sends from a MAC or IPv4 address
//!   that is not its own, keeps each node's gateway frames off the overlay,
//!   and marks frames with the port they come from, then with the port they
//!   are bridged to;
//! - `inet allod` (bridged IPv4 reaches it through br_netfilter, which
//!   shows the bridge, not the port, as the interface) puts each VPC's
//!   bridge in its own conntrack zone, sends traffic from a port (by the
//!   first mark) to the port's egress chain and traffic to a port (by the
//!   second) to its ingress chain, and masquerades router namespaces'
//!   traffic leaving by the uplink.
//!
//! Rules are not chains of statements: each security group is three kinds
//! of set (address . protocol . port range, address . protocol, address),
//! so a port's chain has a fixed number of lookups per group whatever the
//! number of rules (and only for a connection's first packet), and a rule
//! change is a set-element change, not a new ruleset. The two concatenated
//! kinds are split into [`SHARDS`] sets by a hash of the element: deleting
//! from such a set costs the kernel time in proportion to its size.
//!
//! In each router namespace, `ip allod` holds the floating IPs' DNAT and
//! SNAT and masquerades everything else leaving for the node.
//!
//! Every table carries a `fingerprint` set holding a hash of everything
//! applied, so an agent that restarts finds its tables current and changes
//! nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{
    format_mac, gateway_mac, names, netns, Direction, Error, Location, NodeNetwork, Peer, Protocol,
    SecurityGroup, TRANSIT_NODE,
};

/// Marks carried from the bridge to the IPv4 hooks: this base plus the
/// port's number, so marks others use are never mistaken for a port.
const MARK_BASE: u32 = 0xa100_0000;

/// The mark of frames a port sends (the n-th local port, from 0); frames
/// bridged to it get [`MARK_BASE`] + n + 1.
fn source_mark(n: usize) -> u32 {
    MARK_BASE + 0x0080_0000 + n as u32 + 1
}

/// Sets each concatenated rule kind of a group is split into.
pub const SHARDS: usize = 8;

/// The shard of a set element: FNV-1a of its text, stable across runs.
fn shard(element: &str) -> usize {
    let mut hash: u32 = 0x811c_9dc5;
    for b in element.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    hash as usize % SHARDS
}

/// A rendered scope: tables without their sets' elements, and the elements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rendered {
    /// Table families and bodies, set elements left out.
    pub structure: String,
    /// Set (`family table set`) → elements, as nft writes them.
    pub sets: BTreeMap<String, BTreeSet<String>>,
}

impl Rendered {
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.structure.as_bytes());
        for (set, elements) in &self.sets {
            hash.update(set.as_bytes());
            for e in elements {
                hash.update(b"\0");
                hash.update(e.as_bytes());
            }
        }
        hex::encode(&hash.finalize()[..6])
    }

    /// The whole scope as one nft script that replaces its tables.
    pub fn full_script(&self, tables: &[&str]) -> String {
        let mut script = String::new();
        // Creating before deleting makes the delete valid whether or not
        // the table existed; all of it is one transaction.
        for table in tables {
            let _ = writeln!(script, "table {table}\ndelete table {table}");
        }
        script.push_str(&self.structure);
        for (set, elements) in &self.sets {
            if !elements.is_empty() {
                let list: Vec<&str> = elements.iter().map(String::as_str).collect();
                let _ = writeln!(script, "add element {set} {{ {} }}", list.join(", "));
            }
        }
        script
    }
}

struct Scope {
    /// None: the node's namespace.
    namespace: Option<String>,
    tables: Vec<&'static str>,
    /// Where the fingerprint set lives.
    fingerprint_table: &'static str,
}

/// Applies the firewall scopes, remembering what it applied.
pub struct Firewall {
    netns_dir: PathBuf,
    /// What each scope holds, as last applied or found, and when the
    /// kernel last confirmed it.
    applied: HashMap<Option<String>, (Rendered, Instant)>,
}

/// How long a scope found or made current is trusted without asking the
/// kernel again (drift is mended on the first pass after this).
const TRUSTED_FOR: Duration = Duration::from_secs(4);

fn rule_sets_name(sg: usize, direction: Direction, kind: &str) -> String {
    let d = match direction {
        Direction::Ingress => "in",
        Direction::Egress => "eg",
    };
    format!("sg{sg}-{d}-{kind}")
}

fn ifname_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The node namespace's tables for `network`, or `None` when no port of
/// this node needs them.
pub fn render_node(network: &NodeNetwork) -> Option<Rendered> {
    struct LocalPort<'a> {
        ifname: &'a str,
        mac: crate::Mac,
        ip: std::net::Ipv4Addr,
        groups: &'a [String],
    }
    let mut ports = Vec::new();
    let mut gateways = BTreeSet::new();
    let mut zones: Vec<(String, u32)> = Vec::new();
    for vpc in &network.vpcs {
        let mut any = false;
        for port in &vpc.ports {
            if let Location::Local {
                ifname,
                security_groups,
                ..
            } = &port.location
            {
                any = true;
                ports.push(LocalPort {
                    ifname,
                    mac: port.mac,
                    ip: port.ip,
                    groups: security_groups,
                });
            }
        }
        if any {
            gateways.insert(format_mac(&gateway_mac(vpc.vni)));
            // Bridged IPv4 reaches the inet hooks with the bridge as its
            // input interface (br_netfilter), whichever port it came by.
            zones.push((names::bridge(vpc.vni), vpc.vni));
        }
    }
    if ports.is_empty() {
        return None;
    }
    ports.sort_by(|a, b| a.ifname.cmp(b.ifname));

    // Security groups get small numbers for their set names.
    let used: BTreeSet<&String> = ports.iter().flat_map(|p| p.groups.iter()).collect();
    let numbers: BTreeMap<&String, usize> = used.iter().enumerate().map(|(i, g)| (*g, i)).collect();
    let empty = SecurityGroup::default();

    let mut out = Rendered::default();
    let s = &mut out.structure;
    // The bridge table.
    let _ = writeln!(s, "table bridge allod {{");
    let _ = writeln!(s, "  set fingerprint {{ type ifname; }}");
    let _ = writeln!(s, "  set gateway_macs {{ type ether_addr; }}");
    let _ = writeln!(s, "  map port_mark {{ type ifname : mark; }}");
    let _ = writeln!(s, "  map spoof {{ type ifname : verdict; }}");
    for (i, p) in ports.iter().enumerate() {
        let _ = writeln!(s, "  chain spoof-{} {{", p.ifname);
        let mac = format_mac(&p.mac);
        // Every frame of the port passes here: the common case (IPv4 from
        // its own address) leaves at the third rule; what no rule allows
        // (other sources, IPv6, VLAN tags, other protocols) is dropped.
        // The mark names the port the frame came from, for the inet
        // table's egress chains (its hooks see only the bridge).
        let _ = writeln!(s, "    meta mark set {:#x}", source_mark(i));
        let _ = writeln!(s, "    ether saddr != {mac} drop");
        let _ = writeln!(s, "    ip saddr {} accept", p.ip);
        let _ = writeln!(s, "    ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept");
        let _ = writeln!(
            s,
            "    arp saddr ether {mac} arp saddr ip {{ 0.0.0.0, {} }} accept",
            p.ip
        );
        let _ = writeln!(s, "    drop");
        let _ = writeln!(s, "  }}");
    }
    // A host interface named like a port but unknown to this fabric (a
    // port deleted, a tap made by hand) gets nothing in or out: no chain
    // would filter it. (This kernel has no `meta ibrname` to tell which
    // bridge a frame is on.)
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority -200; policy accept;\n    iifname vmap @spoof\n    iifname \"alp*\" drop\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority -200; policy accept;\n    ether type arp ether saddr @gateway_macs iifname \"alvx-*\" drop\n    ether type arp ether saddr @gateway_macs oifname \"alvx-*\" drop\n    meta mark set oifname map @port_mark accept\n    oifname \"alp*\" drop\n  }}"
    );
    let _ = writeln!(s, "}}");
    out.sets
        .insert("bridge allod gateway_macs".into(), gateways);
    out.sets.insert(
        "bridge allod port_mark".into(),
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("\"{}\" : {:#x}", p.ifname, MARK_BASE + i as u32 + 1))
            .collect(),
    );
    out.sets.insert(
        "bridge allod spoof".into(),
        ports
            .iter()
            .map(|p| format!("\"{0}\" : jump spoof-{0}", p.ifname))
            .collect(),
    );

    // The inet table.
    let _ = writeln!(s, "table inet allod {{");
    let _ = writeln!(s, "  set fingerprint {{ type ifname; }}");
    let _ = writeln!(s, "  map zone {{ typeof iifname : ct zone; }}");
    let _ = writeln!(s, "  map egress {{ type mark : verdict; }}");
    let _ = writeln!(s, "  map ingress {{ type mark : verdict; }}");
    for (group, n) in &numbers {
        let _ = group;
        for direction in [Direction::Ingress, Direction::Egress] {
            for k in 0..SHARDS {
                let _ = writeln!(
                    s,
                    "  set {} {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}",
                    rule_sets_name(*n, direction, &format!("pp{k}"))
                );
                let _ = writeln!(
                    s,
                    "  set {} {{ type ipv4_addr . inet_proto; flags interval; }}",
                    rule_sets_name(*n, direction, &format!("p{k}"))
                );
            }
            let _ = writeln!(
                s,
                "  set {} {{ type ipv4_addr; flags interval; auto-merge; }}",
                rule_sets_name(*n, direction, "a")
            );
        }
    }
    for p in &ports {
        for direction in [Direction::Ingress, Direction::Egress] {
            let (chain, field) = match direction {
                Direction::Ingress => (format!("in-{}", p.ifname), "saddr"),
                Direction::Egress => (format!("out-{}", p.ifname), "daddr"),
            };
            let _ = writeln!(s, "  chain {chain} {{");
            let _ = writeln!(s, "    ct state established,related accept");
            if direction == Direction::Egress {
                let _ = writeln!(s, "    udp sport 68 udp dport 67 accept");
            }
            let _ = writeln!(s, "    ct state invalid drop");
            let restricted = direction == Direction::Ingress
                || p.groups.iter().any(|g| {
                    network
                        .security_groups
                        .get(g)
                        .unwrap_or(&empty)
                        .rules
                        .iter()
                        .any(|r| r.direction == Direction::Egress)
                });
            if !restricted {
                // Egress is open until a group restricts it.
                let _ = writeln!(s, "    accept");
            } else {
                for g in p.groups {
                    let n = numbers[g];
                    for k in 0..SHARDS {
                        let _ = writeln!(
                            s,
                            "    ip {field} . meta l4proto . th dport @{} accept",
                            rule_sets_name(n, direction, &format!("pp{k}"))
                        );
                    }
                    for k in 0..SHARDS {
                        let _ = writeln!(
                            s,
                            "    ip {field} . meta l4proto @{} accept",
                            rule_sets_name(n, direction, &format!("p{k}"))
                        );
                    }
                    let _ = writeln!(
                        s,
                        "    ip {field} @{} accept",
                        rule_sets_name(n, direction, "a")
                    );
                }
                let _ = writeln!(s, "    counter drop");
            }
            let _ = writeln!(s, "  }}");
        }
    }
    let _ = writeln!(
        s,
        "  chain raw {{\n    type filter hook prerouting priority -300; policy accept;\n    ct zone set iifname map @zone\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority 0; policy accept;\n    meta mark vmap @egress\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    meta mark vmap @ingress\n  }}"
    );
    if let Some(uplink) = &network.uplink {
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    ip saddr 169.254.0.0/16 ip saddr != {TRANSIT_NODE} oifname {} masquerade\n  }}",
            ifname_list(std::slice::from_ref(uplink))
        );
    }
    let _ = writeln!(s, "}}");

    out.sets.insert(
        "inet allod zone".into(),
        zones
            .iter()
            .map(|(i, z)| format!("\"{i}\" : {z}"))
            .collect(),
    );
    out.sets.insert(
        "inet allod egress".into(),
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:#x} : jump out-{}", source_mark(i), p.ifname))
            .collect(),
    );
    out.sets.insert(
        "inet allod ingress".into(),
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:#x} : jump in-{}", MARK_BASE + i as u32 + 1, p.ifname))
            .collect(),
    );
    for (group, n) in &numbers {
        let sg = network.security_groups.get(*group).unwrap_or(&empty);
        for direction in [Direction::Ingress, Direction::Egress] {
            let mut pp = BTreeSet::new();
            let mut p = BTreeSet::new();
            let mut a = BTreeSet::new();
            for rule in sg.rules.iter().filter(|r| r.direction == direction) {
                let peers: Vec<String> = match &rule.peer {
                    Peer::Cidr(net) => vec![net.trunc().to_string()],
                    Peer::Group(id) => network
                        .security_groups
                        .get(id)
                        .map(|g| g.members.iter().map(|m| m.to_string()).collect())
                        .unwrap_or_default(),
                };
                for peer in peers {
                    match (rule.protocol, rule.ports) {
                        (Protocol::Any, _) => {
                            a.insert(peer);
                        }
                        (Protocol::Icmp, _) => {
                            p.insert(format!("{peer} . icmp"));
                        }
                        (proto, None) => {
                            p.insert(format!("{peer} . {}", proto_name(proto)));
                        }
                        (proto, Some((lo, hi))) => {
                            let range = if lo == hi {
                                lo.to_string()
                            } else {
                                format!("{lo}-{hi}")
                            };
                            pp.insert(format!("{peer} . {} . {range}", proto_name(proto)));
                        }
                    }
                }
            }
            for (kind, elements) in [("pp", pp), ("p", p)] {
                let mut shards = vec![BTreeSet::new(); SHARDS];
                for e in elements {
                    shards[shard(&e)].insert(e);
                }
                for (k, elements) in shards.into_iter().enumerate() {
                    out.sets.insert(
                        format!(
                            "inet allod {}",
                            rule_sets_name(*n, direction, &format!("{kind}{k}"))
                        ),
                        elements,
                    );
                }
            }
            out.sets.insert(
                format!("inet allod {}", rule_sets_name(*n, direction, "a")),
                a,
            );
        }
    }
    Some(out)
}

fn proto_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Any => "any",
    }
}

/// A router namespace's NAT table.
pub fn render_router(network: &NodeNetwork, vni: u32) -> Rendered {
    let mut out = Rendered::default();
    let transit = names::router_transit(vni);
    let s = &mut out.structure;
    let _ = writeln!(s, "table ip allod {{");
    let _ = writeln!(s, "  set fingerprint {{ type ifname; }}");
    let _ = writeln!(s, "  map fip_dnat {{ type ipv4_addr : ipv4_addr; }}");
    let _ = writeln!(s, "  map fip_snat {{ type ipv4_addr : ipv4_addr; }}");
    let _ = writeln!(s, "  set fip_sources {{ type ipv4_addr; }}");
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n    iifname \"{transit}\" dnat to ip daddr map @fip_dnat\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    oifname \"{transit}\" ip saddr @fip_sources snat to ip saddr map @fip_snat\n    oifname \"{transit}\" masquerade\n  }}"
    );
    let _ = writeln!(s, "}}");
    let mut dnat = BTreeSet::new();
    let mut snat = BTreeSet::new();
    let mut sources = BTreeSet::new();
    for vpc in network.vpcs.iter().filter(|v| v.vni == vni) {
        for port in &vpc.ports {
            if let Location::Local {
                floating_ip: Some(fip),
                ..
            } = &port.location
            {
                dnat.insert(format!("{fip} : {}", port.ip));
                snat.insert(format!("{} : {fip}", port.ip));
                sources.insert(port.ip.to_string());
            }
        }
    }
    out.sets.insert("ip allod fip_dnat".into(), dnat);
    out.sets.insert("ip allod fip_snat".into(), snat);
    out.sets.insert("ip allod fip_sources".into(), sources);
    out
}

impl Firewall {
    pub fn new(netns_dir: PathBuf) -> Self {
        Self {
            netns_dir,
            applied: HashMap::new(),
        }
    }

    /// Brings every scope in line with `network`; answers how many scopes
    /// were changed.
    pub async fn apply(&mut self, network: &NodeNetwork) -> Result<usize, Error> {
        let mut changed = 0;
        let node = Scope {
            namespace: None,
            tables: vec!["bridge allod", "inet allod"],
            fingerprint_table: "inet allod",
        };
        if self.apply_scope(&node, render_node(network)).await? {
            changed += 1;
        }
        let local_vpcs: Vec<u32> = network
            .vpcs
            .iter()
            .filter(|v| {
                v.ports
                    .iter()
                    .any(|p| matches!(p.location, Location::Local { .. }))
            })
            .map(|v| v.vni)
            .collect();
        let present = netns::list(&self.netns_dir);
        self.applied
            .retain(|ns, _| ns.as_ref().is_none_or(|n| present.contains(n)));
        for vni in local_vpcs {
            let name = names::router_namespace(vni);
            if !present.contains(&name) {
                continue;
            }
            let scope = Scope {
                namespace: Some(name),
                tables: vec!["ip allod"],
                fingerprint_table: "ip allod",
            };
            if self
                .apply_scope(&scope, Some(render_router(network, vni)))
                .await?
            {
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn apply_scope(
        &mut self,
        scope: &Scope,
        wanted: Option<Rendered>,
    ) -> Result<bool, Error> {
        let path = scope
            .namespace
            .as_ref()
            .map(|n| netns::path(&self.netns_dir, n));
        let label = scope.namespace.clone().unwrap_or_else(|| "node".into());
        let Some(wanted) = wanted else {
            // Nothing wanted: remove our tables if they are there.
            let listed = nft(path.as_deref(), "list tables\n", &label).await?;
            let mut script = String::new();
            for table in &scope.tables {
                if listed.lines().any(|l| l.trim() == format!("table {table}")) {
                    let _ = writeln!(script, "delete table {table}");
                }
            }
            self.applied.remove(&scope.namespace);
            if script.is_empty() {
                return Ok(false);
            }
            nft(path.as_deref(), &script, &label).await?;
            return Ok(true);
        };
        let fingerprint = wanted.fingerprint();
        let fingerprint_set = format!("{} fingerprint", scope.fingerprint_table);
        if let Some((before, confirmed)) = self.applied.get(&scope.namespace) {
            if *before == wanted && confirmed.elapsed() < TRUSTED_FOR {
                return Ok(false);
            }
            if before.structure == wanted.structure && *before != wanted {
                // Same tables and chains: change only set elements, in one
                // transaction that also swaps the fingerprint. Deleting the
                // old fingerprint fails the whole transaction if the tables
                // are not what this fabric left, and then they are replaced.
                let mut script = String::new();
                for (set, elements) in &wanted.sets {
                    let old = before.sets.get(set).cloned().unwrap_or_default();
                    let gone: Vec<&str> = old.difference(elements).map(String::as_str).collect();
                    let new: Vec<&str> = elements.difference(&old).map(String::as_str).collect();
                    if !gone.is_empty() {
                        let _ = writeln!(script, "delete element {set} {{ {} }}", gone.join(", "));
                    }
                    if !new.is_empty() {
                        let _ = writeln!(script, "add element {set} {{ {} }}", new.join(", "));
                    }
                }
                let _ = writeln!(
                    script,
                    "delete element {fingerprint_set} {{ \"{}\" }}\nadd element {fingerprint_set} {{ \"{fingerprint}\" }}",
                    before.fingerprint()
                );
                match nft(path.as_deref(), &script, &label).await {
                    Ok(_) => {
                        self.applied
                            .insert(scope.namespace.clone(), (wanted, Instant::now()));
                        return Ok(true);
                    }
                    Err(e) => {
                        tracing::warn!(
                            scope = %label,
                            "the firewall tables were changed outside Allod; replacing them ({e})"
                        );
                    }
                }
            }
        }
        let current = nft(
            path.as_deref(),
            &format!("list set {fingerprint_set}\n"),
            &label,
        )
        .await
        .ok();
        let up_to_date = current
            .as_deref()
            .is_some_and(|text| text.contains(&format!("\"{fingerprint}\"")));
        if !up_to_date {
            let script = format!(
                "{}add element {fingerprint_set} {{ \"{fingerprint}\" }}\n",
                wanted.full_script(&scope.tables)
            );
            nft(path.as_deref(), &script, &label).await?;
        }
        self.applied
            .insert(scope.namespace.clone(), (wanted, Instant::now()));
        Ok(!up_to_date)
    }
}

/// Runs `nft -f -` with `script`, inside the namespace pinned at `ns` when
/// given; answers what nft printed.
async fn nft(ns: Option<&std::path::Path>, script: &str, label: &str) -> Result<String, Error> {
    use tokio::io::AsyncWriteExt;
    let mut command = match ns {
        Some(path) => {
            let mut c = tokio::process::Command::new("nsenter");
            c.arg(format!("--net={}", path.display())).arg("nft");
            c
        }
        None => tokio::process::Command::new("nft"),
    };
    command
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let spawn = |source| Error::NftSpawn {
        scope: label.to_string(),
        source,
    };
    let mut child = command.spawn().map_err(spawn)?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(script.as_bytes()).await.map_err(spawn)?;
    drop(stdin);
    let output = child.wait_with_output().await.map_err(spawn)?;
    if !output.status.success() {
        return Err(Error::Nft {
            scope: label.to_string(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
