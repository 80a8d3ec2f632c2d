//! `allod cluster`, `allod node`, `allod audit` and a node's own setup.

use std::path::PathBuf;

use crate::cli::{admin, emit, parse_duration_secs, print_table, request, text, ApiArgs};
use crate::daemon::admin::AdminRequest;
use crate::units::human_size;
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the cluster's nodes: role, zone, health, capacity and block
    /// storage.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One node (by id or name): its health as the failure detection sees
    /// it, role, zone, capacity and block storage.
    Show {
        node: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Put a node (by id or name) in maintenance and move its VMs to other
    /// nodes; refused, naming the VM and why, if one has no place.
    Drain {
        node: String,
        /// Restart its running VMs on other nodes (their guests reboot).
        #[arg(long)]
        restart_unmovable: bool,
        /// Return once the drain is recorded, without waiting for the VMs
        /// to move.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take a node out of maintenance: it takes VMs again.
    Resume {
        node: String,
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
    /// Its block storage is drained first: every object it holds is
    /// copied to where the storage map without it places it.
    Remove {
        #[arg(long)]
        data_dir: PathBuf,
        node: String,
        /// Remove it even when it is down and holds the only in-sync copy
        /// of some volumes' objects (those objects are lost).
        #[arg(long)]
        force: bool,
    },
    /// Show members, roles and the leader.
    Status(ApiArgs),
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
    pub(super) fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.interface.is_none()
            && self.ntp.is_empty()
            && self.storage_disk.is_empty()
    }

    pub(super) fn to_setup(&self) -> crate::daemon::setup::NodeSetup {
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

pub(super) async fn run_cluster(command: ClusterCommand) -> anyhow::Result<()> {
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
        ClusterCommand::Remove {
            data_dir,
            node,
            force,
        } => {
            let result = admin(&data_dir, AdminRequest::Remove { node, force }).await?;
            println!("Removed node {}.", text(&result["removed"]));
        }
        ClusterCommand::Status(api) => {
            request(&api, reqwest::Method::GET, "/v1/cluster", None, |c| {
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
            })
            .await?;
        }
    }
    Ok(())
}

pub(super) async fn run_node_setup(
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

pub(super) async fn run_audit(command: AuditCommand) -> anyhow::Result<()> {
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

/// The node table of `allod node list` and `allod node show`.
pub(super) fn print_nodes(nodes: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let s = &n["storage"];
            vec![
                text(&n["id"]),
                text(&n["name"]),
                text(&n["role"]),
                text(&n["health"]),
                text(&n["zone"]),
                text(&n["vcpus"]),
                human_size(n["memory_bytes"].as_u64().unwrap_or(0)),
                match (s["used_bytes"].as_u64(), s["capacity_bytes"].as_u64()) {
                    (Some(u), Some(c)) => format!("{} / {}", human_size(u), human_size(c)),
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
            "HEALTH",
            "ZONE",
            "VCPUS",
            "MEMORY",
            "STORAGE USED",
            "DOMAIN",
        ],
        &rows,
    );
}

/// `allod node drain`: records the drain, then shows the VMs leaving until
/// none is left moving.
pub(super) async fn drain(
    node: String,
    restart_unmovable: bool,
    no_wait: bool,
    api: ApiArgs,
) -> anyhow::Result<()> {
    let client = api.resolve()?;
    let body = crate::api_types::DrainNode { restart_unmovable };
    let drained = client
        .call(
            reqwest::Method::POST,
            &format!("/v1/nodes/{node}/drain"),
            Some(serde_json::to_value(&body)?),
        )
        .await?;
    let path = format!("/v1/nodes/{node}");
    let started = std::time::Instant::now();
    let mut last = None;
    let shown = loop {
        let shown = client.call(reqwest::Method::GET, &path, None).await?;
        let moving = shown["vms_moving"].as_u64().unwrap_or(0);
        if no_wait || moving == 0 {
            break shown;
        }
        if last != Some(moving) && api.output != crate::cli::Output::Json {
            eprintln!(
                "node {}: {moving} VM(s) still moving to other nodes ({} s)",
                text(&drained["name"]),
                started.elapsed().as_secs()
            );
            last = Some(moving);
        }
        if started.elapsed() > std::time::Duration::from_secs(1800) {
            anyhow::bail!("node {node}: {moving} VM(s) still moving after 30 minutes");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    emit(api.output, &shown, |n| print_nodes(std::slice::from_ref(n)));
    Ok(())
}
