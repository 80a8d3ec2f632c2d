//! Node-to-node RPC: Raft's messages and the few cluster operations that must
//! run on the leader, as JSON over HTTPS with mutual TLS.
//!
//! The server side is an axum router mounted on the peer port, whose TLS
//! configuration refuses any client without a certificate from the cluster
//! CA. The client side implements openraft's `RaftNetwork`.

use std::sync::Arc;
use std::time::Duration;

use allod_raft::{Member, NodeId, TypeConfig};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::LogId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cluster::node::{ClusterError, ClusterNode, MemberRole};
use crate::state::Outcome;

/// A switch that cuts a node off from its peers in both directions, for
/// partition tests of the real transport. It exists only in builds with the
/// `test-hooks` feature (the test suite's); elsewhere a node is never
/// isolated and nothing can make it so.
#[cfg(feature = "test-hooks")]
#[derive(Clone, Default)]
pub struct Isolation(Arc<std::sync::atomic::AtomicBool>);

#[cfg(feature = "test-hooks")]
impl Isolation {
    pub fn set(&self, isolated: bool) {
        self.0.store(isolated, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Without `test-hooks`: never isolated.
#[cfg(not(feature = "test-hooks"))]
#[derive(Clone, Default)]
pub struct Isolation;

#[cfg(not(feature = "test-hooks"))]
impl Isolation {
    pub fn get(&self) -> bool {
        false
    }
}

/// The verified identity of the peer on the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// The node the client certificate names, and its key.
    pub node_cert: Option<crate::cluster::admission::NodeCert>,
    /// The client's address.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// Set once the connection has proven who is on it (a client
    /// certificate, or an authenticated request): such connections are the
    /// last to be closed when the listener is full.
    pub proven: Arc<std::sync::atomic::AtomicBool>,
}

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    /// The request never reached the peer: safe to retry elsewhere.
    #[error("cannot connect to peer {addr}")]
    Connect {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    /// The request may or may not have been processed.
    #[error("peer {addr} did not answer")]
    Transport {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("peer {addr} refused the request ({status}): {message}")]
    Refused {
        addr: String,
        status: u16,
        message: String,
    },
    #[error("this node is isolated from its peers")]
    Isolated,
}

impl PeerCallError {
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            PeerCallError::Connect { .. } | PeerCallError::Isolated
        )
    }
}

/// The HTTPS client every peer call goes through.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    pub isolation: Isolation,
    /// Set, with how it was learnt, once this node knows for certain that
    /// it was removed (it removed itself, or most members refuse it).
    pub removed: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// Woken when a peer refuses this node's certificate as revoked or a
    /// member says it was removed: a claim to check with the other members
    /// before acting on it, since one peer's word could be false.
    pub removal_hints: Arc<tokio::sync::Notify>,
    /// When each peer last answered an AppendEntries (heartbeats included)
    /// from this node: the leader's failure detection reads it.
    heard: Arc<std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>>,
}

impl PeerClient {
    /// How long ago `node` last answered this node's AppendEntries, if it
    /// ever did since this process started.
    pub fn last_heard(&self, node: NodeId) -> Option<Duration> {
        self.heard
            .lock()
            .unwrap()
            .get(&node)
            .map(std::time::Instant::elapsed)
    }

    pub fn new(tls: rustls::ClientConfig, isolation: Isolation) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            isolation,
            removed: Arc::new(tokio::sync::watch::channel(None).0),
            removal_hints: Arc::new(tokio::sync::Notify::new()),
            heard: Arc::default(),
        })
    }

    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer_addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerCallError> {
        if self.isolation.get() {
            return Err(PeerCallError::Isolated);
        }
        let addr = peer_addr.to_string();
        let response = self
            .http
            .post(format!("https://{peer_addr}{path}"))
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| {
                if source.is_connect() {
                    PeerCallError::Connect {
                        addr: addr.clone(),
                        source,
                    }
                } else {
                    PeerCallError::Transport {
                        addr: addr.clone(),
                        source,
                    }
                }
            })?;
        let status = response.status();
        if !status.is_success() {
            let message = response.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::FORBIDDEN
                && message.starts_with(crate::cluster::admission::REVOKED)
            {
                self.removal_hints.notify_one();
            }
            return Err(PeerCallError::Refused {
                addr,
                status: status.as_u16(),
                message,
            });
        }
        response
            .json()
            .await
            .map_err(|source| PeerCallError::Transport { addr, source })
    }
}

/// Builds one [`PeerConnection`] per target, all sharing the client's pool.
pub struct NetworkFactory {
    pub client: PeerClient,
}

pub struct PeerConnection {
    client: PeerClient,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerConnection {
            client: self.client.clone(),
            target,
            addr: node.peer_addr.clone(),
        }
    }
}

impl PeerConnection {
    /// Sends one Raft RPC; `entries` is the number of log entries it
    /// carries, for an AppendEntries.
    async fn raft_call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
        entries: Option<usize>,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Result<Resp, RaftError<NodeId, E>>, PeerCallError> = self
            .client
            .call(&self.addr, path, req, option.hard_ttl())
            .await;
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            // The peer refused the batch as too large: Raft sends it again
            // in halves (down to one entry) instead of retrying it as is.
            Err(PeerCallError::Refused { status: 413, .. }) if entries.is_some() => {
                let hint = (entries.unwrap_or(2) / 2).max(1) as u64;
                tracing::warn!(
                    target = self.target,
                    entries,
                    hint,
                    "the peer refused a batch of log entries as too large; sending smaller batches"
                );
                Err(RPCError::PayloadTooLarge(
                    openraft::error::PayloadTooLarge::new_entries_hint(hint),
                ))
            }
            Err(e) if e.never_sent() => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        let started = std::time::Instant::now();
        let result = self
            .raft_call("/raft/append", &rpc, &option, Some(entries))
            .await;
        if result.is_ok() {
            self.client
                .heard
                .lock()
                .unwrap()
                .insert(self.target, std::time::Instant::now());
        }
        tracing::trace!(
            target = self.target,
            entries,
            elapsed_us = started.elapsed().as_micros() as u64,
            "append_entries sent"
        );
        result
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.raft_call("/raft/snapshot", &rpc, &option, None).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.raft_call("/raft/vote", &rpc, &option, None).await
    }
}

/// A write forwarded from a follower to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardedWrite {
    pub command: serde_json::Value,
    /// The API caller's credential when the write comes from an API
    /// request; the leader authorises the write with it.
    #[serde(default)]
    pub credential: Option<crate::cluster::request_audit::Credential>,
}

/// Why a forwarded operation failed on the node that received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardFailure {
    /// The receiver is not the leader (any more); nothing was proposed.
    NotLeader { leader: Option<NodeId> },
    /// Proposed or attempted, with an unknown or failed result.
    Failed { message: String },
    /// Not allowed: nothing was proposed.
    Refused { message: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AddMemberRequest {
    pub node_id: NodeId,
    pub member: Member,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveMemberRequest {
    pub node_id: NodeId,
}

/// A member tells a node it has just been removed from the cluster.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemovedNotice {
    pub node_id: NodeId,
}

pub fn router(node: Arc<ClusterNode>, request_limit_bytes: usize) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/cluster/write", post(forwarded_write))
        .route("/cluster/read-index", post(read_index))
        .route("/cluster/add-member", post(add_member))
        .route("/cluster/remove-member", post(remove_member))
        .route("/cluster/removed", post(removed))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            crate::cluster::admission::members_only,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(request_limit_bytes))
        .with_state(node)
}

fn isolated(node: &ClusterNode) -> Option<(StatusCode, &'static str)> {
    node.peers
        .isolation
        .get()
        .then_some((StatusCode::SERVICE_UNAVAILABLE, "node is isolated"))
}

type PeerReply<T> = Result<Json<T>, (StatusCode, &'static str)>;

async fn append(
    State(node): State<Arc<ClusterNode>>,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> PeerReply<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    let entries = rpc.entries.len();
    let started = std::time::Instant::now();
    let result = node.raft.append_entries(rpc).await;
    tracing::trace!(
        entries,
        elapsed_us = started.elapsed().as_micros() as u64,
        "append_entries handled"
    );
    Ok(Json(result))
}

async fn vote(
    State(node): State<Arc<ClusterNode>>,
    Json(rpc): Json<VoteRequest<NodeId>>,
) -> PeerReply<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    Ok(Json(node.raft.vote(rpc).await))
}

async fn snapshot(
    State(node): State<Arc<ClusterNode>>,
    Json(rpc): Json<InstallSnapshotRequest<TypeConfig>>,
) -> PeerReply<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    Ok(Json(node.raft.install_snapshot(rpc).await))
}

async fn forwarded_write(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Json(req): Json<ForwardedWrite>,
) -> PeerReply<Result<Outcome, ForwardFailure>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    // `members_only` let the request in: the certificate names a member.
    let Some(from) = identity.node_cert.map(|c| c.id) else {
        return Err((StatusCode::FORBIDDEN, "the caller is not a node"));
    };
    Ok(Json(node.write_as_leader(from, req).await))
}

async fn read_index(
    State(node): State<Arc<ClusterNode>>,
) -> PeerReply<Result<Option<LogId<NodeId>>, ForwardFailure>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    Ok(Json(node.read_index_as_leader().await))
}

async fn add_member(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Json(req): Json<AddMemberRequest>,
) -> PeerReply<Result<MemberRole, ForwardFailure>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    // A joining node may only add itself (the certificate it joined with
    // names it); members may forward the request on its behalf.
    let caller = identity.node_cert.map(|c| c.id);
    let allowed =
        caller == Some(req.node_id) || node.members().iter().any(|m| caller == Some(m.id));
    if !allowed {
        return Err((StatusCode::FORBIDDEN, "a node can only ask to add itself"));
    }
    Ok(Json(
        node.add_member(req.node_id, req.member)
            .await
            .map_err(failure),
    ))
}

async fn remove_member(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Json(req): Json<RemoveMemberRequest>,
) -> PeerReply<Result<(), ForwardFailure>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    let caller = identity.node_cert.map(|c| c.id);
    if !node.members().iter().any(|m| caller == Some(m.id)) {
        return Err((
            StatusCode::FORBIDDEN,
            "only cluster members may remove members",
        ));
    }
    // A node removing itself learns it from this answer.
    let tell = caller != Some(req.node_id);
    Ok(Json(
        node.remove_member(req.node_id, tell).await.map_err(failure),
    ))
}

async fn removed(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Json(notice): Json<RemovedNotice>,
) -> PeerReply<()> {
    if notice.node_id != node.id {
        return Err((StatusCode::BAD_REQUEST, "the notice names another node"));
    }
    let by = identity.node_cert.map_or(0, |c| c.id);
    tracing::warn!(
        by,
        "a member says this node was removed; asking the other members"
    );
    node.peers.removal_hints.notify_one();
    Ok(Json(()))
}

fn failure(e: ClusterError) -> ForwardFailure {
    match e {
        ClusterError::NotLeader { leader } => ForwardFailure::NotLeader { leader },
        other => ForwardFailure::Failed {
            message: crate::error_chain(&other),
        },
    }
}
