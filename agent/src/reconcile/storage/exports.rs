//! The NBD server's side in the agent: which export names open which
//! volume, for whom, and whether this node may serve them (the VM's own
//! node; the node it migrates to, in standby; an operator's grant).

use std::sync::{Arc, Weak};

use storage::nbd::{BoxFuture, Export, ExportInfo, Exports};

use super::{standby, BlockStore, OpenGrant};
use crate::state::volumes::VolumeRecord;

pub(super) struct AgentExports(pub(super) Weak<BlockStore>);

/// What an export name was found to give.
struct Resolved {
    volume: VolumeRecord,
    read_only: bool,
    /// The operator's grant it was opened with (id, expiry), if any.
    grant: Option<(String, u64)>,
    /// The VM arriving here by live migration whose disk it is: served in
    /// standby until the switch.
    standby: Option<String>,
}

/// The one answer to an export name that opens nothing: it does not say
/// whether the volume exists or which part was wrong.
const NO_EXPORT: &str = "no such export, or its credential is wrong, expired or for another node; \
     get one with `allod volume export`";

impl AgentExports {
    fn resolve(&self, name: &str) -> Result<(Arc<BlockStore>, Resolved), String> {
        use crate::state::exports::{credential, same_secret, ExportName, Holder};
        let blocks = self.0.upgrade().ok_or("this node is shutting down")?;
        let node = blocks.node().map_err(|e| e.to_string())?;
        let refused = || {
            tracing::info!(export = %crate::units::truncate_at_char(name, 64), "NBD export refused");
            NO_EXPORT.to_string()
        };
        let state = &node.state;
        let read = |e: crate::state::ReadError| e.to_string();
        match ExportName::parse(name).ok_or_else(refused)? {
            ExportName::Attachment {
                volume_id,
                credential: given,
            } => {
                let key = state.export_key().map_err(read)?.ok_or_else(refused)?;
                let volume = state
                    .volume_by_id(volume_id)
                    .map_err(read)?
                    .ok_or_else(refused)?;
                let mut standby = None;
                let holder = match &volume.attached_to {
                    // Only the node the VM is placed on serves its disks,
                    // and the one it migrates to, in standby.
                    Some(vm_id) => {
                        let vm = state.vm_by_id(vm_id).map_err(read)?.ok_or_else(refused)?;
                        if vm.node_id != node.id {
                            if !crate::reconcile::migration::incoming(&vm, node.id) {
                                return Err(refused());
                            }
                            standby = Some(vm.id.clone());
                        }
                        Holder::Vm(vm_id)
                    }
                    None if volume.state == crate::state::volumes::VolumeState::Importing => {
                        let importing_here = state
                            .pending_operations(node.id)
                            .map_err(read)?
                            .into_iter()
                            .any(|o| matches!(&o.work, crate::state::operations::Work::ImportImage { image, .. }
                                if state.image(image).ok().flatten().is_some_and(|i| i.volume_id == volume.id)));
                        if !importing_here {
                            return Err(refused());
                        }
                        Holder::Import
                    }
                    None => return Err(refused()),
                };
                if !same_secret(&credential(&key, &volume.id, holder), given) {
                    return Err(refused());
                }
                let read_only = volume.read_only;
                Ok((
                    blocks,
                    Resolved {
                        volume,
                        read_only,
                        grant: None,
                        standby,
                    },
                ))
            }
            ExportName::Grant { id, secret } => {
                let grant = state.export_grant(id).map_err(read)?.ok_or_else(refused)?;
                let fresh = grant.expires_at_ms > crate::cluster::join::now_ms();
                let sha = crate::cluster::join::sha256_hex(secret);
                if !fresh || grant.node != node.id || !same_secret(&sha, &grant.secret_sha256) {
                    return Err(refused());
                }
                let volume = state
                    .volume_by_id(&grant.volume_id)
                    .map_err(read)?
                    .ok_or_else(refused)?;
                // A VM attached since is the volume's only writer.
                if volume.attached_to.is_some() {
                    return Err(refused());
                }
                let read_only = grant.read_only || volume.read_only;
                Ok((
                    blocks,
                    Resolved {
                        volume,
                        read_only,
                        grant: Some((grant.id, grant.expires_at_ms)),
                        standby: None,
                    },
                ))
            }
        }
    }
}

impl AgentExports {
    /// [`Self::resolve`], asked again after catching up with the leader
    /// when it refuses: a grant or attachment committed moments ago may not
    /// be applied on this node yet. Concurrent refusals share a catch-up.
    async fn resolve_current(&self, name: &str) -> Result<(Arc<BlockStore>, Resolved), String> {
        let arrived_ms = crate::cluster::node::mono_ms();
        let first = self.resolve(name);
        if first.is_ok() {
            return first;
        }
        let node = self
            .0
            .upgrade()
            .ok_or("this node is shutting down")?
            .node()
            .map_err(|e| e.to_string())?;
        if node
            .caught_up_since(arrived_ms, std::time::Duration::ZERO)
            .await
            .is_err()
        {
            return first;
        }
        self.resolve(name)
    }
}

impl Exports for AgentExports {
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Export, String>> {
        Box::pin(async move {
            let (blocks, resolved) = self.resolve_current(name).await?;
            if let Some(vm_id) = &resolved.standby {
                let (handle, standby) =
                    standby::open(&blocks, &resolved.volume, vm_id).map_err(|e| e.to_string())?;
                return Ok(Export {
                    handle,
                    read_only: resolved.read_only,
                    withdrawn: None,
                    standby: Some(standby),
                });
            }
            let node = blocks.node().map_err(|e| e.to_string())?;
            let withdrawn = match &resolved.grant {
                // A VM's own disk: operators' connections to it end here.
                None => {
                    blocks.withdraw_grants(&node, Some(&resolved.volume.id));
                    None
                }
                Some((grant_id, expires_at_ms)) => {
                    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    blocks.open_grants.lock().unwrap().push(OpenGrant {
                        grant_id: grant_id.clone(),
                        volume_id: resolved.volume.id.clone(),
                        expires_at_ms: *expires_at_ms,
                        withdrawn: flag.clone(),
                    });
                    Some(flag)
                }
            };
            let (_, handle) = blocks
                .open_for_write(&resolved.volume.id)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Export {
                handle,
                read_only: resolved.read_only,
                withdrawn,
                standby: None,
            })
        })
    }

    fn describe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ExportInfo, String>> {
        Box::pin(async move {
            let (_, resolved) = self.resolve_current(name).await?;
            Ok(ExportInfo {
                size: resolved.volume.size_bytes,
                read_only: resolved.read_only,
            })
        })
    }

    /// Nothing is listed: an export is reached only by a name its holder
    /// was given.
    fn list(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async { Vec::new() })
    }
}
