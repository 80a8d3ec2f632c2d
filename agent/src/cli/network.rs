//! `allod vpc|subnet|sg|port|fip|ip-pool`: tenant networks from the shell.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use crate::cli::{emit, print_table, text, ApiArgs};

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

async fn call(
    api: &ApiArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
    columns: &[&str],
) -> anyhow::Result<()> {
    let client = api.resolve()?;
    let value = client.call(method, path, body).await?;
    if value.is_null() {
        return Ok(());
    }
    emit(api.output, &value, |v| {
        let headers: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        print_table(&headers, &rows(v, columns));
    });
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
            call(
                &api,
                Method::POST,
                &path,
                Some(json!({ "name": name })),
                VPC,
            )
            .await
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
            let mut body = json!({ "name": name, "cidr": cidr, "dns": dns });
            if let Some(g) = gateway {
                body["gateway"] = g.into();
            }
            let path = format!("/v1/projects/{project}/vpcs/{vpc}/subnets");
            call(&api, Method::POST, &path, Some(body), SUBNET).await
        }
        SubnetCommand::List { vpc, project, api } => {
            let path = format!("/v1/projects/{project}/vpcs/{vpc}/subnets");
            call(&api, Method::GET, &path, None, SUBNET).await
        }
    }
}

/// `22` or `8000-8080` as (first, last); out-of-range numbers are left to
/// the API, which names the limit.
fn port_range(text: &str) -> anyhow::Result<(u64, u64)> {
    let number = |t: &str| {
        t.trim().parse::<u64>().map_err(|_| {
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
            call(&api, Method::POST, &path, Some(json!({ "name": name })), SG).await
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
            let mut body = json!({ "direction": direction, "protocol": protocol });
            if let Some(port) = port {
                let (lo, hi) = port_range(&port)?;
                body["port_min"] = lo.into();
                body["port_max"] = hi.into();
            }
            if cidr.is_none() && remote_group.is_none() {
                anyhow::bail!(
                    "name the rule's peer: --cidr 192.0.2.0/24 (0.0.0.0/0 for anyone) or --remote-group GROUP"
                );
            }
            if let Some(c) = cidr {
                body["cidr"] = c.into();
            }
            if let Some(g) = remote_group {
                body["remote_group"] = g.into();
            }
            let path = format!("/v1/projects/{project}/security-groups/{sg}/rules");
            call(&api, Method::POST, &path, Some(body), SG).await
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
            let mut body = json!({ "name": name, "subnet": subnet });
            if !security_groups.is_empty() {
                body["security_groups"] = security_groups.into();
            }
            if let Some(n) = node {
                body["node"] = n.into();
            }
            if let Some(ip) = ip {
                body["ip"] = ip.into();
            }
            let path = format!("/v1/projects/{project}/ports");
            call(&api, Method::POST, &path, Some(body), PORT).await
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
            let body = match pool {
                Some(p) => json!({ "pool": p }),
                None => json!({}),
            };
            let path = format!("/v1/projects/{project}/floating-ips");
            call(&api, Method::POST, &path, Some(body), FIP).await
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
                Some(json!({ "port": port })),
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
            let body = json!({ "name": name, "cidr": cidr });
            call(&api, Method::POST, "/v1/ip-pools", Some(body), POOL).await
        }
        IpPoolCommand::List { api } => call(&api, Method::GET, "/v1/ip-pools", None, POOL).await,
    }
}
