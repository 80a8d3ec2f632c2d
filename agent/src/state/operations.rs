//! Work that must happen on one node — writing an uploaded image into its
//! base volume, rolling a volume back to a snapshot — recorded through Raft
//! before it starts. The node's reconciler carries it out and records the
//! outcome, so a node that dies part-way finds the operation again when it
//! comes back and retries it: an image is never left `importing` for good.

use allod_raft::{KvError, KvRead, KvWrite, NodeId};
use serde::{Deserialize, Serialize};

use super::{domain, get_json, put_json, ErrorCode, Outcome, ReadError, StateView};

/// `operations/<id>`.
pub const PREFIX_OPERATIONS: &str = "operations/";

/// Finished operations are kept this long for whoever waits on them, then
/// dropped when another operation starts.
const KEEP_FINISHED_MS: u64 = 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    /// The node that carries it out.
    pub node: NodeId,
    pub work: Work,
    pub created_at_ms: u64,
    pub state: OperationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OperationError>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    /// Writes the upload (a file of the node's data directory, already
    /// checked) into the image's base volume.
    ImportImage {
        image: String,
        /// The file's name under `DATA_DIR/imports/`.
        upload: String,
    },
    /// Returns every object of the volume to the snapshot's content.
    RollbackVolume { volume_id: String, snapshot_id: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Pending,
    Done,
    Failed,
}

/// Why an operation failed: an API error code and words for the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationError {
    pub code: String,
    pub message: String,
}

impl Operation {
    /// A new operation, to be carried out by `node`.
    pub fn pending(id: String, node: NodeId, work: Work, now_ms: u64) -> Self {
        Operation {
            id,
            node,
            work,
            created_at_ms: now_ms,
            state: OperationState::Pending,
            error: None,
            finished_at_ms: None,
        }
    }
}

fn key(id: &str) -> String {
    format!("{PREFIX_OPERATIONS}{id}")
}

/// Records an operation (pending), dropping finished ones past their time.
pub(super) fn start(kv: &mut KvWrite<'_>, operation: Operation) -> Result<Outcome, KvError> {
    if kv.get(&key(&operation.id))?.is_some() {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!("operation {:?} already exists", operation.id),
        )));
    }
    for (old_key, bytes) in kv.scan(PREFIX_OPERATIONS)? {
        let Ok(old) = serde_json::from_slice::<Operation>(&bytes) else {
            continue;
        };
        if old
            .finished_at_ms
            .is_some_and(|at| at + KEEP_FINISHED_MS < operation.created_at_ms)
        {
            kv.delete(&old_key)?;
        }
    }
    put_json(kv, &key(&operation.id), &operation)?;
    Ok(Ok(serde_json::to_value(&operation).expect("serialisable")))
}

/// Records how an operation ended and what that means: an import that
/// worked makes its image available; one that failed leaves nothing behind.
/// Finishing an operation that already finished changes nothing.
pub(super) fn finish(
    kv: &mut KvWrite<'_>,
    id: &str,
    error: Option<OperationError>,
    now_ms: u64,
) -> Result<Outcome, KvError> {
    let Some(mut operation) = get_json::<Operation>(kv, &key(id))? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("operation {id:?} does not exist"),
        )));
    };
    if operation.state != OperationState::Pending {
        return Ok(Ok(serde_json::to_value(&operation).expect("serialisable")));
    }
    let mut error = error;
    if let Work::ImportImage { image, .. } = &operation.work {
        match &error {
            None => {
                if let Err(refused) = super::volumes::finish_image(kv, image, now_ms)? {
                    error = Some(OperationError {
                        code: "import_failed".into(),
                        message: refused.message,
                    });
                }
            }
            Some(_) => {
                // Nothing of a failed import is kept.
                let _ = super::volumes::delete_image(kv, image)?;
            }
        }
    }
    operation.state = match error {
        None => OperationState::Done,
        Some(_) => OperationState::Failed,
    };
    operation.error = error;
    operation.finished_at_ms = Some(now_ms);
    put_json(kv, &key(id), &operation)?;
    Ok(Ok(serde_json::to_value(&operation).expect("serialisable")))
}

impl StateView {
    pub fn operation(&self, id: &str) -> Result<Option<Operation>, ReadError> {
        self.get(&key(id))
    }

    /// The operations `node` has yet to carry out.
    pub fn pending_operations(&self, node: NodeId) -> Result<Vec<Operation>, ReadError> {
        Ok(self
            .list::<Operation>(PREFIX_OPERATIONS)?
            .into_iter()
            .filter(|o| o.node == node && o.state == OperationState::Pending)
            .collect())
    }
}
