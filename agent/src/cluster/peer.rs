//! Node-to-node RPC: Raft's messages and the few cluster operations that must
//! run on the leader (forwarded writes, read index, membership changes), over
//! HTTPS with mutual TLS.
//!
//! Each node holds one HTTP/2 connection to each peer (negotiated by ALPN),
//! and every call to that peer is a stream on it: a forwarded write does not
//! wait for a connection of its own, nor queue behind AppendEntries. Bodies
//! are postcard ([`allod_raft::codec`] has the encoding and the rule for
//! clusters of mixed versions); a peer that speaks only JSON over HTTP/1.1
//! (an earlier Allod) is still understood and answered in kind.
//!
//! The server side is an axum router mounted on the peer port, whose TLS
//! configuration refuses any client without a certificate from the cluster
//! CA. The client side implements openraft's `RaftNetwork`.

use std::sync::Arc;
use std::time::Duration;

use allod_raft::codec::PEER_CONTENT_TYPE;
use allod_raft::{Member, NodeId, TypeConfig};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
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
    /// The peer answered something this node cannot read.
    #[error("peer {addr} answered in a form this node cannot read: {reason}")]
    Garbled { addr: String, reason: String },
}

impl PeerCallError {
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            PeerCallError::Connect { .. } | PeerCallError::Isolated
        )
    }
}

/// How long a node speaks JSON to a peer that refused the binary encoding
/// (an earlier version) before trying it again.
const JSON_FALLBACK_FOR: Duration = Duration::from_secs(60);

/// The HTTPS client every peer call goes through.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    /// Peers (by address) that refused the binary encoding, and when.
    json_only: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
    /// When each peer last took an AppendEntries of this node as its
    /// leader's: the term and the moment the request was sent. The leader
    /// lease is built on it (see `ClusterNode::lease_read_log_id`).
    acked: Arc<std::sync::Mutex<std::collections::HashMap<NodeId, (u64, std::time::Instant)>>>,
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
    /// When this node last took an AppendEntries (a heartbeat included)
    /// from a leader it did not refuse: self-fencing reads it.
    leader_contact: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
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

    /// How long ago this node last took an AppendEntries from a leader.
    pub fn since_leader_contact(&self) -> Option<Duration> {
        self.leader_contact.lock().unwrap().map(|at| at.elapsed())
    }

    /// When `node` last accepted an AppendEntries this node sent as leader
    /// of `term`: the moment it was sent.
    pub fn acked_at(&self, node: NodeId, term: u64) -> Option<std::time::Instant> {
        self.acked
            .lock()
            .unwrap()
            .get(&node)
            .filter(|(t, _)| *t == term)
            .map(|(_, at)| *at)
    }

    pub fn new(
        mut tls: rustls::ClientConfig,
        isolation: Isolation,
    ) -> Result<Self, reqwest::Error> {
        // HTTP/2 where the peer offers it (every peer of this version), so
        // that all calls to it share one connection; HTTP/1.1 otherwise.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            // A whole batch of entries or a snapshot chunk in flight
            // without waiting for window updates.
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(16 << 20)
            // A connection whose peer vanished is noticed and replaced.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(true)
            .build()?;
        Ok(Self {
            http,
            json_only: Arc::default(),
            acked: Arc::default(),
            isolation,
            removed: Arc::new(tokio::sync::watch::channel(None).0),
            removal_hints: Arc::new(tokio::sync::Notify::new()),
            heard: Arc::default(),
            leader_contact: Arc::default(),
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
        let json = self
            .json_only
            .lock()
            .unwrap()
            .get(peer_addr)
            .is_some_and(|since| since.elapsed() < JSON_FALLBACK_FOR);
        let encoding = if json {
            Encoding::Json
        } else {
            Encoding::Binary
        };
        match self.call_in(encoding, peer_addr, path, body, timeout).await {
            // An earlier version: nothing was done; ask again in JSON.
            Err(PeerCallError::Refused { status: 415, .. }) if encoding == Encoding::Binary => {
                tracing::info!(
                    peer = peer_addr,
                    "the peer does not speak the binary encoding; using JSON with it"
                );
                self.json_only
                    .lock()
                    .unwrap()
                    .insert(peer_addr.to_string(), std::time::Instant::now());
                self.call_in(Encoding::Json, peer_addr, path, body, timeout)
                    .await
            }
            other => other,
        }
    }

    async fn call_in<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        encoding: Encoding,
        peer_addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerCallError> {
        let addr = peer_addr.to_string();
        let garbled = |reason: String| PeerCallError::Garbled {
            addr: addr.clone(),
            reason,
        };
        let (bytes, content_type) = encoding
            .encode(body)
            .map_err(|e| garbled(format!("cannot encode the request: {e}")))?;
        let response = self
            .http
            .post(format!("https://{peer_addr}{path}"))
            .header(header::CONTENT_TYPE, content_type)
            .body(bytes)
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
        let answered_in = Encoding::of(response.headers().get(header::CONTENT_TYPE));
        let bytes = response
            .bytes()
            .await
            .map_err(|source| PeerCallError::Transport {
                addr: addr.clone(),
                source,
            })?;
        match answered_in {
            Some(encoding) => encoding.decode(&bytes).map_err(garbled),
            None => Err(garbled("no known content type".into())),
        }
    }
}

/// How a peer message is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// postcard, as [`PEER_CONTENT_TYPE`].
    Binary,
    /// JSON, as every version of Allod speaks.
    Json,
}

impl Encoding {
    fn of(content_type: Option<&axum::http::HeaderValue>) -> Option<Self> {
        let content_type = content_type?.to_str().ok()?;
        if content_type == PEER_CONTENT_TYPE {
            Some(Encoding::Binary)
        } else if content_type.starts_with("application/json") {
            Some(Encoding::Json)
        } else {
            None
        }
    }

    fn encode<T: Serialize>(self, message: &T) -> Result<(Vec<u8>, &'static str), String> {
        match self {
            Encoding::Binary => allod_raft::codec::to_wire(message)
                .map(|b| (b, PEER_CONTENT_TYPE))
                .map_err(|e| crate::error_chain(&e)),
            Encoding::Json => serde_json::to_vec(message)
                .map(|b| (b, "application/json"))
                .map_err(|e| e.to_string()),
        }
    }

    fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Binary => {
                allod_raft::codec::from_wire(bytes).map_err(|e| crate::error_chain(&e))
            }
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

/// A peer message in a request, and the same encoding for the answer.
pub struct Wire<T>(pub Encoding, pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Wire<T> {
    type Rejection = (StatusCode, String);

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Some(encoding) = Encoding::of(req.headers().get(header::CONTENT_TYPE)) else {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("a peer message is {PEER_CONTENT_TYPE} or application/json"),
            ));
        };
        // Over the body limit: 413, which a sender of entries takes as a
        // cue to send fewer at a time.
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| (e.status(), e.body_text()))?;
        let message = encoding.decode(&bytes).map_err(|reason| {
            (
                StatusCode::BAD_REQUEST,
                format!("the peer message does not parse: {reason}"),
            )
        })?;
        Ok(Wire(encoding, message))
    }
}

impl<T: Serialize> IntoResponse for Wire<T> {
    fn into_response(self) -> Response {
        match self.0.encode(&self.1) {
            Ok((bytes, content_type)) => {
                ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
            }
            Err(reason) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the answer: {reason}"),
            )
                .into_response(),
        }
    }
}

/// A JSON value inside a peer message: the document itself in JSON (as
/// earlier versions sent it), its text in the binary encoding (which cannot
/// carry a schema-less value).
#[derive(Debug, Clone, PartialEq)]
pub struct JsonValue(pub serde_json::Value);

impl Serialize for JsonValue {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.0.serialize(serializer)
        } else {
            let text = serde_json::to_vec(&self.0).map_err(serde::ser::Error::custom)?;
            serializer.serialize_bytes(&text)
        }
    }
}

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            serde_json::Value::deserialize(deserializer).map(JsonValue)
        } else {
            let text = allod_raft::Command::deserialize(deserializer)?;
            serde_json::from_slice(&text.0)
                .map(JsonValue)
                .map_err(serde::de::Error::custom)
        }
    }
}

/// A command's outcome as it crosses between peers.
pub type WireOutcome = Result<JsonValue, crate::state::DomainError>;

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
        let term = rpc.vote.leader_id().term;
        let as_leader = rpc.vote.is_committed();
        let started = std::time::Instant::now();
        let result: Result<AppendEntriesResponse<NodeId>, _> = self
            .raft_call("/raft/append", &rpc, &option, Some(entries))
            .await;
        if let Ok(answer) = &result {
            self.client
                .heard
                .lock()
                .unwrap()
                .insert(self.target, std::time::Instant::now());
            // Any answer but a higher vote means the peer took this node as
            // its leader when the request arrived, which is after `started`:
            // from then, it refuses other candidates for its lease.
            if as_leader && !matches!(answer, AppendEntriesResponse::HigherVote(_)) {
                let mut acked = self.client.acked.lock().unwrap();
                let newer = acked
                    .get(&self.target)
                    .is_none_or(|(t, at)| (*t, *at) < (term, started));
                if newer {
                    acked.insert(self.target, (term, started));
                }
            }
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
    /// The command's JSON text, proposed by the leader once authorised.
    pub command: allod_raft::Command,
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

type PeerReply<T> = Result<Wire<T>, (StatusCode, &'static str)>;

async fn append(
    State(node): State<Arc<ClusterNode>>,
    Wire(encoding, rpc): Wire<AppendEntriesRequest<TypeConfig>>,
) -> PeerReply<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    let entries = rpc.entries.len();
    let started = std::time::Instant::now();
    let result = node.raft.append_entries(rpc).await;
    if result
        .as_ref()
        .is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_)))
    {
        *node.peers.leader_contact.lock().unwrap() = Some(std::time::Instant::now());
    }
    tracing::trace!(
        entries,
        elapsed_us = started.elapsed().as_micros() as u64,
        "append_entries handled"
    );
    Ok(Wire(encoding, result))
}

async fn vote(
    State(node): State<Arc<ClusterNode>>,
    Wire(encoding, rpc): Wire<VoteRequest<NodeId>>,
) -> PeerReply<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    if node.votes_withheld() {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "this node restarted moments ago and votes only once a leader's lease it may have granted has run out",
        ));
    }
    Ok(Wire(encoding, node.raft.vote(rpc).await))
}

async fn snapshot(
    State(node): State<Arc<ClusterNode>>,
    Wire(encoding, rpc): Wire<InstallSnapshotRequest<TypeConfig>>,
) -> PeerReply<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    Ok(Wire(encoding, node.raft.install_snapshot(rpc).await))
}

async fn forwarded_write(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Wire(encoding, req): Wire<ForwardedWrite>,
) -> PeerReply<Result<WireOutcome, ForwardFailure>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    // `members_only` let the request in: the certificate names a member.
    let Some(from) = identity.node_cert.map(|c| c.id) else {
        return Err((StatusCode::FORBIDDEN, "the caller is not a node"));
    };
    let outcome = node.write_as_leader(from, req).await;
    Ok(Wire(encoding, outcome.map(|o| o.map(JsonValue))))
}

async fn read_index(
    State(node): State<Arc<ClusterNode>>,
    Wire(encoding, ()): Wire<()>,
) -> PeerReply<Result<Option<LogId<NodeId>>, ForwardFailure>> {
    if let Some(refusal) = isolated(&node) {
        return Err(refusal);
    }
    Ok(Wire(encoding, node.read_index_as_leader().await))
}

async fn add_member(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Wire(encoding, req): Wire<AddMemberRequest>,
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
    Ok(Wire(
        encoding,
        node.add_member(req.node_id, req.member)
            .await
            .map_err(failure),
    ))
}

async fn remove_member(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Wire(encoding, req): Wire<RemoveMemberRequest>,
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
    Ok(Wire(
        encoding,
        node.remove_member(req.node_id, tell).await.map_err(failure),
    ))
}

async fn removed(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    Wire(encoding, notice): Wire<RemovedNotice>,
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
    Ok(Wire(encoding, ()))
}

fn failure(e: ClusterError) -> ForwardFailure {
    match e {
        ClusterError::NotLeader { leader } => ForwardFailure::NotLeader { leader },
        other => ForwardFailure::Failed {
            message: crate::error_chain(&other),
        },
    }
}
