//! VPC, subnet, security-group, port, floating-IP and IP-pool routes.

use crate::api_types::{
    AddRule, AllocateFip, BindFip, CreatePool, CreatePort, CreateSecurityGroup, CreateSubnet,
    CreateVpc,
};
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{outcome_as, read_project, ApiError, ApiJson, ApiResult};
use crate::cluster::node::ClusterNode;
use crate::state::network::{
    check_rule, FloatingIpRecord, IpPoolRecord, NetCommand, PortRecord, RuleRecord,
    SecurityGroupRecord, SubnetRecord, VpcRecord,
};
use crate::state::Command;

async fn net<T: serde::de::DeserializeOwned>(
    node: &ClusterNode,
    command: NetCommand,
) -> ApiResult<T> {
    let outcome = node.write(&Command::Network { command }).await?;
    outcome_as(outcome?)
}

fn parse_cidr(text: &str, what: &str) -> ApiResult<ipnet::Ipv4Net> {
    text.parse().map_err(|_| {
        ApiError::invalid(format!(
            "{what} {text:?} is not an IPv4 network in CIDR form (e.g. 10.0.0.0/24)"
        ))
    })
}

fn parse_ip(text: &str, what: &str) -> ApiResult<Ipv4Addr> {
    text.parse()
        .map_err(|_| ApiError::invalid(format!("{what} {text:?} is not an IPv4 address")))
}

#[utoipa::path(get, path = "/v1/projects/{name}/vpcs", tag = "network",
    params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's VPCs", body = Vec<VpcRecord>)))]
pub(super) async fn list_vpcs(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<VpcRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.vpcs(&project)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/vpcs", tag = "network",
    params(("name" = String, Path, description = "Project name")), request_body = CreateVpc,
    responses((status = 201, description = "The VPC, with the VNI the cluster gave it", body = VpcRecord)))]
pub(super) async fn create_vpc(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<CreateVpc>,
) -> ApiResult<(StatusCode, Json<VpcRecord>)> {
    crate::state::validate_name("VPC", &body.name)?;
    let vpc = VpcRecord {
        id: crate::cluster::join::random_hex(8),
        name: body.name,
        project,
        vni: 0,
        created_at_ms: crate::cluster::join::now_ms(),
    };
    let vpc = net(&node, NetCommand::CreateVpc { vpc }).await?;
    Ok((StatusCode::CREATED, Json(vpc)))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/vpcs/{vpc}", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("vpc" = String, Path, description = "VPC name")),
    responses((status = 204, description = "Deleted (it had no subnets)")))]
pub(super) async fn delete_vpc(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    node.write(&Command::Network {
        command: NetCommand::DeleteVpc { project, name },
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/projects/{name}/vpcs/{vpc}/subnets", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("vpc" = String, Path, description = "VPC name")),
    responses((status = 200, description = "The VPC's subnets", body = Vec<SubnetRecord>)))]
pub(super) async fn list_subnets(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vpc)): Path<(String, String)>,
) -> ApiResult<Json<Vec<SubnetRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.subnets(&project, &vpc)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/vpcs/{vpc}/subnets", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("vpc" = String, Path, description = "VPC name")),
    request_body = CreateSubnet,
    responses((status = 201, description = "The subnet", body = SubnetRecord)))]
pub(super) async fn create_subnet(
    State(node): State<Arc<ClusterNode>>,
    Path((project, vpc)): Path<(String, String)>,
    ApiJson(body): ApiJson<CreateSubnet>,
) -> ApiResult<(StatusCode, Json<SubnetRecord>)> {
    crate::state::validate_name("subnet", &body.name)?;
    let cidr = parse_cidr(&body.cidr, "cidr")?;
    let gateway = match &body.gateway {
        Some(g) => parse_ip(g, "gateway")?,
        None => Ipv4Addr::UNSPECIFIED,
    };
    let dns = body
        .dns
        .iter()
        .map(|d| parse_ip(d, "DNS server"))
        .collect::<ApiResult<Vec<_>>>()?;
    let subnet = SubnetRecord {
        id: crate::cluster::join::random_hex(8),
        name: body.name,
        project,
        vpc,
        cidr,
        gateway,
        dns,
    };
    let subnet = net(&node, NetCommand::CreateSubnet { subnet }).await?;
    Ok((StatusCode::CREATED, Json(subnet)))
}

#[utoipa::path(get, path = "/v1/projects/{name}/security-groups", tag = "network",
    params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's security groups and their rules", body = Vec<SecurityGroupRecord>)))]
pub(super) async fn list_security_groups(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<SecurityGroupRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.security_groups(&project)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/security-groups", tag = "network",
    params(("name" = String, Path, description = "Project name")), request_body = CreateSecurityGroup,
    responses((status = 201, description = "The group: no rules, so it lets nothing in and everything out", body = SecurityGroupRecord)))]
pub(super) async fn create_security_group(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<CreateSecurityGroup>,
) -> ApiResult<(StatusCode, Json<SecurityGroupRecord>)> {
    crate::state::validate_name("security group", &body.name)?;
    let group = SecurityGroupRecord {
        id: crate::cluster::join::random_hex(8),
        name: body.name,
        project,
        rules: Vec::new(),
    };
    let group = net(&node, NetCommand::CreateSecurityGroup { group }).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/security-groups/{sg}", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("sg" = String, Path, description = "Security group name")),
    responses((status = 204, description = "Deleted; refused while a port carries it or a rule names it")))]
pub(super) async fn delete_security_group(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    node.write(&Command::Network {
        command: NetCommand::DeleteSecurityGroup { project, name },
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/projects/{name}/security-groups/{sg}/rules/{rule}", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("sg" = String, Path, description = "Security group name"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 200, description = "The group without the rule (established connections stay)", body = SecurityGroupRecord)))]
pub(super) async fn delete_rule(
    State(node): State<Arc<ClusterNode>>,
    Path((project, group, rule)): Path<(String, String, String)>,
) -> ApiResult<Json<SecurityGroupRecord>> {
    let group = net(
        &node,
        NetCommand::DeleteRule {
            project,
            group,
            rule,
        },
    )
    .await?;
    Ok(Json(group))
}

#[utoipa::path(post, path = "/v1/projects/{name}/security-groups/{sg}/rules", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("sg" = String, Path, description = "Security group name")),
    request_body = AddRule,
    responses((status = 201, description = "The group with its new rule (applied on every node within a second)", body = SecurityGroupRecord)))]
pub(super) async fn add_rule(
    State(node): State<Arc<ClusterNode>>,
    Path((project, group)): Path<(String, String)>,
    ApiJson(body): ApiJson<AddRule>,
) -> ApiResult<(StatusCode, Json<SecurityGroupRecord>)> {
    let port = |p: Option<u32>| -> ApiResult<Option<u16>> {
        match p {
            None => Ok(None),
            Some(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
            Some(p) => Err(ApiError::invalid(format!(
                "port {p} is out of range: ports are 1-65535"
            ))),
        }
    };
    let port_min = port(body.port_min)?;
    let port_max = port(body.port_max)?.or(port_min);
    let rule = RuleRecord {
        id: crate::cluster::join::random_hex(6),
        direction: body.direction,
        protocol: body.protocol,
        port_min,
        port_max,
        cidr: body
            .cidr
            .as_deref()
            .map(|c| parse_cidr(c, "cidr"))
            .transpose()?,
        remote_group: body.remote_group,
    };
    check_rule(&rule)?;
    let group = net(
        &node,
        NetCommand::AddRule {
            project,
            group,
            rule,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// A port record as the API makes it: a fresh id, MAC and host interface;
/// the address is assigned where the create applies.
pub(crate) fn new_port(
    project: String,
    name: String,
    subnet: &str,
    ip: Option<&str>,
    security_groups: Option<Vec<String>>,
    node: u64,
) -> ApiResult<PortRecord> {
    let (vpc, subnet) = match subnet.split_once('/') {
        Some((v, s)) => (v.to_string(), s.to_string()),
        None => (String::new(), subnet.to_string()),
    };
    if subnet.is_empty() {
        return Err(ApiError::invalid(
            "a NIC needs a subnet (e.g. --nic subnet=web,sg=default)",
        ));
    }
    let id = crate::cluster::join::random_hex(8);
    Ok(PortRecord {
        host_interface: crate::state::network::host_interface(&id),
        id,
        name,
        project,
        vpc,
        subnet,
        mac: crate::state::network::random_mac(),
        ip: match ip {
            Some(ip) => parse_ip(ip, "ip")?,
            None => Ipv4Addr::UNSPECIFIED,
        },
        security_groups: security_groups.unwrap_or_else(|| vec!["default".into()]),
        node,
        vm: None,
        floating_ip: None,
    })
}

#[utoipa::path(get, path = "/v1/projects/{name}/ports", tag = "network",
    params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's ports (VM NICs)", body = Vec<PortRecord>)))]
pub(super) async fn list_ports(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<PortRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.ports(&project)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/ports", tag = "network",
    params(("name" = String, Path, description = "Project name")), request_body = CreatePort,
    responses((status = 201, description = "The port, with its MAC, address and host interface", body = PortRecord)))]
pub(super) async fn create_port(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<CreatePort>,
) -> ApiResult<(StatusCode, Json<PortRecord>)> {
    crate::state::validate_name("port", &body.name)?;
    let nodes = node.state.nodes()?;
    let host = match body.node {
        Some(id) => nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.id)
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "node {id} is not a member of this cluster (see allod node list)"
                ))
            })?,
        // The first node that may host the project's zone.
        None => {
            let zone = node.state.project(&project)?.map(|p| p.zone);
            nodes
                .iter()
                .find(|n| zone.is_none_or(|z| crate::state::zones::may_host(z, n.zone).is_ok()))
                .or(nodes.first())
                .map(|n| n.id)
                .unwrap_or(1)
        }
    };
    let port = new_port(
        project,
        body.name,
        &body.subnet,
        body.ip.as_deref(),
        body.security_groups,
        host,
    )?;
    let port = net(&node, NetCommand::CreatePort { port }).await?;
    Ok((StatusCode::CREATED, Json(port)))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/ports/{port}", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("port" = String, Path, description = "Port name")),
    responses((status = 204, description = "Deleted; its floating IP stays allocated, unbound")))]
pub(super) async fn delete_port(
    State(node): State<Arc<ClusterNode>>,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    node.write(&Command::Network {
        command: NetCommand::DeletePort { project, name },
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/projects/{name}/floating-ips", tag = "network",
    params(("name" = String, Path, description = "Project name")),
    responses((status = 200, description = "The project's floating IPs", body = Vec<FloatingIpRecord>)))]
pub(super) async fn list_fips(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<FloatingIpRecord>>> {
    read_project(&node, &project).await?;
    Ok(Json(node.state.floating_ips(&project)?))
}

#[utoipa::path(post, path = "/v1/projects/{name}/floating-ips", tag = "network",
    params(("name" = String, Path, description = "Project name")), request_body = AllocateFip,
    responses((status = 201, description = "The allocated address (counts against the floating_ips quota)", body = FloatingIpRecord)))]
pub(super) async fn allocate_fip(
    State(node): State<Arc<ClusterNode>>,
    Path(project): Path<String>,
    ApiJson(body): ApiJson<AllocateFip>,
) -> ApiResult<(StatusCode, Json<FloatingIpRecord>)> {
    let fip = net(
        &node,
        NetCommand::AllocateFip {
            project,
            pool: body.pool,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(fip)))
}

#[utoipa::path(post, path = "/v1/projects/{name}/floating-ips/{ip}/bind", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("ip" = String, Path, description = "The floating IP")),
    request_body = BindFip,
    responses((status = 200, description = "The floating IP, now bound (or unbound)", body = FloatingIpRecord)))]
pub(super) async fn bind_fip(
    State(node): State<Arc<ClusterNode>>,
    Path((project, ip)): Path<(String, String)>,
    ApiJson(body): ApiJson<BindFip>,
) -> ApiResult<Json<FloatingIpRecord>> {
    let ip = parse_ip(&ip, "floating IP")?;
    let fip = net(
        &node,
        NetCommand::BindFip {
            project,
            ip,
            port: body.port,
        },
    )
    .await?;
    Ok(Json(fip))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/floating-ips/{ip}", tag = "network",
    params(("name" = String, Path, description = "Project name"), ("ip" = String, Path, description = "The floating IP")),
    responses((status = 204, description = "Released to its pool")))]
pub(super) async fn release_fip(
    State(node): State<Arc<ClusterNode>>,
    Path((project, ip)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let ip = parse_ip(&ip, "floating IP")?;
    node.write(&Command::Network {
        command: NetCommand::ReleaseFip { project, ip },
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/ip-pools", tag = "network",
    responses((status = 200, description = "Floating-IP pools", body = Vec<IpPoolRecord>)))]
pub(super) async fn list_pools(
    State(node): State<Arc<ClusterNode>>,
) -> ApiResult<Json<Vec<IpPoolRecord>>> {
    Ok(Json(node.state.ip_pools()?))
}

#[utoipa::path(post, path = "/v1/ip-pools", tag = "network", request_body = CreatePool,
    responses((status = 201, description = "The pool (it may not overlap any tenant subnet)", body = IpPoolRecord)))]
pub(super) async fn create_pool(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreatePool>,
) -> ApiResult<(StatusCode, Json<IpPoolRecord>)> {
    crate::state::validate_name("IP pool", &body.name)?;
    let pool = IpPoolRecord {
        name: body.name,
        cidr: parse_cidr(&body.cidr, "cidr")?,
    };
    let pool = net(&node, NetCommand::CreatePool { pool }).await?;
    Ok((StatusCode::CREATED, Json(pool)))
}
