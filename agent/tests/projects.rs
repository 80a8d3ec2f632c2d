//! A project is deleted only when nothing of it is left: its VMs and
//! volumes, and its network (VPCs, subnets, ports, floating IPs, security
//! groups). The `default` security group its first VPC brought goes with it.

mod common;

use common::TestCluster;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_with_network_objects_is_not_deleted_and_its_default_group_goes_with_it() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let created = admin
        .post(&format!("{base}/v1/projects"), json!({ "name": "web" }))
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let vpc = admin
        .post(
            &format!("{base}/v1/projects/web/vpcs"),
            json!({ "name": "main" }),
        )
        .await
        .unwrap();
    assert_eq!(vpc.status, 201, "{}", vpc.body);
    let group = admin
        .post(
            &format!("{base}/v1/projects/web/security-groups"),
            json!({ "name": "frontend" }),
        )
        .await
        .unwrap();
    assert_eq!(group.status, 201, "{}", group.body);

    let refused = admin
        .send(Method::DELETE, &format!("{base}/v1/projects/web"), None)
        .await
        .unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1 VPC(s)") && message.contains("1 security group(s) besides `default`"),
        "{message}"
    );
    let vpcs = admin
        .get(&format!("{base}/v1/projects/web/vpcs"))
        .await
        .unwrap();
    assert_eq!(vpcs.body.as_array().map(Vec::len), Some(1), "{}", vpcs.body);

    for path in ["security-groups/frontend", "vpcs/main"] {
        let deleted = admin
            .send(
                Method::DELETE,
                &format!("{base}/v1/projects/web/{path}"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(deleted.status, 204, "{path}: {}", deleted.body);
    }
    let deleted = admin
        .send(Method::DELETE, &format!("{base}/v1/projects/web"), None)
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.body);

    // A new project of the same name starts with no security group at all.
    let again = admin
        .post(&format!("{base}/v1/projects"), json!({ "name": "web" }))
        .await
        .unwrap();
    assert_eq!(again.status, 201, "{}", again.body);
    let groups = admin
        .get(&format!("{base}/v1/projects/web/security-groups"))
        .await
        .unwrap();
    assert_eq!(groups.status, 200, "{}", groups.body);
    assert_eq!(groups.body, json!([]));
    cluster.shutdown().await;
}
