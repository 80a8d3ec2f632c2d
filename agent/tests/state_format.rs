//! A node's state directory written by an earlier version still works: the
//! checked-in `fixtures/state-format-1` is a single-node cluster's data
//! directory as Allod wrote it while log entries were JSON (log format 1,
//! see `allod_raft::codec`): 32 projects `before-00` … `before-31`, some of
//! them only in the log's entries after its last snapshot.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::cluster::node::RaftOptions;
use serde_json::json;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The first byte of every entry in the log: `{` for format 1, 2 for format 2.
fn entry_formats(dir: &Path) -> Vec<(u64, u8)> {
    // A node that was just stopped may still be releasing its files.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let db = loop {
        match redb::Database::open(dir.join("raft-log.redb")) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("log still open ({e}); retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot open the log: {e}"),
        }
    };
    let txn = db.begin_read().unwrap();
    let table = txn
        .open_table(redb::TableDefinition::<u64, &[u8]>::new("log"))
        .unwrap();
    use redb::ReadableTable;
    table
        .iter()
        .unwrap()
        .map(|item| {
            let (index, bytes) = item.unwrap();
            (index.value(), bytes.value()[0])
        })
        .collect()
}

/// The project names a node lists, once it answers.
async fn names(client: &common::ApiClient, base: &str) -> Option<Vec<String>> {
    let reply = client.get(&format!("{base}/v1/projects")).await.ok()?;
    if reply.status != 200 {
        return None;
    }
    let mut names: Vec<String> = reply
        .body
        .as_array()?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    Some(names)
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-format-1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_of_the_first_log_format_starts_and_keeps_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    copy_dir(&fixture(), &dir);
    let before = entry_formats(&dir);
    assert!(
        before.len() > 5 && before.iter().all(|(_, f)| *f == b'{'),
        "the fixture's log holds entries of the first format: {before:?}"
    );
    let options = RaftOptions::default();
    let agent = common::start_agent(&dir, "127.0.0.1:0", "127.0.0.1:0", "n1", &options).await;
    let token = std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let client = common::ApiClient::new(&ca, &token);
    let base = format!("https://{}", agent.api_addr);
    let expected: Vec<String> = (0..32).map(|i| format!("before-{i:02}")).collect();
    common::wait_for_async(
        "the projects written in the first format",
        Duration::from_secs(20),
        || async { names(&client, &base).await.as_ref() == Some(&expected) },
    )
    .await;

    // New writes land in the current format beside the old entries, and
    // both read back after a restart.
    let reply = client
        .post(&format!("{base}/v1/projects"), json!({ "name": "after" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    agent.shutdown().await;
    drop(agent);
    let formats = entry_formats(&dir);
    assert!(
        formats.iter().any(|(_, f)| *f == b'{'),
        "old entries are kept as they were: {formats:?}"
    );
    assert_eq!(
        formats.last().map(|(_, f)| *f),
        Some(allod_raft::codec::ENTRY_FORMAT),
        "new entries are in the current format: {formats:?}"
    );

    let agent = common::start_agent(&dir, "127.0.0.1:0", "127.0.0.1:0", "n1", &options).await;
    let base = format!("https://{}", agent.api_addr);
    let mut all = expected.clone();
    all.insert(0, "after".into());
    all.sort();
    common::wait_for_async(
        "every project after a restart",
        Duration::from_secs(20),
        || async { names(&client, &base).await.as_ref() == Some(&all) },
    )
    .await;
    agent.shutdown().await;
}
