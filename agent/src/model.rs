//! The cluster model: the commands that change the replicated state, how
//! they apply, and typed reads of the result.
//!
//! Applying is deterministic: every input that varies between nodes (time,
//! random ids, hashes of secrets) is decided by the proposer and carried in
//! the command. Domain failures (a duplicate name, a used join token) are part
//! of the result, so every replica records the same outcome.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use allod_raft::{Apply, KvRead, KvWrite, NodeId, StateReader};
use openraft::LogId;
use serde::{Deserialize, Serialize};

use crate::authz::Role;

pub const KEY_CLUSTER: &str = "cluster";
pub const PREFIX_PROJECTS: &str = "projects/";
pub const PREFIX_JOIN_TOKENS: &str = "join_tokens/";
pub const PREFIX_API_TOKENS: &str = "api_tokens/";
pub const PREFIX_NODES: &str = "nodes/";
pub const KEY_NEXT_NODE_ID: &str = "counters/next_node_id";
pub const PREFIX_USERS: &str = "users/";
pub const PREFIX_USER_GRANTS: &str = "user_grants/";
pub const PREFIX_TOKEN_IDS: &str = "token_ids/";
pub const PREFIX_AUDIT: &str = "audit/entries/";
pub const PREFIX_OIDC_ISSUERS: &str = "oidc_issuers/";
/// `volumes/<project>/<name>`.
pub const PREFIX_VOLUMES: &str = "volumes/";
/// `vms/<project>/<name>`.
pub const PREFIX_VMS: &str = "vms/";
pub const KEY_AUDIT_HEAD: &str = "audit/head";

/// The user `init` creates, holder of the first admin token.
pub const ADMIN_USER: &str = "admin";

/// Facts about the cluster fixed at `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub name: String,
    pub created_at_ms: u64,
    pub ca_fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Project {
    pub name: String,
    pub description: String,
    /// Fixed at creation.
    #[serde(default)]
    pub zone: crate::zones::Zone,
    pub created_at_ms: u64,
    /// Bumped by every change, so clients can tell versions apart.
    pub generation: u64,
    /// Limits set by a cluster admin; absent ones are unlimited.
    #[serde(default)]
    pub quota: crate::quota::Quota,
    /// What the project's objects use, kept with every change to them.
    #[serde(default)]
    pub usage: crate::quota::Usage,
}

/// A block volume's record: what the cluster knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeRecord {
    /// Stable and unique in the cluster (the NBD export name).
    pub id: String,
    pub name: String,
    pub project: String,
    pub size_bytes: u64,
    /// Copies of every object, on distinct nodes (1 to 3).
    pub replicas: u8,
    /// The size of the objects a volume is split into.
    pub object_size_bytes: u64,
    /// `available`; `in-use` while attached to a VM; `importing` for an
    /// image's base volume until its import finishes.
    pub state: String,
    /// The project's zone, which the volume's replicas must honour.
    pub zone: crate::zones::Zone,
    pub created_at_ms: u64,
    /// The id of the VM it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// The storage map (by epoch) its objects are placed with.
    #[serde(default)]
    pub map_epoch: u64,
    /// The newest snapshot's id (0: none yet); writes carry it.
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub snapshots: Vec<crate::volumes::SnapshotRecord>,
    /// For a clone: the snapshot it reads through to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::volumes::ParentRef>,
    /// The node that may write it, and the epoch that fences older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::volumes::Lease>,
    /// An image's base volume: read-only once imported.
    #[serde(default)]
    pub read_only: bool,
}

impl VolumeRecord {
    pub fn usage(&self) -> crate::quota::Usage {
        crate::quota::Usage {
            storage_bytes: self.size_bytes,
            volumes: 1,
            ..Default::default()
        }
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

/// An API token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiTokenRecord {
    pub id: String,
    pub user: String,
    pub scope: TokenScope,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenScope {
    /// Everything its user may do.
    Cluster,
    /// One project, at most `role` (and never more than its user holds there).
    Project { project: String, role: Role },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// Argon2id hash in PHC format; `None` for users who only use tokens.
    pub password_phc: Option<String>,
    pub cluster_admin: bool,
    pub created_at_ms: u64,
}

/// What the cluster remembers of a node beyond its Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub joined_at_ms: u64,
    /// The one zone this node serves (OFFICIAL: the shared pool).
    #[serde(default)]
    pub zone: crate::zones::Zone,
    /// What the node reported of itself; zero until it has.
    #[serde(default)]
    pub vcpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// A node in maintenance takes no new VMs.
    #[serde(default)]
    pub maintenance: bool,
    /// The node's block store, once it has registered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::volumes::NodeStorage>,
}

/// A volume attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attachment {
    pub project: String,
    pub volume: String,
    pub volume_id: String,
}

/// A VM's NIC: the port made for it with the VM (deleted with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmNic {
    /// The port's name (`<vm>-nic<N>`), e.g. for `allod fip bind --port`.
    pub port: String,
    pub vpc: String,
    pub subnet: String,
    pub mac: String,
    /// The address IPAM gave it; the guest gets it by DHCP.
    pub ip: String,
}

/// A VM's record: its desired spec and where the scheduler put it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    /// The project's zone; the VM runs only on nodes of this zone.
    pub zone: crate::zones::Zone,
    pub vcpus: u64,
    pub memory_bytes: u64,
    /// VMs of one group never share a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// The node the scheduler chose (set when the create applies).
    #[serde(rename = "node", alias = "node_id")]
    pub node_id: u64,
    /// What its node last saw: `creating`, `running`, `stopping`,
    /// `stopped`, `paused`, `crashed`, or `failed` (with `reason`).
    pub state: String,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// In boot order: the first is the boot disk.
    #[serde(default)]
    pub volumes: Vec<Attachment>,
    /// Bumped by every change to the spec (vCPUs, memory, disks).
    pub generation: u64,
    pub created_at_ms: u64,
    /// What the owner wants: `running` or `stopped`.
    #[serde(default = "default_power")]
    pub power: String,
    /// A stop that pulls the plug instead of asking the guest.
    #[serde(default)]
    pub force_stop: bool,
    /// Bumped by every reboot request.
    #[serde(default)]
    pub reboots: u64,
    /// The boot volume made with the VM (deleted with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_volume: Option<String>,
    /// The spec generation its node last defined.
    #[serde(default)]
    pub observed_generation: u64,
    /// Its NICs, in the guest's order (eth0 first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<VmNic>,
}

fn default_power() -> String {
    "running".into()
}

impl VmRecord {
    pub fn usage(&self) -> crate::quota::Usage {
        crate::quota::Usage {
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            vms: 1,
            ..Default::default()
        }
    }
}

/// Every change to the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    InitCluster {
        info: ClusterInfo,
        admin_token_sha256: String,
        first_node: NodeRecord,
    },
    CreateProject {
        name: String,
        description: String,
        now_ms: u64,
        #[serde(default)]
        zone: crate::zones::Zone,
    },
    UpdateProject {
        name: String,
        description: String,
    },
    DeleteProject {
        name: String,
    },
    CreateJoinToken {
        id: String,
        secret_sha256: String,
        now_ms: u64,
        expires_at_ms: u64,
    },
    /// Spends a join token and allocates the joining node's id.
    ConsumeJoinToken {
        id: String,
        secret_sha256: String,
        now_ms: u64,
        node_name: String,
    },
    ForgetNode {
        id: NodeId,
    },
    SetNodeZone {
        id: NodeId,
        zone: crate::zones::Zone,
    },
    SetQuota {
        project: String,
        quota: crate::quota::Quota,
    },
    /// Records a volume (validated before proposing) if the project's quota
    /// admits it, placing it on the current storage map; a clone also
    /// registers with the snapshot it reads through to.
    CreateVolume {
        volume: VolumeRecord,
        #[serde(default)]
        source: Option<crate::volumes::VolumeSource>,
    },
    DeleteVolume {
        project: String,
        name: String,
    },
    ResizeVolume {
        project: String,
        name: String,
        size_bytes: u64,
    },
    CreateSnapshot {
        project: String,
        volume: String,
        name: String,
        now_ms: u64,
    },
    DeleteSnapshot {
        project: String,
        volume: String,
        name: String,
    },
    /// Makes `node` the volume's one writer with a new epoch (unless it
    /// already is).
    AcquireLease {
        volume_id: String,
        node: NodeId,
    },
    /// A node registers (or updates) its block store.
    SetNodeStorage {
        id: NodeId,
        storage: crate::volumes::NodeStorage,
    },
    /// Records an image being imported, with its base volume.
    CreateImage {
        image: crate::volumes::ImageRecord,
        volume: VolumeRecord,
    },
    /// The import finished: the base volume becomes read-only with one
    /// snapshot that clones use.
    FinishImage {
        name: String,
        now_ms: u64,
    },
    DeleteImage {
        name: String,
    },
    SetNodeMaintenance {
        id: NodeId,
        maintenance: bool,
    },
    /// What a node reports of its own capacity.
    SetNodeCapacity {
        id: NodeId,
        vcpus: u64,
        memory_bytes: u64,
    },
    /// Places and records a VM (validated before proposing) if its
    /// project's quota admits it and some node can host it.
    CreateVm {
        vm: VmRecord,
        /// vCPUs per 100 cores (400: four vCPUs per core).
        overcommit_cpu_percent: u32,
        overcommit_memory_percent: u32,
        /// A boot volume cloned from an image, made in the same step.
        #[serde(default)]
        boot: Option<crate::compute::BootDisk>,
        /// Ports for its NICs (their node is set where the VM is placed).
        #[serde(default)]
        nics: Vec<crate::network::PortRecord>,
    },
    DeleteVm {
        project: String,
        name: String,
    },
    /// Desired power: `running` or `stopped` (`force`: no ACPI request).
    SetVmPower {
        project: String,
        name: String,
        power: String,
        force: bool,
    },
    RebootVm {
        project: String,
        name: String,
    },
    /// New vCPUs / memory for a stopped VM.
    ResizeVm {
        project: String,
        name: String,
        vcpus: Option<u64>,
        memory_bytes: Option<u64>,
    },
    /// What a node observed of one of its VMs.
    ReportVmState {
        project: String,
        name: String,
        node: NodeId,
        state: String,
        reason: Option<String>,
        generation: u64,
    },
    AttachVolume {
        project: String,
        vm: String,
        volume_project: String,
        volume: String,
    },
    DetachVolume {
        project: String,
        vm: String,
        volume_project: String,
        volume: String,
    },
    /// Adds or replaces a trusted OIDC issuer (validated before proposing).
    PutOidcIssuer {
        issuer: crate::oidc::OidcIssuer,
    },
    DeleteOidcIssuer {
        name: String,
    },
    CreateUser {
        name: String,
        password_phc: Option<String>,
        now_ms: u64,
    },
    /// `cluster-admin` makes the user a cluster administrator; the other
    /// roles apply to `project`.
    GrantRole {
        user: String,
        project: Option<String>,
        role: Role,
    },
    CreateToken {
        id: String,
        secret_sha256: String,
        user: String,
        scope: TokenScope,
        now_ms: u64,
        expires_at_ms: Option<u64>,
    },
    RevokeToken {
        id: String,
    },
    /// VPCs, subnets, security groups, ports, IP pools, floating IPs.
    Network {
        command: crate::network::NetCommand,
    },
    AppendAudit {
        record: crate::audit::AuditRecord,
    },
    /// A command and its audit entry, applied in one transaction: the entry
    /// records the command's outcome.
    Audited {
        command: Box<Command>,
        audit: crate::audit::AuditContext,
    },
}

/// A domain failure recorded as the outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct DomainError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    TokenInvalid,
    TokenExpired,
    TokenUsed,
    FailedPrecondition,
    Unauthenticated,
    QuotaExceeded,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::QuotaExceeded => "quota_exceeded",
        }
    }
}

pub(crate) fn domain(code: ErrorCode, message: impl Into<String>) -> DomainError {
    DomainError {
        code,
        message: message.into(),
    }
}

/// The outcome of a command as it travels in the Raft response.
pub type Outcome = Result<serde_json::Value, DomainError>;

/// Checks a name against DNS-label rules: 1–63 characters of lowercase
/// letters, digits and '-', starting with a letter and not ending with '-'.
pub fn validate_name(kind: &str, name: &str) -> Result<(), DomainError> {
    let invalid = |why: &str| {
        domain(
            ErrorCode::InvalidArgument,
            format!(
                "{kind} name {name:?} is invalid: {why}; use 1-63 lowercase letters, digits or '-', starting with a letter"
            ),
        )
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 63 {
        return Err(invalid("it is longer than 63 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid("it must start with a lowercase letter"));
    }
    if name.ends_with('-') {
        return Err(invalid("it must not end with '-'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(invalid(&format!("it contains {c:?}")));
    }
    Ok(())
}

pub const MAX_DESCRIPTION_BYTES: usize = 1024;

pub fn validate_description(description: &str) -> Result<(), DomainError> {
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(domain(
            ErrorCode::InvalidArgument,
            format!(
                "description is {} bytes long; the limit is {MAX_DESCRIPTION_BYTES}",
                description.len()
            ),
        ));
    }
    Ok(())
}

fn token_still_valid(
    kv: &KvWrite<'_>,
    audit: &crate::audit::AuditContext,
) -> Result<Result<(), DomainError>, allod_raft::KvError> {
    if audit.token_id == "-" {
        return Ok(Ok(()));
    }
    // An OIDC caller's trust ends when its issuer is removed.
    if let Some(issuer) = audit.token_id.strip_prefix(crate::oidc::OIDC_TOKEN_PREFIX) {
        return Ok(match kv.get(&format!("{PREFIX_OIDC_ISSUERS}{issuer}"))? {
            Some(_) => Ok(()),
            None => Err(domain(
                ErrorCode::Unauthenticated,
                "the token's OIDC issuer was removed; nothing was changed",
            )),
        });
    }
    let revoked = || {
        domain(
            ErrorCode::Unauthenticated,
            "the token was revoked or has expired; nothing was changed",
        )
    };
    let Some(sha) = get_json::<String>(kv, &format!("{PREFIX_TOKEN_IDS}{}", audit.token_id))?
    else {
        return Ok(Err(revoked()));
    };
    match get_json::<ApiTokenRecord>(kv, &format!("{PREFIX_API_TOKENS}{sha}"))? {
        Some(record) if record.expires_at_ms.is_none_or(|at| at > audit.time_ms) => Ok(Ok(())),
        _ => Ok(Err(revoked())),
    }
}

fn append_audit(
    kv: &mut KvWrite<'_>,
    record: crate::audit::AuditRecord,
) -> Result<u64, allod_raft::KvError> {
    let head: Option<crate::audit::AuditHead> = get_json(kv, KEY_AUDIT_HEAD)?;
    let entry = crate::audit::chain(head.as_ref(), record);
    put_json(kv, &format!("{PREFIX_AUDIT}{:020}", entry.seq), &entry)?;
    put_json(
        kv,
        KEY_AUDIT_HEAD,
        &crate::audit::AuditHead {
            seq: entry.seq,
            hash: entry.hash.clone(),
        },
    )?;
    Ok(entry.seq)
}

/// A user as the API shows it: never the password hash.
pub fn user_view(user: &User) -> serde_json::Value {
    serde_json::json!({ "name": user.name, "cluster_admin": user.cluster_admin, "has_password": user.password_phc.is_some(), "created_at_ms": user.created_at_ms })
}

/// The state machine's command interpreter.
pub struct ClusterApply {
    /// Bumped after a committed change could alter who a token resolves to
    /// (revocations, grants, deleted projects, OIDC issuers, snapshots), so
    /// that cached principals resolved before it are not used again.
    pub auth_generation: Arc<AtomicU64>,
    auth_changed: AtomicBool,
    /// Moves on after a commit that changed VMs, volumes, images or nodes
    /// (or replaced the whole state): the block store and the compute
    /// reconciler follow it, and writes of other kinds do not wake them.
    pub applied: Arc<tokio::sync::watch::Sender<u64>>,
    resources_changed: AtomicBool,
}

impl Default for ClusterApply {
    fn default() -> Self {
        Self {
            auth_generation: Default::default(),
            auth_changed: Default::default(),
            applied: Arc::new(tokio::sync::watch::channel(0).0),
            resources_changed: Default::default(),
        }
    }
}

/// Whether applying `command` may change how some bearer token resolves.
fn changes_authentication(command: &Command) -> bool {
    match command {
        Command::Audited { command, .. } => changes_authentication(command),
        Command::InitCluster { .. }
        | Command::DeleteProject { .. }
        | Command::GrantRole { .. }
        | Command::RevokeToken { .. }
        | Command::PutOidcIssuer { .. }
        | Command::DeleteOidcIssuer { .. } => true,
        Command::CreateProject { .. }
        | Command::UpdateProject { .. }
        | Command::SetQuota { .. }
        | Command::CreateVolume { .. }
        | Command::DeleteVolume { .. }
        | Command::ResizeVolume { .. }
        | Command::CreateSnapshot { .. }
        | Command::DeleteSnapshot { .. }
        | Command::AcquireLease { .. }
        | Command::SetNodeStorage { .. }
        | Command::CreateImage { .. }
        | Command::FinishImage { .. }
        | Command::DeleteImage { .. }
        | Command::SetNodeCapacity { .. }
        | Command::SetNodeMaintenance { .. }
        | Command::CreateVm { .. }
        | Command::DeleteVm { .. }
        | Command::SetVmPower { .. }
        | Command::RebootVm { .. }
        | Command::ResizeVm { .. }
        | Command::ReportVmState { .. }
        | Command::AttachVolume { .. }
        | Command::DetachVolume { .. }
        | Command::CreateJoinToken { .. }
        | Command::ConsumeJoinToken { .. }
        | Command::ForgetNode { .. }
        | Command::SetNodeZone { .. }
        | Command::CreateUser { .. }
        | Command::CreateToken { .. }
        | Command::Network { .. }
        | Command::AppendAudit { .. } => false,
    }
}

/// Whether applying `command` may change what a node's block store or
/// compute reconciler must do.
fn changes_resources(command: &Command) -> bool {
    match command {
        Command::Audited { command, .. } => changes_resources(command),
        Command::InitCluster { .. }
        | Command::CreateVolume { .. }
        | Command::DeleteVolume { .. }
        | Command::ResizeVolume { .. }
        | Command::CreateSnapshot { .. }
        | Command::DeleteSnapshot { .. }
        | Command::AcquireLease { .. }
        | Command::SetNodeStorage { .. }
        | Command::CreateImage { .. }
        | Command::FinishImage { .. }
        | Command::DeleteImage { .. }
        | Command::CreateVm { .. }
        | Command::DeleteVm { .. }
        | Command::SetVmPower { .. }
        | Command::RebootVm { .. }
        | Command::ResizeVm { .. }
        | Command::ReportVmState { .. }
        | Command::AttachVolume { .. }
        | Command::DetachVolume { .. }
        | Command::ConsumeJoinToken { .. }
        | Command::Network { .. }
        | Command::ForgetNode { .. } => true,
        Command::CreateProject { .. }
        | Command::UpdateProject { .. }
        | Command::DeleteProject { .. }
        | Command::SetQuota { .. }
        | Command::SetNodeCapacity { .. }
        | Command::SetNodeMaintenance { .. }
        | Command::SetNodeZone { .. }
        | Command::CreateJoinToken { .. }
        | Command::GrantRole { .. }
        | Command::RevokeToken { .. }
        | Command::PutOidcIssuer { .. }
        | Command::DeleteOidcIssuer { .. }
        | Command::CreateUser { .. }
        | Command::CreateToken { .. }
        | Command::AppendAudit { .. } => false,
    }
}

pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
    kv: &impl KvRead,
    key: &str,
) -> Result<Option<T>, allod_raft::KvError> {
    match kv.get(key)? {
        // Values are only ever written by this module from these types; a
        // value that no longer parses is treated as absent and logged rather
        // than stopping the state machine.
        Some(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                tracing::error!(key, error = %e, "stored value does not parse; treating it as absent");
                Ok(None)
            }
        },
        None => Ok(None),
    }
}

/// Reads a node's record, lets `change` refuse or change it, stores it and
/// answers with it; an unknown node is refused.
pub(crate) fn update_node(
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
    put_json(kv, &key, &node)?;
    Ok(Ok(serde_json::to_value(&node).expect("serialisable")))
}

pub(crate) fn put_json<T: Serialize>(
    kv: &mut KvWrite<'_>,
    key: &str,
    value: &T,
) -> Result<(), allod_raft::KvError> {
    let bytes = serde_json::to_vec(value).expect("model types always serialise");
    kv.put(key, &bytes)
}

impl ClusterApply {
    fn apply_command(
        kv: &mut KvWrite<'_>,
        command: Command,
    ) -> Result<Outcome, allod_raft::KvError> {
        Ok(match command {
            Command::InitCluster {
                info,
                admin_token_sha256,
                first_node,
            } => {
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
            }
            Command::CreateProject {
                name,
                description,
                now_ms,
                zone,
            } => {
                let key = format!("{PREFIX_PROJECTS}{name}");
                match validate_name("project", &name)
                    .and_then(|_| validate_description(&description))
                {
                    Err(e) => Err(e),
                    Ok(()) if kv.get(&key)?.is_some() => Err(domain(
                        ErrorCode::AlreadyExists,
                        format!("project {name:?} already exists"),
                    )),
                    Ok(()) => {
                        let project = Project {
                            name,
                            description,
                            zone,
                            created_at_ms: now_ms,
                            generation: 1,
                            quota: Default::default(),
                            usage: Default::default(),
                        };
                        put_json(kv, &key, &project)?;
                        Ok(serde_json::to_value(&project).expect("serialisable"))
                    }
                }
            }
            Command::UpdateProject { name, description } => {
                let key = format!("{PREFIX_PROJECTS}{name}");
                match (
                    validate_description(&description),
                    get_json::<Project>(kv, &key)?,
                ) {
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Err(domain(
                        ErrorCode::NotFound,
                        format!("project {name:?} does not exist"),
                    )),
                    (Ok(()), Some(mut project)) => {
                        project.description = description;
                        project.generation += 1;
                        put_json(kv, &key, &project)?;
                        Ok(serde_json::to_value(&project).expect("serialisable"))
                    }
                }
            }
            Command::DeleteProject { name } => {
                let key = format!("{PREFIX_PROJECTS}{name}");
                let volumes = kv.scan(&format!("{PREFIX_VOLUMES}{name}/"))?.len()
                    + kv.scan(&format!("{PREFIX_VMS}{name}/"))?.len();
                if kv.get(&key)?.is_none() {
                    Err(domain(
                        ErrorCode::NotFound,
                        format!("project {name:?} does not exist"),
                    ))
                } else if volumes > 0 {
                    Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "project {name:?} still has {volumes} VM(s) or volume(s); delete them first"
                        ),
                    ))
                } else {
                    kv.delete(&key)?;
                    // Roles in a deleted project go with it.
                    for (grant_key, _) in kv.scan(PREFIX_USER_GRANTS)? {
                        if grant_key.rsplit('/').next() == Some(name.as_str()) {
                            kv.delete(&grant_key)?;
                        }
                    }
                    Ok(serde_json::Value::Null)
                }
            }
            Command::CreateJoinToken {
                id,
                secret_sha256,
                now_ms,
                expires_at_ms,
            } => {
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
            }
            Command::ConsumeJoinToken {
                id,
                secret_sha256,
                now_ms,
                node_name,
            } => {
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
                        let node = NodeRecord { id: node_id, name: node_name, joined_at_ms: now_ms, zone: Default::default(), vcpus: 0, memory_bytes: 0, maintenance: false, storage: None };
                        put_json(kv, &format!("{PREFIX_NODES}{node_id:020}"), &node)?;
                        Ok(serde_json::json!({ "node_id": node_id }))
                    }
                }
            }
            Command::ForgetNode { id } => {
                kv.delete(&format!("{PREFIX_NODES}{id:020}"))?;
                Ok(serde_json::Value::Null)
            }
            Command::SetQuota { project, quota } => {
                let key = format!("{PREFIX_PROJECTS}{project}");
                match get_json::<Project>(kv, &key)? {
                    None => Err(domain(
                        ErrorCode::NotFound,
                        format!("project {project:?} does not exist"),
                    )),
                    Some(mut record) => {
                        // Lowering a limit below the usage is allowed: what
                        // exists stays, new objects are refused.
                        record.quota = quota;
                        record.generation += 1;
                        put_json(kv, &key, &record)?;
                        Ok(serde_json::to_value(&record).expect("serialisable"))
                    }
                }
            }
            Command::Network { command } => crate::network::apply(kv, command)?,
            Command::CreateVolume { volume, source } => {
                crate::volumes::create_volume(kv, volume, source)?
            }
            Command::DeleteVolume { project, name } => {
                crate::volumes::delete_volume(kv, &project, &name)?
            }
            Command::ResizeVolume {
                project,
                name,
                size_bytes,
            } => crate::volumes::resize_volume(kv, &project, &name, size_bytes)?,
            Command::CreateSnapshot {
                project,
                volume,
                name,
                now_ms,
            } => crate::volumes::create_snapshot(kv, &project, &volume, &name, now_ms)?,
            Command::DeleteSnapshot {
                project,
                volume,
                name,
            } => crate::volumes::delete_snapshot(kv, &project, &volume, &name)?,
            Command::AcquireLease { volume_id, node } => {
                crate::volumes::acquire_lease(kv, &volume_id, node)?
            }
            Command::SetNodeStorage { id, storage } => {
                crate::volumes::set_node_storage(kv, id, storage)?
            }
            Command::CreateImage { image, volume } => {
                crate::volumes::create_image(kv, image, volume)?
            }
            Command::FinishImage { name, now_ms } => {
                crate::volumes::finish_image(kv, &name, now_ms)?
            }
            Command::DeleteImage { name } => crate::volumes::delete_image(kv, &name)?,
            Command::SetNodeMaintenance { id, maintenance } => update_node(kv, id, |_, node| {
                node.maintenance = maintenance;
                Ok(Ok(()))
            })?,
            Command::SetNodeCapacity {
                id,
                vcpus,
                memory_bytes,
            } => update_node(kv, id, |_, node| {
                node.vcpus = vcpus;
                node.memory_bytes = memory_bytes;
                Ok(Ok(()))
            })?,
            Command::CreateVm {
                vm,
                overcommit_cpu_percent,
                overcommit_memory_percent,
                boot,
                nics,
            } => crate::compute::create_vm(
                kv,
                vm,
                crate::scheduler::Overcommit {
                    cpu: f64::from(overcommit_cpu_percent) / 100.0,
                    memory: f64::from(overcommit_memory_percent) / 100.0,
                },
                boot,
                nics,
            )?,
            Command::SetVmPower {
                project,
                name,
                power,
                force: _,
            } if power == "running" => crate::compute::start_vm(
                kv,
                &project,
                &name,
                crate::scheduler::Overcommit::default(),
            )?,
            Command::SetVmPower {
                project,
                name,
                power,
                force,
            } => crate::compute::update_vm(kv, &project, &name, |vm| {
                vm.power = power;
                vm.force_stop = force;
                Ok(())
            })?,
            Command::RebootVm { project, name } => {
                crate::compute::update_vm(kv, &project, &name, |vm| {
                    if vm.power != "running" {
                        return Err(domain(
                            ErrorCode::FailedPrecondition,
                            format!("VM {name:?} is stopped; start it instead"),
                        ));
                    }
                    vm.reboots += 1;
                    Ok(())
                })?
            }
            Command::ResizeVm {
                project,
                name,
                vcpus,
                memory_bytes,
            } => crate::compute::resize_vm(kv, &project, &name, vcpus, memory_bytes)?,
            Command::ReportVmState {
                project,
                name,
                node,
                state,
                reason,
                generation,
            } => crate::compute::report_vm(kv, &project, &name, node, state, reason, generation)?,
            Command::DeleteVm { project, name } => crate::compute::delete_vm(kv, &project, &name)?,
            Command::AttachVolume {
                project,
                vm,
                volume_project,
                volume,
            } => crate::compute::attach(kv, &project, &vm, &volume_project, &volume, true)?,
            Command::DetachVolume {
                project,
                vm,
                volume_project,
                volume,
            } => crate::compute::attach(kv, &project, &vm, &volume_project, &volume, false)?,
            Command::PutOidcIssuer { issuer } => {
                let key = format!("{PREFIX_OIDC_ISSUERS}{}", issuer.name);
                let clash = kv
                    .scan(PREFIX_OIDC_ISSUERS)?
                    .into_iter()
                    .filter(|(k, _)| *k != key)
                    .filter_map(|(_, v)| serde_json::from_slice::<crate::oidc::OidcIssuer>(&v).ok())
                    .find(|other| other.issuer == issuer.issuer);
                match clash {
                    Some(other) => Err(domain(
                        ErrorCode::AlreadyExists,
                        format!(
                            "issuer {:?} is already configured as {:?}; change that one instead",
                            issuer.issuer, other.name
                        ),
                    )),
                    None => {
                        put_json(kv, &key, &issuer)?;
                        Ok(serde_json::to_value(&issuer).expect("serialisable"))
                    }
                }
            }
            Command::DeleteOidcIssuer { name } => {
                let key = format!("{PREFIX_OIDC_ISSUERS}{name}");
                if kv.get(&key)?.is_none() {
                    Err(domain(
                        ErrorCode::NotFound,
                        format!("OIDC issuer {name:?} does not exist"),
                    ))
                } else {
                    kv.delete(&key)?;
                    Ok(serde_json::Value::Null)
                }
            }
            Command::SetNodeZone { id, zone } => update_node(kv, id, |kv, node| {
                // A node never hosts another zone's VMs, so it keeps its
                // zone while it holds any.
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
            })?,
            Command::CreateUser {
                name,
                password_phc,
                now_ms,
            } => {
                let key = format!("{PREFIX_USERS}{name}");
                match validate_name("user", &name) {
                    Err(e) => Err(e),
                    Ok(()) if kv.get(&key)?.is_some() => Err(domain(
                        ErrorCode::AlreadyExists,
                        format!("user {name:?} already exists"),
                    )),
                    Ok(()) => {
                        let user = User {
                            name,
                            password_phc,
                            cluster_admin: false,
                            created_at_ms: now_ms,
                        };
                        put_json(kv, &key, &user)?;
                        Ok(user_view(&user))
                    }
                }
            }
            Command::GrantRole {
                user,
                project,
                role,
            } => {
                let user_key = format!("{PREFIX_USERS}{user}");
                match (get_json::<User>(kv, &user_key)?, role, project) {
                    (None, _, _) => Err(domain(
                        ErrorCode::NotFound,
                        format!("user {user:?} does not exist"),
                    )),
                    (Some(mut record), Role::ClusterAdmin, _) => {
                        record.cluster_admin = true;
                        put_json(kv, &user_key, &record)?;
                        Ok(serde_json::json!({ "user": user, "role": role }))
                    }
                    (Some(_), _, None) => Err(domain(
                        ErrorCode::InvalidArgument,
                        format!("the {} role needs a project", role.as_str()),
                    )),
                    (Some(_), _, Some(project))
                        if kv.get(&format!("{PREFIX_PROJECTS}{project}"))?.is_none() =>
                    {
                        Err(domain(
                            ErrorCode::InvalidArgument,
                            format!("project {project:?} does not exist; create it first"),
                        ))
                    }
                    (Some(_), _, Some(project)) => {
                        put_json(kv, &format!("{PREFIX_USER_GRANTS}{user}/{project}"), &role)?;
                        Ok(serde_json::json!({ "user": user, "project": project, "role": role }))
                    }
                }
            }
            Command::CreateToken {
                id,
                secret_sha256,
                user,
                scope,
                now_ms,
                expires_at_ms,
            } => {
                let project_missing = match &scope {
                    TokenScope::Project { project, .. } => {
                        kv.get(&format!("{PREFIX_PROJECTS}{project}"))?.is_none()
                    }
                    TokenScope::Cluster => false,
                };
                if kv.get(&format!("{PREFIX_USERS}{user}"))?.is_none() {
                    Err(domain(
                        ErrorCode::NotFound,
                        format!("user {user:?} does not exist"),
                    ))
                } else if project_missing {
                    Err(domain(
                        ErrorCode::InvalidArgument,
                        "the token's project does not exist",
                    ))
                } else {
                    let record = ApiTokenRecord {
                        id: id.clone(),
                        user,
                        scope,
                        created_at_ms: now_ms,
                        expires_at_ms,
                    };
                    put_json(kv, &format!("{PREFIX_API_TOKENS}{secret_sha256}"), &record)?;
                    put_json(kv, &format!("{PREFIX_TOKEN_IDS}{id}"), &secret_sha256)?;
                    Ok(serde_json::to_value(&record).expect("serialisable"))
                }
            }
            Command::AppendAudit { record } => {
                let seq = append_audit(kv, record)?;
                Ok(serde_json::json!({ "seq": seq }))
            }
            Command::Audited { command, audit } => {
                // The node that authorised the call may have been a moment
                // behind: a token revoked or expired by the time the change
                // is applied in log order changes nothing.
                let outcome = match token_still_valid(kv, &audit)? {
                    Err(e) => Err(e),
                    Ok(()) => Self::apply_command(kv, *command)?,
                };
                let result = match &outcome {
                    Ok(_) => "ok",
                    Err(e) => e.code.as_str(),
                };
                append_audit(kv, audit.with_result(result))?;
                outcome
            }
            Command::RevokeToken { id } => {
                match get_json::<String>(kv, &format!("{PREFIX_TOKEN_IDS}{id}"))? {
                    None => Err(domain(
                        ErrorCode::NotFound,
                        format!("token {id:?} does not exist"),
                    )),
                    Some(sha) => {
                        kv.delete(&format!("{PREFIX_API_TOKENS}{sha}"))?;
                        kv.delete(&format!("{PREFIX_TOKEN_IDS}{id}"))?;
                        Ok(serde_json::Value::Null)
                    }
                }
            }
        })
    }
}

impl ClusterApply {
    fn apply_one(
        &self,
        kv: &mut KvWrite<'_>,
        index: u64,
        command: &serde_json::Value,
    ) -> Result<Outcome, allod_raft::KvError> {
        match serde_json::from_value::<Command>(command.clone()) {
            Ok(command) => {
                if changes_authentication(&command) {
                    self.auth_changed.store(true, Ordering::Relaxed);
                }
                if changes_resources(&command) {
                    self.resources_changed.store(true, Ordering::Relaxed);
                }
                Self::apply_command(kv, command)
            }
            // A command from a newer or broken proposer: record the refusal,
            // change nothing.
            Err(e) => {
                tracing::warn!(index, error = %e, "committed command does not parse; ignoring it");
                Ok(Err(domain(
                    ErrorCode::InvalidArgument,
                    format!("command not understood: {e}"),
                )))
            }
        }
    }
}

impl Apply for ClusterApply {
    /// An entry holds either one command or `{"batch": [command, ...]}`,
    /// applied in order with one outcome each.
    fn apply(
        &self,
        kv: &mut KvWrite<'_>,
        log_id: &LogId<NodeId>,
        command: &serde_json::Value,
    ) -> Result<serde_json::Value, allod_raft::KvError> {
        if let Some(batch) = command.get("batch").and_then(|b| b.as_array()) {
            let mut outcomes = Vec::with_capacity(batch.len());
            for one in batch {
                outcomes.push(self.apply_one(kv, log_id.index, one)?);
            }
            return Ok(serde_json::to_value(outcomes).expect("outcomes serialise"));
        }
        let outcome = self.apply_one(kv, log_id.index, command)?;
        Ok(serde_json::to_value(outcome).expect("outcomes serialise"))
    }

    fn committed(&self, replaced_all: bool) {
        // After the commit, so a reader that sees the new generation also
        // sees the new state.
        if self.auth_changed.swap(false, Ordering::Relaxed) || replaced_all {
            self.auth_generation.fetch_add(1, Ordering::Release);
        }
        if self.resources_changed.swap(false, Ordering::Relaxed) || replaced_all {
            self.applied.send_modify(|n| *n += 1);
        }
    }
}

/// Typed reads of the applied state.
#[derive(Clone)]
pub struct StateView {
    pub reader: StateReader,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read the cluster state")]
pub struct ReadError(#[from] allod_raft::StateMachineError);

impl StateView {
    pub(crate) fn get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ReadError> {
        Ok(self
            .reader
            .get(key)?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub(crate) fn list<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, ReadError> {
        Ok(self
            .reader
            .scan(prefix)?
            .into_iter()
            .filter_map(|(_, b)| serde_json::from_slice(&b).ok())
            .collect())
    }

    pub fn cluster(&self) -> Result<Option<ClusterInfo>, ReadError> {
        self.get(KEY_CLUSTER)
    }

    pub fn project(&self, name: &str) -> Result<Option<Project>, ReadError> {
        self.get(&format!("{PREFIX_PROJECTS}{name}"))
    }

    pub fn vms(&self, project: &str) -> Result<Vec<VmRecord>, ReadError> {
        self.list(&format!("{PREFIX_VMS}{project}/"))
    }

    pub fn vm(&self, project: &str, name: &str) -> Result<Option<VmRecord>, ReadError> {
        self.get(&format!("{PREFIX_VMS}{project}/{name}"))
    }

    pub fn volumes(&self, project: &str) -> Result<Vec<VolumeRecord>, ReadError> {
        self.list(&format!("{PREFIX_VOLUMES}{project}/"))
    }

    pub fn volume(&self, project: &str, name: &str) -> Result<Option<VolumeRecord>, ReadError> {
        self.get(&format!("{PREFIX_VOLUMES}{project}/{name}"))
    }

    pub fn projects(&self) -> Result<Vec<Project>, ReadError> {
        self.list(PREFIX_PROJECTS)
    }

    pub fn api_token(&self, sha256_hex: &str) -> Result<Option<ApiTokenRecord>, ReadError> {
        self.get(&format!("{PREFIX_API_TOKENS}{sha256_hex}"))
    }

    pub fn oidc_issuers(&self) -> Result<Vec<crate::oidc::OidcIssuer>, ReadError> {
        self.list(PREFIX_OIDC_ISSUERS)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ReadError> {
        self.list(PREFIX_NODES)
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, ReadError> {
        self.get(&format!("{PREFIX_USERS}{name}"))
    }

    pub fn users(&self) -> Result<Vec<User>, ReadError> {
        self.list(PREFIX_USERS)
    }

    /// The user's role in each project.
    pub fn grants_of(
        &self,
        user: &str,
    ) -> Result<std::collections::BTreeMap<String, Role>, ReadError> {
        let prefix = format!("{PREFIX_USER_GRANTS}{user}/");
        Ok(self
            .reader
            .scan(&prefix)?
            .into_iter()
            .filter_map(|(key, bytes)| {
                Some((
                    key[prefix.len()..].to_string(),
                    serde_json::from_slice(&bytes).ok()?,
                ))
            })
            .collect())
    }

    pub fn tokens_of(&self, user: &str) -> Result<Vec<ApiTokenRecord>, ReadError> {
        Ok(self
            .list::<ApiTokenRecord>(PREFIX_API_TOKENS)?
            .into_iter()
            .filter(|t| t.user == user)
            .collect())
    }

    /// Audit entries in order, starting after `after_seq`.
    pub fn audit_entries(
        &self,
        after_seq: u64,
    ) -> Result<Vec<crate::audit::AuditEntry>, ReadError> {
        Ok(self
            .reader
            .scan(PREFIX_AUDIT)?
            .into_iter()
            .filter(|(key, _)| {
                key[PREFIX_AUDIT.len()..]
                    .parse::<u64>()
                    .is_ok_and(|seq| seq > after_seq)
            })
            .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
            .collect())
    }

    pub fn token_owner(&self, id: &str) -> Result<Option<String>, ReadError> {
        let Some(sha) = self.get::<String>(&format!("{PREFIX_TOKEN_IDS}{id}"))? else {
            return Ok(None);
        };
        Ok(self.api_token(&sha)?.map(|t| t.user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        for good in [
            "a",
            "web-1",
            "a23456789012345678901234567890123456789012345678901234567890123",
        ] {
            assert!(validate_name("project", good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("1abc", "start with a lowercase letter"),
            ("Abc", "start with a lowercase letter"),
            ("abc-", "end with '-'"),
            ("a_b", "contains '_'"),
            ("a.b", "contains '.'"),
            (
                "a234567890123456789012345678901234567890123456789012345678901234",
                "longer than 63",
            ),
        ] {
            let err = validate_name("project", bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument);
            assert!(err.message.contains(why), "{bad}: {}", err.message);
        }
    }
}
