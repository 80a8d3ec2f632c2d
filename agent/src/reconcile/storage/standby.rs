//! A live migration's destination serves its guest's disks in standby:
//! the incoming QEMU connects (and its devices read a little) while the
//! guest still runs on the source, so the connection is accepted and reads
//! are served at the source's writer epoch through a handle of their own,
//! but this node takes no writer lease. Once the switch is recorded (which
//! moves the lease here), the first request opens the volume for writing,
//! fencing the source's writer at the new epoch, and the connection goes
//! on with that handle. A write before the switch waits for it; a
//! migration that fails ends the connection.

use std::sync::Arc;
use std::time::Duration;

use storage::nbd::Standby;
use storage::VolumeHandle;

use super::{BlockError, BlockStore};
use crate::state::volumes::VolumeRecord;

/// How long a standby connection may wait for its switch: far longer than
/// any migration that converges.
const LONGEST_WAIT: Duration = Duration::from_secs(3600);

/// The reading handle of a standby connection and how it turns active.
pub(super) fn open(
    blocks: &Arc<BlockStore>,
    volume: &VolumeRecord,
    vm_id: &str,
) -> Result<(Arc<VolumeHandle>, Standby), BlockError> {
    let mut spec = blocks.spec(volume)?;
    spec.epoch = volume.lease.as_ref().map_or(0, |l| l.epoch);
    let reader = blocks.storage.open_reader(spec);
    let node = blocks.node()?;
    let id = vm_id.to_string();
    let switched = Box::new(move || {
        node.state
            .vm_by_id(&id)
            .ok()
            .flatten()
            .is_some_and(|vm| vm.node_id == node.id)
    });
    let (blocks, volume_id, vm_id) = (blocks.clone(), volume.id.clone(), vm_id.to_string());
    let activate = Box::pin(async move {
        tokio::time::timeout(LONGEST_WAIT, switched_here(&blocks, &vm_id))
            .await
            .map_err(|_| format!("no switch within {} s", LONGEST_WAIT.as_secs()))??;
        blocks
            .open_for_write(&volume_id)
            .await
            .map(|(_, handle)| handle)
            .map_err(|e| e.to_string())
    });
    Ok((reader, Standby { switched, activate }))
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
