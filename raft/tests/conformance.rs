//! openraft's own storage conformance suite, run against the redb stores.

use std::sync::Arc;

use allod_raft::{Apply, KvRead, KvWrite, LogStore, NodeId, StateMachineStore, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{LogId, StorageError};

/// Appends every command to a list under one key, so a test can see the order
/// in which commands were applied.
struct Journal;

impl Apply for Journal {
    fn apply(
        &self,
        kv: &mut KvWrite<'_>,
        log_id: &LogId<NodeId>,
        command: &[u8],
    ) -> Result<serde_json::Value, redb::StorageError> {
        let mut journal: Vec<serde_json::Value> = kv
            .get("journal")?
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_default();
        journal.push(serde_json::Value::String(
            String::from_utf8_lossy(command).into_owned(),
        ));
        kv.put("journal", &serde_json::to_vec(&journal).unwrap())?;
        Ok(serde_json::json!({ "index": log_id.index }))
    }
}

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft-log.redb")).expect("open log");
        let sm = StateMachineStore::open(&dir.path().join("state.redb"), Arc::new(Journal))
            .expect("open state");
        Ok((dir, log, sm))
    }
}

#[test]
fn redb_store_passes_openraft_conformance_suite() {
    Suite::test_all(RedbBuilder).expect("openraft storage suite");
}
