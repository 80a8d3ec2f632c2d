//! Defects a security review found in how tenants and operators are kept
//! apart, each with the behaviour that fixes it, against real agents.

mod common;

use common::{ApiClient, TestCluster};
use reqwest::Method;
use serde_json::json;

async fn ok(reply: common::Reply, what: &str) -> serde_json::Value {
    assert!(
        (200..300).contains(&reply.status),
        "{what}: {} {}",
        reply.status,
        reply.body
    );
    reply.body
}

/// Users can be disabled, enabled and deleted, roles revoked, and nothing
/// leaves the cluster without an enabled administrator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_can_be_disabled_deleted_and_lose_roles_but_never_the_last_admin() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let post = |path: &str, body: serde_json::Value| {
        let url = format!("{base}{path}");
        let admin = &admin;
        async move { admin.post(&url, body).await }
    };
    ok(
        post("/v1/projects", json!({ "name": "p" })).await.unwrap(),
        "project",
    )
    .await;
    ok(
        post(
            "/v1/users",
            json!({ "name": "bob", "password": "bob's password" }),
        )
        .await
        .unwrap(),
        "user",
    )
    .await;
    ok(
        post(
            "/v1/users/bob/roles",
            json!({ "role": "project-member", "project": "p" }),
        )
        .await
        .unwrap(),
        "grant",
    )
    .await;
    let token = ok(
        post("/v1/users/bob/tokens", json!({})).await.unwrap(),
        "token",
    )
    .await;
    let bob = ApiClient::new(&cluster.ca_pem, token["token"].as_str().unwrap());
    let bob_sees_p = || async {
        bob.get(&format!("{base}/v1/projects/p"))
            .await
            .unwrap()
            .status
    };
    assert_eq!(bob_sees_p().await, 200);

    // Revoking the project role hides the project from bob at once.
    let revoked = ok(
        admin
            .send(
                Method::DELETE,
                &format!("{base}/v1/users/bob/roles?project=p"),
                None,
            )
            .await
            .unwrap(),
        "revoke",
    )
    .await;
    assert_eq!(revoked["name"], "bob");
    assert_eq!(bob_sees_p().await, 404);
    // Naming no role is refused with what to send.
    let vague = admin
        .send(Method::DELETE, &format!("{base}/v1/users/bob/roles"), None)
        .await
        .unwrap();
    assert_eq!(vague.status, 400);
    assert!(vague.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("?project=P"));

    // cluster-admin, granted and revoked.
    ok(
        post("/v1/users/bob/roles", json!({ "role": "cluster-admin" }))
            .await
            .unwrap(),
        "grant",
    )
    .await;
    assert_eq!(
        bob.get(&format!("{base}/v1/users")).await.unwrap().status,
        200
    );
    ok(
        admin
            .send(
                Method::DELETE,
                &format!("{base}/v1/users/bob/roles?role=cluster-admin"),
                None,
            )
            .await
            .unwrap(),
        "revoke admin",
    )
    .await;
    assert_eq!(
        bob.get(&format!("{base}/v1/users")).await.unwrap().status,
        403
    );

    // Disabled: the token and the password are refused; enabled: both work.
    let login = |password: &'static str| {
        let http = admin.http.clone();
        let url = format!("{base}/v1/login");
        async move {
            http.post(url)
                .json(&json!({ "user": "bob", "password": password }))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let disabled = ok(
        admin
            .send(
                Method::PATCH,
                &format!("{base}/v1/users/bob"),
                Some(json!({ "disabled": true })),
            )
            .await
            .unwrap(),
        "disable",
    )
    .await;
    assert_eq!(disabled["disabled"], true);
    assert_eq!(
        bob.get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401
    );
    assert_eq!(login("bob's password").await, 401);
    ok(
        admin
            .send(
                Method::PATCH,
                &format!("{base}/v1/users/bob"),
                Some(json!({ "disabled": false })),
            )
            .await
            .unwrap(),
        "enable",
    )
    .await;
    assert_eq!(
        bob.get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(login("bob's password").await, 200);

    // The only administrator can be neither disabled, deleted nor demoted.
    for (method, path, body) in [
        (
            Method::PATCH,
            "/v1/users/admin",
            Some(json!({ "disabled": true })),
        ),
        (Method::DELETE, "/v1/users/admin", None),
        (
            Method::DELETE,
            "/v1/users/admin/roles?role=cluster-admin",
            None,
        ),
    ] {
        let refused = admin
            .send(method.clone(), &format!("{base}{path}"), body)
            .await
            .unwrap();
        assert_eq!(refused.status, 409, "{method} {path}: {}", refused.body);
        assert!(refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("last enabled cluster administrator"));
    }
    assert_eq!(
        admin.get(&format!("{base}/v1/users")).await.unwrap().status,
        200
    );

    // Deleted: bob, his tokens and his roles are gone.
    ok(
        post(
            "/v1/users/bob/roles",
            json!({ "role": "project-viewer", "project": "p" }),
        )
        .await
        .unwrap(),
        "grant",
    )
    .await;
    let deleted = admin
        .send(Method::DELETE, &format!("{base}/v1/users/bob"), None)
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert_eq!(
        bob.get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401
    );
    let users = ok(
        admin.get(&format!("{base}/v1/users")).await.unwrap(),
        "users",
    )
    .await;
    assert!(users.as_array().unwrap().iter().all(|u| u["name"] != "bob"));
    // A new bob starts with nothing of the old one.
    ok(
        post("/v1/users", json!({ "name": "bob" })).await.unwrap(),
        "user",
    )
    .await;
    let node = cluster.node(0);
    assert!(node.state.grants_of("bob").unwrap().is_empty());
    assert!(node.state.tokens_of("bob").unwrap().is_empty());
    cluster.shutdown().await;
}

/// A tenant cannot pin a port on a node dedicated to another zone; the
/// default placement picks a node of the project's own zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_cannot_be_pinned_on_a_node_of_another_zone() {
    let cluster = TestCluster::start(2).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let (n1, n2) = (cluster.node(0).id, cluster.node(1).id);
    ok(
        admin
            .send(
                Method::PUT,
                &format!("{base}/v1/nodes/{n2}/zone"),
                Some(json!({ "zone": "SECRET" })),
            )
            .await
            .unwrap(),
        "zone",
    )
    .await;
    for (project, zone) in [("shared", "OFFICIAL"), ("secret", "SECRET")] {
        ok(
            admin
                .post(
                    &format!("{base}/v1/projects"),
                    json!({ "name": project, "zone": zone }),
                )
                .await
                .unwrap(),
            "project",
        )
        .await;
        ok(
            admin
                .post(
                    &format!("{base}/v1/projects/{project}/vpcs"),
                    json!({ "name": "net" }),
                )
                .await
                .unwrap(),
            "vpc",
        )
        .await;
        ok(
            admin
                .post(
                    &format!("{base}/v1/projects/{project}/vpcs/net/subnets"),
                    json!({ "name": "sn", "cidr": "10.0.0.0/24" }),
                )
                .await
                .unwrap(),
            "subnet",
        )
        .await;
    }
    let port = |project: &str, name: &str, node: Option<u64>| {
        let url = format!("{base}/v1/projects/{project}/ports");
        let body = json!({ "name": name, "subnet": "sn", "security_groups": [], "node": node });
        let admin = &admin;
        async move { admin.post(&url, body).await }
    };
    let refused = port("shared", "pinned", Some(n2)).await.unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("dedicated to SECRET"), "{message}");
    let refused = port("secret", "pinned", Some(n1)).await.unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    let placed = ok(port("secret", "auto", None).await.unwrap(), "secret port").await;
    assert_eq!(placed["node"], n2);
    let placed = ok(port("shared", "auto", None).await.unwrap(), "shared port").await;
    assert_eq!(placed["node"], n1);
    cluster.shutdown().await;
}

/// A rule that admits a remote group admits its members in the guarded
/// port's own VPC only: another VPC of the project may use the same
/// addresses for ports that are not in the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_group_rule_admits_members_of_the_same_vpc_only() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let post = |path: String, body: serde_json::Value| {
        let admin = &admin;
        async move { ok(admin.post(&path, body).await.unwrap(), &path).await }
    };
    let p = format!("{base}/v1/projects/p");
    post(format!("{base}/v1/projects"), json!({ "name": "p" })).await;
    for group in ["web", "db"] {
        post(format!("{p}/security-groups"), json!({ "name": group })).await;
    }
    post(
        format!("{p}/security-groups/db/rules"),
        json!({ "direction": "ingress", "protocol": "tcp", "port_min": 5432, "remote_group": "web" }),
    )
    .await;
    for vpc in ["blue", "green"] {
        post(format!("{p}/vpcs"), json!({ "name": vpc })).await;
        post(
            format!("{p}/vpcs/{vpc}/subnets"),
            json!({ "name": vpc, "cidr": "10.0.0.0/24" }),
        )
        .await;
    }
    // blue: the database and a port outside "web" at 10.0.0.3;
    // green: a "web" member at the same 10.0.0.3.
    let port = |name: &str, subnet: &str, ip: &str, groups: &[&str]| {
        post(
            format!("{p}/ports"),
            json!({ "name": name, "subnet": subnet, "ip": ip, "security_groups": groups }),
        )
    };
    port("db1", "blue", "10.0.0.2", &["db"]).await;
    port("other", "blue", "10.0.0.3", &[]).await;
    port("web1", "green", "10.0.0.3", &["web"]).await;
    port("web2", "blue", "10.0.0.4", &["web"]).await;

    let network = cluster
        .node(0)
        .state
        .node_network(cluster.node(0).id, 1450, None)
        .unwrap();
    let db1 = network
        .vpcs
        .iter()
        .flat_map(|v| &v.ports)
        .find(|port| port.ip == std::net::Ipv4Addr::new(10, 0, 0, 2))
        .unwrap();
    let netfabric::Location::Local {
        security_groups, ..
    } = &db1.location
    else {
        panic!("db1 is local");
    };
    let db = &network.security_groups[&security_groups[0]];
    let netfabric::Peer::Group(remote) = &db.rules[0].peer else {
        panic!("the rule names a group");
    };
    let members = &network.security_groups[remote].members;
    assert_eq!(
        members,
        &[std::net::Ipv4Addr::new(10, 0, 0, 4)],
        "{network:#?}"
    );
    cluster.shutdown().await;
}
