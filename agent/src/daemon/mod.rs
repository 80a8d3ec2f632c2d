//! `allod agent`: the per-node daemon.
//!
//! It binds its ports and admin socket at start, serves `/healthz` while the
//! node is unconfigured, and becomes a cluster member through `init` or
//! `join` (asked for on the admin socket), or at start when its data
//! directory already holds a node configuration.

pub mod admin;
pub mod disks;
pub mod logring;
pub mod setup;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::join::{now_ms, random_hex, sha256_hex, JoinRequest, JoinResponse, JoinToken};
use crate::cluster::node::{ClusterNode, MemberRole, RaftOptions};
use crate::cluster::paths::{DataDir, ListenAddrs, NodeConfig};
use crate::cluster::peer::{AddMemberRequest, ForwardFailure, Isolation, PeerCallError};
use crate::cluster::pki::{self, CertificateAuthority, NodeKey, NodeTls};
use crate::cluster::serve::{self, ServeMode};
use crate::state::nodes::ClusterInfo;
use crate::state::nodes::NodeRecord;
use crate::state::Command;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub data_dir: DataDir,
    pub api_listen: String,
    pub peer_listen: String,
    pub api_advertise: Option<String>,
    pub peer_advertise: Option<String>,
    pub name: Option<String>,
    pub raft: RaftOptions,
    /// HOST:PORT for block-storage traffic between nodes (mutual TLS).
    pub storage_listen: String,
    pub storage_advertise: Option<String>,
    pub blocks: crate::reconcile::storage::BlockOptions,
    /// Run VMs through libvirt (`None`: this node runs none).
    pub compute: Option<crate::reconcile::compute::ComputeOptions>,
    /// Build tenant networks on this node (`None`: it hosts no VPC ports).
    pub network: Option<crate::reconcile::network::NetworkOptions>,
    /// The failure detection's timeouts (used while this node leads).
    pub ha: crate::reconcile::ha::HaOptions,
    /// How often refused unauthenticated requests are summarised in the
    /// audit log.
    pub audit_summary_interval: std::time::Duration,
}

impl AgentOptions {
    pub fn new(
        data_dir: impl Into<std::path::PathBuf>,
        api_listen: &str,
        peer_listen: &str,
    ) -> Self {
        Self {
            data_dir: DataDir::new(data_dir),
            api_listen: api_listen.into(),
            peer_listen: peer_listen.into(),
            api_advertise: None,
            peer_advertise: None,
            name: None,
            raft: RaftOptions::default(),
            // Port 0 unless asked: in-process clusters share one machine.
            storage_listen: "127.0.0.1:0".into(),
            storage_advertise: None,
            blocks: crate::reconcile::storage::BlockOptions {
                dir: None,
                disks: Vec::new(),
                failure_domain: None,
                nbd_listen: None,
                run_dir: None,
            },
            compute: None,
            network: None,
            ha: Default::default(),
            audit_summary_interval: crate::api::abuse::DEFAULT_SUMMARY_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("this node is already a member of cluster {cluster_id} (node id {node_id}); use a fresh data directory to start another node")]
    AlreadyConfigured { cluster_id: String, node_id: u64 },
    #[error("this node is not a member of any cluster; run `allod cluster init` or `allod cluster join` first")]
    NotConfigured,
    #[error(transparent)]
    Token(#[from] crate::cluster::join::TokenError),
    #[error("the server at {addr} presents CA fingerprint {actual}, but the join token expects {expected}; it is not the cluster the token was issued for (or someone is intercepting the connection), so nothing was changed")]
    FingerprintMismatch {
        addr: String,
        expected: String,
        actual: String,
    },
    #[error("no cluster member named in the token could be reached ({tried}); check that they are running and that this node can reach their API ports")]
    Unreachable { tried: String },
    #[error("the cluster refused to let this node join: {message}")]
    Refused { message: String },
    #[error("{0}")]
    Failed(String),
}

/// The result of `cluster init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitResult {
    pub cluster_id: String,
    pub node_id: u64,
    pub api_url: String,
    pub admin_token_path: String,
    pub ca_path: String,
}

/// The result of `cluster join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResult {
    pub cluster_id: String,
    pub node_id: u64,
    pub role: MemberRole,
}

pub struct Agent {
    pub data_dir: DataDir,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    api_mode: watch::Sender<ServeMode>,
    peer_mode: watch::Sender<ServeMode>,
    node: watch::Sender<Option<Arc<ClusterNode>>>,
    setup_lock: tokio::sync::Mutex<()>,
    pub isolation: Isolation,
    raft_options: RaftOptions,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub storage_addr: String,
    storage_listener: Mutex<Option<TcpListener>>,
    block_options: crate::reconcile::storage::BlockOptions,
    compute: Option<crate::reconcile::compute::ComputeOptions>,
    network: Option<crate::reconcile::network::NetworkOptions>,
    ha: crate::reconcile::ha::HaOptions,
    audit_summary_interval: std::time::Duration,
    /// Addresses the API port refuses at accept (see `serve::Shed`); kept
    /// across configurations, as the listener is.
    api_shed: Arc<serve::Shed>,
}

/// Raises this process's soft limit on open files to its hard limit: every
/// client connection, peer connection, NBD client and object file is one,
/// and systemd's default soft limit of 1,024 would let a thousand idle
/// connections stop the node from accepting more.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit; many connections may exhaust it");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Hands freed heap back to the system every 30 s. After a burst of
/// connections (each holds TLS and HTTP buffers while open) glibc keeps
/// the memory they freed in its arenas, and the agent would stay at its
/// peak resident size for good.
pub async fn return_freed_memory() {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(30));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // SAFETY: malloc_trim only walks and releases the allocator's own
        // free lists; it takes the arenas' locks like any allocation.
        let _ = tokio::task::spawn_blocking(|| unsafe { nix::libc::malloc_trim(0) }).await;
    }
}

/// The host name, made into a valid node name.
pub fn default_node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name = format!("node-{name}").trim_end_matches('-').to_string();
    }
    name
}

fn advertised(explicit: &Option<String>, bound: SocketAddr) -> String {
    match explicit {
        Some(addr) => addr.clone(),
        None if bound.ip().is_unspecified() => {
            tracing::warn!(%bound, "listening on all addresses without --*-advertise; advertising 127.0.0.1, which peers on other machines cannot reach");
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string()
        }
        None => bound.to_string(),
    }
}

impl Agent {
    pub async fn start(options: AgentOptions) -> anyhow::Result<Arc<Agent>> {
        options.blocks.check()?;
        let data_dir = options.data_dir.clone();
        std::fs::create_dir_all(data_dir.path()).with_context(|| {
            format!(
                "cannot create the data directory {}",
                data_dir.path().display()
            )
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(data_dir.path(), std::fs::Permissions::from_mode(0o700))
                .with_context(|| {
                    format!(
                        "cannot restrict the data directory {}",
                        data_dir.path().display()
                    )
                })?;
        }
        let api_listener = TcpListener::bind(&options.api_listen)
            .await
            .with_context(|| format!("cannot listen on the API address {}", options.api_listen))?;
        let peer_listener = TcpListener::bind(&options.peer_listen)
            .await
            .with_context(|| {
                format!("cannot listen on the peer address {}", options.peer_listen)
            })?;
        let storage_listener = TcpListener::bind(&options.storage_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on the storage address {}",
                    options.storage_listen
                )
            })?;
        let api_bound = api_listener.local_addr()?;
        let peer_bound = peer_listener.local_addr()?;
        let storage_bound = storage_listener.local_addr()?;
        let listen = ListenAddrs {
            api_addr: api_bound.to_string(),
            peer_addr: peer_bound.to_string(),
            storage_addr: storage_bound.to_string(),
            pid: std::process::id(),
        };
        std::fs::write(data_dir.listen_file(), serde_json::to_vec_pretty(&listen)?)
            .with_context(|| format!("cannot write {}", data_dir.listen_file().display()))?;

        // A configured node answers nothing until it serves TLS: a client
        // must never meet plain HTTP on a member's API port.
        let (api_mode, api_rx) = watch::channel(if data_dir.node_config().exists() {
            ServeMode::Closed
        } else {
            ServeMode::Plain(crate::api::unconfigured_router())
        });
        let (peer_mode, peer_rx) = watch::channel(ServeMode::Closed);
        let (node, _) = watch::channel(None);
        let agent = Arc::new(Agent {
            name: options.name.clone().unwrap_or_else(default_node_name),
            api_addr: advertised(&options.api_advertise, api_bound),
            peer_addr: advertised(&options.peer_advertise, peer_bound),
            data_dir: data_dir.clone(),
            api_mode,
            peer_mode,
            node,
            setup_lock: tokio::sync::Mutex::new(()),
            isolation: Isolation::default(),
            raft_options: options.raft.clone(),
            tasks: Mutex::new(Vec::new()),
            storage_addr: advertised(&options.storage_advertise, storage_bound),
            storage_listener: Mutex::new(Some(storage_listener)),
            block_options: options.blocks.clone(),
            compute: options.compute.clone(),
            network: options.network.clone(),
            ha: options.ha,
            audit_summary_interval: options.audit_summary_interval,
            api_shed: Arc::default(),
        });
        let admin =
            crate::daemon::admin::spawn(agent.clone()).context("cannot open the admin socket")?;
        let api = serve::spawn(
            api_listener,
            api_rx,
            "api",
            serve::Limits::API,
            Some(agent.api_shed.clone()),
        );
        let peer = serve::spawn(peer_listener, peer_rx, "peer", serve::Limits::PEER, None);
        agent
            .tasks
            .lock()
            .expect("task list")
            .extend([admin, api, peer]);
        tokio::spawn(leave_when_removed(Arc::downgrade(&agent)));

        if data_dir.node_config().exists() {
            let config: NodeConfig = read_json(&data_dir.node_config())?;
            let tls = NodeTls {
                ca_pem: read_text(&data_dir.ca_cert())?,
                cert_pem: read_text(&data_dir.node_cert())?,
                key_pem: read_text(&data_dir.node_key())?,
            };
            agent.configure(config, tls).await?;
            tracing::info!(api = %agent.api_addr, peer = %agent.peer_addr, "agent started as a cluster member");
        } else {
            tracing::info!(api = %api_bound, admin = %data_dir.admin_socket().display(), "agent started unconfigured; waiting for `allod cluster init` or `allod cluster join`");
        }
        Ok(agent)
    }

    pub fn node(&self) -> Option<Arc<ClusterNode>> {
        self.node.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterNode>>> {
        self.node.subscribe()
    }

    async fn configure(
        &self,
        config: NodeConfig,
        tls: NodeTls,
    ) -> anyhow::Result<Arc<ClusterNode>> {
        let api_tls = tls.api_server_config()?;
        let peer_tls = tls.peer_server_config()?;
        let node = ClusterNode::start(
            self.data_dir.clone(),
            config,
            tls,
            &self.raft_options,
            self.isolation.clone(),
        )
        .await
        .context("cannot start this node's Raft instance")?;
        let local = Arc::new(crate::api::LocalServices::default());
        self.peer_mode.send_replace(ServeMode::Tls(
            peer_tls,
            crate::cluster::peer::router(node.clone(), self.raft_options.peer_request_limit_bytes),
        ));
        let app =
            crate::api::AppState::with_shed(node.clone(), local.clone(), self.api_shed.clone());
        let _ = node
            .write_authority
            .set(Arc::new(crate::api::forwarded::ForwardedWrites {
                node: Arc::downgrade(&node),
                auth: app.auth.clone(),
            }));
        tokio::spawn(crate::api::abuse::write_summaries(
            Arc::downgrade(&node),
            app.auth.refusals.clone(),
            self.audit_summary_interval,
        ));
        self.api_mode
            .send_replace(ServeMode::Tls(api_tls, crate::api::router(app)));
        self.node.send_replace(Some(node.clone()));
        tokio::spawn(report_capacity(Arc::downgrade(&node)));
        // Whether this node serves block storage or not: as the leader it
        // decides every storage node's state.
        tokio::spawn(crate::reconcile::storage::recovery::watch_storage_nodes(
            Arc::downgrade(&node),
        ));
        // As the leader it also decides every node's liveness.
        tokio::spawn(crate::reconcile::ha::watch_nodes(
            Arc::downgrade(&node),
            self.ha,
        ));
        let listener = self.storage_listener.lock().expect("listener").take();
        match listener {
            Some(listener) => {
                // Without its disks the node serves no block storage, but
                // stays a member: it says so through Raft, the leader counts
                // it down, its copies are made again elsewhere once it is
                // declared out, and the error says how to get it back.
                let mut options = self.block_options.clone();
                let started = match crate::daemon::disks::mount_all(&self.data_dir.root) {
                    Ok(disks) => {
                        options.disks = disks;
                        crate::reconcile::storage::BlockStore::start(
                            &node,
                            listener,
                            self.storage_addr.clone(),
                            &options,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                match started {
                    Ok(blocks) => {
                        tokio::spawn(crate::reconcile::operations::run(
                            Arc::downgrade(&node),
                            Arc::downgrade(&blocks),
                        ));
                        let _ = local.blocks.set(blocks);
                        if let Some(compute) = &self.compute {
                            let _ = local.compute.set(compute.clone());
                            tokio::spawn(crate::reconcile::compute::run(
                                Arc::downgrade(&node),
                                compute.clone(),
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::error!("this node serves no block storage and runs no VMs: {e:#}");
                        tokio::spawn(crate::reconcile::storage::recovery::report_unavailable(
                            Arc::downgrade(&node),
                            format!("{e:#}"),
                        ));
                    }
                }
            }
            None => tracing::warn!(
                "the storage port was already handed to an earlier configuration; restart the agent to serve block storage"
            ),
        }
        if let Some(network) = &self.network {
            let peer_ip = self
                .peer_addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .and_then(|a| match a.ip() {
                    std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
                    _ => None,
                });
            tokio::spawn(crate::reconcile::network::run(
                Arc::downgrade(&node),
                network.clone(),
                peer_ip,
            ));
        }
        Ok(node)
    }

    async fn unconfigure(&self) {
        if let Some(node) = self.node.send_replace(None) {
            node.shutdown().await;
        }
        self.peer_mode.send_replace(ServeMode::Closed);
        self.api_mode
            .send_replace(ServeMode::Plain(crate::api::unconfigured_router()));
        for path in [
            self.data_dir.node_config(),
            self.data_dir.raft_log(),
            self.data_dir.state_db(),
            self.data_dir.node_cert(),
            self.data_dir.node_key(),
            self.data_dir.ca_cert(),
            self.data_dir.ca_key(),
            self.data_dir.join_pins(),
        ] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a file while rolling back");
                }
            }
        }
    }

    fn refuse_if_configured(&self) -> Result<(), SetupError> {
        match self.node() {
            Some(node) => Err(SetupError::AlreadyConfigured {
                cluster_id: node.config.cluster_id.clone(),
                node_id: node.id,
            }),
            None => Ok(()),
        }
    }

    fn node_sans(&self) -> Vec<String> {
        pki::subject_alt_names(&[&self.api_addr, &self.peer_addr])
    }

    /// Creates a new cluster with this node as its first member.
    pub async fn init(&self, cluster_name: Option<String>) -> anyhow::Result<InitResult> {
        let _guard = self.setup_lock.lock().await;
        self.refuse_if_configured()?;
        let cluster_name = cluster_name.unwrap_or_else(|| "allod".to_string());
        crate::state::validate_name("cluster", &cluster_name)?;
        let cluster_id = random_hex(8);
        let ca = CertificateAuthority::create(&cluster_id)?;
        let (node_key, node_cert) = NodeKey::generate_signed(self.node_sans(), &ca, 1)?;
        let admin_token = format!("allod_{}", random_hex(32));
        let dir = &self.data_dir;
        write_public(&dir.ca_cert(), &ca.cert_pem)?;
        pki::write_private(&dir.ca_key(), &ca.key_pem)?;
        write_public(&dir.node_cert(), &node_cert)?;
        pki::write_private(&dir.node_key(), &node_key)?;
        pki::write_private(&dir.admin_token(), &format!("{admin_token}\n"))?;
        let config = NodeConfig {
            node_id: 1,
            cluster_id: cluster_id.clone(),
            name: self.name.clone(),
            api_addr: self.api_addr.clone(),
            peer_addr: self.peer_addr.clone(),
        };
        write_public(&dir.node_config(), &serde_json::to_string_pretty(&config)?)?;
        let tls = NodeTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: node_cert,
            key_pem: node_key,
        };
        let key_sha256 = pki::parse_certs(&tls.cert_pem, "the node certificate")?
            .first()
            .and_then(|der| pki::cert_key_sha256(der.as_ref()));
        let result = async {
            let node = self.configure(config, tls).await?;
            node.initialize_single().await?;
            let now = now_ms();
            let info = ClusterInfo {
                cluster_id: cluster_id.clone(),
                name: cluster_name,
                created_at_ms: now,
                ca_fingerprint: pki::pem_fingerprint(&ca.cert_pem)?,
            };
            let first_node = NodeRecord {
                id: 1,
                name: self.name.clone(),
                joined_at_ms: now,
                zone: Default::default(),
                vcpus: 0,
                memory_bytes: 0,
                maintenance: false,
                draining: false,
                storage: None,
                key_sha256,
                storage_state: Default::default(),
                storage_state_since_ms: 0,
                liveness: Default::default(),
                liveness_since_ms: 0,
                health: Default::default(),
                migration: None,
            };
            node.write(&Command::InitCluster {
                info,
                admin_token_sha256: sha256_hex(&admin_token),
                first_node,
            })
            .await??;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            self.unconfigure().await;
            let _ = std::fs::remove_file(dir.admin_token());
            return Err(e.context("cannot create the cluster; the node was left unconfigured"));
        }
        tracing::info!(cluster_id, "created a new cluster");
        Ok(InitResult {
            cluster_id,
            node_id: 1,
            api_url: format!("https://{}", self.api_addr),
            admin_token_path: dir.admin_token().display().to_string(),
            ca_path: dir.ca_cert().display().to_string(),
        })
    }

    /// Joins an existing cluster with a join token, reporting each step.
    pub async fn join(
        &self,
        token_text: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> anyhow::Result<JoinResult> {
        let _guard = self.setup_lock.lock().await;
        self.refuse_if_configured()?;
        let token = JoinToken::decode(token_text, now_ms())?;
        progress(format!(
            "Token for cluster {} with CA fingerprint {}",
            token.cluster_id, token.ca_fingerprint
        ));

        // Find a member that answers and prove it holds the cluster's CA.
        let unverified = reqwest::Client::builder()
            .use_preconfigured_tls(pki::unverified_client_config())
            .timeout(std::time::Duration::from_secs(5))
            .build()?;
        let mut contacted = None;
        let mut tried = Vec::new();
        for member in &token.members {
            let url = format!("https://{}/v1/cluster/ca", member.api_addr);
            match unverified
                .get(&url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
            {
                Ok(response) => {
                    let pem = response.text().await?;
                    let actual =
                        pki::pem_fingerprint(&pem).unwrap_or_else(|_| "(not a certificate)".into());
                    if actual != token.ca_fingerprint {
                        return Err(SetupError::FingerprintMismatch {
                            addr: member.api_addr.clone(),
                            expected: token.ca_fingerprint.clone(),
                            actual,
                        }
                        .into());
                    }
                    progress(format!(
                        "{} presents the expected CA certificate",
                        member.api_addr
                    ));
                    contacted = Some((member.clone(), pem));
                    break;
                }
                Err(e) => tried.push(format!("{}: {}", member.api_addr, crate::error_chain(&e))),
            }
        }
        let Some((member, ca_pem)) = contacted else {
            return Err(SetupError::Unreachable {
                tried: tried.join("; "),
            }
            .into());
        };

        // Spend the token and get a certificate for a key that never leaves this node.
        let node_key = NodeKey::generate(self.node_sans())?;
        let verified = reqwest::Client::builder()
            .use_preconfigured_tls(pki::ca_client_config(&ca_pem)?)
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        let request = JoinRequest {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            name: self.name.clone(),
            api_addr: self.api_addr.clone(),
            peer_addr: self.peer_addr.clone(),
            csr_pem: node_key.csr_pem.clone(),
        };
        let response = verified
            .post(format!("https://{}/v1/cluster/join", member.api_addr))
            .json(&request)
            .send()
            .await
            .with_context(|| format!("cannot reach {} to join", member.api_addr))?;
        if !response.status().is_success() {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            let message = body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string();
            return Err(SetupError::Refused { message }.into());
        }
        let joined: JoinResponse = response
            .json()
            .await
            .context("the member's join answer does not parse")?;
        progress(format!(
            "The cluster assigned node id {}; starting Raft",
            joined.node_id
        ));

        let dir = &self.data_dir;
        let config = NodeConfig {
            node_id: joined.node_id,
            cluster_id: joined.cluster_id.clone(),
            name: self.name.clone(),
            api_addr: self.api_addr.clone(),
            peer_addr: self.peer_addr.clone(),
        };
        let result = async {
            write_public(&dir.ca_cert(), &joined.ca_pem)?;
            pki::write_private(&dir.ca_key(), &joined.ca_key_pem)?;
            write_public(&dir.node_cert(), &joined.cert_pem)?;
            pki::write_private(&dir.node_key(), &node_key.key_pem)?;
            write_public(
                &dir.join_pins(),
                &serde_json::to_string(&joined.member_keys)?,
            )?;
            write_public(&dir.node_config(), &serde_json::to_string_pretty(&config)?)?;
            let tls = NodeTls {
                ca_pem: joined.ca_pem.clone(),
                cert_pem: joined.cert_pem.clone(),
                key_pem: node_key.key_pem.clone(),
            };
            let node = self.configure(config.clone(), tls).await?;
            progress("Asking the leader to add this node as a learner and catch it up".to_string());
            let add = AddMemberRequest {
                node_id: joined.node_id,
                member: node.member(),
            };
            let mut last_error = String::new();
            for member in &token.members {
                let reply: Result<Result<MemberRole, ForwardFailure>, PeerCallError> = node
                    .peers
                    .call(
                        &member.peer_addr,
                        "/cluster/add-member",
                        &add,
                        std::time::Duration::from_secs(120),
                    )
                    .await;
                match reply {
                    Ok(Ok(role)) => return anyhow::Ok(role),
                    Ok(Err(failure)) => last_error = format!("{failure:?}"),
                    Err(e) => last_error = crate::error_chain(&e),
                }
            }
            Err(SetupError::Failed(format!("no member could add this node: {last_error}")).into())
        }
        .await;
        match result {
            Ok(role) => {
                progress(match role {
                    MemberRole::Voter => "Caught up and promoted to voter".to_string(),
                    MemberRole::Learner => {
                        "Caught up; stays a learner because the cluster already has 5 voters"
                            .to_string()
                    }
                });
                Ok(JoinResult {
                    cluster_id: joined.cluster_id,
                    node_id: joined.node_id,
                    role,
                })
            }
            Err(e) => {
                self.unconfigure().await;
                Err(e.context("joining failed after the token was spent; the node was left unconfigured, create a new token and retry"))
            }
        }
    }

    /// Removes a member by id or name.
    pub async fn remove(
        &self,
        which: &str,
        force: bool,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> anyhow::Result<u64> {
        let node = self.node().ok_or(SetupError::NotConfigured)?;
        let members = node.members();
        let id = match which.parse::<u64>() {
            Ok(id) => id,
            Err(_) => {
                let matches: Vec<_> = members.iter().filter(|m| m.name == which).collect();
                match matches.as_slice() {
                    [one] => one.id,
                    [] => anyhow::bail!("no member is named {which:?}; `allod cluster status` lists members and their ids"),
                    _ => anyhow::bail!("several members are named {which:?}; remove one by its id instead"),
                }
            }
        };
        drain(&node, id, force, progress).await?;
        node.remove_member(id, true).await?;
        tracing::info!(node_id = id, "removed a member from the cluster");
        Ok(id)
    }

    pub async fn shutdown(&self) {
        for task in self.tasks.lock().expect("task list").drain(..) {
            task.abort();
        }
        if let Some(node) = self.node.send_replace(None) {
            node.shutdown().await;
        }
        let _ = std::fs::remove_file(self.data_dir.admin_socket());
    }
}

/// When the cluster removes this node, it stops serving the cluster and
/// wipes what made it a member (its key and certificate, the CA's, the Raft
/// log and the state), and waits unconfigured to create or join a cluster.
async fn leave_when_removed(agent: std::sync::Weak<Agent>) {
    let Some(mut nodes) = agent.upgrade().map(|a| a.subscribe()) else {
        return;
    };
    loop {
        let current = nodes.borrow_and_update().clone();
        match current {
            Some(node) => {
                let how = tokio::select! {
                    how = node.removed() => Some(how),
                    () = node.removal_hinted() => {
                        let confirmed = node.confirm_removed().await;
                        if confirmed.is_none() {
                            // Not so: claims are checked at most every 10 s.
                            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                        }
                        confirmed
                    }
                    changed = nodes.changed() => if changed.is_err() { return } else { None },
                };
                if let Some(how) = how {
                    drop(node);
                    let Some(agent) = agent.upgrade() else { return };
                    let _setup = agent.setup_lock.lock().await;
                    tracing::warn!(reason = %how, "removed from the cluster: wiping this node's keys and cluster state; it is unconfigured and may create or join a cluster again");
                    agent.unconfigure().await;
                }
            }
            None => {
                if nodes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid node configuration; restore it or start with an empty data directory", path.display()))
}

fn write_public(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// This machine's logical CPUs and memory, as the scheduler counts them.
pub fn local_capacity() -> (u64, u64) {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    (vcpus, memory_bytes)
}

/// Records this node's capacity in the cluster state once it differs from
/// what is recorded, retrying while there is no leader.
async fn report_capacity(node: std::sync::Weak<ClusterNode>) {
    let (vcpus, memory_bytes) = local_capacity();
    loop {
        let Some(node) = node.upgrade() else { return };
        let recorded = node.own_record();
        match recorded {
            Some(r) if r.vcpus == vcpus && r.memory_bytes == memory_bytes => return,
            // Not applied here yet (a joiner catching up): wait.
            None => {}
            Some(_) => {
                let command = Command::SetNodeCapacity {
                    id: node.id,
                    vcpus,
                    memory_bytes,
                };
                match node.write(&command).await {
                    Ok(Ok(_)) => {
                        tracing::info!(vcpus, memory_bytes, "recorded this node's capacity");
                        return;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "capacity not recorded yet"),
                    Err(e) => tracing::debug!(error = %e, "capacity not recorded yet"),
                }
            }
        }
        drop(node);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Drains node `id`'s block storage before it leaves: it becomes
/// `draining` (the storage map leaves it out, so every volume's mover
/// copies its objects elsewhere), and this waits until no volume is placed
/// with a map that holds it. A node that is down or out and holds the only
/// in-sync copy of some objects is refused, unless `force` (those volumes
/// are left behind, and their objects on it are lost).
async fn drain(
    node: &ClusterNode,
    id: u64,
    force: bool,
    progress: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<()> {
    use crate::state::storage::StorageNodeState;
    node.linearizable_read().await?;
    let Some(record) = node.state.nodes()?.into_iter().find(|n| n.id == id) else {
        return Ok(());
    };
    if record.storage.is_none() {
        return Ok(());
    }
    let unreachable = matches!(
        record.storage_state,
        StorageNodeState::Down | StorageNodeState::Out
    );
    let lost = if unreachable {
        node.state.only_copies_on(id)?
    } else {
        Vec::new()
    };
    if !lost.is_empty() && !force {
        anyhow::bail!(
            "node {id} ({}) is {} and holds the only in-sync copy of some objects of volumes {}: \
             removing it would lose them. Bring the node back so that they can be copied off it, \
             or pass --force to remove it anyway and lose those objects",
            record.name,
            record.storage_state.as_str(),
            lost.join(", ")
        );
    }
    if record.storage_state != StorageNodeState::Draining {
        node.write(&Command::SetStorageNodeState {
            id,
            state: StorageNodeState::Draining,
            at_ms: crate::cluster::join::now_ms(),
        })
        .await?
        .map_err(anyhow::Error::new)?;
        tracing::info!(
            node_id = id,
            "draining the node's block storage before it leaves"
        );
    }
    let mut last = String::new();
    loop {
        node.linearizable_read().await?;
        let left = node
            .state
            .volumes_on(id)?
            .into_iter()
            .filter(|v| !lost.contains(&format!("{}/{}", v.project, v.name)))
            .count();
        if left == 0 {
            return Ok(());
        }
        let status = node.state.storage_status(crate::cluster::join::now_ms())?;
        let message = format!(
            "draining node {id}: {left} volumes still have objects on it; {} left to copy",
            crate::units::human_size(status.bytes_to_move)
        );
        if message != last {
            progress(message.clone());
            last = message;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
