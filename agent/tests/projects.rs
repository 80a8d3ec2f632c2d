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

/// A project the caller has no role in answers 404, as if it did not exist,
/// also where it is named in a body: the volume of an attach, the scope of
/// a token. A project the caller only views refuses an attach with 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_the_caller_cannot_see_is_not_found_wherever_it_is_named() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    for project in ["mine", "secret", "shared"] {
        let reply = admin
            .post(&format!("{base}/v1/projects"), json!({ "name": project }))
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let reply = admin
        .post(
            &format!("{base}/v1/users"),
            json!({ "name": "dana", "password": "correct horse" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    for (project, role) in [("mine", "project-member"), ("shared", "project-viewer")] {
        let reply = admin
            .post(
                &format!("{base}/v1/users/dana/roles"),
                json!({ "role": role, "project": project }),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let token = admin
        .post(&format!("{base}/v1/users/dana/tokens"), json!({}))
        .await
        .unwrap();
    assert_eq!(token.status, 201, "{}", token.body);
    let dana = common::ApiClient::new(&cluster.ca_pem, token.body["token"].as_str().unwrap());

    // The node reports its capacity a moment after it starts.
    let mut vm = None;
    for _ in 0..100 {
        let reply = dana
            .post(
                &format!("{base}/v1/projects/mine/vms"),
                json!({ "name": "web", "vcpus": 1, "memory_bytes": 268435456u64 }),
            )
            .await
            .unwrap();
        if reply.status == 201 {
            vm = Some(reply.body);
            break;
        }
        assert_eq!(reply.status, 409, "{}", reply.body);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(vm.is_some(), "the VM was never placed");

    let attach = |project: &'static str| {
        let dana = dana.clone();
        let url = format!("{base}/v1/projects/mine/vms/web/volumes");
        async move {
            dana.post(&url, json!({ "volume": "data", "project": project }))
                .await
                .unwrap()
        }
    };
    let hidden = attach("secret").await;
    assert_eq!(hidden.status, 404, "{}", hidden.body);
    assert_eq!(
        hidden.body["error"]["message"],
        "project \"secret\" does not exist"
    );
    let missing = attach("nowhere").await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(
        missing.body["error"]["message"],
        "project \"nowhere\" does not exist"
    );
    let viewed = attach("shared").await;
    assert_eq!(viewed.status, 403, "{}", viewed.body);

    let scoped = dana
        .post(
            &format!("{base}/v1/users/dana/tokens"),
            json!({ "project": "secret", "role": "project-viewer" }),
        )
        .await
        .unwrap();
    assert_eq!(scoped.status, 404, "{}", scoped.body);
    cluster.shutdown().await;
}
