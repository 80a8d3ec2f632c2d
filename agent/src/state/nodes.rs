//! The cluster itself and its nodes: the facts fixed at `init`, node
//! records (zone, capacity, maintenance), and single-use join tokens.

use allod_raft::{KvError, KvRead, KvWrite, NodeId};
use serde::{Deserialize, Serialize};

use super::auth::{ApiTokenRecord, TokenScope, User, ADMIN_USER};
use super::vms::VmRecord;
use super::zones::Zone;
use super::{
    domain, get_json, put_json, DomainError, ErrorCode, Outcome, ReadError, StateView, KEY_CLUSTER,
    KEY_NEXT_NODE_ID, PREFIX_API_TOKENS, PREFIX_JOIN_TOKENS, PREFIX_NODES, PREFIX_TOKEN_IDS,
    PREFIX_USERS, PREFIX_VMS,
};

/// Facts about the cluster fixed at `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub name: String,
    pub created_at_ms: u64,
    pub ca_fingerprint: String,
}

/// What the cluster remembers of a node beyond its Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub joined_at_ms: u64,
    /// The one zone this node serves (OFFICIAL: the shared pool).
    #[serde(default)]
    pub zone: Zone,
    /// What the node reported of itself; zero until it has.
    #[serde(default)]
    pub vcpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// A node in maintenance takes no new VMs.
    #[serde(default)]
    pub maintenance: bool,
    /// A drain is moving its VMs to other nodes (it is in maintenance too).
    #[serde(default)]
    pub draining: bool,
    /// The node's block store, once it has registered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<super::volumes::NodeStorage>,
    /// SHA-256 of the public key the node joined with: only a certificate
    /// for that key speaks for this node (absent in records written before
    /// keys were pinned, which trust the name alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// `in`, `down`, `out` or `draining` (see `state::storage`).
    #[serde(default)]
    #[schema(value_type = String)]
    pub storage_state: super::storage::StorageNodeState,
    /// When it last changed (milliseconds since the epoch; 0: never).
    #[serde(default)]
    pub storage_state_since_ms: u64,
    /// `healthy`, `suspect` or `dead`, as the leader's failure detection
    /// last decided (see `state::ha`).
    #[serde(default)]
    #[schema(value_type = String)]
    pub liveness: super::ha::Liveness,
    /// When it last changed (milliseconds since the epoch; 0: never).
    #[serde(default)]
    pub liveness_since_ms: u64,
    /// What an operator sees: `dead` or `suspect` when the node is, else
    /// `draining` while a drain moves its VMs, `maintenance` while it takes
    /// no new VMs, or `healthy`. Derived from the fields above whenever
    /// the record changes.
    #[serde(default)]
    #[schema(value_type = String)]
    pub health: super::ha::NodeHealth,
    /// How a migrating VM reaches this node; absent: VMs do not migrate
    /// to or from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<super::migration::Endpoint>,
}

impl NodeRecord {
    /// Brings `health` up to date with liveness and maintenance.
    pub fn refresh_health(&mut self) {
        self.health = super::ha::NodeHealth::of(self);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// The node the token was spent on, once it was.
    pub used_by: Option<NodeId>,
}

pub(super) fn init_cluster(
    kv: &mut KvWrite<'_>,
    info: ClusterInfo,
    admin_token_sha256: String,
    first_node: NodeRecord,
) -> Result<Outcome, KvError> {
    Ok({
        if kv.get(KEY_CLUSTER)?.is_some() {
            Err(domain(
                ErrorCode::FailedPrecondition,
                "the cluster is already initialised",
            ))
        } else {
            put_json(kv, KEY_CLUSTER, &info)?;
            let admin = User {
                name: ADMIN_USER.into(),
                password_phc: None,
                cluster_admin: true,
                created_at_ms: info.created_at_ms,
                disabled: false,
            };
            put_json(kv, &format!("{PREFIX_USERS}{ADMIN_USER}"), &admin)?;
            let token = ApiTokenRecord {
                id: "admin".into(),
                user: ADMIN_USER.into(),
                scope: TokenScope::Cluster,
                created_at_ms: info.created_at_ms,
                expires_at_ms: None,
            };
            put_json(
                kv,
                &format!("{PREFIX_API_TOKENS}{admin_token_sha256}"),
                &token,
            )?;
            put_json(kv, &format!("{PREFIX_TOKEN_IDS}admin"), &admin_token_sha256)?;
            put_json(
                kv,
                &format!("{PREFIX_NODES}{:020}", first_node.id),
                &first_node,
            )?;
            put_json(kv, KEY_NEXT_NODE_ID, &(first_node.id + 1))?;
            Ok(serde_json::to_value(&info).expect("serialisable"))
        }
    })
}

pub(super) fn create_join_token(
    kv: &mut KvWrite<'_>,
    id: String,
    secret_sha256: String,
    now_ms: u64,
    expires_at_ms: u64,
) -> Result<Outcome, KvError> {
    Ok({
        // Expired tokens are dropped here, so the table cannot grow
        // without bound.
        for (key, bytes) in kv.scan(PREFIX_JOIN_TOKENS)? {
            if let Ok(old) = serde_json::from_slice::<JoinTokenRecord>(&bytes) {
                if old.expires_at_ms <= now_ms {
                    kv.delete(&key)?;
                }
            }
        }
        let record = JoinTokenRecord {
            id: id.clone(),
            secret_sha256,
            created_at_ms: now_ms,
            expires_at_ms,
            used_by: None,
        };
        put_json(kv, &format!("{PREFIX_JOIN_TOKENS}{id}"), &record)?;
        Ok(serde_json::json!({ "id": id, "expires_at_ms": expires_at_ms }))
    })
}

pub(super) fn consume_join_token(
    kv: &mut KvWrite<'_>,
    id: String,
    secret_sha256: String,
    now_ms: u64,
    node_name: String,
    key_sha256: Option<String>,
) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_JOIN_TOKENS}{id}");
        match get_json::<JoinTokenRecord>(kv, &key)? {
            None => Err(domain(
                ErrorCode::TokenInvalid,
                "this join token is not known to the cluster (it was never issued here, or it expired and was removed); create a new one with `allod cluster join-token`",
            )),
            Some(record) if record.secret_sha256 != secret_sha256 => Err(domain(
                ErrorCode::TokenInvalid,
                "this join token's secret does not match; copy the whole token again or create a new one",
            )),
            Some(record) if record.used_by.is_some() => Err(domain(
                ErrorCode::TokenUsed,
                format!(
                    "this join token was already used by node {}; tokens are single-use, create a new one with `allod cluster join-token`",
                    record.used_by.unwrap_or_default()
                ),
            )),
            Some(record) if record.expires_at_ms <= now_ms => Err(domain(
                ErrorCode::TokenExpired,
                "this join token has expired; create a new one with `allod cluster join-token`",
            )),
            Some(mut record) => {
                let node_id: NodeId = get_json(kv, KEY_NEXT_NODE_ID)?.unwrap_or(2);
                put_json(kv, KEY_NEXT_NODE_ID, &(node_id + 1))?;
                record.used_by = Some(node_id);
                put_json(kv, &key, &record)?;
                let node = NodeRecord { id: node_id, name: node_name, joined_at_ms: now_ms, zone: Default::default(), vcpus: 0, memory_bytes: 0, maintenance: false, draining: false, storage: None, key_sha256, storage_state: Default::default(), storage_state_since_ms: 0, liveness: Default::default(), liveness_since_ms: 0, health: Default::default(), migration: None };
                put_json(kv, &format!("{PREFIX_NODES}{node_id:020}"), &node)?;
                Ok(serde_json::json!({ "node_id": node_id }))
            }
        }
    })
}

pub(super) fn forget_node(kv: &mut KvWrite<'_>, id: NodeId) -> Result<Outcome, KvError> {
    Ok({
        kv.delete(&format!("{PREFIX_NODES}{id:020}"))?;
        Ok(serde_json::Value::Null)
    })
}

/// Reads a node's record, lets `change` refuse or change it, stores it and
/// answers with it; an unknown node is refused.
pub(super) fn update_node(
    kv: &mut KvWrite<'_>,
    id: NodeId,
    change: impl FnOnce(
        &KvWrite<'_>,
        &mut NodeRecord,
    ) -> Result<Result<(), DomainError>, allod_raft::KvError>,
) -> Result<Outcome, allod_raft::KvError> {
    let key = format!("{PREFIX_NODES}{id:020}");
    let Some(mut node) = get_json::<NodeRecord>(kv, &key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("node {id} is not a member of this cluster"),
        )));
    };
    if let Err(refused) = change(kv, &mut node)? {
        return Ok(Err(refused));
    }
    node.refresh_health();
    put_json(kv, &key, &node)?;
    Ok(Ok(serde_json::to_value(&node).expect("serialisable")))
}

pub(super) fn set_node_zone(
    kv: &mut KvWrite<'_>,
    id: NodeId,
    zone: Zone,
) -> Result<Outcome, KvError> {
    update_node(kv, id, |kv, node| {
        // A node never hosts another zone's VMs, so it keeps its zone while
        // it holds any.
        let foreign = kv
            .scan(PREFIX_VMS)?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<VmRecord>(&v).ok())
            .filter(|vm| vm.node_id == id && vm.zone != zone)
            .count();
        if foreign > 0 {
            return Ok(Err(domain(
                ErrorCode::FailedPrecondition,
                format!(
                    "node {id} runs {foreign} VM(s) of the {} zone; move or delete them before relabelling it",
                    node.zone.as_str()
                ),
            )));
        }
        node.zone = zone;
        Ok(Ok(()))
    })
}

impl StateView {
    /// The NBD socket node `id` registered with its block store, once it
    /// has (`None` also when it is no member).
    pub fn nbd_socket(&self, id: NodeId) -> Result<Option<String>, ReadError> {
        Ok(self
            .nodes()?
            .into_iter()
            .find(|n| n.id == id)
            .and_then(|n| n.storage)
            .map(|s| s.nbd_socket)
            .filter(|s| !s.is_empty()))
    }

    pub fn join_token(&self, id: &str) -> Result<Option<JoinTokenRecord>, ReadError> {
        self.get(&format!("{PREFIX_JOIN_TOKENS}{id}"))
    }

    pub fn cluster(&self) -> Result<Option<ClusterInfo>, ReadError> {
        self.get(KEY_CLUSTER)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ReadError> {
        self.list(PREFIX_NODES)
    }

    /// Whether a certificate naming node `id` and carrying a key whose
    /// SHA-256 is `key_sha256` speaks for a member.
    pub fn node_admission(&self, id: NodeId, key_sha256: &str) -> Result<NodeAdmission, ReadError> {
        if let Some(node) = self.get::<NodeRecord>(&format!("{PREFIX_NODES}{id:020}"))? {
            return Ok(match node.key_sha256 {
                Some(pinned) if pinned != key_sha256 => NodeAdmission::Refused(format!(
                    "the certificate for node {id} carries a key other than the one node {id} joined with"
                )),
                _ => NodeAdmission::Member,
            });
        }
        let next: Option<NodeId> = self.get(KEY_NEXT_NODE_ID)?;
        Ok(match next {
            // Ids are never given out twice: one below the counter without
            // a record belongs to a node that was removed.
            Some(next) if id < next => NodeAdmission::Refused(format!(
                "node {id} was removed from the cluster; its certificate is revoked"
            )),
            _ => NodeAdmission::NotYetKnown,
        })
    }
}

/// What the cluster state says of a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAdmission {
    /// A member's certificate for the key it joined with.
    Member,
    /// Removed, or a key the node never joined with.
    Refused(String),
    /// An id this state has not seen given out: a node that joined after
    /// the state this node has applied, or a forgery.
    NotYetKnown,
}
