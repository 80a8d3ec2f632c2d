//! In-process cluster tests: several real agents in one process, each with
//! its own redb files and TLS listeners on port 0, talking real HTTPS.

mod common;

use std::time::{Duration, Instant};

use agent::cluster::node::{MemberRole, RaftOptions};
use agent::state::Command;
use common::{wait_for, TestCluster};
use serde_json::json;

fn roles(cluster: &TestCluster, via: usize) -> Vec<(u64, MemberRole)> {
    cluster
        .node(via)
        .members()
        .into_iter()
        .map(|m| (m.id, m.role))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_and_writes_through_followers_are_visible_everywhere() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.leader().await;
    assert_eq!(
        roles(&cluster, leader),
        vec![
            (1, MemberRole::Voter),
            (2, MemberRole::Voter),
            (3, MemberRole::Voter)
        ]
    );

    let client = cluster.client();
    // One project created through each node, followers included.
    for i in 0..3 {
        let reply = client
            .post(
                &format!("{}/v1/projects", cluster.api_url(i)),
                json!({ "name": format!("p{i}") }),
            )
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            201,
            "create through node {}: {}",
            i + 1,
            reply.body
        );
        assert_eq!(reply.body["name"], format!("p{i}"));
    }
    // Reads are linearizable: every node sees all three at once.
    for i in 0..3 {
        assert_eq!(
            client.project_names(&cluster.api_url(i)).await,
            vec!["p0", "p1", "p2"]
        );
    }
    // A duplicate through a follower is a conflict, not a second project.
    let follower = (leader + 1) % 3;
    let reply = client
        .post(
            &format!("{}/v1/projects", cluster.api_url(follower)),
            json!({ "name": "p0" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 409);
    assert_eq!(reply.body["error"]["code"], "already_exists");

    // The cluster view names every member with its addresses and role.
    let view = client
        .get(&format!("{}/v1/cluster", cluster.api_url(follower)))
        .await
        .unwrap();
    assert_eq!(view.status, 200);
    assert_eq!(view.body["leader_id"], cluster.node(leader).id);
    assert!(view.body["term"].as_u64().unwrap() >= 1);
    let members = view.body["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        assert_eq!(m["role"], "voter");
        assert!(m["api_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(m["peer_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    // Delete through a follower; gone everywhere.
    let reply = client
        .send(
            reqwest::Method::DELETE,
            &format!("{}/v1/projects/p1", cluster.api_url(follower)),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204);
    for i in 0..3 {
        assert_eq!(
            client.project_names(&cluster.api_url(i)).await,
            vec!["p0", "p2"]
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_voters_at_most_then_learners_who_are_promoted_when_a_voter_leaves() {
    let mut cluster = TestCluster::start(6).await;
    let leader = cluster.leader().await;
    let members = roles(&cluster, leader);
    let voters: Vec<u64> = members
        .iter()
        .filter(|(_, r)| *r == MemberRole::Voter)
        .map(|(id, _)| *id)
        .collect();
    let learners: Vec<u64> = members
        .iter()
        .filter(|(_, r)| *r == MemberRole::Learner)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4, 5]);
    assert_eq!(learners, vec![6]);

    // Remove a voter that is not the leader: the learner takes its place.
    let victim = (0..5).find(|&i| i != leader).unwrap();
    let victim_id = cluster.node(victim).id;
    cluster
        .live(leader)
        .agent
        .remove(&victim_id.to_string(), false, &|_| {})
        .await
        .expect("remove");
    let members = roles(&cluster, leader);
    assert!(
        !members.iter().any(|(id, _)| *id == victim_id),
        "{members:?}"
    );
    assert!(
        members.contains(&(6, MemberRole::Voter)),
        "learner was not promoted: {members:?}"
    );
    assert_eq!(
        members
            .iter()
            .filter(|(_, r)| *r == MemberRole::Voter)
            .count(),
        5
    );
    cluster.stop(victim).await;

    // The shrunken cluster still commits.
    let reply = cluster
        .client()
        .post(
            &format!("{}/v1/projects", cluster.api_url(5)),
            json!({ "name": "after-remove" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let nodes = cluster
        .client()
        .get(&format!("{}/v1/nodes", cluster.api_url(leader)))
        .await
        .unwrap();
    assert_eq!(nodes.body.as_array().unwrap().len(), 5, "{}", nodes.body);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_elects_a_new_leader_quickly_and_loses_no_acknowledged_write() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    for i in 0..20 {
        let reply = client
            .post(
                &format!("{}/v1/projects", cluster.api_url(i % 3)),
                json!({ "name": format!("before-{i}") }),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 201);
    }
    let old_leader = cluster.leader().await;
    let killed_at = Instant::now();
    cluster.stop(old_leader).await;
    let survivors: Vec<usize> = cluster.live_indices();
    let new_leader = cluster
        .leader_among(&survivors, Duration::from_secs(10))
        .await;
    let failover = killed_at.elapsed();
    eprintln!("new leader elected {failover:?} after the old one was killed");
    assert_ne!(new_leader, old_leader);
    // "About a second": election timeouts are 0.5-0.9 s; allow for a loaded machine.
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );

    let names = client.project_names(&cluster.api_url(survivors[0])).await;
    assert_eq!(names.len(), 20, "{names:?}");
    let reply = client
        .post(
            &format!("{}/v1/projects", cluster.api_url(survivors[1])),
            json!({ "name": "after" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201);

    // The old leader comes back from its data directory and catches up.
    cluster.restart(old_leader).await;
    let restarted = cluster.node(old_leader);
    // It may have promised the new leader not to elect another before it
    // was killed; it keeps that promise across the restart by refusing to
    // vote for a while (asked for real, by a peer; a vote of term 0, which
    // openraft would refuse anyway, so the check cannot disturb the cluster).
    assert!(restarted.votes_withheld());
    let asker = cluster.node(new_leader);
    let request = openraft::raft::VoteRequest::new(openraft::Vote::new(0, asker.id), None);
    let answer: Result<
        Result<openraft::raft::VoteResponse<u64>, openraft::error::RaftError<u64>>,
        _,
    > = asker
        .peers
        .call(
            &restarted.member().peer_addr,
            "/raft/vote",
            &request,
            Duration::from_secs(5),
        )
        .await;
    match answer {
        Err(agent::cluster::peer::PeerCallError::Refused {
            status: 503,
            message,
            ..
        }) => assert!(message.contains("restarted"), "{message}"),
        other => panic!("a node that just restarted answered a vote request: {other:?}"),
    }
    wait_for(
        "restarted node applies the write made while it was down",
        Duration::from_secs(20),
        || restarted.state.project("after").ok().flatten().is_some(),
    )
    .await;
    assert_eq!(
        client
            .project_names(&cluster.api_url(old_leader))
            .await
            .len(),
        21
    );
    cluster.shutdown().await;
}

/// Needs the `test-hooks` feature (`.ci/test` turns it on) for the switch
/// that partitions a node.
#[cfg(feature = "test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_cannot_commit_and_its_reads_fail_instead_of_going_stale() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let leader = cluster.leader().await;
    // Cut the leader off: it is now a minority of one.
    cluster.live(leader).agent.isolation.set(true);
    let majority: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new_leader = cluster
        .leader_among(&majority, Duration::from_secs(15))
        .await;
    assert_ne!(new_leader, leader);

    // The majority moves on.
    let reply = client
        .post(
            &format!("{}/v1/projects", cluster.api_url(majority[0])),
            json!({ "name": "majority" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);

    // The isolated node can neither commit nor serve a read that would miss it.
    let minority = cluster.node(leader);
    let write = minority
        .write(&Command::CreateProject {
            name: "minority".into(),
            description: String::new(),
            now_ms: 0,
            zone: Default::default(),
        })
        .await;
    assert!(write.is_err(), "a minority committed a write: {write:?}");
    let read = minority.linearizable_read().await;
    assert!(read.is_err(), "a minority served a linearizable read");
    let reply = client
        .get(&format!("{}/v1/projects", cluster.api_url(leader)))
        .await
        .unwrap();
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "unavailable");

    // Healed, it learns what the majority did, and its own write never happened.
    cluster.live(leader).agent.isolation.set(false);
    common::wait_for_async(
        "healed node serves the majority's write",
        Duration::from_secs(20),
        || async {
            match client
                .get(&format!("{}/v1/projects", cluster.api_url(leader)))
                .await
            {
                Ok(reply) if reply.status == 200 => {
                    let names: Vec<&str> = reply
                        .body
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|p| p["name"].as_str())
                        .collect();
                    names == ["majority"]
                }
                _ => false,
            }
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fell_far_behind_catches_up_by_snapshot() {
    // Small snapshots every 50 entries, sent in 1 KiB chunks, so the
    // laggard receives one in many pieces.
    let options = RaftOptions {
        snapshot_after_logs: 50,
        logs_kept_after_snapshot: 5,
        snapshot_chunk_bytes: 1024,
        ..RaftOptions::default()
    };
    let mut cluster = TestCluster::start_with(3, options).await;
    let leader = cluster.leader().await;
    let laggard = (leader + 1) % 3;
    cluster.stop(laggard).await;
    let writer = cluster.node(leader);
    // Sequential writes: each is its own Raft entry.
    for i in 0..200 {
        writer
            .write(&Command::CreateProject {
                name: format!("bulk-{i:03}"),
                description: String::new(),
                now_ms: 0,
                zone: Default::default(),
            })
            .await
            .expect("write")
            .expect("created");
    }
    // The leader snapshotted and purged the entries the laggard misses.
    wait_for(
        "leader purges its log after a snapshot",
        Duration::from_secs(20),
        || {
            let metrics = writer.raft.metrics().borrow().clone();
            metrics.purged.map(|p| p.index).unwrap_or(0) > 100
        },
    )
    .await;

    cluster.restart(laggard).await;
    let caught_up = cluster.node(laggard);
    wait_for(
        "laggard installs the snapshot and catches up",
        Duration::from_secs(30),
        || caught_up.state.projects().map(|p| p.len()).unwrap_or(0) == 200,
    )
    .await;
    let metrics = caught_up.raft.metrics().borrow().clone();
    assert!(
        metrics.snapshot.is_some(),
        "the laggard caught up without a snapshot: {metrics:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_and_bad_tokens_change_nothing() {
    let cluster = TestCluster::start(1).await;
    let tmp = tempfile::tempdir().unwrap();
    let options = RaftOptions::default();
    let joiner = common::start_agent(
        &tmp.path().join("j"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        "joiner",
        &options,
    )
    .await;
    let node = cluster.node(0);
    let (token, text) = agent::cluster::join::create_token(&node, 3600)
        .await
        .unwrap();

    let refuse = |result: anyhow::Result<agent::daemon::JoinResult>, expect: &str| {
        let message = format!("{:#}", result.expect_err("join should have been refused"));
        assert!(
            message.contains(expect),
            "expected {expect:?} in: {message}"
        );
    };
    // Truncated and damaged tokens are refused before anything is contacted.
    refuse(
        joiner.join(&text[..text.len() / 2], &|_| {}).await,
        "malformed",
    );
    refuse(joiner.join("not-a-token!", &|_| {}).await, "malformed");
    // A forged secret.
    let mut forged = token.clone();
    forged.secret = "00".repeat(32);
    refuse(
        joiner.join(&forged.encode(), &|_| {}).await,
        "secret does not match",
    );
    // A token pointing at a server with another CA.
    let mut wrong_ca = token.clone();
    wrong_ca.ca_fingerprint = "ab".repeat(32);
    refuse(
        joiner.join(&wrong_ca.encode(), &|_| {}).await,
        "fingerprint",
    );
    // An expired token (issued with an expiry already in the past).
    let mut expired = token.clone();
    expired.expires_at_ms = agent::cluster::join::now_ms() - 1_000;
    refuse(joiner.join(&expired.encode(), &|_| {}).await, "expired");
    // A token the cluster itself considers expired (the client-side clock
    // check passes, the cluster's refuses).
    let short_id = agent::cluster::join::random_hex(8);
    let server_expiry_ms = agent::cluster::join::now_ms() + 300;
    node.write(&Command::CreateJoinToken {
        id: short_id.clone(),
        secret_sha256: agent::cluster::join::sha256_hex(&token.secret),
        now_ms: agent::cluster::join::now_ms(),
        expires_at_ms: server_expiry_ms,
    })
    .await
    .unwrap()
    .unwrap();
    let mut server_expired = token.clone();
    server_expired.id = short_id;
    wait_for(
        "the short-lived token passes its expiry",
        Duration::from_secs(5),
        || agent::cluster::join::now_ms() > server_expiry_ms,
    )
    .await;
    refuse(
        joiner.join(&server_expired.encode(), &|_| {}).await,
        "expired",
    );

    // None of that configured the joiner or added a member.
    assert!(joiner.node().is_none());
    assert!(!tmp.path().join("j/node.json").exists());
    assert_eq!(node.members().len(), 1);

    // The real token works once...
    let joined = joiner
        .join(&text, &|_| {})
        .await
        .expect("join with a good token");
    assert_eq!(joined.role, MemberRole::Voter);
    assert_eq!(node.members().len(), 2);
    // ...and never again.
    let tmp2 = tempfile::tempdir().unwrap();
    let second = common::start_agent(
        &tmp2.path().join("k"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        "second",
        &options,
    )
    .await;
    refuse(second.join(&text, &|_| {}).await, "already used");
    assert!(second.node().is_none());
    second.shutdown().await;
    joiner.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_input_gets_clear_errors_and_changes_nothing() {
    let cluster = TestCluster::start(1).await;
    let client = cluster.client();
    let base = cluster.api_url(0);
    let projects = format!("{base}/v1/projects");

    let raw = |body: &'static str| {
        client
            .http
            .post(&projects)
            .bearer_auth(&client.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let reply = raw("{\"name\": ").await.unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");

    let reply = client
        .post(&projects, json!({ "name": "ok", "colour": "blue" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field"),
        "{}",
        reply.body
    );

    let reply = client
        .post(&projects, json!({ "name": "Not_A_Label" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "invalid_argument");

    let huge = "x".repeat(200 * 1024);
    let reply = client
        .post(&projects, json!({ "name": "big", "description": huge }))
        .await
        .unwrap();
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "payload_too_large");

    let wrong = common::ApiClient::new(&cluster.ca_pem, "allod_wrong");
    let reply = wrong
        .post(&projects, json!({ "name": "sneaky" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body["error"]["code"], "unauthenticated");
    let reply = client.http.get(&projects).send().await.unwrap();
    assert_eq!(reply.status(), 401);

    let reply = client
        .get(&format!("{base}/v1/projects/missing"))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "not_found");
    let reply = client.get(&format!("{base}/v1/nope")).await.unwrap();
    assert_eq!(reply.status, 404);

    // Nothing of that changed the state, and the node still serves.
    assert!(client.project_names(&base).await.is_empty());
    let reply = client
        .post(&projects, json!({ "name": "fine" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 201);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_clients_without_a_cluster_certificate_and_survives_garbage() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = TestCluster::start(1).await;
    let peer = cluster.addrs[0].1.clone();

    // A client that trusts the CA but has no certificate of its own.
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls(agent::cluster::pki::ca_client_config(&cluster.ca_pem).unwrap())
        .build()
        .unwrap();
    let result = anonymous
        .post(format!("https://{peer}/raft/vote"))
        .json(&json!({}))
        .send()
        .await;
    assert!(
        result.is_err(),
        "peer port answered a client without a certificate: {result:?}"
    );

    // A certificate from another CA is refused too.
    let other_ca = agent::cluster::pki::CertificateAuthority::create("other").unwrap();
    let (key, cert) =
        agent::cluster::pki::NodeKey::generate_signed(vec!["127.0.0.1".into()], &other_ca, 1)
            .unwrap();
    let foreign = agent::cluster::pki::NodeTls {
        ca_pem: cluster.ca_pem.clone(),
        cert_pem: cert,
        key_pem: key,
    };
    let impostor = reqwest::Client::builder()
        .use_preconfigured_tls(foreign.peer_client_config().unwrap())
        .build()
        .unwrap();
    let result = impostor
        .post(format!("https://{peer}/raft/vote"))
        .json(&json!({}))
        .send()
        .await;
    assert!(
        result.is_err(),
        "peer port accepted a foreign certificate: {result:?}"
    );

    // Garbage bytes instead of a TLS handshake.
    let mut stream = tokio::net::TcpStream::connect(&peer).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01\x02garbage")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;

    // A member's own client gets through, and the node still works.
    let node = cluster.node(0);
    let reply: Result<
        Result<Option<openraft::LogId<u64>>, agent::cluster::peer::ForwardFailure>,
        _,
    > = node
        .peers
        .call(&peer, "/cluster/read-index", &(), Duration::from_secs(5))
        .await;
    assert!(matches!(reply, Ok(Ok(_))), "{reply:?}");
    let reply = cluster
        .client()
        .post(
            &format!("{}/v1/projects", cluster.api_url(0)),
            json!({ "name": "still-up" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_agent_serves_only_healthz_and_its_root_only_admin_socket() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let agent = common::start_agent(
        &dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "fresh",
        &RaftOptions::default(),
    )
    .await;
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("admin.sock"), 0o600);

    let plain = reqwest::Client::new();
    let health = plain
        .get(format!("http://{}/healthz", agent.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let other = plain
        .get(format!("http://{}/v1/projects", agent.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 503);
    let body: serde_json::Value = other.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unconfigured");
    // The peer port accepts nothing yet.
    let mut stream = tokio::net::TcpStream::connect(&agent.peer_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "peer port of an unconfigured node answered: {read:?}"
    );

    // Over the admin socket, init configures it: secrets are owner-only.
    let result = agent::daemon::admin::request(
        &dir,
        &agent::daemon::admin::AdminRequest::Init { cluster_name: None },
    )
    .await
    .unwrap();
    assert_eq!(result["node_id"], 1);
    assert_eq!(mode("admin.token"), 0o600);
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("node.key"), 0o600);
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let client = common::ApiClient::new(&ca, token.trim());
    let ready = client
        .get(&format!("https://{}/readyz", agent.api_addr))
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    // A second init is refused and changes nothing.
    let again = agent::daemon::admin::request(
        &dir,
        &agent::daemon::admin::AdminRequest::Init { cluster_name: None },
    )
    .await;
    assert!(format!("{:#}", again.unwrap_err()).contains("already a member"));
    assert_eq!(
        std::fs::read_to_string(dir.join("admin.token")).unwrap(),
        token
    );
    agent.shutdown().await;
}

/// A follower that refuses a batch of log entries as too large (413) still
/// catches up: the leader sends smaller batches instead of retrying the
/// same one for ever.
#[cfg(feature = "test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refusing_an_oversized_batch_catches_up_in_smaller_ones() {
    let options = RaftOptions {
        peer_request_limit_bytes: 64 * 1024,
        snapshot_chunk_bytes: 16 * 1024,
        ..RaftOptions::default()
    };
    let cluster = TestCluster::start_with(3, options).await;
    let leader = cluster.leader().await;
    let behind = (0..3).find(|&i| i != leader).unwrap();
    cluster.live(behind).agent.isolation.set(true);
    // About 400 KB of entries while it is away: more than one request holds.
    let node = cluster.node(leader);
    for i in 0..300 {
        node.write(&Command::CreateProject {
            name: format!("p{i}"),
            description: "x".repeat(1000),
            now_ms: 0,
            zone: Default::default(),
        })
        .await
        .unwrap()
        .unwrap();
    }
    let target = node.raft.metrics().borrow().last_applied;
    cluster.live(behind).agent.isolation.set(false);
    let follower = cluster.node(behind);
    common::wait_for(
        "the follower applies everything the leader has",
        Duration::from_secs(30),
        || follower.raft.metrics().borrow().last_applied >= target,
    )
    .await;
    assert_eq!(follower.state.projects().unwrap().len(), 300);
    cluster.shutdown().await;
}

/// Raft's storage work has threads of its own: with every thread of the
/// process's blocking pool busy (slow API work, a stuck hypervisor call),
/// writes still commit.
#[test]
fn writes_commit_while_the_blocking_pool_is_full() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cluster = TestCluster::start(1).await;
        let node = cluster.node(0);
        let busy: Vec<_> = (0..4)
            .map(|_| tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(8))))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(4),
            node.write(&Command::CreateProject {
                name: "busy".into(),
                description: String::new(),
                now_ms: 0,
                zone: Default::default(),
            }),
        )
        .await
        .expect("the write commits while the blocking pool is full")
        .unwrap()
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(node.state.project("busy").unwrap().is_some());
        for task in busy {
            task.await.unwrap();
        }
        cluster.shutdown().await;
    });
}
