//! A project is deleted only when none of its VMs, volumes, ports or
//! floating IPs is left; its VPCs, subnets and security groups go with it.

mod common;

use common::TestCluster;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_with_ports_is_not_deleted_and_its_vpcs_subnets_and_groups_go_with_it() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let post = |path: &str, body: serde_json::Value| {
        let (admin, url) = (admin.clone(), format!("{base}{path}"));
        async move {
            let reply = admin.post(&url, body).await.unwrap();
            assert_eq!(reply.status, 201, "POST {url}: {}", reply.body);
            reply.body
        }
    };
    post("/v1/projects", json!({ "name": "web" })).await;
    let vpc = post("/v1/projects/web/vpcs", json!({ "name": "main" })).await;
    assert_eq!(vpc["vni"], 1, "{vpc}");
    post(
        "/v1/projects/web/vpcs/main/subnets",
        json!({ "name": "front", "cidr": "10.9.0.0/24" }),
    )
    .await;
    post(
        "/v1/projects/web/security-groups",
        json!({ "name": "frontend" }),
    )
    .await;
    post(
        "/v1/projects/web/ports",
        json!({ "name": "host1", "subnet": "front", "node": 1 }),
    )
    .await;

    // A port is in use (its address may be on a host outside Allod): the
    // project stays, and says why.
    let refused = admin
        .send(Method::DELETE, &format!("{base}/v1/projects/web"), None)
        .await
        .unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1 port(s)"), "{message}");
    let vpcs = admin
        .get(&format!("{base}/v1/projects/web/vpcs"))
        .await
        .unwrap();
    assert_eq!(vpcs.body.as_array().map(Vec::len), Some(1), "{}", vpcs.body);

    let deleted = admin
        .send(
            Method::DELETE,
            &format!("{base}/v1/projects/web/ports/host1"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    let deleted = admin
        .send(Method::DELETE, &format!("{base}/v1/projects/web"), None)
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.body);

    // Nothing of it is left: a new project of the same name has no VPC and
    // no security group, and the VNI is free again.
    post("/v1/projects", json!({ "name": "web" })).await;
    for path in ["vpcs", "security-groups"] {
        let listed = admin
            .get(&format!("{base}/v1/projects/web/{path}"))
            .await
            .unwrap();
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(listed.body, json!([]), "{path}");
    }
    let again = post("/v1/projects/web/vpcs", json!({ "name": "other" })).await;
    assert_eq!(again["vni"], 1, "{again}");
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
