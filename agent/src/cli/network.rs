//! `allod vpc|subnet|sg|port|fip|ip-pool`: tenant networks from the shell.

use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use crate::api_types::{
    AddRule, AllocateFip, BindFip, CreatePool, CreatePort, CreateSecurityGroup, CreateSubnet,
    CreateVpc,
};
use crate::cli::{body, print_table, request, text, ApiArgs};

#[derive(Subcommand, Debug)]
pub enum VpcCommand {
    /// Create a VPC: an isolated network of its own (the cluster picks its VNI).
    Create {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Delete {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum SubnetCommand {
    /// Create a subnet of a VPC (its own range; DHCP hands out addresses).
    Create {
        name: String,
        #[arg(long)]
        vpc: String,
        /// e.g. 10.0.0.0/24
        #[arg(long)]
        cidr: String,
        /// Default: the first host address.
        #[arg(long)]
        gateway: Option<String>,
        /// DNS servers announced by DHCP (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        vpc: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum SgCommand {
    /// Create a security group: it lets nothing in until a rule does.
    Create {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a group no port carries and no rule names.
    Delete {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Rules of a group.
    #[command(subcommand)]
    Rule(RuleCommand),
}

#[derive(Subcommand, Debug)]
pub enum RuleCommand {
    /// Allow traffic: by direction, protocol, port range and peer.
    Add {
        /// The security group.
        sg: String,
        #[arg(long)]
        project: String,
        #[arg(long, default_value = "ingress", value_parser = ["ingress", "egress"])]
        direction: String,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "icmp", "any"])]
        protocol: String,
        /// A port (22) or a range (8000-8080).
        #[arg(long)]
        port: Option<String>,
        /// Peer addresses, e.g. 192.0.2.0/24.
        #[arg(long)]
        cidr: Option<String>,
        /// Peer: the ports of this security group.
        #[arg(long, conflicts_with = "cidr")]
        remote_group: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a rule (by the id `allod sg list` shows); connections it let
    /// in stay up, new ones follow the remaining rules.
    Delete {
        sg: String,
        rule: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum PortCommand {
    /// Create a port (a NIC) on a subnet, on a node.
    Create {
        name: String,
        #[arg(long)]
        subnet: String,
        /// Security groups (repeatable; default: default).
        #[arg(long = "sg")]
        security_groups: Vec<String>,
        #[arg(long)]
        node: Option<u64>,
        #[arg(long)]
        ip: Option<String>,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Delete {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum FipCommand {
    /// Take an address from an IP pool for the project.
    Allocate {
        #[arg(long)]
        project: String,
        #[arg(long)]
        pool: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Forward a floating IP to a port (and its traffic out from it).
    Bind {
        ip: String,
        #[arg(long)]
        port: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Give the address back to its pool.
    Release {
        ip: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum IpPoolCommand {
    /// Add a floating-IP pool (cluster admins).
    Create {
        name: String,
        #[arg(long)]
        cidr: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn rows(value: &Value, columns: &[&str]) -> Vec<Vec<String>> {
    let items = match value {
        Value::Array(items) => items.clone(),
        one => vec![one.clone()],
    };
    items
        .iter()
        .map(|v| columns.iter().map(|c| text(&v[*c])).collect())
        .collect()
}

/// [`request`], printing the answer's `columns` as a table.
async fn call(
    api: &ApiArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
    columns: &[&str],
) -> anyhow::Result<()> {
    request(api, method, path, body, |v| {
        let headers: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        print_table(&headers, &rows(v, columns));
    })
    .await?;
    Ok(())
}

const VPC: &[&str] = &["name", "id", "vni"];
const SUBNET: &[&str] = &["name", "vpc", "cidr", "gateway"];
const SG: &[&str] = &["name", "id"];
const PORT: &[&str] = &[
    "name",
    "subnet",
    "ip",
    "mac",
    "node",
    "host_interface",
    "floating_ip",
];
const FIP: &[&str] = &["ip", "pool", "port"];
const POOL: &[&str] = &["name", "cidr"];

pub async fn run_vpc(command: VpcCommand) -> anyhow::Result<()> {
    match command {
        VpcCommand::Create { name, project, api } => {
            let path = format!("/v1/projects/{project}/vpcs");
            call(&api, Method::POST, &path, body(&CreateVpc { name }), VPC).await
        }
        VpcCommand::List { project, api } => {
            let path = format!("/v1/projects/{project}/vpcs");
            call(&api, Method::GET, &path, None, VPC).await
        }
        VpcCommand::Delete { name, project, api } => {
            let path = format!("/v1/projects/{project}/vpcs/{name}");
            call(&api, Method::DELETE, &path, None, VPC).await
        }
    }
}

pub async fn run_subnet(command: SubnetCommand) -> anyhow::Result<()> {
    match command {
        SubnetCommand::Create {
            name,
            vpc,
            cidr,
            gateway,
            dns,
            project,
            api,
        } => {
            let payload = CreateSubnet {
                name,
                cidr,
                gateway,
                dns,
            };
            let path = format!("/v1/projects/{project}/vpcs/{vpc}/subnets");
            call(&api, Method::POST, &path, body(&payload), SUBNET).await
        }
        SubnetCommand::List { vpc, project, api } => {
            let path = format!("/v1/projects/{project}/vpcs/{vpc}/subnets");
            call(&api, Method::GET, &path, None, SUBNET).await
        }
    }
}

/// `22` or `8000-8080` as (first, last); out-of-range numbers are left to
/// the API, which names the limit.
fn port_range(text: &str) -> anyhow::Result<(u32, u32)> {
    let number = |t: &str| {
        t.trim().parse::<u32>().map_err(|_| {
            anyhow::anyhow!("--port {text:?} is not a port (22) or a range (8000-8080)")
        })
    };
    match text.split_once('-') {
        Some((a, b)) => Ok((number(a)?, number(b)?)),
        None => {
            let p = number(text)?;
            Ok((p, p))
        }
    }
}

pub async fn run_sg(command: SgCommand) -> anyhow::Result<()> {
    match command {
        SgCommand::Create { name, project, api } => {
            let path = format!("/v1/projects/{project}/security-groups");
            let payload = CreateSecurityGroup { name };
            call(&api, Method::POST, &path, body(&payload), SG).await
        }
        SgCommand::List { project, api } => {
            let path = format!("/v1/projects/{project}/security-groups");
            call(&api, Method::GET, &path, None, SG).await
        }
        SgCommand::Delete { name, project, api } => {
            let path = format!("/v1/projects/{project}/security-groups/{name}");
            call(&api, Method::DELETE, &path, None, SG).await
        }
        SgCommand::Rule(RuleCommand::Delete {
            sg,
            rule,
            project,
            api,
        }) => {
            let path = format!("/v1/projects/{project}/security-groups/{sg}/rules/{rule}");
            call(&api, Method::DELETE, &path, None, SG).await
        }
        SgCommand::Rule(RuleCommand::Add {
            sg,
            project,
            direction,
            protocol,
            port,
            cidr,
            remote_group,
            api,
        }) => {
            let (port_min, port_max) = match port {
                Some(port) => {
                    let (lo, hi) = port_range(&port)?;
                    (Some(lo), Some(hi))
                }
                None => (None, None),
            };
            if cidr.is_none() && remote_group.is_none() {
                anyhow::bail!(
                    "name the rule's peer: --cidr 192.0.2.0/24 (0.0.0.0/0 for anyone) or --remote-group GROUP"
                );
            }
            let payload = AddRule {
                direction,
                protocol,
                port_min,
                port_max,
                cidr,
                remote_group,
            };
            let path = format!("/v1/projects/{project}/security-groups/{sg}/rules");
            call(&api, Method::POST, &path, body(&payload), SG).await
        }
    }
}

pub async fn run_port(command: PortCommand) -> anyhow::Result<()> {
    match command {
        PortCommand::Create {
            name,
            subnet,
            security_groups,
            node,
            ip,
            project,
            api,
        } => {
            let payload = CreatePort {
                name,
                subnet,
                security_groups: (!security_groups.is_empty()).then_some(security_groups),
                node,
                ip,
            };
            let path = format!("/v1/projects/{project}/ports");
            call(&api, Method::POST, &path, body(&payload), PORT).await
        }
        PortCommand::List { project, api } => {
            let path = format!("/v1/projects/{project}/ports");
            call(&api, Method::GET, &path, None, PORT).await
        }
        PortCommand::Delete { name, project, api } => {
            let path = format!("/v1/projects/{project}/ports/{name}");
            call(&api, Method::DELETE, &path, None, PORT).await
        }
    }
}

pub async fn run_fip(command: FipCommand) -> anyhow::Result<()> {
    match command {
        FipCommand::Allocate { project, pool, api } => {
            let path = format!("/v1/projects/{project}/floating-ips");
            call(&api, Method::POST, &path, body(&AllocateFip { pool }), FIP).await
        }
        FipCommand::List { project, api } => {
            let path = format!("/v1/projects/{project}/floating-ips");
            call(&api, Method::GET, &path, None, FIP).await
        }
        FipCommand::Bind {
            ip,
            port,
            project,
            api,
        } => {
            let path = format!("/v1/projects/{project}/floating-ips/{ip}/bind");
            call(
                &api,
                Method::POST,
                &path,
                body(&BindFip { port: Some(port) }),
                FIP,
            )
            .await
        }
        FipCommand::Release { ip, project, api } => {
            let path = format!("/v1/projects/{project}/floating-ips/{ip}");
            call(&api, Method::DELETE, &path, None, FIP).await
        }
    }
}

pub async fn run_pool(command: IpPoolCommand) -> anyhow::Result<()> {
    match command {
        IpPoolCommand::Create { name, cidr, api } => {
            let payload = CreatePool { name, cidr };
            call(&api, Method::POST, "/v1/ip-pools", body(&payload), POOL).await
        }
        IpPoolCommand::List { api } => call(&api, Method::GET, "/v1/ip-pools", None, POOL).await,
    }
}
