//! Reads without a round trip where that is safe: the leader's lease, and
//! stale reads a caller asks for (`?consistency=stale`), marked as such.
//! (That a restarted node withholds its vote is checked where
//! `cluster.rs` restarts a killed leader.)
//! Needs the `test-hooks` feature (`.ci/test` turns it on) for the switch
//! that partitions a node.
#![cfg(feature = "test-hooks")]

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use serde_json::json;

async fn get(
    client: &common::ApiClient,
    url: &str,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let response = client
        .http
        .get(url)
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

fn names(body: &serde_json::Value) -> Vec<String> {
    body.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_answers_from_a_partitioned_follower_and_says_so() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let leader = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let reply = client
        .post(
            &format!("{}/v1/projects", cluster.api_url(leader)),
            json!({ "name": "before" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let stale_url = format!(
        "{}/v1/projects?consistency=stale",
        cluster.api_url(follower)
    );
    common::wait_for_async(
        "the follower applies the first write",
        Duration::from_secs(10),
        || async { names(&get(&client, &stale_url).await.2) == ["before"] },
    )
    .await;

    // Cut the follower off; the others go on writing.
    cluster.live(follower).agent.isolation.set(true);
    let reply = client
        .post(
            &format!("{}/v1/projects", cluster.api_url(leader)),
            json!({ "name": "after" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);

    // A default read through it fails rather than answer without `after`.
    let (status, headers, body) = get(
        &client,
        &format!("{}/v1/projects", cluster.api_url(follower)),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.get("allod-consistency").is_none());

    // A stale read answers what it has, and says it is stale and how far
    // it reflects the log.
    let (status, headers, body) = get(&client, &stale_url).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&body), ["before"]);
    assert_eq!(headers["allod-consistency"], "stale");
    let applied: u64 = headers["allod-applied-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(applied > 0);

    // On the leader, a default read is current and carries no mark.
    let (status, headers, body) =
        get(&client, &format!("{}/v1/projects", cluster.api_url(leader))).await;
    assert_eq!(status, 200, "{body}");
    let mut seen = names(&body);
    seen.sort();
    assert_eq!(seen, ["after", "before"]);
    assert!(headers.get("allod-consistency").is_none());

    // Bad values and stale writes are refused, saying what is accepted.
    let (status, _, body) = get(
        &client,
        &format!(
            "{}/v1/projects?consistency=eventual",
            cluster.api_url(leader)
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("stale") && message.contains("linearizable"),
        "{message}"
    );
    let reply = client
        .post(
            &format!("{}/v1/projects?consistency=stale", cluster.api_url(leader)),
            json!({ "name": "stale-write" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);

    // A query with other parameters keeps them.
    let (status, headers, body) = get(
        &client,
        &format!(
            "{}/v1/audit?limit=1&consistency=stale",
            cluster.api_url(follower)
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(1));
    assert_eq!(headers["allod-consistency"], "stale");

    cluster.live(follower).agent.isolation.set(false);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_reads_on_its_lease_until_it_is_cut_off() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.leader().await;
    let node = cluster.node(leader);
    // The lease needs this term's entry committed and a heartbeat round.
    common::wait_for("a lease", Duration::from_secs(10), || {
        node.lease_read_log_id().is_some()
    })
    .await;
    let lease_reads = node.lease_reads();
    let rounds = node.read_index_rounds();
    for _ in 0..20 {
        node.linearizable_read().await.unwrap();
    }
    assert!(
        node.lease_reads() - lease_reads >= 15,
        "reads on the leader of a healthy cluster use the lease: {} of 20",
        node.lease_reads() - lease_reads
    );
    assert_eq!(node.read_index_rounds() - rounds, 20);

    // Cut off, the leader's lease runs out before any other node leads (the
    // others wait out their promise to it first), and it stops reading.
    cluster.live(leader).agent.isolation.set(true);
    let majority: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut lease_ended, mut new_leader) = (None, None);
    while new_leader.is_none() {
        assert!(
            Instant::now() < deadline,
            "no new leader among {majority:?}"
        );
        let leasing = node.lease_read_log_id().is_some();
        if !leasing && lease_ended.is_none() {
            lease_ended = Some(Instant::now());
        }
        new_leader = majority.iter().copied().find(|&i| {
            let metrics = cluster.node(i).raft.metrics().borrow().clone();
            metrics.state == openraft::ServerState::Leader
        });
        assert!(
            !(leasing && new_leader.is_some()),
            "node {new_leader:?} leads while the old leader still reads on its lease"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(lease_ended.is_some());
    let lease_reads = node.lease_reads();
    assert!(node.linearizable_read().await.is_err());
    assert_eq!(node.lease_reads(), lease_reads);
    cluster.live(leader).agent.isolation.set(false);

    cluster.shutdown().await;
}
