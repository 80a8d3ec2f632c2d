//! The command line: `allod agent`, `allod up`, `allod cluster ...` (admin
//! socket) and the API client commands (`allod project ...`,
//! `allod cluster status`).

mod agent;
mod client;
mod cluster;
pub mod console_client;
pub mod network;
mod projects;
mod storage;
mod users;
mod vms;
mod volumes;

use agent::*;
pub use agent::{AgentArgs, ComputeArgs, NetworkArgs, UpArgs};
use client::*;
pub use client::{
    body, error_message, print_table, request, text, ApiArgs, ApiClient, CliConfig, Output,
};
use cluster::*;
use projects::*;
use users::*;
use vms::*;
use volumes::*;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::daemon::admin::{self, AdminRequest};

#[derive(Parser, Debug)]
#[command(
    name = "allod",
    version,
    about = "Allod: a sovereign cloud appliance in one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: TopCommand,
}

#[derive(Subcommand, Debug)]
pub enum TopCommand {
    /// Run the node agent (the daemon).
    Agent(AgentArgs),
    /// Run a single-node cluster on this machine with built-in defaults.
    Up(UpArgs),
    /// Create, join and manage the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Manage projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Manage block volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The storage cluster: health, recovery, settings.
    #[command(subcommand)]
    Storage(storage::StorageCommand),
    /// The image catalog: disk images that volumes and VMs clone from.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Tenant VPCs (isolated networks).
    #[command(subcommand)]
    Vpc(crate::cli::network::VpcCommand),
    /// Subnets of a VPC.
    #[command(subcommand)]
    Subnet(crate::cli::network::SubnetCommand),
    /// Security groups and their rules.
    #[command(subcommand)]
    Sg(crate::cli::network::SgCommand),
    /// Ports (NICs) on subnets.
    #[command(subcommand)]
    Port(crate::cli::network::PortCommand),
    /// Floating IPs.
    #[command(subcommand)]
    Fip(crate::cli::network::FipCommand),
    /// Floating-IP pools (cluster admins).
    #[command(subcommand)]
    IpPool(crate::cli::network::IpPoolCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Grant roles to users.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Create and revoke API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Log in with a password and store URL, CA and a token in the CLI config.
    Login(LoginArgs),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Trust users of an OpenID Connect issuer (Keycloak, ...).
    #[command(subcommand)]
    Oidc(OidcCommand),
    /// Print the API's OpenAPI 3 document (also served at /v1/openapi.json).
    Openapi,
    /// The node's console: set it up, create or join a cluster, watch it.
    Console {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Set this node up without the console.
    #[command(subcommand)]
    Node(NodeCommand),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        TopCommand::Agent(args) => run_agent(args).await,
        TopCommand::Up(args) => run_up(args).await,
        TopCommand::Cluster(command) => run_cluster(command).await,
        TopCommand::Project(command) => run_project(command).await,
        TopCommand::Volume(command) => run_volume(command).await,
        TopCommand::Storage(command) => storage::run_storage(command).await,
        TopCommand::Vpc(command) => crate::cli::network::run_vpc(command).await,
        TopCommand::Subnet(command) => crate::cli::network::run_subnet(command).await,
        TopCommand::Sg(command) => crate::cli::network::run_sg(command).await,
        TopCommand::Port(command) => crate::cli::network::run_port(command).await,
        TopCommand::Fip(command) => crate::cli::network::run_fip(command).await,
        TopCommand::IpPool(command) => crate::cli::network::run_pool(command).await,
        TopCommand::Image(command) => run_image(command).await,
        TopCommand::Vm(command) => run_vm(command).await,
        TopCommand::User(command) => run_user(command).await,
        TopCommand::Role(command) => run_role(command).await,
        TopCommand::Token(command) => run_token(command).await,
        TopCommand::Login(args) => run_login(args).await,
        TopCommand::Console { data_dir } => crate::console::run(data_dir).await,
        TopCommand::Node(NodeCommand::Setup {
            data_dir,
            node,
            create,
            name,
            join,
            check_only,
        }) => {
            if !node.is_empty() {
                let wipe = node.wipe.clone();
                let result = admin(
                    &data_dir,
                    AdminRequest::Setup {
                        setup: node.to_setup(),
                        wipe,
                    },
                )
                .await?;
                println!("Node set up: {result}");
                if !create && join.is_none() {
                    return Ok(());
                }
            }
            run_node_setup(data_dir, create, name, join, check_only).await
        }
        TopCommand::Node(NodeCommand::List { api }) => {
            let client = api.resolve()?;
            let nodes = client.call(reqwest::Method::GET, "/v1/nodes", None).await?;
            emit(api.output, &nodes, |list| {
                cluster::print_nodes(list.as_array().map(Vec::as_slice).unwrap_or_default())
            });
            Ok(())
        }
        TopCommand::Node(NodeCommand::Show { node, api }) => {
            let client = api.resolve()?;
            let path = format!("/v1/nodes/{node}");
            let shown = client.call(reqwest::Method::GET, &path, None).await?;
            emit(api.output, &shown, |n| {
                cluster::print_nodes(std::slice::from_ref(n))
            });
            Ok(())
        }
        TopCommand::Node(NodeCommand::Drain {
            node,
            restart_unmovable,
            no_wait,
            api,
        }) => cluster::drain(node, restart_unmovable, no_wait, api).await,
        TopCommand::Node(NodeCommand::Resume { node, api }) => {
            let client = api.resolve()?;
            let path = format!("/v1/nodes/{node}/resume");
            client.call(reqwest::Method::POST, &path, None).await?;
            let shown = client
                .call(reqwest::Method::GET, &format!("/v1/nodes/{node}"), None)
                .await?;
            emit(api.output, &shown, |n| {
                cluster::print_nodes(std::slice::from_ref(n))
            });
            Ok(())
        }
        TopCommand::Node(NodeCommand::Maintenance { data_dir, state }) => {
            let on = state == "on";
            admin(&data_dir, AdminRequest::Maintenance { on }).await?;
            println!(
                "{}",
                if on {
                    "This node is in maintenance: it takes no new VMs."
                } else {
                    "This node takes new VMs again."
                }
            );
            Ok(())
        }
        TopCommand::Openapi => {
            print!("{}", crate::api::openapi_pretty());
            Ok(())
        }
        TopCommand::Audit(command) => run_audit(command).await,
        TopCommand::Oidc(command) => run_oidc(command).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{human_size, parse_size};

    #[test]
    fn sizes_read_and_print_in_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("1Q").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(parse_count_limit("unlimited"), Ok(Limit::Unlimited));
        assert_eq!(parse_size_limit("1T"), Ok(Limit::At(1 << 40)));
    }
}
