//! Node identity: removing a node revokes its certificate on the peer, API
//! and storage ports from the removal's commit on (on connections it already
//! holds too), and the removed node wipes its keys and is unconfigured; a
//! certificate minted with the CA key for a member's id is refused; and a
//! member's certificate alone can neither make writes for users nor report
//! for other nodes.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agent::cluster::pki::{CertificateAuthority, NodeKey, NodeTls};
use common::{identity_of, wait_for, TestCluster};
use serde_json::{json, Value};

/// An HTTPS client presenting `tls`'s certificate.
fn client_with(tls: &NodeTls) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.peer_client_config().unwrap())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// A storage-protocol client presenting `tls`'s certificate.
fn storage_client(tls: &NodeTls) -> storage::transport::Peers {
    let mut config = tls.peer_client_config().unwrap();
    config.alpn_protocols = vec![b"allod-storage/1".to_vec()];
    storage::transport::Peers::new(Arc::new(config))
}

async fn peer_post(client: &reqwest::Client, peer: &str, path: &str, body: Value) -> (u16, String) {
    let reply = client
        .post(format!("https://{peer}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (reply.status().as_u16(), reply.text().await.unwrap())
}

async fn api_get(client: &reqwest::Client, api: &str, token: &str) -> (u16, String) {
    let reply = client
        .get(format!("https://{api}/v1/cluster"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (reply.status().as_u16(), reply.text().await.unwrap())
}

async fn storage_answers(peers: &storage::transport::Peers, node: u64) -> bool {
    let request = storage::proto::Request::Exists {
        volume: "nothing".into(),
        index: 0,
    };
    peers.call(node, &request).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_nodes_certificate_is_refused_on_peer_api_and_storage_ports_and_its_keys_are_wiped(
) {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.leader().await;
    let victim = (0..3).find(|&i| i != leader).unwrap();
    let victim_id = cluster.node(victim).id;
    let leader_id = cluster.node(leader).id;
    let stolen = identity_of(&cluster.live(victim).dir);
    let (api, peer) = cluster.addrs[leader].clone();
    let http = client_with(&stolen);
    let storage = storage_client(&stolen);
    storage.set_addresses(HashMap::from([(
        leader_id,
        cluster.live(leader).agent.storage_addr.clone(),
    )]));

    // A server showing the victim's certificate, as a machine that kept
    // its key could run anywhere.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap().to_string();
    let router = axum::Router::new().route(
        "/cluster/read-index",
        // Each answer closes its connection: every call is a new handshake.
        axum::routing::post(|| async {
            (
                [(axum::http::header::CONNECTION, "close")],
                axum::Json(Value::Null),
            )
        }),
    );
    // HTTP/1.1 only, so that `Connection: close` ends each connection (an
    // HTTP/2 connection would carry every call after the first).
    let mut impostor_tls = (*stolen.peer_server_config().unwrap()).clone();
    impostor_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (_keep, mode) = tokio::sync::watch::channel(agent::cluster::serve::ServeMode::Tls(
        std::sync::Arc::new(impostor_tls),
        router,
    ));
    agent::cluster::serve::spawn(
        listener,
        mode,
        "impostor",
        agent::cluster::serve::Limits::PEER,
        None,
    );
    let other = (0..3).find(|&i| i != leader && i != victim).unwrap();
    let call_impostor = || async {
        let reply: Result<Value, _> = cluster
            .node(other)
            .peers
            .call(
                &impostor,
                "/cluster/read-index",
                &(),
                Duration::from_secs(5),
            )
            .await;
        reply
    };
    call_impostor()
        .await
        .expect("a member's certificate is served to");

    // A member: served everywhere, and the connections stay open.
    let (status, body) = peer_post(&http, &peer, "/cluster/read-index", json!(null)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api_get(&http, &api, &cluster.admin_token).await;
    assert_eq!(status, 200, "{body}");
    assert!(storage_answers(&storage, leader_id).await);

    cluster
        .live(leader)
        .agent
        .remove(&victim_id.to_string(), false, &|_| {})
        .await
        .expect("remove");

    // From the commit on, on the connections already open and on new ones.
    let (status, body) = peer_post(&http, &peer, "/cluster/read-index", json!(null)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("was removed from the cluster"), "{body}");
    let (status, body) = api_get(&http, &api, &cluster.admin_token).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(!storage_answers(&storage, leader_id).await);
    let fresh = storage_client(&stolen);
    fresh.set_addresses(HashMap::from([(
        leader_id,
        cluster.live(leader).agent.storage_addr.clone(),
    )]));
    assert!(!storage_answers(&fresh, leader_id).await);
    // A member's clients no longer talk to a server showing it, once that
    // member has applied the removal.
    let other_node = cluster.node(other);
    wait_for(
        "the other member to apply the removal",
        Duration::from_secs(10),
        || {
            !other_node
                .state
                .nodes()
                .unwrap()
                .iter()
                .any(|n| n.id == victim_id)
        },
    )
    .await;
    let refused = call_impostor().await.unwrap_err();
    assert!(!refused.to_string().is_empty());
    // Every member refuses it, not only the leader.
    let (status, body) = peer_post(
        &client_with(&stolen),
        &cluster.addrs[other].1,
        "/cluster/read-index",
        json!(null),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // The removed node was told: it stopped serving the cluster and wiped
    // its keys and state, and is unconfigured.
    let removed = &cluster.live(victim);
    let wiped = [
        "node.key",
        "node.pem",
        "ca.key",
        "node.json",
        "state.redb",
        "raft-log.redb",
    ];
    wait_for(
        "the removed node to unconfigure itself and wipe its files",
        Duration::from_secs(30),
        || removed.agent.node().is_none() && wiped.iter().all(|f| !removed.dir.join(f).exists()),
    )
    .await;

    // The others carry on.
    let reply = cluster
        .client()
        .post(
            &format!("{}/v1/projects", cluster.api_url(other)),
            json!({ "name": "after-removal" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    cluster.shutdown().await;
}

/// The outcome of a forwarded write sent straight to the leader's peer
/// port: `Ok` or the refusal's message.
async fn forward(client: &reqwest::Client, peer: &str, body: Value) -> Result<Value, String> {
    let (status, text) = peer_post(client, peer, "/cluster/write", body).await;
    assert_eq!(status, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    match reply.get("Ok") {
        Some(outcome) => Ok(outcome.clone()),
        None => Err(reply["Err"].to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_certificate_alone_cannot_write_for_users_or_for_other_nodes_nor_be_minted() {
    let cluster = TestCluster::start(2).await;
    let leader = cluster.leader().await;
    let follower = 1 - leader;
    let leader_id = cluster.node(leader).id;
    let follower_id = cluster.node(follower).id;
    let peer = cluster.addrs[leader].1.clone();
    let member = client_with(&identity_of(&cluster.live(follower).dir));

    // An admin token for a secret the forger knows: refused without a
    // user's credential, and the token does not work.
    let secret = "forged-admin-token-secret";
    let create_token = json!({
        "op": "create_token",
        "id": "forged",
        "secret_sha256": agent::cluster::join::sha256_hex(secret),
        "user": "admin",
        "scope": { "kind": "cluster" },
        "now_ms": 1,
        "expires_at_ms": null,
    });
    let refused = forward(&member, &peer, json!({ "command": create_token.clone() }))
        .await
        .unwrap_err();
    assert!(
        refused.contains("without the caller's credential"),
        "{refused}"
    );
    let reply = common::ApiClient::new(&cluster.ca_pem, secret)
        .get(&format!("{}/v1/projects", cluster.api_url(leader)))
        .await
        .unwrap();
    assert_eq!(reply.status, 401, "{}", reply.body);
    // A bearer token that does not exist is no better.
    let refused = forward(
        &member,
        &peer,
        json!({ "command": create_token.clone(), "credential": { "bearer": "made-up" } }),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("refused"), "{refused}");

    // A node reports its own state only.
    let capacity = |id: u64| json!({ "command": { "op": "set_node_capacity", "id": id, "vcpus": 1, "memory_bytes": 1 } });
    let refused = forward(&member, &peer, capacity(leader_id))
        .await
        .unwrap_err();
    assert!(refused.contains("only its own state"), "{refused}");
    forward(&member, &peer, capacity(follower_id))
        .await
        .expect("its own capacity");

    // Nor may it make itself the writer of a volume it has no business
    // with (no VM of it there, no import, rollback or export grant).
    let admin = cluster.client();
    let base = cluster.api_url(leader);
    let reply = admin
        .post(&format!("{base}/v1/projects"), json!({ "name": "p" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let reply = admin
        .post(
            &format!("{base}/v1/projects/p/volumes"),
            json!({ "name": "v", "size_bytes": 1u64 << 20, "replicas": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let volume_id = reply.body["id"].as_str().unwrap().to_string();
    let lease = json!({ "command": { "op": "acquire_lease", "volume_id": volume_id, "node": follower_id } });
    let refused = forward(&member, &peer, lease).await.unwrap_err();
    assert!(refused.contains("no reason to write"), "{refused}");

    // Nor revoke a node Raft still counts on, nor join with no key pinned.
    let forget = json!({ "command": { "op": "forget_node", "id": leader_id } });
    let refused = forward(&member, &peer, forget).await.unwrap_err();
    assert!(refused.contains("still a member of Raft"), "{refused}");
    let join = json!({ "command": {
        "op": "consume_join_token", "id": "t", "secret_sha256": "s", "now_ms": 1, "node_name": "x"
    } });
    let refused = forward(&member, &peer, join).await.unwrap_err();
    assert!(refused.contains("must name the key"), "{refused}");

    // One member's word that a node was removed does not make it wipe
    // itself: it asks the others, who still serve it.
    let (status, body) = peer_post(
        &member,
        &peer,
        "/cluster/removed",
        json!({ "node_id": leader_id }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cluster.live(leader).agent.node().is_some(),
        "the leader unconfigured itself"
    );
    assert!(cluster.live(leader).dir.join("node.key").exists());

    // The same write with the admin's credential is the admin's to make.
    forward(
        &member,
        &peer,
        json!({ "command": create_token, "credential": { "bearer": cluster.admin_token } }),
    )
    .await
    .expect("the admin's own request");

    // A certificate minted with the CA key (every member holds it) for a
    // member's id but another key, or for an id never given out.
    let ca_key = std::fs::read_to_string(cluster.live(follower).dir.join("ca.key")).unwrap();
    let ca = CertificateAuthority {
        cert_pem: cluster.ca_pem.clone(),
        key_pem: ca_key,
    };
    for (id, expected) in [
        (follower_id, "a key other than the one"),
        (99, "not a member of this cluster"),
    ] {
        let (key_pem, cert_pem) =
            NodeKey::generate_signed(vec!["localhost".into()], &ca, id).unwrap();
        let minted = client_with(&NodeTls {
            ca_pem: cluster.ca_pem.clone(),
            cert_pem,
            key_pem,
        });
        let (status, body) = peer_post(&minted, &peer, "/cluster/read-index", json!(null)).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains(expected), "{body}");
        let (status, body) = peer_post(&minted, &peer, "/raft/vote", json!({})).await;
        assert_eq!(status, 403, "{body}");
    }
    cluster.shutdown().await;
}

/// A node removing itself through the cluster's API on a follower: the
/// removal succeeds for the caller, and the node wipes itself once the
/// other members refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_removes_itself_succeeds_and_is_unconfigured() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let id = cluster.node(follower).id;
    cluster
        .live(follower)
        .agent
        .remove(&id.to_string(), false, &|_| {})
        .await
        .expect("a node may remove itself");
    let removed = cluster.live(follower);
    wait_for(
        "the node to unconfigure itself",
        Duration::from_secs(30),
        || removed.agent.node().is_none() && !removed.dir.join("node.key").exists(),
    )
    .await;
    cluster.shutdown().await;
}
