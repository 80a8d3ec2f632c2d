//! The cluster model: the commands that change the replicated state, how
//! they apply, and typed reads of the result. It knows nothing of HTTP,
//! clap, libvirt or the Raft node that carries it: this file holds the key
//! layout, [`Command`] with its [`Command::effects`] table and the dispatch;
//! each resource's module holds its records, its apply functions and its
//! reads.
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

pub mod audit;
pub mod auth;
pub mod exports;
pub mod ha;
pub mod migration;
pub mod network;
pub mod nodes;
pub mod operations;
pub mod projects;
pub mod quotas;
pub mod scheduler;
pub mod storage;
pub mod vms;
pub mod volumes;
pub mod zones;

use auth::{Role, TokenScope};
use nodes::{ClusterInfo, NodeRecord};
use vms::VmRecord;
use volumes::VolumeRecord;

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
        zone: zones::Zone,
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
        /// SHA-256 of the public key in the node's CSR, pinned in its record.
        #[serde(default)]
        key_sha256: Option<String>,
    },
    ForgetNode {
        id: NodeId,
    },
    SetNodeZone {
        id: NodeId,
        zone: zones::Zone,
    },
    SetQuota {
        project: String,
        quota: quotas::Quota,
    },
    /// Records a volume (validated before proposing) if the project's quota
    /// admits it, placing it on the current storage map; a clone also
    /// registers with the snapshot it reads through to.
    CreateVolume {
        volume: VolumeRecord,
        #[serde(default)]
        source: Option<volumes::VolumeSource>,
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
    /// A volume's writer (of `epoch`) records a change to its in-sync set.
    UpdateReplicas {
        volume_id: String,
        epoch: u64,
        change: volumes::ReplicaChange,
    },
    /// Cluster-wide storage settings.
    SetStorageConfig {
        change: storage::StorageConfigChange,
    },
    /// A node's storage state changes (the leader's failure detection, or
    /// a drain); the storage map follows.
    SetStorageNodeState {
        id: NodeId,
        state: storage::StorageNodeState,
        at_ms: u64,
    },
    /// Asks the volumes' stewards for a scrub (deep: every block read and
    /// checked against its checksum).
    RequestScrub {
        volume_ids: Vec<String>,
        deep: bool,
    },
    /// The recovery jobs a node runs now (none: finished).
    ReportStorageJobs {
        node: NodeId,
        jobs: Vec<storage::StorageJob>,
    },
    /// A node registers (or updates) its block store.
    SetNodeStorage {
        id: NodeId,
        storage: volumes::NodeStorage,
    },
    /// Records an image being imported, with its base volume.
    CreateImage {
        image: volumes::ImageRecord,
        volume: VolumeRecord,
        /// The node-side work that writes the image into its volume.
        #[serde(default)]
        operation: Option<operations::Operation>,
    },
    /// Records work one node must carry out (see `operations`).
    StartOperation {
        operation: operations::Operation,
    },
    /// How that work ended (`error` absent: it worked).
    FinishOperation {
        id: String,
        error: Option<operations::OperationError>,
        now_ms: u64,
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
        boot: Option<vms::BootDisk>,
        /// Ports for its NICs (their node is set where the VM is placed).
        #[serde(default)]
        nics: Vec<network::PortRecord>,
    },
    DeleteVm {
        project: String,
        name: String,
    },
    /// Desired power: `running` or `stopped` (`force`: no ACPI request).
    SetVmPower {
        project: String,
        name: String,
        power: vms::PowerState,
        force: bool,
        /// A start places the VM again on its node with the overcommit its
        /// proposer runs with, as a create does; entries written before it
        /// was carried apply with the default.
        #[serde(default = "scheduler::default_cpu_percent")]
        overcommit_cpu_percent: u32,
        #[serde(default = "scheduler::default_memory_percent")]
        overcommit_memory_percent: u32,
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
        state: vms::VmState,
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
        issuer: auth::OidcIssuer,
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
    /// Takes a project role from a user, or with no project cluster-admin.
    RevokeRole {
        user: String,
        project: Option<String>,
    },
    SetUserDisabled {
        user: String,
        disabled: bool,
    },
    /// Deletes a user with their roles and tokens.
    DeleteUser {
        user: String,
    },
    /// Sets the key attachments' export credentials derive from (hex);
    /// once set it stays.
    SetExportKey {
        key: String,
    },
    /// An operator's time-limited NBD access to a volume on one node.
    CreateExportGrant {
        grant: exports::ExportGrant,
    },
    /// VPCs, subnets, security groups, ports, IP pools, floating IPs.
    Network {
        command: network::NetCommand,
    },
    /// Failure detection and VM mobility (`state::ha`).
    Ha {
        command: ha::HaCommand,
    },
    /// Live migration (`state::migration`).
    Migration {
        command: migration::MigrationCommand,
    },
    AppendAudit {
        record: audit::AuditRecord,
    },
    /// A command and its audit entry, applied in one transaction: the entry
    /// records the command's outcome.
    Audited {
        command: Box<Command>,
        audit: audit::AuditContext,
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

pub(crate) fn put_json<T: Serialize>(
    kv: &mut KvWrite<'_>,
    key: &str,
    value: &T,
) -> Result<(), allod_raft::KvError> {
    let bytes = serde_json::to_vec(value).expect("model types always serialise");
    kv.put(key, &bytes)
}

/// What applying a command may change beyond its own records: the caches
/// and watchers outside the state machine that must hear of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// How some bearer token resolves to a principal.
    pub authentication: bool,
    /// What a node's block store or compute and network reconcilers must do.
    pub resources: bool,
}

impl Effects {
    const NONE: Effects = Effects {
        authentication: false,
        resources: false,
    };
    const AUTHENTICATION: Effects = Effects {
        authentication: true,
        resources: false,
    };
    const RESOURCES: Effects = Effects {
        authentication: false,
        resources: true,
    };
    const BOTH: Effects = Effects {
        authentication: true,
        resources: true,
    };
}

impl Command {
    /// The one table of what each command may change; a new command does
    /// not compile until it has a row.
    pub fn effects(&self) -> Effects {
        match self {
            Command::Audited { command, .. } => command.effects(),
            Command::InitCluster { .. } => Effects::BOTH,
            Command::DeleteProject { .. }
            | Command::GrantRole { .. }
            | Command::RevokeToken { .. }
            | Command::RevokeRole { .. }
            | Command::SetUserDisabled { .. }
            | Command::DeleteUser { .. }
            | Command::PutOidcIssuer { .. }
            | Command::DeleteOidcIssuer { .. } => Effects::AUTHENTICATION,
            Command::CreateVolume { .. }
            | Command::DeleteVolume { .. }
            | Command::ResizeVolume { .. }
            | Command::CreateSnapshot { .. }
            | Command::DeleteSnapshot { .. }
            | Command::AcquireLease { .. }
            | Command::UpdateReplicas { .. }
            | Command::SetNodeStorage { .. }
            | Command::SetStorageNodeState { .. }
            | Command::SetStorageConfig { .. }
            | Command::RequestScrub { .. }
            | Command::CreateImage { .. }
            | Command::FinishImage { .. }
            | Command::DeleteImage { .. }
            | Command::StartOperation { .. }
            | Command::FinishOperation { .. }
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
            | Command::Ha { .. }
            | Command::Migration { .. }
            | Command::ForgetNode { .. } => Effects::RESOURCES,
            Command::CreateProject { .. }
            | Command::UpdateProject { .. }
            | Command::SetQuota { .. }
            | Command::SetNodeCapacity { .. }
            | Command::SetNodeMaintenance { .. }
            | Command::SetNodeZone { .. }
            | Command::CreateJoinToken { .. }
            | Command::CreateUser { .. }
            | Command::CreateToken { .. }
            | Command::SetExportKey { .. }
            | Command::CreateExportGrant { .. }
            | Command::ReportStorageJobs { .. }
            | Command::AppendAudit { .. } => Effects::NONE,
        }
    }
}

/// Applies one command to the key/value state: each resource's module holds
/// the function that does it.
fn apply_command(kv: &mut KvWrite<'_>, command: Command) -> Result<Outcome, allod_raft::KvError> {
    match command {
        Command::InitCluster {
            info,
            admin_token_sha256,
            first_node,
        } => nodes::init_cluster(kv, info, admin_token_sha256, first_node),
        Command::CreateJoinToken {
            id,
            secret_sha256,
            now_ms,
            expires_at_ms,
        } => nodes::create_join_token(kv, id, secret_sha256, now_ms, expires_at_ms),
        Command::ConsumeJoinToken {
            id,
            secret_sha256,
            now_ms,
            node_name,
            key_sha256,
        } => nodes::consume_join_token(kv, id, secret_sha256, now_ms, node_name, key_sha256),
        Command::ForgetNode { id } => {
            let outcome = nodes::forget_node(kv, id)?;
            storage::recompute_map(kv)?;
            Ok(outcome)
        }
        Command::SetNodeZone { id, zone } => nodes::set_node_zone(kv, id, zone),
        Command::SetNodeMaintenance { id, maintenance } => nodes::update_node(kv, id, |_, node| {
            node.maintenance = maintenance;
            Ok(Ok(()))
        }),
        Command::SetNodeCapacity {
            id,
            vcpus,
            memory_bytes,
        } => nodes::update_node(kv, id, |_, node| {
            node.vcpus = vcpus;
            node.memory_bytes = memory_bytes;
            Ok(Ok(()))
        }),
        Command::CreateProject {
            name,
            description,
            now_ms,
            zone,
        } => projects::create_project(kv, name, description, now_ms, zone),
        Command::UpdateProject { name, description } => {
            projects::update_project(kv, name, description)
        }
        Command::DeleteProject { name } => projects::delete_project(kv, name),
        Command::SetQuota { project, quota } => projects::set_quota(kv, project, quota),
        Command::Network { command } => network::apply(kv, command),
        Command::Ha { command } => ha::apply(kv, command),
        Command::Migration { command } => migration::apply(kv, command),
        Command::CreateVolume { volume, source } => volumes::create_volume(kv, volume, source),
        Command::DeleteVolume { project, name } => volumes::delete_volume(kv, &project, &name),
        Command::ResizeVolume {
            project,
            name,
            size_bytes,
        } => volumes::resize_volume(kv, &project, &name, size_bytes),
        Command::CreateSnapshot {
            project,
            volume,
            name,
            now_ms,
        } => volumes::create_snapshot(kv, &project, &volume, &name, now_ms),
        Command::DeleteSnapshot {
            project,
            volume,
            name,
        } => volumes::delete_snapshot(kv, &project, &volume, &name),
        Command::AcquireLease { volume_id, node } => volumes::acquire_lease(kv, &volume_id, node),
        Command::UpdateReplicas {
            volume_id,
            epoch,
            change,
        } => volumes::update_replicas(kv, &volume_id, epoch, change),
        Command::SetNodeStorage { id, storage } => volumes::set_node_storage(kv, id, storage),
        Command::SetStorageConfig { change } => storage::set_storage_config(kv, change),
        Command::SetStorageNodeState { id, state, at_ms } => {
            storage::set_storage_node_state(kv, id, state, at_ms)
        }
        Command::ReportStorageJobs { node, jobs } => storage::report_jobs(kv, node, jobs),
        Command::RequestScrub { volume_ids, deep } => storage::request_scrub(kv, volume_ids, deep),
        Command::CreateImage {
            image,
            volume,
            operation,
        } => {
            let outcome = volumes::create_image(kv, image, volume)?;
            match (outcome, operation) {
                (Ok(created), Some(operation)) => {
                    Ok(operations::start(kv, operation)?.map(|_| created))
                }
                (outcome, _) => Ok(outcome),
            }
        }
        Command::StartOperation { operation } => operations::start(kv, operation),
        Command::FinishOperation { id, error, now_ms } => {
            operations::finish(kv, &id, error, now_ms)
        }
        Command::FinishImage { name, now_ms } => volumes::finish_image(kv, &name, now_ms),
        Command::DeleteImage { name } => volumes::delete_image(kv, &name),
        Command::CreateVm {
            vm,
            overcommit_cpu_percent,
            overcommit_memory_percent,
            boot,
            nics,
        } => vms::create_vm(
            kv,
            vm,
            scheduler::Overcommit::from_percent(overcommit_cpu_percent, overcommit_memory_percent),
            boot,
            nics,
        ),
        Command::SetVmPower {
            project,
            name,
            power,
            force,
            overcommit_cpu_percent,
            overcommit_memory_percent,
        } => vms::set_power(
            kv,
            &project,
            &name,
            power,
            force,
            scheduler::Overcommit::from_percent(overcommit_cpu_percent, overcommit_memory_percent),
        ),
        Command::RebootVm { project, name } => vms::reboot_vm(kv, &project, &name),
        Command::ResizeVm {
            project,
            name,
            vcpus,
            memory_bytes,
        } => vms::resize_vm(kv, &project, &name, vcpus, memory_bytes),
        Command::ReportVmState {
            project,
            name,
            node,
            state,
            reason,
            generation,
        } => vms::report_vm(kv, &project, &name, node, state, reason, generation),
        Command::DeleteVm { project, name } => vms::delete_vm(kv, &project, &name),
        Command::AttachVolume {
            project,
            vm,
            volume_project,
            volume,
        } => vms::attach(kv, &project, &vm, &volume_project, &volume, true),
        Command::DetachVolume {
            project,
            vm,
            volume_project,
            volume,
        } => vms::attach(kv, &project, &vm, &volume_project, &volume, false),
        Command::PutOidcIssuer { issuer } => auth::put_oidc_issuer(kv, issuer),
        Command::DeleteOidcIssuer { name } => auth::delete_oidc_issuer(kv, name),
        Command::CreateUser {
            name,
            password_phc,
            now_ms,
        } => auth::create_user(kv, name, password_phc, now_ms),
        Command::GrantRole {
            user,
            project,
            role,
        } => auth::grant_role(kv, user, project, role),
        Command::CreateToken {
            id,
            secret_sha256,
            user,
            scope,
            now_ms,
            expires_at_ms,
        } => auth::create_token(kv, id, secret_sha256, user, scope, now_ms, expires_at_ms),
        Command::RevokeToken { id } => auth::revoke_token(kv, id),
        Command::RevokeRole { user, project } => auth::revoke_role(kv, user, project),
        Command::SetUserDisabled { user, disabled } => auth::set_user_disabled(kv, user, disabled),
        Command::DeleteUser { user } => auth::delete_user(kv, user),
        Command::SetExportKey { key } => exports::set_export_key(kv, key),
        Command::CreateExportGrant { grant } => exports::create_grant(kv, grant),
        Command::AppendAudit { record } => {
            let seq = audit::append_audit(kv, record)?;
            Ok(Ok(serde_json::json!({ "seq": seq })))
        }
        Command::Audited { command, audit } => {
            // The node that authorised the call may have been a moment
            // behind: a token revoked or expired by the time the change is
            // applied in log order changes nothing.
            let outcome = match auth::token_still_valid(kv, &audit)? {
                Err(e) => Err(e),
                Ok(()) => apply_command(kv, *command)?,
            };
            let result = match &outcome {
                Ok(_) => "ok",
                Err(e) => e.code.as_str(),
            };
            audit::append_audit(kv, audit.with_result(result))?;
            Ok(outcome)
        }
    }
}

impl ClusterApply {
    fn apply_one(
        &self,
        kv: &mut KvWrite<'_>,
        index: u64,
        command: &str,
    ) -> Result<Outcome, allod_raft::KvError> {
        match serde_json::from_str::<Command>(command) {
            Ok(command) => {
                let effects = command.effects();
                if effects.authentication {
                    self.auth_changed.store(true, Ordering::Relaxed);
                }
                if effects.resources {
                    self.resources_changed.store(true, Ordering::Relaxed);
                }
                apply_command(kv, command)
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

/// An entry's commands: `{"batch": [command, ...]}`, each command kept as
/// its text so that one that does not parse fails alone.
#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<&'a serde_json::value::RawValue>,
}

impl Apply for ClusterApply {
    /// An entry holds either one command or `{"batch": [command, ...]}`
    /// (JSON), applied in order with one outcome each.
    fn apply(
        &self,
        kv: &mut KvWrite<'_>,
        log_id: &LogId<NodeId>,
        command: &[u8],
    ) -> Result<serde_json::Value, allod_raft::KvError> {
        let Ok(text) = std::str::from_utf8(command) else {
            tracing::warn!(
                index = log_id.index,
                "committed entry is not UTF-8 text; ignoring it"
            );
            let refused: Outcome = Err(domain(
                ErrorCode::InvalidArgument,
                "command not understood: not UTF-8 text".to_string(),
            ));
            return Ok(serde_json::to_value(refused).expect("outcomes serialise"));
        };
        if let Ok(Batch { batch }) = serde_json::from_str::<Batch>(text) {
            let mut outcomes = Vec::with_capacity(batch.len());
            for one in batch {
                outcomes.push(self.apply_one(kv, log_id.index, one.get())?);
            }
            return Ok(serde_json::to_value(outcomes).expect("outcomes serialise"));
        }
        let outcome = self.apply_one(kv, log_id.index, text)?;
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
