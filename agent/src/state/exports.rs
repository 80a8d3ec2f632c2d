//! Who may open a volume through a node's NBD socket. A tenant's disk is
//! reachable only with a credential: a VM's attachment has one derived
//! from the cluster's export key (HMAC-SHA256 of the volume and the VM),
//! which only the node running the VM accepts; an operator who needs a
//! volume outside a VM gets a short-lived grant for one node
//! (`allod volume export`). The export key and the grants' secrets are
//! never shown by the API.
//!
//! Export names: `<volume-id>.<credential>` for an attachment (or an
//! image's import), `grant-<id>.<secret>` for an operator's grant.

use allod_raft::{KvRead, KvWrite, NodeId};
use hmac::Mac;
use serde::{Deserialize, Serialize};

use super::{domain, get_json, put_json, ErrorCode, Outcome, ReadError, StateView};

const KEY_EXPORT_KEY: &str = "secrets/export-key";
const PREFIX_GRANTS: &str = "export_grants/";

/// The longest a grant can be asked for.
pub const MAX_GRANT_SECS: u64 = 7 * 24 * 3600;

/// An operator's time-limited access to one volume on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportGrant {
    pub id: String,
    pub volume_id: String,
    pub project: String,
    pub volume: String,
    /// The one node whose NBD socket accepts it.
    pub node: NodeId,
    pub read_only: bool,
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Who holds an attachment's credential: a VM, or the import that writes
/// an image's base volume.
pub enum Holder<'a> {
    Vm(&'a str),
    Import,
}

/// The credential of `volume_id`'s export for `holder`: 32 hex digits of
/// HMAC-SHA256 under the cluster's export key.
pub fn credential(key: &[u8], volume_id: &str, holder: Holder<'_>) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(b"allod-nbd-export\0");
    mac.update(volume_id.as_bytes());
    mac.update(b"\0");
    match holder {
        Holder::Vm(vm_id) => {
            mac.update(b"vm\0");
            mac.update(vm_id.as_bytes());
        }
        Holder::Import => mac.update(b"import"),
    }
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// The export name of `volume_id` for `holder`: what [`ExportName::parse`]
/// reads back as an attachment.
pub fn attachment_name(key: &[u8], volume_id: &str, holder: Holder<'_>) -> String {
    format!("{volume_id}.{}", credential(key, volume_id, holder))
}

/// Whether two strings are equal, in time that does not depend on where
/// they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// What an export name asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum ExportName<'a> {
    Attachment {
        volume_id: &'a str,
        credential: &'a str,
    },
    Grant {
        id: &'a str,
        secret: &'a str,
    },
}

impl<'a> ExportName<'a> {
    pub fn parse(name: &'a str) -> Option<Self> {
        let (left, secret) = name.rsplit_once('.')?;
        if secret.is_empty() || left.is_empty() {
            return None;
        }
        Some(match left.strip_prefix("grant-") {
            Some(id) => ExportName::Grant { id, secret },
            None => ExportName::Attachment {
                volume_id: left,
                credential: secret,
            },
        })
    }
}

/// Sets the cluster's export key, once: a key already set stays.
pub(super) fn set_export_key(
    kv: &mut KvWrite<'_>,
    key: String,
) -> Result<Outcome, allod_raft::KvError> {
    if kv.get(KEY_EXPORT_KEY)?.is_none() {
        put_json(kv, KEY_EXPORT_KEY, &key)?;
    }
    Ok(Ok(serde_json::Value::Null))
}

/// Records a grant; expired grants are dropped on the way.
pub(super) fn create_grant(
    kv: &mut KvWrite<'_>,
    grant: ExportGrant,
) -> Result<Outcome, allod_raft::KvError> {
    for (key, value) in kv.scan(PREFIX_GRANTS)? {
        if serde_json::from_slice::<ExportGrant>(&value)
            .is_ok_and(|g| g.expires_at_ms <= grant.created_at_ms)
        {
            kv.delete(&key)?;
        }
    }
    let volume: Option<super::volumes::VolumeRecord> = get_json(
        kv,
        &format!(
            "{}{}/{}",
            super::PREFIX_VOLUMES,
            grant.project,
            grant.volume
        ),
    )?;
    let Some(volume) = volume else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("volume {:?} does not exist", grant.volume),
        )));
    };
    if volume.id != grant.volume_id {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "volume {:?} was replaced meanwhile; ask again",
                grant.volume
            ),
        )));
    }
    if volume.attached_to.is_some() {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "volume {:?} is attached to a VM, which is its only writer; detach it (with the VM stopped) or export a clone of a snapshot of it",
                grant.volume
            ),
        )));
    }
    if volume.read_only && !grant.read_only {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "volume {:?} is read-only; export it with --read-only",
                grant.volume
            ),
        )));
    }
    if kv
        .get(&format!("{}{:020}", super::PREFIX_NODES, grant.node))?
        .is_none()
    {
        return Ok(Err(domain(
            ErrorCode::InvalidArgument,
            format!("node {} is not a member of this cluster", grant.node),
        )));
    }
    put_json(kv, &format!("{PREFIX_GRANTS}{}", grant.id), &grant)?;
    Ok(Ok(serde_json::Value::Null))
}

impl StateView {
    /// The cluster's export key, once one is set.
    pub fn export_key(&self) -> Result<Option<Vec<u8>>, ReadError> {
        Ok(self
            .get::<String>(KEY_EXPORT_KEY)?
            .and_then(|hex_key| hex::decode(hex_key).ok()))
    }

    pub fn export_grant(&self, id: &str) -> Result<Option<ExportGrant>, ReadError> {
        self.get(&format!("{PREFIX_GRANTS}{id}"))
    }

    /// Whether `node` has a reason to be the volume's writer: the volume is
    /// attached to a VM placed there, an import or rollback of it is that
    /// node's work, or an export grant for it on that node is unexpired.
    pub fn may_write(
        &self,
        volume: &super::volumes::VolumeRecord,
        node: allod_raft::NodeId,
        now_ms: u64,
    ) -> Result<bool, ReadError> {
        use super::operations::Work;
        // Moving and scrubbing the volume is its steward's work.
        if self.steward_of(volume)? == Some(node) {
            return Ok(true);
        }
        if let Some(vm_id) = &volume.attached_to {
            return Ok(self.vm_by_id(vm_id)?.is_some_and(|vm| vm.node_id == node));
        }
        for operation in self.pending_operations(node)? {
            let mine = match &operation.work {
                Work::RollbackVolume { volume_id, .. } => *volume_id == volume.id,
                Work::ImportImage { image, .. } => {
                    self.image(image)?.is_some_and(|i| i.volume_id == volume.id)
                }
            };
            if mine {
                return Ok(true);
            }
        }
        Ok(self
            .list::<ExportGrant>(PREFIX_GRANTS)?
            .into_iter()
            .any(|g| g.volume_id == volume.id && g.node == node && g.expires_at_ms > now_ms))
    }

    /// The VM with this id, in whichever project.
    pub fn vm_by_id(&self, id: &str) -> Result<Option<super::vms::VmRecord>, ReadError> {
        Ok(self
            .list::<super::vms::VmRecord>(super::PREFIX_VMS)?
            .into_iter()
            .find(|vm| vm.id == id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_parse_and_credentials_bind_volume_and_holder() {
        assert_eq!(
            ExportName::parse("v1.abc"),
            Some(ExportName::Attachment {
                volume_id: "v1",
                credential: "abc"
            })
        );
        assert_eq!(
            ExportName::parse("grant-7f.s3cret"),
            Some(ExportName::Grant {
                id: "7f",
                secret: "s3cret"
            })
        );
        for bad in ["v1", "v1.", ".x", ""] {
            assert_eq!(ExportName::parse(bad), None, "{bad:?}");
        }
        let key = b"k".repeat(32);
        let a = credential(&key, "v1", Holder::Vm("vm1"));
        assert_eq!(a.len(), 32);
        assert_eq!(a, credential(&key, "v1", Holder::Vm("vm1")));
        assert_ne!(a, credential(&key, "v1", Holder::Vm("vm2")));
        assert_ne!(a, credential(&key, "v2", Holder::Vm("vm1")));
        assert_ne!(a, credential(&key, "v1", Holder::Import));
        assert_ne!(a, credential(b"other", "v1", Holder::Vm("vm1")));
        let name = attachment_name(&key, "v1", Holder::Vm("vm1"));
        assert_eq!(
            ExportName::parse(&name),
            Some(ExportName::Attachment {
                volume_id: "v1",
                credential: &a
            })
        );
        assert!(same_secret(&a, &a.clone()));
        assert!(!same_secret(&a, &a[..31]));
    }
}
