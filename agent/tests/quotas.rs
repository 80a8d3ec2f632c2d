//! Quotas are checked where commands apply, in log order: concurrent creates
//! through different nodes can never exceed them.

mod common;

use common::TestCluster;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_creates_through_three_nodes_against_a_quota_of_ten_leave_ten() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let reply = admin
        .post(&format!("{base}/v1/projects"), json!({ "name": "web" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let reply = admin
        .send(
            reqwest::Method::PUT,
            &format!("{base}/v1/projects/web/quota"),
            Some(json!({ "volumes": 10, "storage_bytes": 100u64 << 30 })),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["quota"]["volumes"], 10);

    let mut creates = tokio::task::JoinSet::new();
    for i in 0..50 {
        let client = cluster.client();
        let url = format!("{}/v1/projects/web/volumes", cluster.api_url(i % 3));
        creates.spawn(async move {
            client
                .post(
                    &url,
                    json!({ "name": format!("v{i}"), "size_bytes": 1u64 << 30 }),
                )
                .await
                .unwrap()
        });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(reply) = creates.join_next().await {
        let reply = reply.unwrap();
        match reply.status {
            201 => created += 1,
            409 => {
                assert_eq!(reply.body["error"]["code"], "quota_exceeded");
                assert!(
                    reply.body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("volumes quota is 10"),
                    "{}",
                    reply.body
                );
                refused += 1;
            }
            other => panic!("unexpected answer {other}: {}", reply.body),
        }
    }
    assert_eq!((created, refused), (10, 40));

    // Every node agrees: ten volumes, and the usage says so.
    for i in 0..3 {
        let url = cluster.api_url(i);
        let list = admin
            .get(&format!("{url}/v1/projects/web/volumes"))
            .await
            .unwrap();
        assert_eq!(list.body.as_array().unwrap().len(), 10, "node {i}");
        let project = admin.get(&format!("{url}/v1/projects/web")).await.unwrap();
        assert_eq!(project.body["usage"]["volumes"], 10, "node {i}");
        assert_eq!(project.body["usage"]["storage_bytes"], 10u64 << 30);
    }

    // Deleting one frees its share; the storage quota counts too.
    let name = list_names(&admin, &base).await[0].clone();
    let reply = admin
        .send(
            reqwest::Method::DELETE,
            &format!("{base}/v1/projects/web/volumes/{name}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204, "{}", reply.body);
    let reply = admin
        .post(
            &format!("{base}/v1/projects/web/volumes"),
            json!({ "name": "huge", "size_bytes": 92u64 << 30 }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "over the storage quota: {}", reply.body);
    assert!(reply.body.to_string().contains("storage_bytes quota"));
    let reply = admin
        .post(
            &format!("{base}/v1/projects/web/volumes"),
            json!({ "name": "last", "size_bytes": 1u64 << 30 }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.body["zone"], "OFFICIAL");
    assert_eq!(reply.body["state"], "available");
    // A volume answers to its id as well as its name.
    let id = reply.body["id"].as_str().unwrap().to_string();
    let by_id = admin
        .get(&format!("{base}/v1/projects/web/volumes/{id}"))
        .await
        .unwrap();
    assert_eq!(by_id.body["name"], "last", "{}", by_id.body);

    // A project with volumes is not deleted from under them.
    let reply = admin
        .send(
            reqwest::Method::DELETE,
            &format!("{base}/v1/projects/web"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    cluster.shutdown().await;
}

async fn list_names(admin: &common::ApiClient, base: &str) -> Vec<String> {
    admin
        .get(&format!("{base}/v1/projects/web/volumes"))
        .await
        .unwrap()
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}
