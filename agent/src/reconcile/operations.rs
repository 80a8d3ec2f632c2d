//! Carries out the operations the cluster recorded for this node
//! (`state::operations`): writing an uploaded image into its base volume,
//! rolling a volume back. Each runs in a task of its own; one task owns the
//! set of those running. An operation's outcome is recorded through Raft;
//! until it is, the operation stays pending and is carried out again, also
//! after this agent restarts (an import interrupted half-way is written
//! again in full, zeros included).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::cluster::node::ClusterNode;
use crate::reconcile::storage::{BlockError, BlockStore};
use crate::state::operations::{Operation, OperationError, Work};
use crate::state::Command;

/// Where uploads wait for their import: `DATA_DIR/imports/<name>`.
pub fn imports_dir(node: &ClusterNode) -> PathBuf {
    node.data_dir.path().join("imports")
}

pub async fn run(node: Weak<ClusterNode>, blocks: Weak<BlockStore>) {
    let Some(n) = node.upgrade() else { return };
    let mut applied = n.applied.subscribe();
    remove_orphaned_uploads(&n);
    drop(n);
    let mut running: JoinSet<()> = JoinSet::new();
    let mut in_progress: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        let (Some(n), Some(b)) = (node.upgrade(), blocks.upgrade()) else {
            return;
        };
        let busy: HashSet<&String> = in_progress.values().collect();
        let pending = n.state.pending_operations(n.id).unwrap_or_default();
        let new: Vec<Operation> = pending
            .into_iter()
            .filter(|o| !busy.contains(&o.id))
            .collect();
        for operation in new {
            let id = operation.id.clone();
            let (n, b) = (n.clone(), b.clone());
            let task = running.spawn(async move { carry_out(&n, &b, operation).await });
            in_progress.insert(task.id(), id);
        }
        drop((n, b));
        let sleep = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                // Cancel-safe: a finished task stays in the set until taken.
                Some(finished) = running.join_next_with_id() => {
                    let task = match finished {
                        Ok((task, ())) => task,
                        Err(e) => {
                            tracing::error!(error = %e, "an operation's task failed");
                            e.id()
                        }
                    };
                    in_progress.remove(&task);
                }
                // Cancel-safe: the value is marked seen only when this returns.
                _ = applied.changed() => break,
                () = &mut sleep => break,
            }
        }
    }
}

/// Does the work and records how it ended.
async fn carry_out(node: &Arc<ClusterNode>, blocks: &Arc<BlockStore>, operation: Operation) {
    let error = match &operation.work {
        Work::ImportImage { image, upload } => {
            let path = imports_dir(node).join(upload);
            import(node, blocks, image, &path).await.err()
        }
        Work::RollbackVolume {
            volume_id,
            snapshot_id,
        } => blocks
            .rollback(volume_id, *snapshot_id)
            .await
            .err()
            .map(|e| OperationError {
                code: match e {
                    BlockError::NotFound(_) => "not_found",
                    BlockError::Refused(_) => "failed_precondition",
                    BlockError::Unavailable(_) => "unavailable",
                }
                .into(),
                message: e.to_string(),
            }),
    };
    if let Some(e) = &error {
        tracing::warn!(operation = %operation.id, "operation failed: {}", e.message);
    }
    let finish = Command::FinishOperation {
        id: operation.id.clone(),
        error,
        now_ms: crate::cluster::join::now_ms(),
    };
    match node.write(&finish).await {
        Ok(_) => {
            if let Work::ImportImage { upload, .. } = &operation.work {
                let path = imports_dir(node).join(upload);
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(started_marker(&path));
            }
        }
        // Still pending: carried out again on a later pass.
        Err(e) => tracing::warn!(
            operation = %operation.id,
            "cannot record the end of an operation, it will run again: {}",
            crate::error_chain(&e)
        ),
    }
}

/// Present while an import is writing: a second attempt cannot assume the
/// volume still reads as zeros.
fn started_marker(upload: &Path) -> PathBuf {
    upload.with_extension("started")
}

/// Writes a checked upload into its image's base volume through this
/// node's NBD socket.
async fn import(
    node: &ClusterNode,
    blocks: &BlockStore,
    image: &str,
    upload: &Path,
) -> Result<(), OperationError> {
    let failed = |message: String| OperationError {
        code: "import_failed".into(),
        message,
    };
    let record = node
        .state
        .image(image)
        .map_err(|e| failed(crate::error_chain(&e)))?
        .ok_or_else(|| failed(format!("image {image:?} was deleted before it was written")))?;
    let head = read_head(upload).await.map_err(|e| {
        failed(format!(
            "the upload {} is gone or unreadable ({e}); upload the image again",
            upload.display()
        ))
    })?;
    let len = tokio::fs::metadata(upload)
        .await
        .map_err(|e| failed(e.to_string()))?
        .len();
    let plan = image::plan(&head, len).map_err(|e| failed(e.to_string()))?;
    let marker = started_marker(upload);
    let target_is_zero = !marker.exists();
    std::fs::write(&marker, b"").map_err(|e| failed(e.to_string()))?;
    let key = node
        .state
        .export_key()
        .map_err(|e| failed(crate::error_chain(&e)))?
        .ok_or_else(|| failed("the cluster has no export key yet; try again".into()))?;
    let export = crate::state::exports::attachment_name(
        &key,
        &record.volume_id,
        crate::state::exports::Holder::Import,
    );
    let target = format!(
        "nbd+unix:///{export}?socket={}",
        blocks.nbd_socket.display()
    );
    let limit = conversion_timeout(len);
    let converted = tokio::process::Command::new("qemu-img")
        .args(plan.qemu_img_args(upload, &target, target_is_zero))
        .kill_on_drop(true)
        .output();
    let Ok(converted) = tokio::time::timeout(limit, converted).await else {
        return Err(failed(format!(
            "qemu-img convert did not finish within {} s (at most 10 minutes plus a second per 16 MiB); the volume is left as it was",
            limit.as_secs()
        )));
    };
    match converted {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(failed(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(e) => Err(failed(format!(
            "cannot run qemu-img (install qemu-utils): {e}"
        ))),
    }
}

/// The longest the conversion of an upload of `len` bytes may take: ten
/// minutes, and a second more per 16 MiB (far slower than any disk).
fn conversion_timeout(len: u64) -> Duration {
    Duration::from_secs(600 + len / (16 << 20))
}

/// The first bytes of an upload, as many as `image::plan` looks at.
pub async fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(image::HEADER_PROBE_BYTES);
    tokio::fs::File::open(path)
        .await?
        .take(image::HEADER_PROBE_BYTES as u64)
        .read_to_end(&mut head)
        .await?;
    Ok(head)
}

/// Uploads no pending operation names (their import ended, or their
/// request failed, while this agent was down).
fn remove_orphaned_uploads(node: &ClusterNode) {
    let Ok(entries) = std::fs::read_dir(imports_dir(node)) else {
        return;
    };
    let wanted: HashSet<String> = node
        .state
        .pending_operations(node.id)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| match o.work {
            Work::ImportImage { upload, .. } => Some(upload),
            Work::RollbackVolume { .. } => None,
        })
        .collect();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let upload = name.trim_end_matches(".started").replace(".upload", "") + ".upload";
        if !wanted.contains(&upload) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
