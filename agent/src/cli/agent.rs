//! `allod agent` and `allod up`: starting the daemon.

use std::path::{Path, PathBuf};

use crate::daemon::admin::AdminRequest;
use crate::daemon::{admin, Agent, AgentOptions};
use clap::Args;

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
    /// Refused: NBD over plain TCP would carry tenants' disks unencrypted
    /// (use `allod volume export` on the node's socket).
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
    /// Seconds a node may go unheard before the leader holds it suspect
    /// (it takes no new VMs).
    #[arg(long, default_value_t = 5)]
    pub suspect_after: u64,
    /// Seconds a node may go unheard before the leader declares it dead and
    /// its VMs restart on other nodes.
    #[arg(long, default_value_t = 15)]
    pub dead_after: u64,
    /// Seconds this node may be out of touch with a quorum before it stops
    /// its own VMs (at least 2 s shorter than --dead-after).
    #[arg(long, default_value_t = 10)]
    pub fence_after: u64,
    /// The URI other nodes' libvirt daemons reach this node's libvirt at,
    /// for live migration (libvirt's TLS transport between appliances:
    /// `qemu+tls://HOST/system`). Without it, VMs do not migrate to or
    /// from this node: a drain then restarts them elsewhere.
    #[arg(long)]
    pub migration_uri: Option<String>,
}

impl ComputeArgs {
    pub fn options(&self) -> Option<crate::reconcile::compute::ComputeOptions> {
        (self.libvirt_uri != "none").then(|| crate::reconcile::compute::ComputeOptions {
            virt_type: hypervisor::spec::VirtType::parse(&self.virt_type).expect("checked by clap"),
            libvirt_uri: self.libvirt_uri.clone(),
            stop_timeout: std::time::Duration::from_secs(self.stop_timeout),
            fence_after: std::time::Duration::from_secs(self.fence_after),
            migration_uri: self.migration_uri.clone().filter(|u| u != "none"),
        })
    }

    /// The failure detection's timeouts, refused when they could let a VM
    /// run twice.
    pub fn ha(&self) -> anyhow::Result<crate::reconcile::ha::HaOptions> {
        crate::reconcile::ha::HaOptions::new(self.suspect_after, self.dead_after, self.fence_after)
            .map_err(anyhow::Error::msg)
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
    /// Refused: NBD over plain TCP would carry tenants' disks unencrypted
    /// (use `allod volume export` on the node's socket).
    #[arg(long)]
    pub nbd_listen: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

pub(super) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

pub(super) async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
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
    options.ha = args.compute.ha()?;
    options.network = args.network.options();
    let agent = Agent::start(options).await?;
    tokio::spawn(crate::daemon::return_freed_memory());
    wait_for_signal().await;
    tracing::info!("stopping");
    agent.shutdown().await;
    Ok(())
}

pub(super) async fn run_up(args: UpArgs) -> anyhow::Result<()> {
    let mut options = AgentOptions::new(&args.data_dir, &args.api_listen, &args.peer_listen);
    options.storage_listen = args.storage_listen;
    options.blocks.nbd_listen = args.nbd_listen;
    options.compute = args.compute.options();
    options.ha = args.compute.ha()?;
    options.network = args.network.options();
    let agent = Agent::start(options).await?;
    tokio::spawn(crate::daemon::return_freed_memory());
    if agent.node().is_none() {
        agent.init(None).await?;
    }
    let data_dir = std::fs::canonicalize(&args.data_dir).unwrap_or(args.data_dir.clone());
    println!("Allod is running: a single-node cluster.");
    println!("  API:          https://{}", agent.api_addr);
    println!("  Admin token:  {}", data_dir.join("admin.token").display());
    println!("  CA:           {}", data_dir.join("ca.pem").display());
    if let Some(socket) = agent
        .node()
        .and_then(|n| n.state.nbd_socket(n.id).ok().flatten())
    {
        println!("  NBD:          {socket} (with `allod volume export`)");
    }
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

pub(super) async fn admin(
    data_dir: &Path,
    request: AdminRequest,
) -> anyhow::Result<serde_json::Value> {
    admin::request(data_dir, &request).await
}
