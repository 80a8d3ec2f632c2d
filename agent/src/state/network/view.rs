//! Typed reads of the network state, and a node's share of it as the
//! [`netfabric::NodeNetwork`] its reconciler builds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::state::network::{
    rules_prefix, FloatingIpRecord, IpPoolRecord, PortRecord, RuleRecord, SecurityGroupRecord,
    SubnetRecord, VpcRecord, PREFIX_FIPS, PREFIX_POOLS, PREFIX_PORTS, PREFIX_SGS, PREFIX_SG_RULES,
    PREFIX_SUBNETS, PREFIX_UNDERLAY, PREFIX_VPCS,
};
use allod_raft::NodeId;

/// Typed reads.
impl crate::state::StateView {
    pub fn vpcs(&self, project: &str) -> Result<Vec<VpcRecord>, crate::state::ReadError> {
        self.list(&format!("{PREFIX_VPCS}{project}/"))
    }
    pub fn vpc(
        &self,
        project: &str,
        name: &str,
    ) -> Result<Option<VpcRecord>, crate::state::ReadError> {
        self.get(&format!("{PREFIX_VPCS}{project}/{name}"))
    }
    pub fn subnets(
        &self,
        project: &str,
        vpc: &str,
    ) -> Result<Vec<SubnetRecord>, crate::state::ReadError> {
        self.list(&format!("{PREFIX_SUBNETS}{project}/{vpc}/"))
    }
    pub fn security_groups(
        &self,
        project: &str,
    ) -> Result<Vec<SecurityGroupRecord>, crate::state::ReadError> {
        self.list::<SecurityGroupRecord>(&format!("{PREFIX_SGS}{project}/"))?
            .into_iter()
            .map(|g| self.group_rules(g))
            .collect()
    }
    fn group_rules(
        &self,
        mut group: SecurityGroupRecord,
    ) -> Result<SecurityGroupRecord, crate::state::ReadError> {
        group
            .rules
            .extend(self.list::<RuleRecord>(&rules_prefix(&group.project, &group.name))?);
        Ok(group)
    }
    pub fn ports(&self, project: &str) -> Result<Vec<PortRecord>, crate::state::ReadError> {
        self.list(&format!("{PREFIX_PORTS}{project}/"))
    }
    pub fn port(
        &self,
        project: &str,
        name: &str,
    ) -> Result<Option<PortRecord>, crate::state::ReadError> {
        self.get(&format!("{PREFIX_PORTS}{project}/{name}"))
    }
    pub fn ip_pools(&self) -> Result<Vec<IpPoolRecord>, crate::state::ReadError> {
        self.list(PREFIX_POOLS)
    }
    pub fn floating_ips(
        &self,
        project: &str,
    ) -> Result<Vec<FloatingIpRecord>, crate::state::ReadError> {
        Ok(self
            .list::<FloatingIpRecord>(PREFIX_FIPS)?
            .into_iter()
            .filter(|f| f.project == project)
            .collect())
    }

    /// What node `me` must build, from the whole network state.
    pub fn node_network(
        &self,
        me: NodeId,
        underlay_mtu: u32,
        uplink: Option<String>,
    ) -> Result<netfabric::NodeNetwork, crate::state::ReadError> {
        let underlays: BTreeMap<NodeId, Ipv4Addr> = self
            .reader
            .scan(PREFIX_UNDERLAY)?
            .into_iter()
            .filter_map(|(k, v)| {
                let id = k.strip_prefix(PREFIX_UNDERLAY)?.parse().ok()?;
                let ip = std::str::from_utf8(&v).ok()?.parse().ok()?;
                Some((id, ip))
            })
            .collect();
        let ports: Vec<PortRecord> = self.list(PREFIX_PORTS)?;
        let mut groups: Vec<SecurityGroupRecord> = self.list(PREFIX_SGS)?;
        // Every rule in one scan, to its group by the key's path.
        let mut rules: BTreeMap<(String, String), Vec<RuleRecord>> = BTreeMap::new();
        for (key, bytes) in self.reader.scan(PREFIX_SG_RULES)? {
            let mut path = key.strip_prefix(PREFIX_SG_RULES).unwrap_or("").split('/');
            let (Some(project), Some(group), Ok(rule)) = (
                path.next(),
                path.next(),
                serde_json::from_slice::<RuleRecord>(&bytes),
            ) else {
                continue;
            };
            rules
                .entry((project.to_string(), group.to_string()))
                .or_default()
                .push(rule);
        }
        for g in &mut groups {
            if let Some(more) = rules.remove(&(g.project.clone(), g.name.clone())) {
                g.rules.extend(more);
            }
        }
        // A group's members are counted per VPC: a rule naming a remote
        // group matches only members in the VPC of the port it guards
        // (addresses of different VPCs may be the same).
        let group_id = |project: &str, vpc: &str, name: &str| format!("{project}/{vpc}/{name}");
        let mut network = netfabric::NodeNetwork {
            underlay: underlays.get(&me).copied(),
            underlay_mtu,
            uplink,
            fip_pools: self.ip_pools()?.into_iter().map(|p| p.cidr).collect(),
            vpcs: Vec::new(),
            security_groups: BTreeMap::new(),
        };
        let mut by_vpc: BTreeMap<(String, String), Vec<&PortRecord>> = BTreeMap::new();
        for p in &ports {
            by_vpc
                .entry((p.project.clone(), p.vpc.clone()))
                .or_default()
                .push(p);
        }
        for ((project, vpc_name), members) in by_vpc {
            if !members.iter().any(|p| p.node == me) {
                continue;
            }
            let Some(vpc) = self.vpc(&project, &vpc_name)? else {
                continue;
            };
            let subnets = self.subnets(&project, &vpc_name)?;
            let mut vpc_ports = Vec::new();
            let mut vteps = BTreeSet::new();
            for p in members {
                let Some(mac) = netfabric::parse_mac(&p.mac) else {
                    continue;
                };
                let location = if p.node == me {
                    netfabric::Location::Local {
                        ifname: p.host_interface.clone(),
                        security_groups: p
                            .security_groups
                            .iter()
                            .map(|g| group_id(&project, &vpc_name, g))
                            .collect(),
                        floating_ip: p.floating_ip,
                        hostname: p.vm.clone().unwrap_or_else(|| p.name.clone()),
                    }
                } else {
                    match underlays.get(&p.node) {
                        Some(vtep) => {
                            vteps.insert(*vtep);
                            netfabric::Location::Remote { vtep: *vtep }
                        }
                        None => continue,
                    }
                };
                vpc_ports.push(netfabric::Port {
                    id: p.id.clone(),
                    mac,
                    ip: p.ip,
                    location,
                });
            }
            network.vpcs.push(netfabric::Vpc {
                vni: vpc.vni,
                subnets: subnets
                    .iter()
                    .map(|s| netfabric::Subnet {
                        cidr: s.cidr,
                        gateway: s.gateway,
                        dns: s.dns.clone(),
                    })
                    .collect(),
                remote_vteps: vteps.into_iter().collect(),
                ports: vpc_ports,
            });
        }
        let vpcs_of_project: BTreeSet<(&str, &str)> = ports
            .iter()
            .map(|p| (p.project.as_str(), p.vpc.as_str()))
            .collect();
        for g in &groups {
            for &(project, vpc) in vpcs_of_project
                .iter()
                .filter(|(project, _)| *project == g.project)
            {
                let members = ports
                    .iter()
                    .filter(|p| {
                        p.project == project && p.vpc == vpc && p.security_groups.contains(&g.name)
                    })
                    .map(|p| p.ip)
                    .collect();
                let rules = g
                    .rules
                    .iter()
                    .filter_map(|r| {
                        let peer = match (&r.cidr, &r.remote_group) {
                            (Some(c), _) => netfabric::Peer::Cidr(*c),
                            (None, Some(remote)) => {
                                netfabric::Peer::Group(group_id(project, vpc, remote))
                            }
                            (None, None) => return None,
                        };
                        Some(netfabric::Rule {
                            direction: match r.direction.as_str() {
                                "egress" => netfabric::Direction::Egress,
                                _ => netfabric::Direction::Ingress,
                            },
                            protocol: match r.protocol.as_str() {
                                "tcp" => netfabric::Protocol::Tcp,
                                "udp" => netfabric::Protocol::Udp,
                                "icmp" => netfabric::Protocol::Icmp,
                                _ => netfabric::Protocol::Any,
                            },
                            ports: r.port_min.zip(r.port_max),
                            peer,
                        })
                    })
                    .collect();
                network.security_groups.insert(
                    group_id(project, vpc, &g.name),
                    netfabric::SecurityGroup { rules, members },
                );
            }
        }
        Ok(network)
    }
}
