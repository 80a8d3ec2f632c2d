//! The local admin socket, `DATA_DIR/admin.sock` (mode 0600, so root only).
//!
//! It is how `allod cluster init|join|join-token|remove` talk to the agent on
//! the same machine, and the only thing an unconfigured agent listens on
//! besides `/healthz`. The protocol is line-delimited JSON: one request line,
//! then any number of progress lines and one final `done` or `failed` line.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::daemon::Agent;

const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Init {
        cluster_name: Option<String>,
    },
    JoinToken {
        ttl_secs: u64,
    },
    Join {
        token: String,
    },
    Remove {
        node: String,
        /// Remove it even when it holds the only in-sync copy of some
        /// objects and cannot be read from (they are lost).
        #[serde(default)]
        force: bool,
    },
    /// Puts this node into maintenance (no new VMs) or takes it out.
    Maintenance {
        on: bool,
    },
    /// Applies a node setup (validated as a whole first) and keeps it.
    Setup {
        setup: crate::daemon::setup::NodeSetup,
        #[serde(default)]
        wipe: Vec<String>,
    },
    Status,
    /// Cuts this node off from its peers, or joins it again: partition
    /// tests of agents run as processes. Only in test builds.
    #[cfg(feature = "test-hooks")]
    Isolate {
        on: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AdminEvent {
    Progress { message: String },
    Done { result: serde_json::Value },
    Failed { message: String },
}

pub fn spawn(agent: Arc<Agent>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = agent.data_dir.admin_socket();
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(agent.clone(), stream));
                }
                Err(e) => tracing::warn!(error = %e, "admin socket accept failed"),
            }
        }
    }))
}

async fn handle(agent: Arc<Agent>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(
        read,
        MAX_REQUEST_BYTES as u64,
    ));
    let mut line = String::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<AdminEvent>();
    let request = match reader.read_line(&mut line).await {
        Ok(0) => return,
        Ok(_) => serde_json::from_str::<AdminRequest>(&line).map_err(|e| {
            format!("the admin request does not parse ({e}); use the `allod cluster` commands")
        }),
        Err(e) => Err(format!("cannot read the admin request: {e}")),
    };
    let worker = tokio::spawn(async move {
        let progress_tx = tx.clone();
        let progress = move |message: String| {
            let _ = progress_tx.send(AdminEvent::Progress { message });
        };
        let final_event = match request {
            Err(message) => AdminEvent::Failed { message },
            Ok(request) => {
                let action = request.audit_action();
                let outcome = execute(&agent, request, &progress).await;
                if let Some((action, object)) = action {
                    audit(&agent, action, object, outcome.is_ok());
                }
                match outcome {
                    Ok(result) => AdminEvent::Done { result },
                    Err(e) => AdminEvent::Failed {
                        message: crate::error_chain_anyhow(&e),
                    },
                }
            }
        };
        let _ = tx.send(final_event);
    });
    // Cancel-safe loop: every event is written before the next is taken.
    while let Some(event) = rx.recv().await {
        let mut bytes = serde_json::to_vec(&event).expect("events serialise");
        bytes.push(b'\n');
        if write.write_all(&bytes).await.is_err() {
            // The client went away; the operation still runs to completion.
            break;
        }
    }
    let _ = worker.await;
}

impl AdminRequest {
    /// What the audit log calls this request, if it changes anything.
    fn audit_action(&self) -> Option<(&'static str, String)> {
        match self {
            AdminRequest::Init { .. } => Some(("ADMIN cluster init", "cluster".into())),
            AdminRequest::Join { .. } => Some(("ADMIN cluster join", "cluster".into())),
            AdminRequest::JoinToken { .. } => {
                Some(("ADMIN cluster join-token", "join-token".into()))
            }
            AdminRequest::Remove { node, .. } => {
                Some(("ADMIN cluster remove", format!("node {node}")))
            }
            AdminRequest::Maintenance { on } => Some((
                if *on {
                    "ADMIN node maintenance on"
                } else {
                    "ADMIN node maintenance off"
                },
                "this node".into(),
            )),
            AdminRequest::Setup { .. } => Some(("ADMIN node setup", "this node".into())),
            AdminRequest::Status => None,
            #[cfg(feature = "test-hooks")]
            AdminRequest::Isolate { .. } => None,
        }
    }
}

/// Appends an entry for an operator action taken on this node's admin
/// socket (local root), once the node is part of a cluster.
fn audit(agent: &Agent, action: &str, object: String, ok: bool) {
    let Some(node) = agent.node() else {
        tracing::info!(
            action,
            ok,
            "admin action on an unconfigured node; nothing to audit into"
        );
        return;
    };
    let record = crate::state::audit::AuditContext {
        time_ms: crate::cluster::join::now_ms(),
        user: "local-admin".into(),
        token_id: "-".into(),
        source: format!("admin.sock of node {}", node.id),
        action: action.into(),
        object,
        zone: None,
    }
    .with_result(if ok { "ok" } else { "failed" });
    tokio::spawn(async move {
        if let Err(e) = node
            .write(&crate::state::Command::AppendAudit { record })
            .await
        {
            tracing::error!(error = %crate::error_chain(&e), "cannot append an admin action to the audit log");
        }
    });
}

async fn execute(
    agent: &Agent,
    request: AdminRequest,
    progress: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<serde_json::Value> {
    match request {
        AdminRequest::Init { cluster_name } => {
            Ok(serde_json::to_value(agent.init(cluster_name).await?)?)
        }
        AdminRequest::Join { token } => {
            Ok(serde_json::to_value(agent.join(&token, progress).await?)?)
        }
        AdminRequest::JoinToken { ttl_secs } => {
            let node = agent
                .node()
                .ok_or(crate::daemon::SetupError::NotConfigured)?;
            if ttl_secs == 0 {
                anyhow::bail!("a join token's lifetime must be at least one second");
            }
            let (token, text) = crate::cluster::join::create_token(&node, ttl_secs).await?;
            Ok(
                serde_json::json!({ "token": text, "expires_at_ms": token.expires_at_ms, "ca_fingerprint": token.ca_fingerprint }),
            )
        }
        AdminRequest::Remove { node, force } => {
            let id = agent.remove(&node, force, progress).await?;
            Ok(serde_json::json!({ "removed": id }))
        }
        AdminRequest::Maintenance { on } => {
            let node = agent
                .node()
                .ok_or(crate::daemon::SetupError::NotConfigured)?;
            node.write(&crate::state::Command::SetNodeMaintenance {
                id: node.id,
                maintenance: on,
            })
            .await?
            .map_err(anyhow::Error::new)?;
            Ok(serde_json::json!({ "maintenance": on }))
        }
        AdminRequest::Setup { setup, wipe } => {
            let known = crate::daemon::disks::recorded(&agent.data_dir.root)?;
            let plan = setup.plan(&wipe, &known).map_err(anyhow::Error::msg)?;
            progress("The setup is valid; applying it".into());
            crate::daemon::setup::apply(&plan, &agent.data_dir.root, progress).await?;
            let path = crate::daemon::setup::path(&agent.data_dir.root);
            std::fs::write(&path, serde_json::to_vec_pretty(&setup)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(format!("Setup kept in {}", path.display()));
            Ok(serde_json::to_value(&setup)?)
        }
        #[cfg(feature = "test-hooks")]
        AdminRequest::Isolate { on } => {
            agent.isolation.set(on);
            Ok(serde_json::json!({ "isolated": on }))
        }
        AdminRequest::Status => match agent.node() {
            None => Ok(
                serde_json::json!({ "configured": false, "api_addr": agent.api_addr, "peer_addr": agent.peer_addr }),
            ),
            Some(node) => Ok(serde_json::json!({
                "configured": true,
                "cluster_id": node.config.cluster_id,
                "node_id": node.id,
                "leader_id": node.leader(),
                "api_addr": node.config.api_addr,
                "peer_addr": node.config.peer_addr,
                "members": node.members(),
                "ca_fingerprint": crate::cluster::pki::pem_fingerprint(&node.tls.ca_pem).unwrap_or_default(),
                "node": node.own_record(),
                "cluster_name": node.state.cluster().ok().flatten().map(|c| c.name).unwrap_or_default(),
                "vms": local_vms(&node),
                "storage": storage_line(&node),
                "lag": node.replication_lag(),
                "log_tail": crate::daemon::logring::tail(20),
            })),
        },
    }
}

/// The storage cluster's health in one line, as the console shows it.
fn storage_line(node: &crate::cluster::node::ClusterNode) -> String {
    use crate::units::human_size;
    let Ok(s) = node.state.storage_status(crate::cluster::join::now_ms()) else {
        return "unknown (the state cannot be read)".into();
    };
    let mut line = s.health.clone();
    if s.bytes_to_move > 0 {
        line.push_str(&format!(
            ", {} left at {}/s",
            human_size(s.bytes_to_move),
            human_size(s.rate_bytes_per_s)
        ));
        if let Some(eta) = s.eta_s {
            line.push_str(&format!(", ~{eta} s"));
        }
    }
    if s.objects_degraded > 0 {
        line.push_str(&format!(
            ", {} objects short of replicas",
            s.objects_degraded
        ));
    }
    let away: Vec<String> = s
        .nodes
        .iter()
        .filter(|n| n.state != crate::state::storage::StorageNodeState::In)
        .map(|n| format!("{} {}", n.name, n.state.as_str()))
        .collect();
    if !away.is_empty() {
        line.push_str(&format!(" ({})", away.join(", ")));
    }
    line
}

/// The VMs placed on this node, as the console lists them.
fn local_vms(node: &crate::cluster::node::ClusterNode) -> Vec<serde_json::Value> {
    let projects = node.state.projects().unwrap_or_default();
    projects
        .iter()
        .flat_map(|p| node.state.vms(&p.name).unwrap_or_default())
        .filter(|vm| vm.node_id == node.id)
        .map(|vm| serde_json::json!({ "project": vm.project, "name": vm.name, "vcpus": vm.vcpus, "memory_bytes": vm.memory_bytes, "state": vm.state }))
        .collect()
}

/// Sends one request to the agent owning `data_dir`, printing progress to
/// stderr, and returns the final result.
pub async fn request(data_dir: &Path, request: &AdminRequest) -> anyhow::Result<serde_json::Value> {
    request_with(data_dir, request, |message| eprintln!("{message}")).await
}

/// [`request`], handing each progress message to `progress`.
pub async fn request_with(
    data_dir: &Path,
    request: &AdminRequest,
    mut progress: impl FnMut(String),
) -> anyhow::Result<serde_json::Value> {
    let path = data_dir.join("admin.sock");
    let stream = UnixStream::connect(&path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no agent is running with data directory {} (cannot connect to {}); start it with `allod agent --data-dir {}`",
            data_dir.display(),
            path.display(),
            data_dir.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}; the admin socket is for root (the agent's user) only",
            path.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot connect to {}", path.display())),
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .context("cannot send the admin request")?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .context("cannot read the agent's answer")?
    {
        match serde_json::from_str::<AdminEvent>(&line)
            .context("the agent's answer does not parse")?
        {
            AdminEvent::Progress { message } => progress(message),
            AdminEvent::Done { result } => return Ok(result),
            AdminEvent::Failed { message } => anyhow::bail!("{message}"),
        }
    }
    anyhow::bail!("the agent closed the admin connection without an answer (did it stop?)")
}
