//! Classification zones end to end: a SECRET project's VMs run only on nodes
//! dedicated to SECRET, shared projects never land there, a dedicated node
//! keeps its label while it holds VMs, and volumes never attach across zones.

mod common;

use std::time::Duration;

use common::{wait_for_async, TestCluster};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_vms_only_on_secret_nodes_and_no_attachment_across_zones() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    // Every node reports its capacity on its own.
    wait_for_async("every node's capacity", Duration::from_secs(15), || {
        let admin = admin.clone();
        let base = base.clone();
        async move {
            let nodes = admin.get(&format!("{base}/v1/nodes")).await.unwrap().body;
            nodes
                .as_array()
                .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["vcpus"].as_u64() > Some(0)))
        }
    })
    .await;
    for (name, zone) in [
        ("vault", "SECRET"),
        ("vault2", "SECRET"),
        ("shop", "OFFICIAL"),
    ] {
        let reply = admin
            .post(
                &format!("{base}/v1/projects"),
                json!({ "name": name, "zone": zone }),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let vm = |name: &str| json!({ "name": name, "vcpus": 1, "memory_bytes": 64u64 << 20 });

    // No SECRET node yet: refused, and the answer says why.
    let reply = admin
        .post(&format!("{base}/v1/projects/vault/vms"), vm("early"))
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("3 not dedicated to the project's SECRET zone"),
        "{message}"
    );

    let reply = admin
        .send(
            Method::PUT,
            &format!("{base}/v1/nodes/3/zone"),
            Some(json!({ "zone": "SECRET" })),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    for i in 0..6 {
        let url = cluster.api_url(i % 3);
        let reply = admin
            .post(
                &format!("{url}/v1/projects/vault/vms"),
                vm(&format!("s{i}")),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(reply.body["node"], 3, "SECRET VM placed on a shared node");
        assert_eq!(reply.body["zone"], "SECRET");
        let reply = admin
            .post(&format!("{url}/v1/projects/shop/vms"), vm(&format!("o{i}")))
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_ne!(reply.body["node"], 3, "OFFICIAL VM on a SECRET node");
    }
    // Spread over the shared pool.
    let shop = admin
        .get(&format!("{base}/v1/projects/shop/vms"))
        .await
        .unwrap()
        .body;
    let on_one = shop
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["node"] == 1)
        .count();
    assert_eq!(on_one, 3, "{shop}");
    // A dedicated node holding SECRET VMs cannot be relabelled under them.
    let reply = admin
        .send(
            Method::PUT,
            &format!("{base}/v1/nodes/3/zone"),
            Some(json!({ "zone": "OFFICIAL" })),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(reply
        .body
        .to_string()
        .contains("6 VM(s) of the SECRET zone"));

    // Volumes: never attached across zones, across projects of one zone yes.
    for (project, volume) in [("shop", "data"), ("vault2", "keys"), ("vault", "own")] {
        let reply = admin
            .post(
                &format!("{base}/v1/projects/{project}/volumes"),
                json!({ "name": volume, "size_bytes": 1u64 << 30 }),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let s0_volumes = format!("{base}/v1/projects/vault/vms/s0/volumes");
    let attach = |body: serde_json::Value| admin.post(&s0_volumes, body);
    let reply = attach(json!({ "volume": "data", "project": "shop" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(
        reply.body.to_string().contains("across zones"),
        "{}",
        reply.body
    );
    let reply = attach(json!({ "volume": "keys", "project": "vault2" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = attach(json!({ "volume": "own" })).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["volumes"].as_array().unwrap().len(), 2);
    // A volume serves one VM at a time.
    let reply = admin
        .post(
            &format!("{base}/v1/projects/vault/vms/s1/volumes"),
            json!({ "volume": "own" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    // An attached volume is not deleted; detaching frees it.
    let reply = admin
        .send(
            Method::DELETE,
            &format!("{base}/v1/projects/vault/volumes/own"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    let reply = admin
        .send(
            Method::DELETE,
            &format!("{base}/v1/projects/vault/vms/s0/volumes/own"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["volumes"].as_array().unwrap().len(), 1);
    let reply = admin
        .send(
            Method::DELETE,
            &format!("{base}/v1/projects/vault/volumes/own"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204, "{}", reply.body);

    // The audit log names the zone of what each change touched.
    let audit = admin
        .get(&format!("{base}/v1/audit?action=POST"))
        .await
        .unwrap()
        .body;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["object"] == "/v1/projects/vault/vms" && e["result"] == "ok")
        .expect("the VM create is audited");
    assert_eq!(entry["zone"], "SECRET");

    // A node in maintenance takes no new VMs.
    agent::daemon::admin::request(
        &cluster.live(0).dir,
        &agent::daemon::admin::AdminRequest::Maintenance { on: true },
    )
    .await
    .unwrap();
    for i in 0..3 {
        let reply = admin
            .post(
                &format!("{base}/v1/projects/shop/vms"),
                vm(&format!("m{i}")),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(reply.body["node"], 2, "node 1 is in maintenance");
    }
    cluster.shutdown().await;
}

/// A stopped VM holds no capacity; starting it takes its node's room again,
/// and is refused with the reason when there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_vms_reserve_nothing_and_starting_one_needs_room() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let vcpus = {
        let mut v = 0;
        for _ in 0..150 {
            let nodes = admin.get(&format!("{base}/v1/nodes")).await.unwrap().body;
            v = nodes[0]["vcpus"].as_u64().unwrap_or(0);
            if v > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        v
    };
    assert!(vcpus > 0, "the node never reported its capacity");
    // Four vCPUs per core: one VM takes the whole node.
    let whole = vcpus * 4;
    let reply = admin
        .post(&format!("{base}/v1/projects"), json!({ "name": "p" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let vm = |name: &str, start: bool| json!({ "name": name, "vcpus": whole, "memory_bytes": 64u64 << 20, "start": start });
    let reply = admin
        .post(&format!("{base}/v1/projects/p/vms"), vm("big", true))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    // The node is full, yet a VM that is only defined fits.
    let reply = admin
        .post(&format!("{base}/v1/projects/p/vms"), vm("spare", false))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.body["power"], "stopped");
    let reply = admin
        .post(&format!("{base}/v1/projects/p/vms"), vm("third", true))
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    // Starting it needs room: refused, saying why, until the first stops.
    let start = format!("{base}/v1/projects/p/vms/spare/start");
    let reply = admin.post(&start, json!({})).await.unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no room"),
        "{}",
        reply.body
    );
    let reply = admin
        .post(&format!("{base}/v1/projects/p/vms/big/stop"), json!({}))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = admin.post(&start, json!({})).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["power"], "running");
}
