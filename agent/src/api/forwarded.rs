//! The leader's check of a write another node forwarded to it.
//!
//! A follower's word is not enough: a node may only report its own state
//! (its VMs' states, its capacity, its store, the leases and replica sets
//! it holds as a volume's writer), and a change a user asked for is made
//! only when the credential the user gave, carried with the write, lets
//! that user make it, decided by the same rules ([`decide`]) the API applies
//! to its routes. So a member, or a stolen node certificate, cannot mint
//! itself an admin token by forwarding `CreateToken`.

use crate::state::ha::HaCommand;
use crate::state::migration::MigrationCommand;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use allod_raft::NodeId;

use crate::api::authz::{
    authenticate, decide, AuthServices, Decision, Permission, TOKEN_OWNER_PARAM,
};
use crate::cluster::node::{ClusterNode, WriteAuthority};
use crate::cluster::request_audit::Credential;
use crate::state::auth::Role;
use crate::state::network::NetCommand;
use crate::state::operations::Work;
use crate::state::Command;

/// The API's rules, applied on the leader to forwarded writes.
pub struct ForwardedWrites {
    pub node: Weak<ClusterNode>,
    pub auth: Arc<AuthServices>,
}

/// What a command needs of the node that forwarded it, or of its caller.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    /// The command proves itself (a join token's secret, checked at apply).
    Nothing,
    /// Any member: an operator's action on a member's own console (join
    /// tokens, removing a node, the audit entries a node writes).
    Member,
    /// Only the node named: a node reports its own state.
    Node(NodeId),
    /// The caller's credential must pass every one of these checks (a
    /// route's permission with its path parameters).
    Caller(Vec<(Permission, HashMap<String, String>)>),
    /// Never forwarded.
    Never,
    /// Not now, and why.
    Refused(String),
}

fn in_project(name: &str, role: Role) -> (Permission, HashMap<String, String>) {
    (
        Permission::Project {
            param: "name",
            role,
        },
        HashMap::from([("name".to_string(), name.to_string())]),
    )
}

fn project(name: &str, role: Role) -> Need {
    Need::Caller(vec![in_project(name, role)])
}

fn admin() -> Need {
    Need::Caller(vec![(Permission::ClusterAdmin, HashMap::new())])
}

/// What `command` needs, reading the leader's state where the command
/// names an object by id.
fn need(node: &ClusterNode, command: &Command) -> Result<Need, String> {
    let read = |e: crate::state::ReadError| format!("cannot read the cluster state: {e}");
    let member = |p: &str| project(p, Role::ProjectMember);
    Ok(match command {
        Command::InitCluster { .. } | Command::Audited { .. } => Need::Never,
        // Every join pins the key it joins with.
        Command::ConsumeJoinToken {
            key_sha256: None, ..
        } => Need::Refused("a join must name the key it joins with".into()),
        Command::ConsumeJoinToken { .. } => Need::Nothing,
        Command::CreateJoinToken { .. }
        | Command::AppendAudit { .. }
        | Command::SetExportKey { .. } => Need::Member,
        // Only after Raft let the node go (`remove_member` does both), so
        // that a member cannot revoke a voter Raft still counts on.
        Command::ForgetNode { id } => {
            if node.member_of(*id).is_some() {
                Need::Refused(format!(
                    "node {id} is still a member of Raft; `allod cluster remove` takes it out first"
                ))
            } else {
                Need::Member
            }
        }
        Command::ReportVmState { node, .. } => Need::Node(*node),
        Command::AcquireLease {
            volume_id,
            node: to,
        } => {
            let volume = node.state.volume_by_id(volume_id).map_err(read)?;
            match volume {
                Some(volume)
                    if !node
                        .state
                        .may_write(&volume, *to, crate::cluster::join::now_ms())
                        .map_err(read)? =>
                {
                    Need::Refused(format!(
                        "node {to} has no reason to write volume {volume_id}: it is not attached to a VM there, \
                         no import or rollback of it is that node's work, and no export grant names that node"
                    ))
                }
                _ => Need::Node(*to),
            }
        }
        Command::SetStorageConfig { .. } | Command::RequestScrub { .. } => admin(),
        // Failure detection is the leader's own: no member may declare
        // another down or out on its word.
        // Draining is an operator's removal from a member's console.
        Command::SetStorageNodeState {
            state: crate::state::storage::StorageNodeState::Draining,
            ..
        } => Need::Member,
        Command::SetStorageNodeState { .. } => Need::Never,
        Command::ReportStorageJobs { node: id, .. } => Need::Node(*id),
        Command::SetNodeStorage { id, .. }
        | Command::SetNodeCapacity { id, .. }
        | Command::SetNodeMaintenance { id, .. } => Need::Node(*id),
        Command::UpdateReplicas { volume_id, .. } => {
            match node.state.volume_by_id(volume_id).map_err(read)? {
                Some(volume) => match volume.lease {
                    Some(lease) => Need::Node(lease.node),
                    None => Need::Never,
                },
                None => Need::Nothing,
            }
        }
        Command::FinishOperation { id, .. } => match node.state.operation(id).map_err(read)? {
            Some(operation) => Need::Node(operation.node),
            None => Need::Nothing,
        },
        Command::StartOperation { operation } => match &operation.work {
            Work::ImportImage { .. } => admin(),
            Work::RollbackVolume { volume_id, .. } => {
                match node.state.volume_by_id(volume_id).map_err(read)? {
                    Some(volume) => member(&volume.project),
                    None => admin(),
                }
            }
        },
        Command::CreateProject { .. }
        | Command::DeleteProject { .. }
        | Command::SetQuota { .. }
        | Command::SetNodeZone { .. }
        | Command::CreateImage { .. }
        | Command::FinishImage { .. }
        | Command::DeleteImage { .. }
        | Command::PutOidcIssuer { .. }
        | Command::DeleteOidcIssuer { .. }
        | Command::CreateUser { .. }
        | Command::GrantRole { .. }
        | Command::RevokeRole { .. }
        | Command::SetUserDisabled { .. }
        | Command::DeleteUser { .. }
        | Command::CreateExportGrant { .. } => admin(),
        Command::UpdateProject { name, .. } => project(name, Role::ProjectAdmin),
        Command::CreateVolume { volume, .. } => member(&volume.project),
        Command::DeleteVolume { project, .. }
        | Command::ResizeVolume { project, .. }
        | Command::CreateSnapshot { project, .. }
        | Command::DeleteSnapshot { project, .. }
        | Command::DeleteVm { project, .. }
        | Command::SetVmPower { project, .. }
        | Command::RebootVm { project, .. }
        | Command::ResizeVm { project, .. } => member(project),
        Command::CreateVm { vm, .. } => member(&vm.project),
        Command::AttachVolume {
            project,
            volume_project,
            ..
        }
        | Command::DetachVolume {
            project,
            volume_project,
            ..
        } => Need::Caller(vec![
            in_project(project, Role::ProjectMember),
            in_project(volume_project, Role::ProjectMember),
        ]),
        Command::CreateToken { user, .. } => Need::Caller(vec![(
            Permission::SelfOrClusterAdmin { param: "user" },
            HashMap::from([("user".to_string(), user.clone())]),
        )]),
        Command::RevokeToken { id } => {
            let mut params = HashMap::from([("id".to_string(), id.clone())]);
            if let Some(owner) = node.state.token_owner(id).map_err(read)? {
                params.insert(TOKEN_OWNER_PARAM.to_string(), owner);
            }
            Need::Caller(vec![(
                Permission::TokenOwnerOrClusterAdmin { param: "id" },
                params,
            )])
        }
        // Drains are an operator's; failure detection and what follows
        // from it are the leader's own.
        Command::Ha {
            command: HaCommand::Drain { .. } | HaCommand::Resume { .. },
        } => admin(),
        Command::Ha { .. } => Need::Never,
        // Operators move VMs; each step after is the node's that takes it.
        Command::Migration { command } => match command {
            MigrationCommand::Start { .. } => admin(),
            MigrationCommand::Progress { node, .. }
            | MigrationCommand::Switched { node, .. }
            | MigrationCommand::Failed { node, .. }
            | MigrationCommand::Resumed { node, .. }
            | MigrationCommand::SetEndpoint { id: node, .. } => Need::Node(*node),
        },
        Command::Network { command } => match command {
            NetCommand::SetUnderlay { node, .. } => Need::Node(*node),
            NetCommand::CreatePool { .. } | NetCommand::DeletePool { .. } => admin(),
            NetCommand::CreateVpc { vpc } => member(&vpc.project),
            NetCommand::CreateSubnet { subnet } => member(&subnet.project),
            NetCommand::CreateSecurityGroup { group } => member(&group.project),
            NetCommand::CreatePort { port } => member(&port.project),
            NetCommand::DeleteVpc { project, .. }
            | NetCommand::DeleteSubnet { project, .. }
            | NetCommand::DeleteSecurityGroup { project, .. }
            | NetCommand::AddRule { project, .. }
            | NetCommand::DeleteRule { project, .. }
            | NetCommand::DeletePort { project, .. }
            | NetCommand::AllocateFip { project, .. }
            | NetCommand::BindFip { project, .. }
            | NetCommand::ReleaseFip { project, .. } => member(project),
        },
    })
}

impl ForwardedWrites {
    async fn check(
        &self,
        from: NodeId,
        credential: Option<Credential>,
        command: Command,
    ) -> Result<Command, String> {
        let node = self
            .node
            .upgrade()
            .ok_or_else(|| "the leader is shutting down".to_string())?;
        let (inner, mut audit) = match command {
            Command::Audited { command, audit } => (*command, Some(audit)),
            other => (other, None),
        };
        // The command's name, for a refusal only.
        let op = || {
            serde_json::to_value(&inner)
                .ok()
                .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
                .unwrap_or_default()
        };
        match need(&node, &inner)? {
            Need::Nothing | Need::Member => {}
            Need::Never => return Err(format!("a {} command is never forwarded", op())),
            Need::Refused(why) => return Err(why),
            Need::Node(id) if id == from => {}
            Need::Node(id) => {
                let why = "a node reports only its own state";
                return Err(format!(
                    "node {from} may not write {} for node {id}: {why}",
                    op()
                ));
            }
            Need::Caller(checks) => {
                let who = match credential {
                    None => {
                        return Err(format!(
                            "node {from} forwarded {} without the caller's credential; only a user's request can make it",
                            op()
                        ))
                    }
                    Some(Credential::Password { user, password }) => {
                        self.password_caller(&node, &inner, user, password).await?
                    }
                    Some(Credential::Bearer(token)) => {
                        let principal = authenticate(&node, &self.auth, &token)
                            .await
                            .map_err(|e| format!("the caller's credential is refused: {e}"))?;
                        for (permission, params) in &checks {
                            match decide(*permission, &principal, params) {
                                Decision::Allow => {}
                                Decision::Forbidden(why) | Decision::Hidden(why) => {
                                    return Err(why)
                                }
                            }
                        }
                        (principal.user, principal.token_id)
                    }
                };
                // The entry names the caller as the leader resolved them.
                if let Some(audit) = audit.as_mut() {
                    (audit.user, audit.token_id) = who;
                }
            }
        }
        Ok(match audit {
            Some(audit) => Command::Audited {
                command: Box::new(inner),
                audit,
            },
            None => inner,
        })
    }

    /// A login through a follower: the password is checked again, and it
    /// only ever yields that user's own token.
    async fn password_caller(
        &self,
        node: &ClusterNode,
        command: &Command,
        user: String,
        password: String,
    ) -> Result<(String, String), String> {
        match command {
            Command::CreateToken { user: owner, .. } if *owner == user => {}
            _ => return Err("a password only ever creates its own user's login token".into()),
        }
        let phc = node
            .state
            .user(&user)
            .map_err(|e| format!("cannot read the cluster state: {e}"))?
            .filter(|u| !u.disabled)
            .and_then(|u| u.password_phc);
        if !self.auth.login.verify(password, phc).await {
            return Err("unknown user or wrong password".into());
        }
        Ok((user, "-".into()))
    }
}

impl WriteAuthority for ForwardedWrites {
    fn authorize(
        &self,
        from: NodeId,
        credential: Option<Credential>,
        command: Command,
    ) -> Pin<Box<dyn Future<Output = Result<Command, String>> + Send + '_>> {
        Box::pin(self.check(from, credential, command))
    }
}
