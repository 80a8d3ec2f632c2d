//! Tenant networks in the cluster state: VPCs (each with a VNI the cluster
//! allocates), subnets, security groups and their rules, ports (VM NICs,
//! with MAC and IPAM address), IP pools and floating IPs; and the one
//! function that turns them into the [`netfabric::NodeNetwork`] of a node.
//!
//! Every check that decides an outcome (overlaps, free addresses, the next
//! VNI) runs here, in the state machine, so every replica agrees.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use allod_raft::{KvRead, KvWrite, NodeId};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::state::{domain, get_json, put_json, validate_name, ErrorCode, Outcome};

mod view;

type KvResult<T> = Result<T, allod_raft::KvError>;

const PREFIX_VPCS: &str = "net/vpcs/";
const PREFIX_SUBNETS: &str = "net/subnets/";
const PREFIX_SGS: &str = "net/sgs/";
/// Security-group rules, each a record of its own so that a rule change
/// writes one small record whatever the group holds:
/// `net/sg-rules/<project>/<group>/<rule id>`.
const PREFIX_SG_RULES: &str = "net/sg-rules/";
const PREFIX_PORTS: &str = "net/ports/";
const PREFIX_POOLS: &str = "net/pools/";
const PREFIX_FIPS: &str = "net/fips/";
const PREFIX_VNIS: &str = "net/vnis/";
/// Node underlay (VTEP) addresses: `net/underlay/<node id>`.
const PREFIX_UNDERLAY: &str = "net/underlay/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VpcRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    /// The VXLAN network identifier of the VPC's segment.
    pub vni: u32,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubnetRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    pub vpc: String,
    #[schema(value_type = String, example = "10.0.0.0/24")]
    pub cidr: Ipv4Net,
    #[schema(value_type = String, example = "10.0.0.1")]
    pub gateway: Ipv4Addr,
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuleRecord {
    pub id: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// `tcp`, `udp`, `icmp` or `any`.
    pub protocol: String,
    /// First and last port (TCP and UDP); absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_min: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_max: Option<u16>,
    /// The peer: addresses in this CIDR…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cidr: Option<Ipv4Net>,
    /// …or the ports of this security group of the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecurityGroupRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    /// Stored apart (see [`PREFIX_SG_RULES`]); filled in when read.
    #[serde(default)]
    pub rules: Vec<RuleRecord>,
}

fn rules_prefix(project: &str, group: &str) -> String {
    format!("{PREFIX_SG_RULES}{project}/{group}/")
}

/// Writes a group, its rules as records of their own.
fn put_group(kv: &mut KvWrite<'_>, group: &SecurityGroupRecord) -> KvResult<()> {
    let bare = SecurityGroupRecord {
        rules: Vec::new(),
        ..group.clone()
    };
    put_json(
        kv,
        &format!("{PREFIX_SGS}{}/{}", group.project, group.name),
        &bare,
    )?;
    for rule in &group.rules {
        put_json(
            kv,
            &format!("{}{}", rules_prefix(&group.project, &group.name), rule.id),
            rule,
        )?;
    }
    Ok(())
}

/// A group as stored, with its rules.
fn with_rules(kv: &impl KvRead, mut group: SecurityGroupRecord) -> KvResult<SecurityGroupRecord> {
    group.rules.extend(list::<RuleRecord>(
        kv,
        &rules_prefix(&group.project, &group.name),
    )?);
    Ok(group)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    pub vpc: String,
    pub subnet: String,
    pub mac: String,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    pub security_groups: Vec<String>,
    /// The node the port lives on (its VM's node).
    pub node: NodeId,
    /// The VM whose NIC this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The host-side interface (the VM's tap) the node attaches.
    pub host_interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub floating_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IpPoolRecord {
    pub name: String,
    #[schema(value_type = String, example = "192.0.2.0/24")]
    pub cidr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FloatingIpRecord {
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    pub project: String,
    pub pool: String,
    /// The port (by name) it forwards to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

/// Network commands; see [`crate::state::Command::Network`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "net", rename_all = "snake_case")]
pub enum NetCommand {
    CreateVpc {
        vpc: VpcRecord,
    },
    DeleteVpc {
        project: String,
        name: String,
    },
    CreateSubnet {
        subnet: SubnetRecord,
    },
    DeleteSubnet {
        project: String,
        vpc: String,
        name: String,
    },
    CreateSecurityGroup {
        group: SecurityGroupRecord,
    },
    DeleteSecurityGroup {
        project: String,
        name: String,
    },
    AddRule {
        project: String,
        group: String,
        rule: RuleRecord,
    },
    DeleteRule {
        project: String,
        group: String,
        rule: String,
    },
    /// `ip` unspecified: the lowest free address of the subnet.
    CreatePort {
        port: PortRecord,
    },
    DeletePort {
        project: String,
        name: String,
    },
    CreatePool {
        pool: IpPoolRecord,
    },
    DeletePool {
        name: String,
    },
    AllocateFip {
        project: String,
        pool: Option<String>,
    },
    BindFip {
        project: String,
        ip: Ipv4Addr,
        port: Option<String>,
    },
    ReleaseFip {
        project: String,
        ip: Ipv4Addr,
    },
    SetUnderlay {
        node: NodeId,
        address: Ipv4Addr,
    },
}

fn value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("serialisable")
}

fn not_found(what: String) -> crate::state::DomainError {
    domain(ErrorCode::NotFound, what)
}

fn invalid(what: String) -> crate::state::DomainError {
    domain(ErrorCode::InvalidArgument, what)
}

fn list<T: serde::de::DeserializeOwned>(kv: &impl KvRead, prefix: &str) -> KvResult<Vec<T>> {
    Ok(kv
        .scan(prefix)?
        .into_iter()
        .filter_map(|(_, b)| serde_json::from_slice(&b).ok())
        .collect())
}

fn all_subnets(kv: &impl KvRead) -> KvResult<Vec<SubnetRecord>> {
    list(kv, PREFIX_SUBNETS)
}

/// Whether two networks share an address (one holds the other's start).
fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Usable host addresses of `net`, lowest first.
fn hosts(net: &Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let small = net.prefix_len() >= 31;
    let first = u32::from(net.network()) + u32::from(!small);
    let last = u32::from(net.broadcast()) - u32::from(!small);
    (first..=last).map(Ipv4Addr::from)
}

/// Checks a rule as the API and the state machine see it.
pub fn check_rule(rule: &RuleRecord) -> Result<(), crate::state::DomainError> {
    if !matches!(rule.direction.as_str(), "ingress" | "egress") {
        return Err(invalid(format!(
            "direction {:?} is not ingress or egress",
            rule.direction
        )));
    }
    if !matches!(rule.protocol.as_str(), "tcp" | "udp" | "icmp" | "any") {
        return Err(invalid(format!(
            "protocol {:?} is not tcp, udp, icmp or any",
            rule.protocol
        )));
    }
    match (rule.port_min, rule.port_max) {
        (None, None) => {}
        (Some(lo), Some(hi)) if lo >= 1 && lo <= hi => {
            if !matches!(rule.protocol.as_str(), "tcp" | "udp") {
                return Err(invalid("ports apply to tcp and udp rules only".into()));
            }
        }
        _ => {
            return Err(invalid(
                "a port range is 1-65535 with the first port not above the last (e.g. --port 22 or --port 8000-8080)".into(),
            ))
        }
    }
    if rule.cidr.is_some() == rule.remote_group.is_some() {
        return Err(invalid(
            "a rule names its peer: a CIDR (--cidr 192.0.2.0/24) or a security group (--remote-group web), one of them".into(),
        ));
    }
    Ok(())
}

/// Applies one network command.
pub fn apply(kv: &mut KvWrite<'_>, command: NetCommand) -> KvResult<Outcome> {
    Ok(match command {
        NetCommand::CreateVpc { mut vpc } => {
            let key = format!("{PREFIX_VPCS}{}/{}", vpc.project, vpc.name);
            if let Err(e) = validate_name("VPC", &vpc.name) {
                return Ok(Err(e));
            }
            if kv.get(&format!("projects/{}", vpc.project))?.is_none() {
                return Ok(Err(not_found(format!(
                    "project {:?} does not exist",
                    vpc.project
                ))));
            }
            if kv.get(&key)?.is_some() {
                return Ok(Err(domain(
                    ErrorCode::AlreadyExists,
                    format!(
                        "VPC {:?} already exists in project {:?}",
                        vpc.name, vpc.project
                    ),
                )));
            }
            let used: BTreeSet<u32> = kv
                .scan(PREFIX_VNIS)?
                .into_iter()
                .filter_map(|(k, _)| k.strip_prefix(PREFIX_VNIS)?.parse().ok())
                .collect();
            let Some(vni) = (1..=netfabric::MAX_VNI).find(|v| !used.contains(v)) else {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("all {} VPC segments are in use", netfabric::MAX_VNI),
                )));
            };
            vpc.vni = vni;
            kv.put(&format!("{PREFIX_VNIS}{vni}"), key.as_bytes())?;
            put_json(kv, &key, &vpc)?;
            // Every project has a security group named "default": ingress
            // from its own members, egress open.
            let default_key = format!("{PREFIX_SGS}{}/default", vpc.project);
            if kv.get(&default_key)?.is_none() {
                let group = SecurityGroupRecord {
                    id: format!("{}-default", vpc.id),
                    name: "default".into(),
                    project: vpc.project.clone(),
                    rules: vec![RuleRecord {
                        id: "members".into(),
                        direction: "ingress".into(),
                        protocol: "any".into(),
                        port_min: None,
                        port_max: None,
                        cidr: None,
                        remote_group: Some("default".into()),
                    }],
                };
                put_group(kv, &group)?;
            }
            Ok(value(&vpc))
        }
        NetCommand::DeleteVpc { project, name } => {
            let key = format!("{PREFIX_VPCS}{project}/{name}");
            let Some(vpc) = get_json::<VpcRecord>(kv, &key)? else {
                return Ok(Err(not_found(format!(
                    "VPC {name:?} does not exist in project {project:?}"
                ))));
            };
            let subnets = kv
                .scan(&format!("{PREFIX_SUBNETS}{project}/{name}/"))?
                .len();
            if subnets > 0 {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("VPC {name:?} still has {subnets} subnet(s); delete them first"),
                )));
            }
            kv.delete(&key)?;
            kv.delete(&format!("{PREFIX_VNIS}{}", vpc.vni))?;
            Ok(serde_json::Value::Null)
        }
        NetCommand::CreateSubnet { mut subnet } => {
            if let Err(e) = validate_name("subnet", &subnet.name) {
                return Ok(Err(e));
            }
            let vpc_key = format!("{PREFIX_VPCS}{}/{}", subnet.project, subnet.vpc);
            if kv.get(&vpc_key)?.is_none() {
                return Ok(Err(not_found(format!(
                    "VPC {:?} does not exist in project {:?}",
                    subnet.vpc, subnet.project
                ))));
            }
            subnet.cidr = subnet.cidr.trunc();
            if subnet.cidr.prefix_len() > 29 || subnet.cidr.prefix_len() < 8 {
                return Ok(Err(invalid(format!(
                    "subnet {} must be between a /8 and a /29",
                    subnet.cidr
                ))));
            }
            if subnet.gateway.is_unspecified() {
                subnet.gateway = hosts(&subnet.cidr).next().expect("a /29 has hosts");
            }
            if !subnet.cidr.contains(&subnet.gateway)
                || subnet.gateway == subnet.cidr.network()
                || subnet.gateway == subnet.cidr.broadcast()
            {
                return Ok(Err(invalid(format!(
                    "gateway {} is not a host address of {}",
                    subnet.gateway, subnet.cidr
                ))));
            }
            let key = format!(
                "{PREFIX_SUBNETS}{}/{}/{}",
                subnet.project, subnet.vpc, subnet.name
            );
            if kv.get(&key)?.is_some() {
                return Ok(Err(domain(
                    ErrorCode::AlreadyExists,
                    format!(
                        "subnet {:?} already exists in VPC {:?}",
                        subnet.name, subnet.vpc
                    ),
                )));
            }
            for other in list::<SubnetRecord>(
                kv,
                &format!("{PREFIX_SUBNETS}{}/{}/", subnet.project, subnet.vpc),
            )? {
                if overlaps(&other.cidr, &subnet.cidr) {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "{} overlaps subnet {:?} ({}) of the same VPC; choose a range outside it",
                            subnet.cidr, other.name, other.cidr
                        ),
                    )));
                }
            }
            for pool in list::<IpPoolRecord>(kv, PREFIX_POOLS)? {
                if overlaps(&pool.cidr, &subnet.cidr) {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "{} overlaps the floating-IP pool {:?} ({}); choose a private range",
                            subnet.cidr, pool.name, pool.cidr
                        ),
                    )));
                }
            }
            put_json(kv, &key, &subnet)?;
            Ok(value(&subnet))
        }
        NetCommand::DeleteSubnet { project, vpc, name } => {
            let key = format!("{PREFIX_SUBNETS}{project}/{vpc}/{name}");
            if kv.get(&key)?.is_none() {
                return Ok(Err(not_found(format!(
                    "subnet {name:?} does not exist in VPC {vpc:?}"
                ))));
            }
            let ports = list::<PortRecord>(kv, &format!("{PREFIX_PORTS}{project}/"))?
                .into_iter()
                .filter(|p| p.vpc == vpc && p.subnet == name)
                .count();
            if ports > 0 {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("subnet {name:?} still has {ports} port(s); delete their VMs first"),
                )));
            }
            kv.delete(&key)?;
            Ok(serde_json::Value::Null)
        }
        NetCommand::CreateSecurityGroup { group } => {
            if let Err(e) = validate_name("security group", &group.name) {
                return Ok(Err(e));
            }
            if kv.get(&format!("projects/{}", group.project))?.is_none() {
                return Ok(Err(not_found(format!(
                    "project {:?} does not exist",
                    group.project
                ))));
            }
            let key = format!("{PREFIX_SGS}{}/{}", group.project, group.name);
            if kv.get(&key)?.is_some() {
                return Ok(Err(domain(
                    ErrorCode::AlreadyExists,
                    format!("security group {:?} already exists", group.name),
                )));
            }
            put_group(kv, &group)?;
            Ok(value(&group))
        }
        NetCommand::DeleteSecurityGroup { project, name } => {
            let key = format!("{PREFIX_SGS}{project}/{name}");
            if kv.get(&key)?.is_none() {
                return Ok(Err(not_found(format!(
                    "security group {name:?} does not exist"
                ))));
            }
            let users = list::<PortRecord>(kv, &format!("{PREFIX_PORTS}{project}/"))?
                .into_iter()
                .filter(|p| p.security_groups.contains(&name))
                .count();
            if users > 0 {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("security group {name:?} is used by {users} port(s)"),
                )));
            }
            let groups: Vec<SecurityGroupRecord> = list(kv, &format!("{PREFIX_SGS}{project}/"))?;
            for other in groups.into_iter().filter(|g| g.name != name) {
                let other = with_rules(kv, other)?;
                if other
                    .rules
                    .iter()
                    .any(|r| r.remote_group.as_deref() == Some(name.as_str()))
                {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "security group {name:?} is named by a rule of group {:?}; delete that rule first",
                            other.name
                        ),
                    )));
                }
            }
            kv.delete(&key)?;
            for (rule_key, _) in kv.scan(&rules_prefix(&project, &name))? {
                kv.delete(&rule_key)?;
            }
            Ok(serde_json::Value::Null)
        }
        NetCommand::AddRule {
            project,
            group,
            rule,
        } => {
            let key = format!("{PREFIX_SGS}{project}/{group}");
            let Some(sg) = get_json::<SecurityGroupRecord>(kv, &key)? else {
                return Ok(Err(not_found(format!(
                    "security group {group:?} does not exist"
                ))));
            };
            if let Err(e) = check_rule(&rule) {
                return Ok(Err(e));
            }
            if let Some(remote) = &rule.remote_group {
                if kv
                    .get(&format!("{PREFIX_SGS}{project}/{remote}"))?
                    .is_none()
                {
                    return Ok(Err(not_found(format!(
                        "security group {remote:?} named as the rule's peer does not exist"
                    ))));
                }
            }
            let rule_key = format!("{}{}", rules_prefix(&project, &group), rule.id);
            if kv.get(&rule_key)?.is_some() {
                return Ok(Err(domain(
                    ErrorCode::AlreadyExists,
                    format!("security group {group:?} already has a rule {:?}", rule.id),
                )));
            }
            put_json(kv, &rule_key, &rule)?;
            Ok(value(&with_rules(kv, sg)?))
        }
        NetCommand::DeleteRule {
            project,
            group,
            rule,
        } => {
            let key = format!("{PREFIX_SGS}{project}/{group}");
            let Some(mut sg) = get_json::<SecurityGroupRecord>(kv, &key)? else {
                return Ok(Err(not_found(format!(
                    "security group {group:?} does not exist"
                ))));
            };
            let rule_key = format!("{}{rule}", rules_prefix(&project, &group));
            let before = sg.rules.len();
            // Groups written before rules had records of their own.
            sg.rules.retain(|r| r.id != rule);
            if sg.rules.len() < before {
                put_json(kv, &key, &sg)?;
            } else if kv.get(&rule_key)?.is_some() {
                kv.delete(&rule_key)?;
            } else {
                return Ok(Err(not_found(format!(
                    "security group {group:?} has no rule {rule:?}"
                ))));
            }
            Ok(value(&with_rules(kv, sg)?))
        }
        NetCommand::CreatePort { port } => {
            // A port stands for a workload on its node: the node must be
            // one that may host the project's zone, as for a VM.
            let project: Option<crate::state::projects::Project> = get_json(
                kv,
                &format!("{}{}", crate::state::PREFIX_PROJECTS, port.project),
            )?;
            let host: Option<crate::state::nodes::NodeRecord> = get_json(
                kv,
                &format!("{}{:020}", crate::state::PREFIX_NODES, port.node),
            )?;
            if let (Some(project), Some(host)) = (project, host) {
                if let Err(why) = crate::state::zones::may_host(project.zone, host.zone) {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "node {} cannot hold a port of project {:?}: {why}; pick a node of the {} zone (allod node list)",
                            host.id,
                            port.project,
                            project.zone.as_str()
                        ),
                    )));
                }
            }
            create_port(kv, port)?
        }
        NetCommand::DeletePort { project, name } => {
            let key = format!("{PREFIX_PORTS}{project}/{name}");
            let Some(port) = get_json::<PortRecord>(kv, &key)? else {
                return Ok(Err(not_found(format!("port {name:?} does not exist"))));
            };
            if let Some(vm) = port.vm {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("port {name:?} is a NIC of VM {vm:?}; it goes when the VM is deleted"),
                )));
            }
            delete_port(kv, &project, &name)?;
            Ok(serde_json::Value::Null)
        }
        NetCommand::CreatePool { pool } => {
            if let Err(e) = validate_name("IP pool", &pool.name) {
                return Ok(Err(e));
            }
            let key = format!("{PREFIX_POOLS}{}", pool.name);
            if kv.get(&key)?.is_some() {
                return Ok(Err(domain(
                    ErrorCode::AlreadyExists,
                    format!("IP pool {:?} already exists", pool.name),
                )));
            }
            let cidr = pool.cidr.trunc();
            for subnet in all_subnets(kv)? {
                if overlaps(&subnet.cidr, &cidr) {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "{cidr} overlaps subnet {:?} ({}) of project {:?}; floating IPs must not be tenant addresses",
                            subnet.name, subnet.cidr, subnet.project
                        ),
                    )));
                }
            }
            for other in list::<IpPoolRecord>(kv, PREFIX_POOLS)? {
                if overlaps(&other.cidr, &cidr) {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!("{cidr} overlaps IP pool {:?} ({})", other.name, other.cidr),
                    )));
                }
            }
            let pool = IpPoolRecord { cidr, ..pool };
            put_json(kv, &key, &pool)?;
            Ok(value(&pool))
        }
        NetCommand::DeletePool { name } => {
            let key = format!("{PREFIX_POOLS}{name}");
            if kv.get(&key)?.is_none() {
                return Ok(Err(not_found(format!("IP pool {name:?} does not exist"))));
            }
            let used = list::<FloatingIpRecord>(kv, PREFIX_FIPS)?
                .into_iter()
                .filter(|f| f.pool == name)
                .count();
            if used > 0 {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!("IP pool {name:?} has {used} floating IP(s) allocated"),
                )));
            }
            kv.delete(&key)?;
            Ok(serde_json::Value::Null)
        }
        NetCommand::AllocateFip { project, pool } => {
            let Some(mut record) =
                get_json::<crate::state::projects::Project>(kv, &format!("projects/{project}"))?
            else {
                return Ok(Err(not_found(format!(
                    "project {project:?} does not exist"
                ))));
            };
            if let Some(limit) = record.quota.floating_ips {
                if record.usage.floating_ips >= limit {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "project {project:?} has all {limit} floating IPs its quota allows"
                        ),
                    )));
                }
            }
            let pools: Vec<IpPoolRecord> = list::<IpPoolRecord>(kv, PREFIX_POOLS)?
                .into_iter()
                .filter(|p| pool.as_ref().is_none_or(|n| &p.name == n))
                .collect();
            if pools.is_empty() {
                return Ok(Err(match pool {
                    // A name in the body, not the resource addressed: the
                    // request is wrong, the project is there (not a 404).
                    Some(n) => domain(
                        ErrorCode::InvalidArgument,
                        format!(
                            "IP pool {n:?} does not exist; `allod ip-pool list` shows the pools"
                        ),
                    ),
                    None => domain(
                        ErrorCode::FailedPrecondition,
                        "no IP pool exists; a cluster admin creates one (allod ip-pool create)"
                            .to_string(),
                    ),
                }));
            }
            for p in pools {
                for ip in hosts(&p.cidr) {
                    let key = format!("{PREFIX_FIPS}{ip}");
                    if kv.get(&key)?.is_none() {
                        let fip = FloatingIpRecord {
                            ip,
                            project: project.clone(),
                            pool: p.name.clone(),
                            port: None,
                        };
                        put_json(kv, &key, &fip)?;
                        record.usage.floating_ips += 1;
                        put_json(kv, &format!("projects/{project}"), &record)?;
                        return Ok(Ok(value(&fip)));
                    }
                }
            }
            Err(domain(
                ErrorCode::FailedPrecondition,
                "every address of the IP pools is allocated".to_string(),
            ))
        }
        NetCommand::BindFip { project, ip, port } => {
            let key = format!("{PREFIX_FIPS}{ip}");
            let Some(mut fip) =
                get_json::<FloatingIpRecord>(kv, &key)?.filter(|f| f.project == project)
            else {
                return Ok(Err(not_found(format!(
                    "floating IP {ip} is not allocated to project {project:?}"
                ))));
            };
            if let Some(old) = &fip.port {
                let okey = format!("{PREFIX_PORTS}{project}/{old}");
                if let Some(mut p) = get_json::<PortRecord>(kv, &okey)? {
                    p.floating_ip = None;
                    put_json(kv, &okey, &p)?;
                }
            }
            if let Some(name) = &port {
                let pkey = format!("{PREFIX_PORTS}{project}/{name}");
                let Some(mut p) = get_json::<PortRecord>(kv, &pkey)? else {
                    return Ok(Err(not_found(format!(
                        "port {name:?} does not exist in project {project:?}"
                    ))));
                };
                if let Some(other) = p.floating_ip.filter(|o| *o != ip) {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!("port {name:?} already has floating IP {other}; unbind it first"),
                    )));
                }
                p.floating_ip = Some(ip);
                put_json(kv, &pkey, &p)?;
            }
            fip.port = port;
            put_json(kv, &key, &fip)?;
            Ok(value(&fip))
        }
        NetCommand::ReleaseFip { project, ip } => {
            let key = format!("{PREFIX_FIPS}{ip}");
            let Some(fip) =
                get_json::<FloatingIpRecord>(kv, &key)?.filter(|f| f.project == project)
            else {
                return Ok(Err(not_found(format!(
                    "floating IP {ip} is not allocated to project {project:?}"
                ))));
            };
            if let Some(name) = &fip.port {
                let pkey = format!("{PREFIX_PORTS}{project}/{name}");
                if let Some(mut p) = get_json::<PortRecord>(kv, &pkey)? {
                    p.floating_ip = None;
                    put_json(kv, &pkey, &p)?;
                }
            }
            kv.delete(&key)?;
            if let Some(mut record) =
                get_json::<crate::state::projects::Project>(kv, &format!("projects/{project}"))?
            {
                record.usage.floating_ips = record.usage.floating_ips.saturating_sub(1);
                put_json(kv, &format!("projects/{project}"), &record)?;
            }
            Ok(serde_json::Value::Null)
        }
        NetCommand::SetUnderlay { node, address } => {
            kv.put(
                &format!("{PREFIX_UNDERLAY}{node:020}"),
                address.to_string().as_bytes(),
            )?;
            Ok(serde_json::Value::Null)
        }
    })
}
/// What of a project's network is in use and must be let go of by its
/// owner before the project can go: ports (addresses handed out, maybe to a
/// host outside Allod) and floating IPs (addresses from a shared pool).
/// Counted per kind, in words.
pub fn project_leftovers(kv: &impl KvRead, project: &str) -> KvResult<Vec<String>> {
    let ports = kv.scan(&format!("{PREFIX_PORTS}{project}/"))?.len();
    let floating_ips = list::<FloatingIpRecord>(kv, PREFIX_FIPS)?
        .into_iter()
        .filter(|f| f.project == project)
        .count();
    Ok([(ports, "port(s)"), (floating_ips, "floating IP(s)")]
        .into_iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, what)| format!("{count} {what}"))
        .collect())
}

/// Removes the rest of a project's network with it: its VPCs (their VNIs
/// become free), subnets, security groups and their rules. Ports and
/// floating IPs must be gone already ([`project_leftovers`]).
pub fn delete_project_network(kv: &mut KvWrite<'_>, project: &str) -> KvResult<()> {
    for (key, bytes) in kv.scan(&format!("{PREFIX_VPCS}{project}/"))? {
        if let Ok(vpc) = serde_json::from_slice::<VpcRecord>(&bytes) {
            kv.delete(&format!("{PREFIX_VNIS}{}", vpc.vni))?;
        }
        kv.delete(&key)?;
    }
    for prefix in [PREFIX_SUBNETS, PREFIX_SGS, PREFIX_SG_RULES] {
        for (key, _) in kv.scan(&format!("{prefix}{project}/"))? {
            kv.delete(&key)?;
        }
    }
    Ok(())
}

/// Deletes a port if it exists; its floating IP stays allocated, unbound.
pub fn delete_port(kv: &mut KvWrite<'_>, project: &str, name: &str) -> KvResult<()> {
    let key = format!("{PREFIX_PORTS}{project}/{name}");
    let Some(port) = get_json::<PortRecord>(kv, &key)? else {
        return Ok(());
    };
    if let Some(fip) = port.floating_ip {
        let fkey = format!("{PREFIX_FIPS}{fip}");
        if let Some(mut f) = get_json::<FloatingIpRecord>(kv, &fkey)? {
            f.port = None;
            put_json(kv, &fkey, &f)?;
        }
    }
    kv.delete(&key)
}

/// Moves a port to another node (its VM moved); nothing if it is gone.
pub fn move_port(kv: &mut KvWrite<'_>, project: &str, name: &str, node: NodeId) -> KvResult<()> {
    let key = format!("{PREFIX_PORTS}{project}/{name}");
    let Some(mut port) = get_json::<PortRecord>(kv, &key)? else {
        return Ok(());
    };
    port.node = node;
    put_json(kv, &key, &port)
}

/// Creates a port: checks its subnet and groups, assigns its address.
pub fn create_port(kv: &mut KvWrite<'_>, mut port: PortRecord) -> KvResult<Outcome> {
    if let Err(e) = validate_name("port", &port.name) {
        return Ok(Err(e));
    }
    let key = format!("{PREFIX_PORTS}{}/{}", port.project, port.name);
    if kv.get(&key)?.is_some() {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!(
                "port {:?} already exists in project {:?}",
                port.name, port.project
            ),
        )));
    }
    // The subnet is named alone when the project has one subnet of that
    // name, or as VPC/subnet.
    let subnets: Vec<SubnetRecord> =
        list::<SubnetRecord>(kv, &format!("{PREFIX_SUBNETS}{}/", port.project))?
            .into_iter()
            .filter(|s| s.name == port.subnet && (port.vpc.is_empty() || s.vpc == port.vpc))
            .collect();
    let subnet = match subnets.as_slice() {
        [one] => one.clone(),
        [] => {
            return Ok(Err(not_found(format!(
                "subnet {:?} does not exist in project {:?}",
                port.subnet, port.project
            ))))
        }
        _ => {
            return Ok(Err(invalid(format!(
                "several VPCs have a subnet {:?}; name it as VPC/SUBNET",
                port.subnet
            ))))
        }
    };
    port.vpc = subnet.vpc.clone();
    for group in &port.security_groups {
        if kv
            .get(&format!("{PREFIX_SGS}{}/{group}", port.project))?
            .is_none()
        {
            return Ok(Err(not_found(format!(
                "security group {group:?} does not exist in project {:?}",
                port.project
            ))));
        }
    }
    let ports: Vec<PortRecord> = list(kv, &format!("{PREFIX_PORTS}{}/", port.project))?;
    let taken: BTreeSet<Ipv4Addr> = ports
        .iter()
        .filter(|p| p.vpc == port.vpc)
        .map(|p| p.ip)
        .collect();
    if port.ip.is_unspecified() {
        match hosts(&subnet.cidr).find(|ip| *ip != subnet.gateway && !taken.contains(ip)) {
            Some(ip) => port.ip = ip,
            None => {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "subnet {:?} ({}) has no free address",
                        subnet.name, subnet.cidr
                    ),
                )))
            }
        }
    } else if !hosts(&subnet.cidr).any(|ip| ip == port.ip) || port.ip == subnet.gateway {
        return Ok(Err(invalid(format!(
            "{} is not a free host address of subnet {:?} ({}, gateway {})",
            port.ip, subnet.name, subnet.cidr, subnet.gateway
        ))));
    } else if taken.contains(&port.ip) {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!("{} is already used in VPC {:?}", port.ip, port.vpc),
        )));
    }
    put_json(kv, &key, &port)?;
    Ok(Ok(value(&port)))
}

/// The host interface name of port `id`: `alp` and 12 hex digits.
pub fn host_interface(id: &str) -> String {
    let hex: String = id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("alp{hex}")
}

/// A random locally administered MAC in QEMU's range.
pub fn random_mac() -> String {
    let bytes: [u8; 3] = rand::random();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2]
    )
}
