//! A configured node's membership in the cluster: its Raft instance, writes
//! forwarded to the leader, linearizable reads through read-index, and
//! membership changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use allod_raft::{LogStore, Member, NodeId, Raft, StateMachineStore};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, LogId, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::time::{timeout_at, Instant};

use crate::cluster::paths::{DataDir, NodeConfig};
use crate::cluster::peer::{
    AddMemberRequest, ForwardFailure, ForwardedWrite, Isolation, NetworkFactory, PeerCallError,
    PeerClient, RemoveMemberRequest,
};
use crate::cluster::pki::NodeTls;
use crate::cluster::proposer::{ProposeError, Proposer};
use crate::state::{ClusterApply, Command, DomainError, Outcome, StateView};

/// How long a write or read may wait for a leader and a quorum.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait before asking again to confirm leadership for a read
/// after a heartbeat round that did not hear from a quorum in time.
const QUORUM_RETRY: Duration = Duration::from_millis(20);
/// At most this many voters; later nodes stay learners.
pub const MAX_VOTERS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("no leader could be reached within {}s; a majority of the cluster's voters may be down or unreachable", .waited.as_secs())]
    NoLeader { waited: Duration },
    #[error("the cluster could not confirm a quorum, so the operation was refused rather than risk stale or lost data")]
    NoQuorum,
    #[error("forwarding to the leader failed")]
    Peer(#[from] PeerCallError),
    #[error("the leader refused: {message}")]
    Leader { message: String },
    /// The leader does not let the caller (or the node that forwarded the
    /// call) do this.
    #[error("{message}")]
    Refused { message: String },
    #[error("the write was not confirmed within {}s; it may still commit, so check its effect before retrying", .waited.as_secs())]
    Unconfirmed { waited: Duration },
    #[error("Raft failed: {message}")]
    Raft { message: String },
    #[error("cannot remove node {node_id}: {reason}")]
    Membership { node_id: NodeId, reason: String },
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Read(#[from] crate::state::ReadError),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the Raft log")]
    Log(#[from] allod_raft::LogStoreError),
    #[error("cannot open the cluster state")]
    State(#[from] allod_raft::StateMachineError),
    #[error("invalid Raft configuration")]
    Config(#[from] openraft::ConfigError),
    #[error("cannot build the peer TLS client")]
    Tls(#[from] crate::cluster::pki::PkiError),
    #[error("cannot build the peer HTTP client")]
    Http(#[from] reqwest::Error),
    #[error("Raft did not start")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Voter,
    Learner,
}

/// Tunables a test may shrink; defaults suit a real cluster.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    pub snapshot_after_logs: u64,
    pub logs_kept_after_snapshot: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Snapshots are sent to lagging peers in chunks of this size.
    pub snapshot_chunk_bytes: u64,
    /// The largest request the peer port accepts; a batch of log entries
    /// over it is answered 413 and sent again in smaller batches.
    pub peer_request_limit_bytes: usize,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 1_000,
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 900,
            snapshot_chunk_bytes: 3 * 1024 * 1024,
            peer_request_limit_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One member of the cluster as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemberView {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub role: MemberRole,
}

/// Where an operation this node cannot do should go: the leader it knows
/// of, if any, and its address when known.
struct NotHere {
    leader: Option<NodeId>,
    member: Option<Member>,
}

/// Decides on the leader whether a write another node forwarded may be
/// made: `credential` is what the original caller authenticated with (none
/// for the forwarding node's own work). Answers the command to propose (its
/// audit entry naming the caller as the leader resolved them), or why not.
/// The API layer implements it.
pub trait WriteAuthority: Send + Sync + 'static {
    fn authorize(
        &self,
        from: NodeId,
        credential: Option<crate::cluster::request_audit::Credential>,
        command: Command,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Command, String>> + Send + '_>>;
}

pub struct ClusterNode {
    pub id: NodeId,
    /// What this node's peer and storage clients connect with: its
    /// certificate, and only servers that are members (see `admission`).
    pub peer_client_tls: rustls::ClientConfig,
    /// Authorises forwarded writes; set once the API is built.
    pub write_authority: std::sync::OnceLock<Arc<dyn WriteAuthority>>,
    /// The members' pinned keys this node was given when it joined, for
    /// the ids its state does not know yet (see `admission`).
    pub join_pins: std::collections::BTreeMap<NodeId, String>,
    proposer: Proposer,
    /// Moves on after every applied change that can alter a token's principal.
    pub auth_generation: Arc<std::sync::atomic::AtomicU64>,
    pub config: NodeConfig,
    pub raft: Raft,
    pub state: StateView,
    pub peers: PeerClient,
    pub tls: NodeTls,
    pub data_dir: DataDir,
    /// Moves on after commits that change VMs, volumes, images or nodes.
    pub applied: Arc<tokio::sync::watch::Sender<u64>>,
    /// Catching up with the leader, and when this node last did.
    catch_up: CatchUp,
    /// When this node's Raft started.
    started: Instant,
    /// How long a quorum's acknowledgement lets the leader read without
    /// asking again (see [`Self::lease_read_log_id`]).
    lease: Duration,
    /// How long a follower refuses other candidates after hearing from its
    /// leader (openraft's leader lease: the longest election timeout).
    follower_lease: Duration,
}

/// How many voters Raft's latest membership has.
fn voter_count(raft: &Raft) -> usize {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .count()
}

/// Milliseconds on a clock that never goes back (since the process's first
/// call), for comparing moments within this process.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // Starts at 1: zero means "never" in the catch-up's records.
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// When this node was last known to have applied everything the leader had
/// committed, so that a refusal may skip a round trip that one made a
/// moment ago.
#[derive(Default)]
struct CatchUp {
    /// When ([`mono_ms`]) the last successful read index was asked for
    /// (what it proves holds from then on).
    at_ms: std::sync::atomic::AtomicU64,
    /// When the last catch-up that failed was asked for: callers that
    /// arrived before it fail at once instead of queueing for one each.
    failed_at_ms: std::sync::atomic::AtomicU64,
    /// One catch-up at a time: callers arriving during one share it.
    lock: tokio::sync::Mutex<()>,
    /// Read-index round trips made, for the metrics and the tests.
    rounds: std::sync::atomic::AtomicU64,
    /// Reads the leader answered on its lease, without a round trip.
    lease_reads: std::sync::atomic::AtomicU64,
    /// Calls this node has sent to the leader and not yet heard back on.
    forwards_in_flight: std::sync::atomic::AtomicU64,
}

impl ClusterNode {
    pub async fn start(
        data_dir: DataDir,
        config: NodeConfig,
        tls: NodeTls,
        options: &RaftOptions,
        isolation: Isolation,
    ) -> Result<Arc<Self>, StartError> {
        let log = LogStore::open(&data_dir.raft_log())?;
        let apply = Arc::new(ClusterApply::default());
        let auth_generation = apply.auth_generation.clone();
        let applied = apply.applied.clone();
        let state_machine = StateMachineStore::open(&data_dir.state_db(), apply)?;
        let state = StateView {
            reader: state_machine.reader(),
        };
        let raft_config = Config {
            cluster_name: config.cluster_id.clone(),
            heartbeat_interval: options.heartbeat_ms,
            election_timeout_min: options.election_timeout_min_ms,
            election_timeout_max: options.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_after_logs),
            max_in_snapshot_log_to_keep: options.logs_kept_after_snapshot,
            install_snapshot_timeout: 2_000,
            snapshot_max_chunk_size: options.snapshot_chunk_bytes,
            ..Default::default()
        }
        .validate()?;
        // Servers are checked against this node's state once it exists.
        let me: Arc<std::sync::OnceLock<std::sync::Weak<ClusterNode>>> = Arc::default();
        let check_me = me.clone();
        let peer_client_tls = tls.member_client_config(Arc::new(move |der: &[u8]| {
            match check_me.get().and_then(std::sync::Weak::upgrade) {
                Some(node) => crate::cluster::admission::NodeCert::from_der(der)
                    .ok_or_else(|| "the server's certificate does not name a node".to_string())
                    .and_then(|cert| node.judge_node_cert(&cert, true)),
                // Starting: nothing has been sent yet.
                None => Ok(()),
            }
        }))?;
        let peers = PeerClient::new(peer_client_tls.clone(), isolation)?;
        let network = NetworkFactory {
            client: peers.clone(),
        };
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log,
            state_machine,
        )
        .await?;
        let proposer = Proposer::spawn(raft.clone());
        let follower_lease = Duration::from_millis(options.election_timeout_max_ms);
        if voter_count(&raft) > 1 {
            // Before this restart this node may have promised a leader not
            // to elect another for `follower_lease`; openraft forgets such
            // promises across a restart, so it keeps them here by standing
            // for election only once any of them has run out (and the vote
            // handler refuses to vote until then).
            raft.runtime_config().elect(false);
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(follower_lease).await;
                raft.runtime_config().elect(true);
            });
        }
        let join_pins = std::fs::read_to_string(data_dir.join_pins())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let node = Arc::new(Self {
            peer_client_tls,
            id: config.node_id,
            write_authority: std::sync::OnceLock::new(),
            join_pins,
            proposer,
            auth_generation,
            config,
            raft,
            state,
            peers,
            tls,
            data_dir,
            applied,
            catch_up: CatchUp::default(),
            started: Instant::now(),
            lease: Duration::from_millis(options.election_timeout_min_ms),
            follower_lease,
        });
        let _ = me.set(Arc::downgrade(&node));
        Ok(node)
    }

    pub fn member(&self) -> Member {
        Member {
            name: self.config.name.clone(),
            api_addr: self.config.api_addr.clone(),
            peer_addr: self.config.peer_addr.clone(),
        }
    }

    /// Makes this node the single voter of a new cluster.
    pub async fn initialize_single(&self) -> Result<(), ClusterError> {
        let members = [(self.id, self.member())]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ClusterError::Raft {
                message: e.to_string(),
            })?;
        self.raft
            .wait(Some(OPERATION_TIMEOUT))
            .current_leader(self.id, "single-node cluster elects itself")
            .await
            .map_err(|_| ClusterError::NoLeader {
                waited: OPERATION_TIMEOUT,
            })?;
        Ok(())
    }

    /// This node's record as this node has applied it (`None` before its
    /// join is applied here, or when the state cannot be read).
    pub fn own_record(&self) -> Option<crate::state::nodes::NodeRecord> {
        self.state
            .nodes()
            .ok()?
            .into_iter()
            .find(|n| n.id == self.id)
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Node `id` as Raft's latest membership names it, if it does.
    pub fn member_of(&self, id: NodeId) -> Option<Member> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// Waits (briefly) until the known leader differs from `previous`.
    async fn await_leader_change(&self, previous: Option<NodeId>, deadline: Instant) {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(300));
        let _changed = self
            .raft
            .wait(Some(wait))
            .metrics(move |m| m.current_leader != previous, "leader change")
            .await;
    }

    /// Commits `command` through Raft from any node, forwarding to the
    /// leader when needed, and returns its outcome.
    pub async fn write(&self, command: &Command) -> Result<Outcome, ClusterError> {
        // Inside an API request, the first write carries the request's audit
        // entry, so the change and its record commit together.
        let text = match crate::cluster::request_audit::take_request_context() {
            Some(audit) => serde_json::to_vec(&Command::Audited {
                command: Box::new(command.clone()),
                audit,
            }),
            None => serde_json::to_vec(command),
        }
        .expect("commands serialise");
        let started = Instant::now();
        let deadline = started + OPERATION_TIMEOUT;
        let forwarded = ForwardedWrite {
            command: allod_raft::Command(text.clone()),
            credential: crate::cluster::request_audit::current_credential(),
        };
        let result = self
            .via_leader(
                deadline,
                "/cluster/write",
                &forwarded,
                None,
                || {
                    let text = text.clone();
                    async move {
                        match timeout_at(deadline, self.proposer.propose(text)).await {
                            Err(_) => Ok(Err(ClusterError::Unconfirmed {
                                waited: OPERATION_TIMEOUT,
                            })),
                            Ok(Ok(outcome)) => Ok(Ok(outcome)),
                            Ok(Err(ProposeError::ForwardToLeader {
                                leader_id,
                                leader_node,
                            })) => Err(NotHere {
                                leader: leader_id,
                                member: leader_node,
                            }),
                            Ok(Err(ProposeError::Failed { message })) => {
                                Ok(Err(ClusterError::Raft { message }))
                            }
                        }
                    }
                },
                |outcome: crate::cluster::peer::WireOutcome| outcome.map(|value| value.0),
                |message| ClusterError::Leader { message },
            )
            .await;
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "write done"
        );
        result
    }

    /// The leader's side of a write forwarded by node `from`: authorised
    /// again here (see [`WriteAuthority`]), never forwarded again.
    pub async fn write_as_leader(
        &self,
        from: NodeId,
        forwarded: ForwardedWrite,
    ) -> Result<Outcome, ForwardFailure> {
        if self.leader() != Some(self.id) {
            return Err(ForwardFailure::NotLeader {
                leader: self.leader(),
            });
        }
        let command: Command =
            serde_json::from_slice(&forwarded.command.0).map_err(|e| ForwardFailure::Refused {
                message: format!("the forwarded command does not parse: {e}"),
            })?;
        let Some(authority) = self.write_authority.get() else {
            return Err(ForwardFailure::Failed {
                message: "the leader is still starting; retry".into(),
            });
        };
        let command = authority
            .authorize(from, forwarded.credential, command)
            .await
            .map_err(|message| {
                tracing::warn!(from, %message, "refused a forwarded write");
                ForwardFailure::Refused { message }
            })?;
        let command = serde_json::to_vec(&command).expect("commands serialise");
        match tokio::time::timeout(OPERATION_TIMEOUT, self.proposer.propose(command)).await {
            Err(_) => Err(ForwardFailure::Failed {
                message: "the write did not commit in time (no quorum?)".into(),
            }),
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(ProposeError::ForwardToLeader { leader_id, .. })) => {
                Err(ForwardFailure::NotLeader { leader: leader_id })
            }
            Ok(Err(ProposeError::Failed { message })) => Err(ForwardFailure::Failed { message }),
        }
    }

    /// The leader's side of read-index: confirms leadership with a quorum
    /// and returns the log id a follower must have applied before reading.
    pub async fn read_index_as_leader(&self) -> Result<Option<LogId<NodeId>>, ForwardFailure> {
        match self
            .confirmed_read_log_id(Instant::now() + OPERATION_TIMEOUT)
            .await
        {
            Err(_) => Err(ForwardFailure::Failed {
                message: "leadership could not be confirmed in time".into(),
            }),
            Ok(Ok(read_log_id)) => Ok(read_log_id),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(ForwardFailure::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Err(e)) => Err(ForwardFailure::Failed {
                message: e.to_string(),
            }),
        }
    }

    /// The read index, asked of openraft as the leader until `deadline`.
    /// openraft 0.9 confirms leadership with one heartbeat round whose
    /// answers must come within the heartbeat interval: under load a round
    /// can miss by a little, which says nothing of the quorum, so a round
    /// that missed is asked again.
    async fn confirmed_read_log_id(
        &self,
        deadline: Instant,
    ) -> Result<
        Result<Option<LogId<NodeId>>, RaftError<NodeId, CheckIsLeaderError<NodeId, Member>>>,
        tokio::time::error::Elapsed,
    > {
        if let Some(read_log_id) = self.lease_read_log_id() {
            self.catch_up
                .lease_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Ok(Some(read_log_id)));
        }
        loop {
            match timeout_at(deadline, self.raft.get_read_log_id()).await {
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))))
                    if Instant::now() + QUORUM_RETRY < deadline =>
                {
                    tokio::time::sleep(QUORUM_RETRY).await;
                }
                other => return other.map(|r| r.map(|(read_log_id, _applied)| read_log_id)),
            }
        }
    }

    /// Whether this node holds back its vote: for a while after it starts
    /// (see `start`), since it may have promised a leader before.
    pub fn votes_withheld(&self) -> bool {
        self.started.elapsed() < self.follower_lease
    }

    /// On the leader, the log id a linearizable read must wait for when its
    /// lease answers for its leadership; `None` when only a round trip can.
    /// The lease (openraft 0.9 has none for reads; it has the follower's
    /// half): a follower that took an AppendEntries as its leader's refuses
    /// to vote for anyone else for `follower_lease` after it arrived, and
    /// stands for election only later still (and, after a restart, this
    /// node keeps both rules, see `start`). So once a quorum of voters took
    /// AppendEntries sent at or after moment T in this term, no other
    /// leader can exist before T + `follower_lease`. The leader reads on
    /// its lease until T + `lease`, which is shorter (the shortest election
    /// timeout), leaving the difference for clock rate drift.
    ///
    /// What the read must then wait for is the commit index: the entry a
    /// quorum of voters holds (from the replication metrics, which are
    /// published before any later message is handled, so before any reader
    /// elsewhere could have learnt a higher one), and it must be this
    /// leader's own (openraft may elect two leaders in one term, the later
    /// winning; before its own entry commits, earlier ones may not be known
    /// to be committed yet). Joint memberships take the round trip.
    pub fn lease_read_log_id(&self) -> Option<LogId<NodeId>> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != openraft::ServerState::Leader || metrics.current_leader != Some(self.id)
        {
            return None;
        }
        let term = metrics.current_term;
        let configs = metrics.membership_config.membership().get_joint_config();
        let [voters] = configs.as_slice() else {
            return None;
        };
        let quorum = voters.len() / 2 + 1;
        if self.quorum_acked_age(voters, term)? >= self.lease {
            return None;
        }
        let replication = metrics.replication.as_ref()?;
        let mut matched: Vec<Option<LogId<NodeId>>> = voters
            .iter()
            .map(|v| replication.get(v).copied().flatten())
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let committed = matched[quorum - 1]?;
        (metrics.vote.is_committed() && committed.leader_id == *metrics.vote.leader_id())
            .then_some(committed)
    }

    /// Calls (writes, reads' index, membership changes) this node has sent
    /// to the leader and awaits the answer of.
    pub fn forwards_in_flight(&self) -> u64 {
        self.catch_up
            .forwards_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads this node answered on its leader lease since it started.
    pub fn lease_reads(&self) -> u64 {
        self.catch_up
            .lease_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns once this node's state machine reflects every write committed
    /// before the call: after this, local reads are linearizable.
    pub async fn linearizable_read(&self) -> Result<(), ClusterError> {
        let asked_ms = mono_ms();
        self.catch_up
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.read_index().await {
            Ok(()) => {
                self.catch_up
                    .at_ms
                    .fetch_max(asked_ms, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.catch_up
                    .failed_at_ms
                    .fetch_max(asked_ms, std::sync::atomic::Ordering::Release);
                Err(e)
            }
        }
    }

    /// Makes sure this node has applied everything committed before
    /// `arrived_ms` (a linearizable read for a request that arrived then),
    /// or, when `max_age` is not zero, everything committed before some
    /// moment within the last `max_age`. Callers arriving while a catch-up
    /// is under way wait for the next one and share it, so many requests
    /// cost one round trip at a time, and with `max_age` one per `max_age`.
    pub async fn caught_up_since(
        &self,
        arrived_ms: u64,
        max_age: Duration,
    ) -> Result<(), ClusterError> {
        let fresh = || {
            let at = self
                .catch_up
                .at_ms
                .load(std::sync::atomic::Ordering::Acquire);
            at > arrived_ms || mono_ms().saturating_sub(at) < max_age.as_millis() as u64
        };
        if fresh() {
            return Ok(());
        }
        let _one_at_a_time = self.catch_up.lock.lock().await;
        if fresh() {
            return Ok(());
        }
        // One that failed after this caller arrived answers for it too.
        let failed = self
            .catch_up
            .failed_at_ms
            .load(std::sync::atomic::Ordering::Acquire);
        if failed > arrived_ms {
            return Err(ClusterError::NoQuorum);
        }
        self.linearizable_read().await
    }

    /// Read-index round trips this node has made since it started.
    pub fn read_index_rounds(&self) -> u64 {
        self.catch_up
            .rounds
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn read_index(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        let read_log_id: Option<LogId<NodeId>> = self
            .via_leader(
                deadline,
                "/cluster/read-index",
                &(),
                None,
                || async move {
                    match self.confirmed_read_log_id(deadline).await {
                        Err(_) => Ok(Err(ClusterError::NoQuorum)),
                        Ok(Ok(read_log_id)) => Ok(Ok(read_log_id)),
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                            forward,
                        )))) => Err(NotHere {
                            leader: forward.leader_id,
                            member: forward.leader_node,
                        }),
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                            Ok(Err(ClusterError::NoQuorum))
                        }
                        Ok(Err(e)) => Ok(Err(ClusterError::Raft {
                            message: e.to_string(),
                        })),
                    }
                },
                |read_log_id| read_log_id,
                |_| ClusterError::NoQuorum,
            )
            .await?;
        // Here or on the leader, the state is current once this node has
        // applied the read index.
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(read_log_id.map(|l| l.index), "read index")
            .await
            .map_err(|_| ClusterError::NoQuorum)?;
        Ok(())
    }

    /// Runs an operation only the leader may do: `local` tries it here and
    /// says where the leader is when this node does not lead; the operation
    /// then goes to the leader's peer port at `path` (for `peer_timeout`, or
    /// until the deadline). "Not the leader" there, or a call that provably
    /// never left this node, waits for a new leader and tries again; any
    /// other failure is final, so an operation that may have happened is
    /// never sent twice. Write, linearizable read and membership changes all
    /// go through here.
    #[allow(clippy::too_many_arguments)]
    async fn via_leader<T, R, Fut>(
        &self,
        deadline: Instant,
        path: &str,
        body: &impl Serialize,
        peer_timeout: Option<Duration>,
        mut local: impl FnMut() -> Fut,
        from_leader: impl Fn(R) -> T,
        leader_failed: impl Fn(String) -> ClusterError,
    ) -> Result<T, ClusterError>
    where
        R: serde::de::DeserializeOwned,
        Fut: std::future::Future<Output = Result<Result<T, ClusterError>, NotHere>>,
    {
        loop {
            let not_here = match local().await {
                Ok(result) => return result,
                Err(not_here) => not_here,
            };
            let leader = not_here.leader;
            let member = not_here
                .member
                .or_else(|| leader.and_then(|l| self.member_of(l)));
            match member {
                Some(member) if leader != Some(self.id) => {
                    let timeout = peer_timeout
                        .unwrap_or_else(|| deadline.saturating_duration_since(Instant::now()));
                    let in_flight = &self.catch_up.forwards_in_flight;
                    in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let reply: Result<Result<R, ForwardFailure>, PeerCallError> = self
                        .peers
                        .call(&member.peer_addr, path, body, timeout)
                        .await;
                    in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    match reply {
                        Ok(Ok(value)) => return Ok(from_leader(value)),
                        Ok(Err(ForwardFailure::NotLeader { .. })) => {
                            self.await_leader_change(leader, deadline).await
                        }
                        Ok(Err(ForwardFailure::Failed { message })) => {
                            return Err(leader_failed(message))
                        }
                        Ok(Err(ForwardFailure::Refused { message })) => {
                            return Err(ClusterError::Refused { message })
                        }
                        Err(e) if e.never_sent() => {
                            self.await_leader_change(leader, deadline).await
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                _ => self.await_leader_change(leader, deadline).await,
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NoLeader {
                    waited: OPERATION_TIMEOUT,
                });
            }
        }
    }

    pub fn members(&self) -> Vec<MemberView> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, member)| MemberView {
                id: *id,
                name: member.name.clone(),
                api_addr: member.api_addr.clone(),
                peer_addr: member.peer_addr.clone(),
                role: if voters.contains(id) {
                    MemberRole::Voter
                } else {
                    MemberRole::Learner
                },
            })
            .collect()
    }

    /// On the leader: how many log entries each member is behind (`None`
    /// for a member it has not heard from). Empty on other nodes.
    pub fn replication_lag(&self) -> std::collections::BTreeMap<NodeId, Option<u64>> {
        let metrics = self.raft.metrics().borrow().clone();
        let last = metrics.last_log_index.unwrap_or(0);
        metrics
            .replication
            .map(|replication| {
                replication
                    .into_iter()
                    .map(|(id, matched)| (id, matched.map(|m| last.saturating_sub(m.index))))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs a membership operation on the leader: here if this node leads,
    /// otherwise on the leader through the peer port.
    async fn on_leader<T, F, Fut>(
        &self,
        path: &str,
        body: &impl Serialize,
        local: F,
    ) -> Result<T, ClusterError>
    where
        T: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClusterError>>,
    {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        // Membership changes wait for a learner to catch up, so the leader
        // gets a generous deadline.
        self.via_leader(
            deadline,
            path,
            body,
            Some(Duration::from_secs(120)),
            || async {
                match self.leader() {
                    Some(l) if l == self.id => match local().await {
                        Err(ClusterError::NotLeader { leader }) => Err(NotHere {
                            leader,
                            member: None,
                        }),
                        other => Ok(other),
                    },
                    leader => Err(NotHere {
                        leader,
                        member: None,
                    }),
                }
            },
            |value| value,
            |message| ClusterError::Leader { message },
        )
        .await
    }

    /// Adds a node as a learner, waits for it to catch up, and promotes it
    /// to voter while there are fewer than [`MAX_VOTERS`] voters.
    pub async fn add_member(
        &self,
        node_id: NodeId,
        member: Member,
    ) -> Result<MemberRole, ClusterError> {
        let request = AddMemberRequest {
            node_id,
            member: member.clone(),
        };
        self.on_leader("/cluster/add-member", &request, || {
            self.add_member_locally(node_id, member.clone())
        })
        .await
    }

    async fn add_member_locally(
        &self,
        node_id: NodeId,
        member: Member,
    ) -> Result<MemberRole, ClusterError> {
        let map_err = |e: RaftError<NodeId, ClientWriteError<NodeId, Member>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader {
                leader: f.leader_id,
            },
            other => ClusterError::Raft {
                message: other.to_string(),
            },
        };
        self.raft
            .add_learner(node_id, member, true)
            .await
            .map_err(map_err)?;
        if voter_count(&self.raft) >= MAX_VOTERS {
            return Ok(MemberRole::Learner);
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([node_id].into()), false)
            .await
            .map_err(map_err)?;
        Ok(MemberRole::Voter)
    }

    /// Removes a node from the cluster; if it was a voter and a learner is
    /// waiting, the learner takes its place.
    /// Its record goes with it, which revokes its certificate (see
    /// `admission`); the node is then told, so that, once most members
    /// confirm it, it wipes its keys (a node that is down hears it from the
    /// members that refuse it when it is back).
    /// `tell`: whether to tell the node (not when it is the one asking,
    /// through a follower: it learns from the answer, and a notice racing
    /// that answer could have it wipe itself before the answer arrives).
    pub async fn remove_member(&self, node_id: NodeId, tell: bool) -> Result<(), ClusterError> {
        let peer_addr = self.member_of(node_id).map(|m| m.peer_addr);
        let request = RemoveMemberRequest { node_id };
        let here = std::sync::atomic::AtomicBool::new(false);
        self.on_leader("/cluster/remove-member", &request, || async {
            self.remove_member_locally(node_id).await?;
            here.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
        .await?;
        let here = here.load(std::sync::atomic::Ordering::Relaxed);
        if here {
            // Otherwise the leader did it (its peer handler runs this very
            // function), telling the node unless the node asked.
            self.write(&Command::ForgetNode { id: node_id })
                .await?
                .map_err(ClusterError::from)?;
        }
        if node_id == self.id {
            self.mark_removed("this node removed itself from the cluster".into());
        } else if let Some(addr) = peer_addr.filter(|_| here && tell) {
            let notice = crate::cluster::peer::RemovedNotice { node_id };
            let told: Result<(), PeerCallError> = self
                .peers
                .call(&addr, "/cluster/removed", &notice, Duration::from_secs(5))
                .await;
            if let Err(e) = told {
                tracing::warn!(node_id, error = %crate::error_chain(&e), "cannot tell the removed node; it learns it when a member next refuses it");
            }
        }
        Ok(())
    }

    async fn remove_member_locally(&self, node_id: NodeId) -> Result<(), ClusterError> {
        let map_err = |e: RaftError<NodeId, ClientWriteError<NodeId, Member>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader {
                leader: f.leader_id,
            },
            other => ClusterError::Raft {
                message: other.to_string(),
            },
        };
        let membership = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let mut voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.remove(&node_id) {
            if voters.is_empty() {
                return Err(ClusterError::Membership {
                    node_id,
                    reason: "it is the only voter; the cluster would have no members left".into(),
                });
            }
            if voters.len() < MAX_VOTERS {
                if let Some(learner) = membership.learner_ids().find(|l| *l != node_id) {
                    voters.insert(learner);
                }
            }
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
                .await
                .map_err(map_err)?;
        } else if membership.get_node(&node_id).is_some() {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes([node_id].into()), false)
                .await
                .map_err(map_err)?;
        } else {
            return Err(ClusterError::Membership {
                node_id,
                reason: "it is not a member of this cluster".into(),
            });
        }
        Ok(())
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not shut down cleanly");
        }
    }
}
