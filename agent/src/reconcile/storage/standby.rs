//! A live migration's destination serves its guest's disks in standby:
//! the incoming QEMU connects while the guest is still running on the
//! source, so the connection is accepted, but this node takes no writer
//! lease and serves no request until the switch is recorded (which moves
//! the lease here). The first request then opens the volume for writing,
//! which fences the source's writer at the new epoch. A migration that
//! fails instead ends the connection.

use std::sync::Arc;
use std::time::Duration;

use storage::nbd::BoxFuture;
use storage::VolumeHandle;

use super::{BlockError, BlockStore};
use crate::state::volumes::VolumeRecord;

/// How long a standby connection may wait for its switch: far longer than
/// any migration that converges.
const LONGEST_WAIT: Duration = Duration::from_secs(3600);

/// The volume's handle for a standby connection (no lease, not
/// activated) and what its first request waits for.
pub(super) fn open(
    blocks: &Arc<BlockStore>,
    volume: &VolumeRecord,
    vm_id: &str,
) -> Result<(Arc<VolumeHandle>, BoxFuture<'static, Result<(), String>>), BlockError> {
    let handle = blocks.storage.open(blocks.spec(volume)?);
    let (blocks, volume_id, vm_id) = (blocks.clone(), volume.id.clone(), vm_id.to_string());
    let ready = Box::pin(async move {
        tokio::time::timeout(LONGEST_WAIT, switched_here(&blocks, &vm_id))
            .await
            .map_err(|_| format!("no switch within {} s", LONGEST_WAIT.as_secs()))??;
        blocks
            .open_for_write(&volume_id)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    });
    Ok((handle, ready))
}

/// Waits until VM `vm_id` is placed on this node; an error once it is
/// neither here nor on its way.
async fn switched_here(blocks: &BlockStore, vm_id: &str) -> Result<(), String> {
    let node = blocks.node().map_err(|e| e.to_string())?;
    let mut applied = node.applied.subscribe();
    loop {
        let vm = node
            .state
            .vm_by_id(vm_id)
            .map_err(|e| e.to_string())?
            .ok_or("the VM was deleted")?;
        if vm.node_id == node.id {
            return Ok(());
        }
        if !crate::reconcile::migration::incoming(&vm, node.id) {
            return Err("the VM's migration to this node ended without it".into());
        }
        // A closed channel means the node is going away.
        applied
            .changed()
            .await
            .map_err(|_| "this node is shutting down".to_string())?;
    }
}
