//! The cluster, its nodes, joining, zones and the audit log.

use crate::api_types::{AuditFormat, SetZone};
use std::sync::Arc;

use crate::api::{outcome_as, parse_zone, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::cluster::join::{sha256_hex, JoinRequest, JoinResponse};
use crate::cluster::node::{ClusterNode, MemberView};
use crate::state::audit::AuditEntry;
use crate::state::nodes::NodeRecord;
use crate::state::zones::ZonePolicy;
use crate::state::{validate_name, Command};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

#[utoipa::path(get, path = "/v1/cluster/ca", tag = "cluster",
    responses((status = 200, description = "The cluster CA certificate (PEM)", body = String, content_type = "application/x-pem-file")))]
pub(super) async fn ca_certificate(State(node): State<Arc<ClusterNode>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        node.tls.ca_pem.clone(),
    )
        .into_response()
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct ClusterView {
    pub cluster_id: String,
    pub name: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub node_id: u64,
    /// The index of the last Raft log entry this node applied.
    pub applied_index: u64,
    pub members: Vec<MemberView>,
}

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "The cluster, its leader and members", body = ClusterView)))]
pub(super) async fn cluster(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<ClusterView>> {
    crate::api::consistency::read_barrier(&node).await?;
    let info = node.state.cluster()?;
    let metrics = node.raft.metrics().borrow().clone();
    Ok(Json(ClusterView {
        cluster_id: node.config.cluster_id.clone(),
        name: info.map(|i| i.name).unwrap_or_default(),
        leader_id: metrics.current_leader,
        term: metrics.current_term,
        node_id: node.id,
        applied_index: metrics.last_applied.map_or(0, |l| l.index),
        members: node.members(),
    }))
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub role: crate::cluster::node::MemberRole,
    pub is_leader: bool,
    pub joined_at_ms: Option<u64>,
    pub zone: crate::state::zones::Zone,
    /// Capacity the node reported (0 until it has).
    pub vcpus: u64,
    pub memory_bytes: u64,
    /// The node's block store: address, capacity, use, failure domain
    /// (absent until it has registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::state::volumes::NodeStorage>,
    /// `healthy`, `suspect` or `dead` as the leader's failure detection
    /// sees it, else `draining` or `maintenance`.
    #[schema(value_type = String)]
    pub health: crate::state::ha::NodeHealth,
    /// When its liveness last changed (milliseconds since the epoch; 0:
    /// never).
    pub health_since_ms: u64,
    /// It takes no new VMs.
    pub maintenance: bool,
    /// VMs placed on it.
    pub vms: u64,
    /// Of those, VMs a drain is moving elsewhere.
    pub vms_moving: u64,
    /// `in`, `down`, `out` or `draining` (see `allod storage status`).
    #[schema(value_type = String)]
    pub storage_state: crate::state::storage::StorageNodeState,
}

#[utoipa::path(get, path = "/v1/nodes", tag = "cluster",
    responses((status = 200, description = "Every member node", body = Vec<NodeView>)))]
pub(super) async fn nodes(State(node): State<Arc<ClusterNode>>) -> ApiResult<Json<Vec<NodeView>>> {
    // Linearizable like every read: a drain or resume just answered by the
    // leader shows here, whichever node is asked.
    crate::api::consistency::read_barrier(&node).await?;
    let records = node.state.nodes()?;
    let all_vms = node
        .state
        .list::<crate::state::vms::VmRecord>(crate::state::PREFIX_VMS)?;
    let count = |id: u64, moving: bool| {
        all_vms
            .iter()
            .filter(|vm| {
                vm.node_id == id
                    && (!moving
                        || vm.relocation.is_some()
                        || crate::state::migration::migrating(vm))
            })
            .count() as u64
    };
    let leader = node.leader();
    Ok(Json(
        node.members()
            .into_iter()
            .map(|m| {
                let record = records.iter().find(|r| r.id == m.id);
                NodeView {
                    joined_at_ms: record.map(|r| r.joined_at_ms),
                    zone: record.map(|r| r.zone).unwrap_or_default(),
                    vcpus: record.map_or(0, |r| r.vcpus),
                    memory_bytes: record.map_or(0, |r| r.memory_bytes),
                    storage: record.and_then(|r| r.storage.clone()),
                    health: record.map(|r| r.health).unwrap_or_default(),
                    health_since_ms: record.map_or(0, |r| r.liveness_since_ms),
                    maintenance: record.is_some_and(|r| r.maintenance),
                    vms: count(m.id, false),
                    vms_moving: count(m.id, true),
                    storage_state: record.map(|r| r.storage_state).unwrap_or_default(),
                    is_leader: leader == Some(m.id),
                    id: m.id,
                    name: m.name,
                    api_addr: m.api_addr,
                    peer_addr: m.peer_addr,
                    role: m.role,
                }
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/nodes/{node}", tag = "cluster",
    params(("node" = String, Path, description = "Node id or name")),
    responses((status = 200, description = "The node", body = NodeView)))]
pub(super) async fn show_node(
    state: State<Arc<ClusterNode>>,
    Path(wanted): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let Json(all) = nodes(state).await?;
    all.into_iter()
        .find(|n| n.name == wanted || n.id.to_string() == wanted)
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no node is named or numbered {wanted:?}; `allod node list` lists them"
            ))
        })
}

/// The id of the node named or numbered `wanted`.
pub(super) fn node_id_of(node: &ClusterNode, wanted: &str) -> ApiResult<u64> {
    node.state
        .nodes()?
        .iter()
        .find(|n| n.name == wanted || n.id.to_string() == wanted)
        .map(|n| n.id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no node is named or numbered {wanted:?}; `allod node list` lists them"
            ))
        })
}

#[utoipa::path(post, path = "/v1/nodes/{node}/drain", tag = "cluster",
    params(("node" = String, Path, description = "Node id or name")), request_body = crate::api_types::DrainNode,
    responses((status = 200, description = "The node, in maintenance; its VMs' `relocation` says where each goes", body = NodeRecord)))]
pub(super) async fn drain_node(
    State(node): State<Arc<ClusterNode>>,
    Path(wanted): Path<String>,
    ApiJson(body): ApiJson<crate::api_types::DrainNode>,
) -> ApiResult<Json<NodeRecord>> {
    let id = node_id_of(&node, &wanted)?;
    let overcommit = crate::state::scheduler::Overcommit::DEFAULT;
    let outcome = node
        .write(&Command::Ha {
            command: crate::state::ha::HaCommand::Drain {
                id,
                restart_unmovable: body.restart_unmovable,
                at_ms: crate::cluster::join::now_ms(),
                overcommit_cpu_percent: overcommit.cpu_percent(),
                overcommit_memory_percent: overcommit.memory_percent(),
            },
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(post, path = "/v1/nodes/{node}/resume", tag = "cluster",
    params(("node" = String, Path, description = "Node id or name")),
    responses((status = 200, description = "The node, taking VMs again", body = NodeRecord)))]
pub(super) async fn resume_node(
    State(node): State<Arc<ClusterNode>>,
    Path(wanted): Path<String>,
) -> ApiResult<Json<NodeRecord>> {
    let id = node_id_of(&node, &wanted)?;
    let outcome = node
        .write(&Command::Ha {
            command: crate::state::ha::HaCommand::Resume { id },
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

/// A joining node spends its token here and receives its certificate.
#[utoipa::path(post, path = "/v1/cluster/join", tag = "cluster", request_body = JoinRequest,
    responses((status = 200, description = "The joining node's identity and certificate", body = JoinResponse)))]
pub(super) async fn join(
    State(node): State<Arc<ClusterNode>>,
    State(auth): State<Arc<crate::api::authz::AuthServices>>,
    ApiJson(body): ApiJson<JoinRequest>,
) -> ApiResult<Json<JoinResponse>> {
    let arrived_ms = crate::cluster::node::mono_ms();
    validate_name("node", &body.name)?;
    for (what, addr) in [("api_addr", &body.api_addr), ("peer_addr", &body.peer_addr)] {
        if addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_none()
        {
            return Err(ApiError::invalid(format!(
                "{what} {addr:?} is not HOST:PORT"
            )));
        }
    }
    crate::cluster::pki::check_csr(&body.csr_pem)
        .map_err(|e| ApiError::invalid(crate::error_chain(&e)))?;
    let key_sha256 = crate::cluster::pki::csr_key_sha256(&body.csr_pem)
        .map_err(|e| ApiError::invalid(crate::error_chain(&e)))?;
    if node.members().iter().any(|m| m.name == body.name) {
        return Err(ApiError::already_exists(format!(
            "a member named {:?} already exists; pick another node name",
            body.name
        )));
    }
    // The token is checked here before anything is written: a stranger's
    // guess costs no Raft write and no audit entry. A token made moments
    // ago through another node is found after a catch-up with the leader
    // (shared, and during a flood of bad tokens at most once a second).
    let secret_sha256 = sha256_hex(&body.secret);
    let usable = |node: &ClusterNode| -> ApiResult<Result<(), &'static str>> {
        Ok(match node.state.join_token(&body.token_id)? {
            Some(t) if !crate::state::exports::same_secret(&t.secret_sha256, &secret_sha256) => {
                Err("this join token's secret does not match; copy the whole token again or create a new one with `allod cluster join-token`")
            }
            Some(t) if t.used_by.is_some() => Err("this join token was already used; tokens are single-use, create a new one with `allod cluster join-token`"),
            Some(t) if t.expires_at_ms <= crate::cluster::join::now_ms() => Err("this join token has expired; create a new one with `allod cluster join-token`"),
            Some(_) => Ok(()),
            None => Err("this join token is not known to the cluster (it was never issued here, or it expired and was removed); create a new one with `allod cluster join-token`"),
        })
    };
    if usable(&node)?.is_err() {
        node.caught_up_since(arrived_ms, auth.catch_up_age_for_unknown())
            .await?;
        if let Err(why) = usable(&node)? {
            return Err(ApiError::unauthenticated(why));
        }
    }
    let outcome = node
        .write(&Command::ConsumeJoinToken {
            id: body.token_id,
            secret_sha256,
            now_ms: crate::cluster::join::now_ms(),
            node_name: body.name,
            key_sha256: Some(key_sha256),
        })
        .await??;
    let node_id = outcome
        .get("node_id")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| ApiError::internal(&std::io::Error::other("join outcome has no node id")))?;
    let ca_key_pem =
        std::fs::read_to_string(node.data_dir.ca_key()).map_err(|e| ApiError::internal(&e))?;
    let cert_pem = crate::cluster::pki::CertificateAuthority::sign_node_csr(
        &node.tls.ca_pem,
        &ca_key_pem,
        &body.csr_pem,
        node_id,
    )
    .map_err(|e| ApiError::internal(&e))?;
    tracing::info!(node_id, "issued a certificate to a joining node");
    let member_keys = node
        .state
        .nodes()?
        .into_iter()
        .filter_map(|n| Some((n.id, n.key_sha256?)))
        .collect();
    Ok(Json(JoinResponse {
        node_id,
        cluster_id: node.config.cluster_id.clone(),
        cert_pem,
        ca_pem: node.tls.ca_pem.clone(),
        ca_key_pem,
        member_keys,
    }))
}

pub(super) const MAX_AUDIT_LIMIT: usize = 1_000_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries of this user.
    user: Option<String>,
    /// Only entries whose action contains this text (e.g. `DELETE`).
    action: Option<String>,
    /// Only entries after this sequence number.
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after: Option<u64>,
    /// At most this many entries (all when absent).
    #[param(minimum = 0, maximum = 1_000_000)]
    limit: Option<usize>,
    /// `json` (default) or `jsonl` for an export, one entry per line.
    format: Option<AuditFormat>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "Audit entries, oldest first (JSON array, or JSON lines with format=jsonl)", content(
        (Vec<AuditEntry> = "application/json"),
        (String = "application/x-ndjson")))))]
pub(super) async fn audit_log(
    State(node): State<Arc<ClusterNode>>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> ApiResult<Response> {
    let after = query.after.unwrap_or(0);
    if after > i64::MAX as u64 || query.limit.is_some_and(|l| l > MAX_AUDIT_LIMIT) {
        return Err(ApiError::invalid(format!("`after` must be at most {} and `limit` at most {MAX_AUDIT_LIMIT}; page with `after` for more", i64::MAX),
        ));
    }
    crate::api::consistency::read_barrier(&node).await?;
    let entries: Vec<AuditEntry> = node
        .state
        .audit_entries(after)?
        .into_iter()
        .filter(|e| {
            query
                .user
                .as_ref()
                .is_none_or(|u| &e.record.context.user == u)
        })
        .filter(|e| {
            query
                .action
                .as_ref()
                .is_none_or(|a| e.record.context.action.contains(a.as_str()))
        })
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    match query.format.unwrap_or(AuditFormat::Json) {
        AuditFormat::Json => Ok(Json(entries).into_response()),
        AuditFormat::Jsonl => {
            let mut body = String::new();
            for entry in &entries {
                body.push_str(&serde_json::to_string(entry).expect("entries serialise"));
                body.push('\n');
            }
            Ok((
                [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                body,
            )
                .into_response())
        }
    }
}

#[utoipa::path(get, path = "/v1/zones", tag = "zones",
    responses((status = 200, description = "What each classification zone demands", body = Vec<ZonePolicy>)))]
pub(super) async fn zones() -> Json<Vec<ZonePolicy>> {
    Json(crate::state::zones::policies())
}

#[utoipa::path(put, path = "/v1/nodes/{node}/zone", tag = "cluster", params(("node" = u64, Path, description = "Node id")), request_body = SetZone,
    responses((status = 200, description = "The node's record", body = NodeRecord)))]
pub(super) async fn set_node_zone(
    State(node): State<Arc<ClusterNode>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetZone>,
) -> ApiResult<Json<NodeRecord>> {
    let zone = parse_zone(&body.zone)?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::invalid(format!(
            "{id:?} is not a node id; `allod cluster status` lists them"
        ))
    })?;
    let outcome = node.write(&Command::SetNodeZone { id, zone }).await?;
    Ok(Json(outcome_as(outcome?)?))
}
