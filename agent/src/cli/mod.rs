//! The command line: `allod agent`, `allod up`, `allod cluster ...` (admin
//! socket) and the API client commands (`allod project ...`,
//! `allod cluster status`).

pub mod console_client;
pub mod network;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::daemon::admin::{self, AdminRequest};
use crate::daemon::{Agent, AgentOptions};

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

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the cluster's nodes: role, zone, capacity and block storage.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set the node up (host name, management network, NTP, storage disks)
    /// and then create a cluster (--create) or join one (--join TOKEN) after
    /// the same pre-flight checks as the console; refuses to join if any fails.
    Setup {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        node: Box<SetupArgs>,
        #[arg(long, conflicts_with = "join")]
        create: bool,
        /// Name of the new cluster (with --create).
        #[arg(long, requires = "create")]
        name: Option<String>,
        /// Join with this token.
        #[arg(long)]
        join: Option<String>,
        /// Only run the pre-flight checks for --join; change nothing.
        #[arg(long, requires = "join")]
        check_only: bool,
    },
    /// Put this node into maintenance (it takes no new VMs), or take it out.
    Maintenance {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum OidcCommand {
    /// Add or replace an issuer whose bearer JWTs the API accepts.
    Add {
        /// The issuer's name in Allod.
        name: String,
        /// The exact `iss` of its tokens (https://...).
        #[arg(long)]
        issuer: String,
        /// The `aud` its tokens must carry (usually the client id).
        #[arg(long)]
        audience: String,
        /// The claim whose values map to roles; dotted paths reach into objects.
        #[arg(long, default_value = "groups")]
        claim: String,
        /// VALUE=ROLE or VALUE=ROLE@PROJECT, e.g. `ops=cluster-admin`,
        /// `web-devs=project-member@web`; repeat for more.
        #[arg(long = "map", value_parser = crate::state::auth::ClaimMapping::parse)]
        mappings: Vec<crate::state::auth::ClaimMapping>,
        /// A CA certificate (PEM file) to trust for the issuer's HTTPS.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the issuers this cluster trusts.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop trusting an issuer; its tokens are refused at once.
    Remove {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// List audit entries (all, or those of --user / --action).
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check the hash chain of the whole log, live or from an export (JSON lines).
    Verify {
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user; with --password-stdin, read its password from the first line of standard input.
    Create {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum RoleCommand {
    /// Give USER a role: cluster-admin, or project-admin|project-member|project-viewer in --project.
    Grant {
        user: String,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        role: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token (the secret is printed once).
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        role: Option<String>,
        /// Lifetime, e.g. 24h or 30d; none means until revoked.
        #[arg(long, value_parser = parse_duration_secs)]
        expires: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token by its id.
    Revoke {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    #[arg(long)]
    pub url: String,
    /// PEM file of the cluster CA.
    #[arg(long)]
    pub ca: PathBuf,
    /// User name (asked for when missing).
    #[arg(long)]
    pub user: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// Config file to write (default: $XDG_CONFIG_HOME/allod/config.json or ~/.config/allod/config.json).
    #[arg(long, env = "ALLOD_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Directory holding this node's state, keys and admin socket.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// HOST:PORT for the tenant HTTPS API.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub api_listen: String,
    /// HOST:PORT for mutual-TLS traffic between nodes.
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub peer_listen: String,
    /// API address other machines use to reach this node (default: --api-listen).
    #[arg(long)]
    pub api_advertise: Option<String>,
    /// Peer address other nodes use to reach this node (default: --peer-listen).
    #[arg(long)]
    pub peer_advertise: Option<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// HOST:PORT for block-storage traffic between nodes (mutual TLS).
    #[arg(long, default_value = "127.0.0.1:7445")]
    pub storage_listen: String,
    /// Storage address other nodes use to reach this node (default: --storage-listen).
    #[arg(long)]
    pub storage_advertise: Option<String>,
    /// Directory for this node's volume objects (default: DATA_DIR/storage).
    #[arg(long)]
    pub storage_dir: Option<PathBuf>,
    /// Failure domain (rack, room) for replica placement (default: the node name).
    #[arg(long)]
    pub failure_domain: Option<String>,
    /// Also serve NBD on this TCP address (unauthenticated: trusted networks only).
    #[arg(long)]
    pub nbd_listen: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

/// How this node builds tenant networks.
#[derive(Args, Debug, Clone)]
pub struct NetworkArgs {
    /// `off`: this node builds no tenant networks (it hosts no VPC ports).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub network_fabric: String,
    /// This node's VXLAN endpoint address (default: the peer address's IP).
    #[arg(long)]
    pub underlay_address: Option<std::net::Ipv4Addr>,
    /// Interface for egress NAT and floating IPs (default: the default
    /// route's; `none`: no outside access from this node's VPCs).
    #[arg(long)]
    pub uplink: Option<String>,
    /// Where router namespaces are pinned (as `ip netns` does).
    #[arg(long, default_value = "/run/netns")]
    pub netns_dir: PathBuf,
}

impl NetworkArgs {
    pub fn options(&self) -> Option<crate::reconcile::network::NetworkOptions> {
        if self.network_fabric == "off" {
            return None;
        }
        let uplink = match self.uplink.as_deref() {
            Some("none") => None,
            Some(i) => Some(i.to_string()),
            None => crate::reconcile::network::default_route_interface(),
        };
        Some(crate::reconcile::network::NetworkOptions {
            underlay: self.underlay_address,
            underlay_mtu: crate::reconcile::network::interface_mtu(uplink.as_deref()),
            uplink,
            netns_dir: self.netns_dir.clone(),
        })
    }
}

/// How this node runs VMs.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// `kvm` on hardware with virtualisation, `qemu` (TCG emulation) where
    /// KVM cannot run guests.
    #[arg(long, default_value = "kvm", value_parser = ["kvm", "qemu"])]
    pub virt_type: String,
    /// libvirt connection URI; `none` runs no VMs on this node.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Seconds a guest gets to power off after an ACPI request before it is
    /// forced off.
    #[arg(long, default_value_t = 60)]
    pub stop_timeout: u64,
}

impl ComputeArgs {
    pub fn options(&self) -> Option<crate::reconcile::compute::ComputeOptions> {
        (self.libvirt_uri != "none").then(|| crate::reconcile::compute::ComputeOptions {
            virt_type: hypervisor::spec::VirtType::parse(&self.virt_type).expect("checked by clap"),
            libvirt_uri: self.libvirt_uri.clone(),
            stop_timeout: std::time::Duration::from_secs(self.stop_timeout),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    #[arg(long, default_value = "allod-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub api_listen: String,
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub peer_listen: String,
    #[arg(long, default_value = "127.0.0.1:7445")]
    pub storage_listen: String,
    /// Also serve NBD on this TCP address (unauthenticated: trusted networks only).
    #[arg(long)]
    pub nbd_listen: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Create a new cluster with the local agent as its first member.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Cluster name shown in status output.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a single-use token another node can join with.
    JoinToken {
        #[arg(long)]
        data_dir: PathBuf,
        /// Lifetime, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = parse_duration_secs)]
        ttl: u64,
    },
    /// Join the local (unconfigured) agent to a cluster.
    Join {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        token: String,
    },
    /// Remove a member (by id or name) from the cluster.
    Remove {
        #[arg(long)]
        data_dir: PathBuf,
        node: String,
    },
    /// Show members, roles and the leader.
    Status(ApiArgs),
}

#[derive(Subcommand, Debug)]
pub enum ProjectCommand {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// OFFICIAL (default), OFFICIAL-SENSITIVE or SECRET; fixed for the project's life.
        #[arg(long)]
        zone: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Update {
        name: String,
        #[arg(long)]
        description: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set a project's quotas (cluster admins); the flags given change,
    /// the others stay. `unlimited` lifts a limit.
    Quota {
        name: String,
        #[arg(long, value_parser = parse_count_limit)]
        vcpus: Option<Limit>,
        /// e.g. 64G
        #[arg(long, value_parser = parse_size_limit)]
        memory: Option<Limit>,
        /// e.g. 2T
        #[arg(long, value_parser = parse_size_limit)]
        storage: Option<Limit>,
        #[arg(long, value_parser = parse_count_limit)]
        volumes: Option<Limit>,
        #[arg(long, value_parser = parse_count_limit)]
        vms: Option<Limit>,
        #[arg(long, value_parser = parse_count_limit)]
        floating_ips: Option<Limit>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin volume, or a copy-on-write clone of an image.
    Create {
        name: String,
        #[arg(long)]
        project: String,
        /// e.g. 20G (a multiple of 512 bytes); default with --image: the image's size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Copies of every byte on distinct nodes (1 to 3; default 3, or
        /// every storage node when there are fewer).
        #[arg(long)]
        replicas: Option<u8>,
        /// Clone this image (instant, whatever its size).
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
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
    /// Grow a volume (clients see the new size when they reconnect).
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take a snapshot (copy-on-write, instant).
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a volume's snapshots.
    Snapshots {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a snapshot (refused while clones read through to it).
    SnapshotDelete {
        name: String,
        snapshot: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Return a (detached) volume to a snapshot's content.
    Rollback {
        name: String,
        snapshot: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a new volume from a snapshot (copy-on-write, instant).
    Clone {
        name: String,
        #[arg(long)]
        snapshot: String,
        /// The new volume's name.
        #[arg(long)]
        to: String,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Upload a raw or qcow2 disk image (the format is detected) into the catalog.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// The file's SHA-256 as published; computed here when omitted.
        #[arg(long)]
        sha256: Option<String>,
        /// Private to this project (default: public).
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete an image (refused while volumes are cloned from it).
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Place a VM on a node of its project's zone.
    Create {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u64,
        /// e.g. 512M or 4G.
        #[arg(long, value_parser = parse_size)]
        memory: u64,
        /// VMs of one group never share a node.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Boot from a new volume cloned from this image.
        #[arg(long)]
        image: Option<String>,
        /// The boot volume's size (default: the image's), e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// A NIC, repeatable (eth0 first): `subnet=web,sg=default`; more
        /// `sg=` for more security groups, `ip=` for a fixed address.
        #[arg(long = "nic", value_parser = parse_nic)]
        nics: Vec<serde_json::Value>,
        /// Wait until the VM runs (or fails, saying why).
        #[arg(long)]
        wait: bool,
        /// Only define it; start it later with `allod vm start`.
        #[arg(long, conflicts_with = "wait")]
        no_start: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Power on a stopped VM.
    Start {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Ask the guest to power off (ACPI); it is forced off after the node's stop timeout.
    Stop {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Power off at once.
    ForceStop {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Reset a running VM.
    Reboot {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change vCPUs or memory of a stopped VM.
    Update {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        vcpus: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Attach this terminal to the VM's serial console (Ctrl-] leaves).
    Console {
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
    Show {
        name: String,
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
    /// Attach a volume (of this project, or of another with --volume-project).
    Attach {
        name: String,
        volume: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        volume_project: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Detach a volume (by name or id).
    Detach {
        name: String,
        volume: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// The node-setup flags of `allod node setup`.
#[derive(Args, Debug, Default)]
pub struct SetupArgs {
    #[arg(long)]
    pub hostname: Option<String>,
    /// The management interface.
    #[arg(long)]
    pub interface: Option<String>,
    /// Address the management interface by DHCP.
    #[arg(long, requires = "interface")]
    pub dhcp: bool,
    /// Static address, ADDRESS/PREFIX.
    #[arg(long, requires = "interface")]
    pub address: Option<String>,
    #[arg(long, requires = "address")]
    pub gateway: Option<String>,
    #[arg(long, requires = "interface")]
    pub dns: Vec<String>,
    #[arg(long)]
    pub ntp: Vec<String>,
    /// A whole disk Allod may use for volumes (repeat for more).
    #[arg(long)]
    pub storage_disk: Vec<String>,
    /// Erase this storage disk's partition table and signatures first.
    #[arg(long)]
    pub wipe: Vec<String>,
}

impl SetupArgs {
    fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.interface.is_none()
            && self.ntp.is_empty()
            && self.storage_disk.is_empty()
    }

    fn to_setup(&self) -> crate::daemon::setup::NodeSetup {
        crate::daemon::setup::NodeSetup {
            hostname: self.hostname.clone(),
            management: self
                .interface
                .as_ref()
                .map(|interface| crate::daemon::setup::Management {
                    interface: interface.clone(),
                    dhcp: self.dhcp,
                    address: self.address.clone(),
                    gateway: self.gateway.clone(),
                    dns: self.dns.clone(),
                }),
            ntp: self.ntp.clone(),
            storage_disks: self.storage_disk.clone(),
        }
    }
}

/// A quota limit from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Unlimited,
    At(u64),
}

fn parse_count_limit(text: &str) -> Result<Limit, String> {
    match text {
        "unlimited" => Ok(Limit::Unlimited),
        _ => text
            .parse()
            .map(Limit::At)
            .map_err(|_| format!("{text:?} is not a number or `unlimited`")),
    }
}

fn parse_size_limit(text: &str) -> Result<Limit, String> {
    match text {
        "unlimited" => Ok(Limit::Unlimited),
        _ => parse_size(text).map(Limit::At),
    }
}

/// Parses a size such as `512`, `64K`, `20G`, `1.5T` or `2GiB` (powers of
/// 1024 either way) into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use K, M, G, T or P (powers of 1024)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. 20G or 512M"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Where the API is and how to authenticate: flags, then `ALLOD_URL`,
/// `ALLOD_TOKEN`, `ALLOD_CA`, then the config file.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    #[arg(long, env = "ALLOD_URL")]
    pub url: Option<String>,
    #[arg(long, env = "ALLOD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the cluster CA.
    #[arg(long, env = "ALLOD_CA")]
    pub ca: Option<PathBuf>,
    /// Take URL, token and CA from a local node's data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CLI config file (default: $XDG_CONFIG_HOME/allod/config.json or ~/.config/allod/config.json).
    #[arg(long, env = "ALLOD_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// The CLI config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    pub url: Option<String>,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 90s, 30m, 1h or 2d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}; use s, m, h or d"
            ))
        }
    };
    if value == 0 {
        return Err("the duration must be more than zero".into());
    }
    Ok(value * scale)
}

fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("allod/config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/allod/config.json"))
}

/// A resolved API endpoint.
pub struct ApiClient {
    pub url: String,
    pub token: String,
    pub ca_pem: String,
    http: reqwest::Client,
}

impl ApiArgs {
    pub fn resolve(&self) -> anyhow::Result<ApiClient> {
        let (mut url, mut token, mut ca) = (self.url.clone(), self.token.clone(), self.ca.clone());
        if let Some(dir) = &self.data_dir {
            let dd = crate::cluster::paths::DataDir::new(dir);
            if url.is_none() {
                let text = std::fs::read_to_string(dd.node_config()).with_context(|| {
                    format!(
                        "{} is not a configured node's data directory",
                        dir.display()
                    )
                })?;
                let config: crate::cluster::paths::NodeConfig = serde_json::from_str(&text)?;
                url = Some(format!("https://{}", config.api_addr));
            }
            if token.is_none() {
                token = Some(
                    std::fs::read_to_string(dd.admin_token())
                        .with_context(|| format!("cannot read {}", dd.admin_token().display()))?
                        .trim()
                        .to_string(),
                );
            }
            ca = ca.or(Some(dd.ca_cert()));
        }
        let config_path = self.config.clone().or_else(default_config_path);
        if url.is_none() || token.is_none() || ca.is_none() {
            if let Some(path) = config_path.filter(|p| p.exists()) {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let config: CliConfig = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{} is not a valid CLI config (expected {{\"url\",\"token\",\"ca\"}})",
                        path.display()
                    )
                })?;
                url = url.or(config.url);
                token = token.or(config.token);
                ca = ca.or(config.ca);
            }
        }
        let url = url
            .context("no API URL: pass --url, set ALLOD_URL, or write it to the CLI config file")?;
        let token = token.context(
            "no API token: pass --token, set ALLOD_TOKEN, or write it to the CLI config file",
        )?;
        let ca = ca.context(
            "no CA certificate: pass --ca FILE, set ALLOD_CA, or write it to the CLI config file",
        )?;
        let ca_pem = std::fs::read_to_string(&ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(crate::cluster::pki::ca_client_config(&ca_pem)?)
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(ApiClient {
            url: url.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            ca_pem,
            http,
        })
    }
}

impl ApiClient {
    /// Streams a file as the body of a POST, with a progress bar.
    pub async fn upload(
        &self,
        path: &str,
        file: &std::path::Path,
        len: u64,
    ) -> anyhow::Result<serde_json::Value> {
        use futures_util::StreamExt;
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::new("uploading", len)));
        let p = progress.clone();
        let stream = tokio_util_reader(f).map(move |chunk| {
            if let Ok(c) = &chunk {
                p.lock().expect("progress").add(c.len() as u64);
            }
            chunk
        });
        let response = self
            .http
            .post(format!("{}{}", self.url, path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .timeout(std::time::Duration::from_secs(7 * 24 * 3600))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.url))?;
        progress.lock().expect("progress").finish();
        if len > 0 {
            eprintln!("uploaded; the server is storing the image...");
        }
        answer(response).await
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.url))?;
        answer(response).await
    }
}

/// An API answer as JSON (`null` when empty), or its error's message.
async fn answer(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{} (HTTP {})", error_message(&text), status.as_u16());
    }
    if text.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text).context("the API's answer is not JSON")
}

/// The `error.message` of an API error body, or the body itself.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub(crate) fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_projects(projects: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = projects
        .iter()
        .map(|p| {
            vec![
                text(&p["name"]),
                text(&p["zone"]),
                text(&p["description"]),
                text(&p["generation"]),
            ]
        })
        .collect();
    print_table(&["NAME", "ZONE", "DESCRIPTION", "GENERATION"], &rows);
}

/// One project with its quotas and usage.
fn print_project_detail(p: &serde_json::Value) {
    print_projects(std::slice::from_ref(p));
    println!();
    let rows: Vec<Vec<String>> = [
        "vcpus",
        "memory_bytes",
        "storage_bytes",
        "volumes",
        "vms",
        "floating_ips",
    ]
    .iter()
    .map(|field| {
        vec![
            field.to_string(),
            text(&p["usage"][field]).replace('-', "0"),
            match &p["quota"][field] {
                serde_json::Value::Null => "unlimited".into(),
                limit => text(limit),
            },
        ]
    })
    .collect();
    print_table(&["RESOURCE", "USED", "QUOTA"], &rows);
}

pub(crate) fn emit(
    output: Output,
    value: &serde_json::Value,
    table: impl FnOnce(&serde_json::Value),
) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values print")
        ),
        Output::Table => table(value),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        TopCommand::Agent(args) => run_agent(args).await,
        TopCommand::Up(args) => run_up(args).await,
        TopCommand::Cluster(command) => run_cluster(command).await,
        TopCommand::Project(command) => run_project(command).await,
        TopCommand::Volume(command) => run_volume(command).await,
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
                let rows: Vec<Vec<String>> = list
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|n| {
                        let s = &n["storage"];
                        vec![
                            text(&n["id"]),
                            text(&n["name"]),
                            text(&n["role"]),
                            text(&n["zone"]),
                            text(&n["vcpus"]),
                            human_size(n["memory_bytes"].as_u64().unwrap_or(0)),
                            match (s["used_bytes"].as_u64(), s["capacity_bytes"].as_u64()) {
                                (Some(u), Some(c)) => {
                                    format!("{} / {}", human_size(u), human_size(c))
                                }
                                _ => "-".into(),
                            },
                            s["failure_domain"].as_str().unwrap_or("-").to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "ROLE",
                        "ZONE",
                        "VCPUS",
                        "MEMORY",
                        "STORAGE USED",
                        "DOMAIN",
                    ],
                    &rows,
                );
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut options = AgentOptions::new(&args.data_dir, &args.api_listen, &args.peer_listen);
    options.api_advertise = args.api_advertise;
    options.peer_advertise = args.peer_advertise;
    options.name = args.name;
    options.storage_listen = args.storage_listen;
    options.storage_advertise = args.storage_advertise;
    options.blocks.dir = args.storage_dir;
    options.blocks.failure_domain = args.failure_domain;
    options.blocks.nbd_listen = args.nbd_listen;
    options.compute = args.compute.options();
    options.network = args.network.options();
    let agent = Agent::start(options).await?;
    wait_for_signal().await;
    tracing::info!("stopping");
    agent.shutdown().await;
    Ok(())
}

async fn run_up(args: UpArgs) -> anyhow::Result<()> {
    let mut options = AgentOptions::new(&args.data_dir, &args.api_listen, &args.peer_listen);
    options.storage_listen = args.storage_listen;
    options.blocks.nbd_listen = args.nbd_listen;
    options.compute = args.compute.options();
    options.network = args.network.options();
    let agent = Agent::start(options).await?;
    if agent.node().is_none() {
        agent.init(None).await?;
    }
    let data_dir = std::fs::canonicalize(&args.data_dir).unwrap_or(args.data_dir.clone());
    println!("Allod is running: a single-node cluster.");
    println!("  API:          https://{}", agent.api_addr);
    println!("  Admin token:  {}", data_dir.join("admin.token").display());
    println!("  CA:           {}", data_dir.join("ca.pem").display());
    println!("  NBD:          {}", data_dir.join("nbd.sock").display());
    println!(
        "Try:  allod project create demo --data-dir {}",
        data_dir.display()
    );
    println!(
        "      allod cluster status --data-dir {}",
        data_dir.display()
    );
    println!(
        "Stop with Ctrl-C; the state stays in {}.",
        data_dir.display()
    );
    wait_for_signal().await;
    agent.shutdown().await;
    Ok(())
}

async fn admin(data_dir: &Path, request: AdminRequest) -> anyhow::Result<serde_json::Value> {
    admin::request(data_dir, &request).await
}

async fn run_cluster(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Init { data_dir, name } => {
            let result = admin(&data_dir, AdminRequest::Init { cluster_name: name }).await?;
            println!(
                "Created cluster {} (this node is node {}).",
                text(&result["cluster_id"]),
                text(&result["node_id"])
            );
            println!("API:         {}", text(&result["api_url"]));
            println!("Admin token: {}", text(&result["admin_token_path"]));
            println!("CA:          {}", text(&result["ca_path"]));
        }
        ClusterCommand::JoinToken { data_dir, ttl } => {
            let result = admin(&data_dir, AdminRequest::JoinToken { ttl_secs: ttl }).await?;
            println!("{}", text(&result["token"]));
        }
        ClusterCommand::Join { data_dir, token } => {
            let result = admin(&data_dir, AdminRequest::Join { token }).await?;
            println!(
                "Joined cluster {} as node {} ({}).",
                text(&result["cluster_id"]),
                text(&result["node_id"]),
                text(&result["role"])
            );
        }
        ClusterCommand::Remove { data_dir, node } => {
            let result = admin(&data_dir, AdminRequest::Remove { node }).await?;
            println!("Removed node {}.", text(&result["removed"]));
        }
        ClusterCommand::Status(api) => {
            let client = api.resolve()?;
            let cluster = client
                .call(reqwest::Method::GET, "/v1/cluster", None)
                .await?;
            emit(api.output, &cluster, |c| {
                println!(
                    "Cluster {} ({})  leader: node {}  term: {}",
                    text(&c["name"]),
                    text(&c["cluster_id"]),
                    text(&c["leader_id"]),
                    text(&c["term"])
                );
                let leader = c["leader_id"].as_u64();
                let rows: Vec<Vec<String>> = c["members"]
                    .as_array()
                    .map(|members| {
                        members
                            .iter()
                            .map(|m| {
                                let is_leader = m["id"].as_u64() == leader;
                                vec![
                                    text(&m["id"]),
                                    text(&m["name"]),
                                    if is_leader {
                                        "leader".into()
                                    } else {
                                        text(&m["role"])
                                    },
                                    text(&m["api_addr"]),
                                    text(&m["peer_addr"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["ID", "NAME", "ROLE", "API", "PEER"], &rows);
            });
        }
    }
    Ok(())
}

async fn run_project(command: ProjectCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        ProjectCommand::Create {
            name,
            description,
            zone,
            api,
        } => {
            let client = api.resolve()?;
            let project = client
                .call(Method::POST, "/v1/projects", Some(serde_json::json!({ "name": name, "description": description, "zone": zone })))
                .await?;
            emit(api.output, &project, |p| {
                println!("Created project {}.", text(&p["name"]))
            });
        }
        ProjectCommand::List { api } => {
            let client = api.resolve()?;
            let projects = client.call(Method::GET, "/v1/projects", None).await?;
            emit(api.output, &projects, |p| {
                print_projects(p.as_array().map(Vec::as_slice).unwrap_or_default())
            });
        }
        ProjectCommand::Show { name, api } => {
            let client = api.resolve()?;
            let project = client
                .call(Method::GET, &format!("/v1/projects/{name}"), None)
                .await?;
            emit(api.output, &project, print_project_detail);
        }
        ProjectCommand::Quota {
            name,
            vcpus,
            memory,
            storage,
            volumes,
            vms,
            floating_ips,
            api,
        } => {
            let client = api.resolve()?;
            let project = client
                .call(Method::GET, &format!("/v1/projects/{name}"), None)
                .await?;
            let mut quota = project["quota"].as_object().cloned().unwrap_or_default();
            for (field, limit) in [
                ("vcpus", vcpus),
                ("memory_bytes", memory),
                ("storage_bytes", storage),
                ("volumes", volumes),
                ("vms", vms),
                ("floating_ips", floating_ips),
            ] {
                match limit {
                    None => {}
                    Some(Limit::Unlimited) => {
                        quota.remove(field);
                    }
                    Some(Limit::At(n)) => {
                        quota.insert(field.into(), n.into());
                    }
                }
            }
            let project = client
                .call(
                    Method::PUT,
                    &format!("/v1/projects/{name}/quota"),
                    Some(serde_json::Value::Object(quota)),
                )
                .await?;
            emit(api.output, &project, print_project_detail);
        }
        ProjectCommand::Update {
            name,
            description,
            api,
        } => {
            let client = api.resolve()?;
            let project = client
                .call(
                    Method::PATCH,
                    &format!("/v1/projects/{name}"),
                    Some(serde_json::json!({ "description": description })),
                )
                .await?;
            emit(api.output, &project, |p| {
                print_projects(std::slice::from_ref(p))
            });
        }
        ProjectCommand::Delete { name, api } => {
            let client = api.resolve()?;
            client
                .call(Method::DELETE, &format!("/v1/projects/{name}"), None)
                .await?;
            if api.output == Output::Table {
                println!("Deleted project {name}.");
            }
        }
    }
    Ok(())
}

fn read_line(prompt: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    if let Some(prompt) = prompt {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

async fn run_user(command: UserCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        UserCommand::Create {
            name,
            password_stdin,
            api,
        } => {
            let client = api.resolve()?;
            let password = if password_stdin {
                Some(read_line(None)?)
            } else {
                None
            };
            let user = client
                .call(
                    Method::POST,
                    "/v1/users",
                    Some(serde_json::json!({ "name": name, "password": password })),
                )
                .await?;
            emit(api.output, &user, |u| {
                println!("Created user {}.", text(&u["name"]))
            });
        }
        UserCommand::List { api } => {
            let client = api.resolve()?;
            let users = client.call(Method::GET, "/v1/users", None).await?;
            emit(api.output, &users, |u| {
                let rows: Vec<Vec<String>> = u
                    .as_array()
                    .map(|users| {
                        users
                            .iter()
                            .map(|u| {
                                let projects = u["projects"]
                                    .as_object()
                                    .map(|m| {
                                        m.iter()
                                            .map(|(p, r)| format!("{p}={}", text(r)))
                                            .collect::<Vec<_>>()
                                            .join(",")
                                    })
                                    .unwrap_or_default();
                                vec![text(&u["name"]), text(&u["cluster_admin"]), projects]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["NAME", "CLUSTER-ADMIN", "PROJECT ROLES"], &rows);
            });
        }
    }
    Ok(())
}

async fn run_role(command: RoleCommand) -> anyhow::Result<()> {
    let RoleCommand::Grant {
        user,
        project,
        role,
        api,
    } = command;
    let client = api.resolve()?;
    let result = client
        .call(
            reqwest::Method::POST,
            &format!("/v1/users/{user}/roles"),
            Some(serde_json::json!({ "role": role, "project": project })),
        )
        .await?;
    emit(api.output, &result, |r| match r.get("project") {
        Some(p) => println!(
            "Granted {} in project {} to {}.",
            text(&r["role"]),
            text(p),
            text(&r["user"])
        ),
        None => println!("Granted {} to {}.", text(&r["role"]), text(&r["user"])),
    });
    Ok(())
}

async fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        TokenCommand::Create {
            user,
            project,
            role,
            expires,
            api,
        } => {
            let client = api.resolve()?;
            let body =
                serde_json::json!({ "project": project, "role": role, "expires_in_secs": expires });
            let token = client
                .call(
                    Method::POST,
                    &format!("/v1/users/{user}/tokens"),
                    Some(body),
                )
                .await?;
            emit(api.output, &token, |t| {
                println!(
                    "Token {} for {} (shown only now):",
                    text(&t["id"]),
                    text(&t["user"])
                );
                println!("{}", text(&t["token"]));
            });
        }
        TokenCommand::Revoke { id, api } => {
            let client = api.resolve()?;
            client
                .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                .await?;
            if api.output == Output::Table {
                println!("Revoked token {id}.");
            }
        }
    }
    Ok(())
}

fn print_volumes(volumes: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                text(&v["name"]),
                text(&v["id"]),
                human_size(v["size_bytes"].as_u64().unwrap_or(0)),
                text(&v["replicas"]),
                text(&v["state"]),
                text(&v["zone"]),
            ]
        })
        .collect();
    print_table(&["NAME", "ID", "SIZE", "REPLICAS", "STATE", "ZONE"], &rows);
}

/// Bytes in the largest binary unit that keeps them whole or to one decimal.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Calls the API and prints the volume it answers with.
async fn volume_action(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    let client = api.resolve()?;
    let volume = client.call(method, path, body).await?;
    emit(api.output, &volume, |v| {
        print_volumes(std::slice::from_ref(v))
    });
    Ok(())
}

async fn run_volume(command: VolumeCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        VolumeCommand::Create {
            name,
            project,
            size,
            replicas,
            image,
            api,
        } => {
            if size.is_none() && image.is_none() {
                anyhow::bail!("give --size (e.g. --size 20G), or --image to clone an image");
            }
            let client = api.resolve()?;
            let mut body = serde_json::json!({ "name": name });
            if let Some(size) = size {
                body["size_bytes"] = size.into();
            }
            if let Some(r) = replicas {
                body["replicas"] = r.into();
            }
            if let Some(i) = image {
                body["from_image"] = i.into();
            }
            let volume = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/volumes"),
                    Some(body),
                )
                .await?;
            emit(api.output, &volume, |v| {
                print_volumes(std::slice::from_ref(v))
            });
        }
        VolumeCommand::Resize {
            name,
            size,
            project,
            api,
        } => {
            volume_action(
                &api,
                Method::POST,
                &format!("/v1/projects/{project}/volumes/{name}/resize"),
                Some(serde_json::json!({ "size_bytes": size })),
            )
            .await?;
        }
        VolumeCommand::Snapshot {
            name,
            snapshot,
            project,
            api,
        } => {
            let client = api.resolve()?;
            let volume = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/volumes/{name}/snapshots"),
                    Some(serde_json::json!({ "name": snapshot })),
                )
                .await?;
            emit(api.output, &volume, |v| {
                print_snapshots(
                    v["snapshots"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                )
            });
        }
        VolumeCommand::Snapshots { name, project, api } => {
            let client = api.resolve()?;
            let list = client
                .call(
                    Method::GET,
                    &format!("/v1/projects/{project}/volumes/{name}/snapshots"),
                    None,
                )
                .await?;
            emit(api.output, &list, |l| {
                print_snapshots(l.as_array().map(Vec::as_slice).unwrap_or_default())
            });
        }
        VolumeCommand::SnapshotDelete {
            name,
            snapshot,
            project,
            api,
        } => {
            let client = api.resolve()?;
            client
                .call(
                    Method::DELETE,
                    &format!("/v1/projects/{project}/volumes/{name}/snapshots/{snapshot}"),
                    None,
                )
                .await?;
            if api.output == Output::Table {
                println!("Deleted snapshot {snapshot} of volume {name}.");
            }
        }
        VolumeCommand::Rollback {
            name,
            snapshot,
            project,
            api,
        } => {
            volume_action(
                &api,
                Method::POST,
                &format!("/v1/projects/{project}/volumes/{name}/rollback"),
                Some(serde_json::json!({ "snapshot": snapshot })),
            )
            .await?;
        }
        VolumeCommand::Clone {
            name,
            snapshot,
            to,
            size,
            project,
            api,
        } => {
            let client = api.resolve()?;
            let mut body = serde_json::json!({ "snapshot": snapshot, "name": to });
            if let Some(size) = size {
                body["size_bytes"] = size.into();
            }
            let volume = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/volumes/{name}/clone"),
                    Some(body),
                )
                .await?;
            emit(api.output, &volume, |v| {
                print_volumes(std::slice::from_ref(v))
            });
        }
        VolumeCommand::List { project, api } => {
            let client = api.resolve()?;
            let volumes = client
                .call(
                    Method::GET,
                    &format!("/v1/projects/{project}/volumes"),
                    None,
                )
                .await?;
            emit(api.output, &volumes, |list| {
                print_volumes(list.as_array().map(Vec::as_slice).unwrap_or_default())
            });
        }
        VolumeCommand::Show { name, project, api } => {
            volume_action(
                &api,
                Method::GET,
                &format!("/v1/projects/{project}/volumes/{name}"),
                None,
            )
            .await?;
        }
        VolumeCommand::Delete { name, project, api } => {
            let client = api.resolve()?;
            client
                .call(
                    Method::DELETE,
                    &format!("/v1/projects/{project}/volumes/{name}"),
                    None,
                )
                .await?;
            if api.output == Output::Table {
                println!("Deleted volume {name} of project {project}.");
            }
        }
    }
    Ok(())
}

/// A file as a stream of 1 MiB chunks.
fn tokio_util_reader(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

fn print_snapshots(snapshots: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                text(&s["name"]),
                text(&s["id"]),
                s["clones"].as_array().map_or(0, Vec::len).to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "ID", "CLONES"], &rows);
}

fn print_images(images: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                text(&i["name"]),
                human_size(i["size_bytes"].as_u64().unwrap_or(0)),
                text(&i["format"]),
                i["project"].as_str().unwrap_or("(public)").to_string(),
                text(&i["state"]),
                i["sha256"]
                    .as_str()
                    .map_or(String::new(), |h| h.chars().take(16).collect()),
            ]
        })
        .collect();
    print_table(
        &["NAME", "SIZE", "FORMAT", "PROJECT", "STATE", "SHA256"],
        &rows,
    );
}

/// A progress bar on stderr when it is a terminal; silence otherwise.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    shown: u64,
    tty: bool,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(what: impl Into<String>, total: u64) -> Self {
        use std::io::IsTerminal;
        Self {
            what: what.into(),
            total: total.max(1),
            done: 0,
            shown: u64::MAX,
            tty: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        let permille = self.done * 1000 / self.total;
        if self.tty && permille != self.shown {
            self.shown = permille;
            let width = 30;
            let filled = (permille * width / 1000) as usize;
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\r{} [{}{}] {:>5.1}% {} of {} ({}/s)  ",
                self.what,
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                permille as f64 / 10.0,
                human_size(self.done),
                human_size(self.total),
                human_size(rate as u64)
            );
        }
    }

    pub fn finish(&mut self) {
        if self.tty {
            eprintln!();
        }
    }
}

async fn sha256_file(path: &std::path::Path, len: u64) -> anyhow::Result<String> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut progress = Progress::new("checksumming", len);
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.add(n as u64);
    }
    progress.finish();
    Ok(hex::encode(hasher.finalize()))
}

async fn run_image(command: ImageCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        ImageCommand::Import {
            file,
            name,
            sha256,
            project,
            api,
        } => {
            let client = api.resolve()?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            let sha256 = match sha256 {
                Some(h) => h,
                None => sha256_file(&file, len).await?,
            };
            let mut path = format!("/v1/images?name={name}&sha256={sha256}");
            if let Some(p) = &project {
                path.push_str(&format!("&project={p}"));
            }
            let image = client.upload(&path, &file, len).await?;
            emit(api.output, &image, |i| {
                print_images(std::slice::from_ref(i))
            });
        }
        ImageCommand::List { api } => {
            let client = api.resolve()?;
            let list = client.call(Method::GET, "/v1/images", None).await?;
            emit(api.output, &list, |l| {
                print_images(l.as_array().map(Vec::as_slice).unwrap_or_default())
            });
        }
        ImageCommand::Show { name, api } => {
            let client = api.resolve()?;
            let image = client
                .call(Method::GET, &format!("/v1/images/{name}"), None)
                .await?;
            emit(api.output, &image, |i| {
                print_images(std::slice::from_ref(i))
            });
        }
        ImageCommand::Delete { name, api } => {
            let client = api.resolve()?;
            client
                .call(Method::DELETE, &format!("/v1/images/{name}"), None)
                .await?;
            if api.output == Output::Table {
                println!("Deleted image {name}.");
            }
        }
    }
    Ok(())
}

/// `subnet=web,sg=default,sg=ssh,ip=10.0.0.5` as the API's NIC object.
fn parse_nic(text: &str) -> Result<serde_json::Value, String> {
    let mut subnet = None;
    let mut groups = Vec::new();
    let mut ip = None;
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("subnet", v)) if !v.is_empty() => subnet = Some(v.to_string()),
            Some(("sg", v)) if !v.is_empty() => groups.push(v.to_string()),
            Some(("ip", v)) if !v.is_empty() => ip = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "{pair:?} is not subnet=NAME, sg=GROUP or ip=ADDRESS (e.g. --nic subnet=web,sg=default)"
                ))
            }
        }
    }
    let Some(subnet) = subnet else {
        return Err("a NIC needs subnet=NAME (e.g. --nic subnet=web,sg=default)".into());
    };
    let mut nic = serde_json::json!({ "subnet": subnet });
    if !groups.is_empty() {
        nic["security_groups"] = groups.into();
    }
    if let Some(ip) = ip {
        nic["ip"] = ip.into();
    }
    Ok(nic)
}

fn print_vms(vms: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                text(&v["name"]),
                text(&v["state"]),
                match v["reason"].as_str() {
                    Some(r) => format!("({r})"),
                    None => text(&v["power"]),
                },
                text(&v["node"]),
                text(&v["vcpus"]),
                human_size(v["memory_bytes"].as_u64().unwrap_or(0)),
                text(&v["zone"]),
                v["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| text(&a["volume"]))
                    .collect::<Vec<_>>()
                    .join(","),
                v["nics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| text(&n["ip"]))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "STATE",
            "WANTED",
            "NODE",
            "VCPUS",
            "MEMORY",
            "ZONE",
            "VOLUMES",
            "ADDRESSES",
        ],
        &rows,
    );
}

/// Polls a new VM until it runs or fails.
async fn wait_for_vm(
    client: &ApiClient,
    project: &str,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let started = std::time::Instant::now();
    loop {
        let vm = client
            .call(
                reqwest::Method::GET,
                &format!("/v1/projects/{project}/vms/{name}"),
                None,
            )
            .await?;
        match vm["state"].as_str() {
            Some("running") => return Ok(vm),
            Some("failed") => anyhow::bail!(
                "VM {name} failed: {}",
                vm["reason"].as_str().unwrap_or("no reason given")
            ),
            _ if started.elapsed() > std::time::Duration::from_secs(600) => {
                anyhow::bail!("VM {name} is still {} after 10 minutes", text(&vm["state"]))
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}

async fn run_vm(command: VmCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let (api, method, path, body) = match command {
        VmCommand::Create {
            name,
            project,
            vcpus,
            memory,
            anti_affinity,
            image,
            disk_size,
            nics,
            wait,
            no_start,
            api,
        } => {
            let mut body = serde_json::json!({
                "name": name, "vcpus": vcpus, "memory_bytes": memory, "anti_affinity": anti_affinity,
            });
            if no_start {
                body["start"] = false.into();
            }
            if let Some(i) = image {
                body["image"] = i.into();
            }
            if let Some(d) = disk_size {
                body["disk_size_bytes"] = d.into();
            }
            if !nics.is_empty() {
                body["nics"] = nics.into();
            }
            let client = api.resolve()?;
            let mut vm = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/vms"),
                    Some(body),
                )
                .await?;
            if wait {
                vm = wait_for_vm(&client, &project, &name).await?;
            }
            emit(api.output, &vm, |v| print_vms(std::slice::from_ref(v)));
            return Ok(());
        }
        VmCommand::Start { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/start"),
            None,
        ),
        VmCommand::Stop { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/stop"),
            None,
        ),
        VmCommand::ForceStop { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/force-stop"),
            None,
        ),
        VmCommand::Reboot { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/reboot"),
            None,
        ),
        VmCommand::Update {
            name,
            project,
            vcpus,
            memory,
            api,
        } => (
            api,
            Method::PATCH,
            format!("/v1/projects/{project}/vms/{name}"),
            Some(serde_json::json!({ "vcpus": vcpus, "memory_bytes": memory })),
        ),
        VmCommand::Console { name, project, api } => {
            return crate::cli::console_client::attach(&api, &project, &name).await;
        }
        VmCommand::List { project, api } => (
            api,
            Method::GET,
            format!("/v1/projects/{project}/vms"),
            None,
        ),
        VmCommand::Show { name, project, api } => (
            api,
            Method::GET,
            format!("/v1/projects/{project}/vms/{name}"),
            None,
        ),
        VmCommand::Delete { name, project, api } => (
            api,
            Method::DELETE,
            format!("/v1/projects/{project}/vms/{name}"),
            None,
        ),
        VmCommand::Attach {
            name,
            volume,
            project,
            volume_project,
            api,
        } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/volumes"),
            Some(serde_json::json!({ "volume": volume, "project": volume_project })),
        ),
        VmCommand::Detach {
            name,
            volume,
            project,
            api,
        } => (
            api,
            Method::DELETE,
            format!("/v1/projects/{project}/vms/{name}/volumes/{volume}"),
            None,
        ),
    };
    let client = api.resolve()?;
    let deleting = method == Method::DELETE && !path.contains("/volumes/");
    let answer = client.call(method, &path, body).await?;
    if deleting {
        if api.output == Output::Table {
            println!("Deleted.");
        }
        return Ok(());
    }
    emit(api.output, &answer, |v| match v.as_array() {
        Some(list) => print_vms(list),
        None => print_vms(std::slice::from_ref(v)),
    });
    Ok(())
}

async fn run_node_setup(
    data_dir: PathBuf,
    create: bool,
    name: Option<String>,
    join: Option<String>,
    check_only: bool,
) -> anyhow::Result<()> {
    use crate::console::app::Verdict;
    match (create, join) {
        (true, _) => {
            let result = admin(&data_dir, AdminRequest::Init { cluster_name: name }).await?;
            println!(
                "Created cluster {} (this node is node {}).",
                text(&result["cluster_id"]),
                text(&result["node_id"])
            );
        }
        (false, Some(raw)) => {
            let token =
                crate::cluster::join::JoinToken::decode(&raw, 0).map_err(anyhow::Error::new)?;
            println!(
                "Cluster {} (CA SHA-256 {})",
                token.cluster_id, token.ca_fingerprint
            );
            let checks = crate::console::preflight::run(&token, &data_dir).await;
            for check in &checks {
                let mark = match check.verdict {
                    Verdict::Pass => "ok  ",
                    Verdict::Warn => "warn",
                    Verdict::Fail => "FAIL",
                };
                println!("[{mark}] {}: {}", check.name, check.detail);
                if check.verdict != Verdict::Pass && !check.fix.is_empty() {
                    println!("       fix: {}", check.fix);
                }
            }
            let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
            if failed > 0 {
                anyhow::bail!(
                    "{failed} pre-flight check(s) failed; nothing was changed on this node"
                );
            }
            if check_only {
                return Ok(());
            }
            let result = admin(&data_dir, AdminRequest::Join { token: raw }).await?;
            println!(
                "Joined cluster {} as node {} ({}).",
                text(&result["cluster_id"]),
                text(&result["node_id"]),
                text(&result["role"])
            );
        }
        (false, None) => anyhow::bail!("say --create or --join TOKEN"),
    }
    Ok(())
}

async fn run_oidc(command: OidcCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        OidcCommand::Add {
            name,
            issuer,
            audience,
            claim,
            mappings,
            ca,
            api,
        } => {
            let ca_pem = match ca {
                Some(path) => Some(std::fs::read_to_string(&path).with_context(|| {
                    format!("cannot read the CA certificate {}", path.display())
                })?),
                None => None,
            };
            let client = api.resolve()?;
            let body = serde_json::json!({
                "issuer": issuer, "audience": audience, "claim": claim,
                "mappings": mappings, "ca_pem": ca_pem,
            });
            let stored = client
                .call(Method::PUT, &format!("/v1/oidc/issuers/{name}"), Some(body))
                .await?;
            emit(api.output, &stored, |i| {
                println!(
                    "Trusting {} as {} (audience {}, {} mapping(s) of claim {}).",
                    text(&i["issuer"]),
                    text(&i["name"]),
                    text(&i["audience"]),
                    i["mappings"].as_array().map_or(0, |m| m.len()),
                    text(&i["claim"])
                )
            });
        }
        OidcCommand::List { api } => {
            let client = api.resolve()?;
            let issuers = client.call(Method::GET, "/v1/oidc/issuers", None).await?;
            emit(api.output, &issuers, |list| {
                let rows: Vec<Vec<String>> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        let mappings: Vec<String> = i["mappings"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|m| match m["project"].as_str() {
                                Some(p) => {
                                    format!("{}={}@{p}", text(&m["value"]), text(&m["role"]))
                                }
                                None => format!("{}={}", text(&m["value"]), text(&m["role"])),
                            })
                            .collect();
                        vec![
                            text(&i["name"]),
                            text(&i["issuer"]),
                            text(&i["audience"]),
                            text(&i["claim"]),
                            mappings.join(" "),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "ISSUER", "AUDIENCE", "CLAIM", "MAPPINGS"], &rows);
            });
        }
        OidcCommand::Remove { name, api } => {
            let client = api.resolve()?;
            client
                .call(Method::DELETE, &format!("/v1/oidc/issuers/{name}"), None)
                .await?;
            if api.output == Output::Table {
                println!("No longer trusting issuer {name}.");
            }
        }
    }
    Ok(())
}

async fn run_login(args: LoginArgs) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(&args.ca)
        .with_context(|| format!("cannot read the CA certificate {}", args.ca.display()))?;
    let user = match args.user {
        Some(user) => user,
        None => read_line(Some("User: "))?,
    };
    let password = if args.password_stdin {
        read_line(None)?
    } else {
        read_line(Some("Password: "))?
    };
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(crate::cluster::pki::ca_client_config(&ca_pem)?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let response = http
        .post(format!("{url}/v1/login"))
        .json(&serde_json::json!({ "user": user, "password": password }))
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{} (HTTP {})",
            body["error"]["message"].as_str().unwrap_or("login refused"),
            status.as_u16()
        );
    }
    let path = args
        .config
        .or_else(default_config_path)
        .context("no config file location: set HOME or pass --config")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let ca = std::fs::canonicalize(&args.ca).unwrap_or(args.ca);
    let config = CliConfig {
        url: Some(url),
        token: body["token"].as_str().map(str::to_string),
        ca: Some(ca),
    };
    crate::cluster::pki::write_private(&path, &serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "Logged in as {user}; the session token (valid 24 h) is in {}.",
        path.display()
    );
    Ok(())
}

async fn run_audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::List { user, action, api } => {
            let client = api.resolve()?;
            let mut query = Vec::new();
            if let Some(user) = &user {
                query.push(format!("user={user}"));
            }
            if let Some(action) = &action {
                query.push(format!("action={action}"));
            }
            let path = if query.is_empty() {
                "/v1/audit".to_string()
            } else {
                format!("/v1/audit?{}", query.join("&"))
            };
            let entries = client.call(reqwest::Method::GET, &path, None).await?;
            emit(api.output, &entries, |e| {
                let rows: Vec<Vec<String>> = e
                    .as_array()
                    .map(|entries| {
                        entries
                            .iter()
                            .map(|e| {
                                vec![
                                    text(&e["seq"]),
                                    text(&e["time_ms"]),
                                    text(&e["user"]),
                                    text(&e["action"]),
                                    text(&e["object"]),
                                    text(&e["result"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &["SEQ", "TIME_MS", "USER", "ACTION", "OBJECT", "RESULT"],
                    &rows,
                );
            });
        }
        AuditCommand::Verify { file, api } => {
            let entries: Vec<crate::state::audit::AuditEntry> = match file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .enumerate()
                        .map(|(i, l)| {
                            serde_json::from_str(l).with_context(|| {
                                format!(
                                    "line {} of {} is not an audit entry",
                                    i + 1,
                                    path.display()
                                )
                            })
                        })
                        .collect::<anyhow::Result<_>>()?
                }
                None => {
                    let client = api.resolve()?;
                    serde_json::from_value(
                        client.call(reqwest::Method::GET, "/v1/audit", None).await?,
                    )?
                }
            };
            let count = crate::state::audit::verify(&entries)
                .map_err(|e| anyhow::anyhow!("the audit log is broken: {e}"))?;
            println!("The audit log is intact: {count} entries, chained from the first.");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
