//! The authorisation matrix, built from the router's own route list: every
//! route × every role × own / other project (or user, or token), each in a
//! fresh project so that allowed destructive calls do not disturb the rest.
//! Expectations are written out here, independently of the permission
//! table, and a route missing from them fails the test.

mod common;

use std::collections::HashMap;

use agent::state::auth::Role;
use common::{ApiClient, TestCluster};
use reqwest::Method;
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Rule {
    AnyAuthenticated,
    AdminOnly,
    /// Allowed from this role up in the project; hidden from strangers.
    ProjectAtLeast(Role),
    SelfOrAdmin,
}

/// SHA-256 of the two bytes `{}`: the image the matrix uploads.
const EMPTY_OBJECT_SHA256: &str =
    "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

fn expectations() -> HashMap<(&'static str, &'static str), Rule> {
    use Rule::*;
    HashMap::from([
        (("GET", "/v1/cluster"), AnyAuthenticated),
        (("GET", "/v1/nodes"), AnyAuthenticated),
        (("GET", "/v1/storage"), AdminOnly),
        (("PATCH", "/v1/storage/config"), AdminOnly),
        (("POST", "/v1/storage/scrub"), AdminOnly),
        (("GET", "/v1/projects"), AnyAuthenticated),
        (("POST", "/v1/projects"), AdminOnly),
        (
            ("GET", "/v1/projects/{name}"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("PATCH", "/v1/projects/{name}"),
            ProjectAtLeast(Role::ProjectAdmin),
        ),
        (
            ("DELETE", "/v1/projects/{name}"),
            ProjectAtLeast(Role::ClusterAdmin),
        ),
        (
            ("PUT", "/v1/projects/{name}/quota"),
            ProjectAtLeast(Role::ClusterAdmin),
        ),
        (
            ("GET", "/v1/projects/{name}/volumes"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/volumes"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/volumes/{volume}"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("DELETE", "/v1/projects/{name}/volumes/{volume}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/volumes/{volume}/resize"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/volumes/{volume}/snapshots"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/volumes/{volume}/snapshots"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            (
                "DELETE",
                "/v1/projects/{name}/volumes/{volume}/snapshots/{snapshot}",
            ),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/volumes/{volume}/rollback"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/volumes/{volume}/clone"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (("GET", "/v1/images"), AnyAuthenticated),
        (("POST", "/v1/images"), AdminOnly),
        (("GET", "/v1/images/{image}"), AnyAuthenticated),
        (("DELETE", "/v1/images/{image}"), AdminOnly),
        (
            ("GET", "/v1/projects/{name}/vms"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/vms"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/vms/{vm}"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("DELETE", "/v1/projects/{name}/vms/{vm}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/vms/{vm}/volumes"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("DELETE", "/v1/projects/{name}/vms/{vm}/volumes/{volume}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/vms/{vm}/start"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/vms/{vm}/stop"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/vms/{vm}/force-stop"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/vms/{vm}/reboot"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("PATCH", "/v1/projects/{name}/vms/{vm}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (("POST", "/v1/projects/{name}/vms/{vm}/migrate"), AdminOnly),
        (
            ("GET", "/v1/projects/{name}/vms/{vm}/console"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/volumes/{volume}/exports"),
            ProjectAtLeast(Role::ClusterAdmin),
        ),
        (("GET", "/v1/users"), AdminOnly),
        (("POST", "/v1/users"), AdminOnly),
        (("POST", "/v1/users/{user}/roles"), AdminOnly),
        (("DELETE", "/v1/users/{user}/roles"), AdminOnly),
        (("PATCH", "/v1/users/{user}"), AdminOnly),
        (("DELETE", "/v1/users/{user}"), AdminOnly),
        (("GET", "/v1/users/{user}/tokens"), SelfOrAdmin),
        (("POST", "/v1/users/{user}/tokens"), SelfOrAdmin),
        (("DELETE", "/v1/tokens/{id}"), SelfOrAdmin),
        (("GET", "/v1/audit"), AdminOnly),
        (("GET", "/v1/zones"), AnyAuthenticated),
        (("PUT", "/v1/nodes/{node}/zone"), AdminOnly),
        (("GET", "/v1/nodes/{node}"), AnyAuthenticated),
        (("POST", "/v1/nodes/{node}/drain"), AdminOnly),
        (("POST", "/v1/nodes/{node}/resume"), AdminOnly),
        (("GET", "/v1/oidc/issuers"), AdminOnly),
        (("PUT", "/v1/oidc/issuers/{issuer}"), AdminOnly),
        (("DELETE", "/v1/oidc/issuers/{issuer}"), AdminOnly),
        (("GET", "/v1/ip-pools"), AnyAuthenticated),
        (("POST", "/v1/ip-pools"), AdminOnly),
        (
            ("GET", "/v1/projects/{name}/vpcs"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/vpcs"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("DELETE", "/v1/projects/{name}/vpcs/{vpc}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/vpcs/{vpc}/subnets"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/vpcs/{vpc}/subnets"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/security-groups"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/security-groups"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("DELETE", "/v1/projects/{name}/security-groups/{sg}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/security-groups/{sg}/rules"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            (
                "DELETE",
                "/v1/projects/{name}/security-groups/{sg}/rules/{rule}",
            ),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/ports"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/ports"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("DELETE", "/v1/projects/{name}/ports/{port}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("GET", "/v1/projects/{name}/floating-ips"),
            ProjectAtLeast(Role::ProjectViewer),
        ),
        (
            ("POST", "/v1/projects/{name}/floating-ips"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("POST", "/v1/projects/{name}/floating-ips/{ip}/bind"),
            ProjectAtLeast(Role::ProjectMember),
        ),
        (
            ("DELETE", "/v1/projects/{name}/floating-ips/{ip}"),
            ProjectAtLeast(Role::ProjectMember),
        ),
    ])
}

/// Roles in increasing power, for "at least".
const LADDER: [Role; 4] = [
    Role::ProjectViewer,
    Role::ProjectMember,
    Role::ProjectAdmin,
    Role::ClusterAdmin,
];

fn at_least(held: Role, needed: Role) -> bool {
    LADDER.iter().position(|r| *r == held) >= LADDER.iter().position(|r| *r == needed)
}

/// Who calls: a role, or `None` for an authenticated user with no role at all.
fn callers() -> Vec<Option<Role>> {
    vec![
        Some(Role::ClusterAdmin),
        Some(Role::ProjectAdmin),
        Some(Role::ProjectMember),
        Some(Role::ProjectViewer),
        None,
    ]
}

async fn ok(reply: common::Reply, what: &str) -> serde_json::Value {
    assert!(
        reply.status < 300,
        "{what}: {} {}",
        reply.status,
        reply.body
    );
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_for_every_role_on_own_and_other_projects() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let (_, table) = agent::api::routes().finish();
    let expected = expectations();
    common::wait_for_async(
        "the node's capacity",
        std::time::Duration::from_secs(10),
        || {
            let admin = admin.clone();
            let base = base.clone();
            async move {
                let nodes = admin.get(&format!("{base}/v1/nodes")).await.unwrap().body;
                nodes[0]["vcpus"].as_u64() > Some(0) && nodes[0]["storage"].is_object()
            }
        },
    )
    .await;
    let mut case = 0;
    let mut checked = 0;

    for (method, pattern, permission) in table.routes() {
        if permission == agent::api::authz::Permission::Public {
            continue;
        }
        let rule = *expected
            .get(&(method.as_str(), pattern))
            .unwrap_or_else(|| {
                panic!("{method} {pattern} is not in the authorisation matrix; add its expectation")
            });
        for caller in callers() {
            for own in [true, false] {
                case += 1;
                // A fresh world for each case.
                let own_project = format!("own{case}");
                let other_project = format!("other{case}");
                let user = format!("user{case}");
                let someone_else = format!("else{case}");
                for p in [&own_project, &other_project] {
                    ok(
                        admin
                            .post(&format!("{base}/v1/projects"), json!({ "name": p }))
                            .await
                            .unwrap(),
                        "create project",
                    )
                    .await;
                }
                for u in [&user, &someone_else] {
                    ok(
                        admin
                            .post(&format!("{base}/v1/users"), json!({ "name": u }))
                            .await
                            .unwrap(),
                        "create user",
                    )
                    .await;
                }
                if let Some(role) = caller {
                    let grant = match role {
                        Role::ClusterAdmin => json!({ "role": "cluster-admin" }),
                        r => json!({ "role": r.as_str(), "project": own_project }),
                    };
                    ok(
                        admin
                            .post(&format!("{base}/v1/users/{user}/roles"), grant)
                            .await
                            .unwrap(),
                        "grant",
                    )
                    .await;
                }
                let token = ok(
                    admin
                        .post(&format!("{base}/v1/users/{user}/tokens"), json!({}))
                        .await
                        .unwrap(),
                    "token",
                )
                .await;
                let client = ApiClient::new(&cluster.ca_pem, token["token"].as_str().unwrap());
                let victim_token = ok(
                    admin
                        .post(&format!("{base}/v1/users/{someone_else}/tokens"), json!({}))
                        .await
                        .unwrap(),
                    "token",
                )
                .await;
                let own_token = ok(
                    admin
                        .post(&format!("{base}/v1/users/{user}/tokens"), json!({}))
                        .await
                        .unwrap(),
                    "token",
                )
                .await;

                let project = if own { &own_project } else { &other_project };
                let target_user = if own { &user } else { &someone_else };
                let token_id = if own {
                    own_token["id"].as_str().unwrap()
                } else {
                    victim_token["id"].as_str().unwrap()
                };
                // Network fixtures: a VPC, a subnet with a port, a group,
                // and a pool of this case's own with an allocated address.
                let post = |url: String, body: serde_json::Value| {
                    let admin = &admin;
                    async move { ok(admin.post(&url, body).await.unwrap(), "network fixture").await }
                };
                let pool_net = format!("100.{}.{}", 64 + case / 256, case % 256);
                let needs_subnet = pattern.contains("{port}") || pattern.ends_with("/ports");
                if pattern.contains("{vpc}") || needs_subnet {
                    post(
                        format!("{base}/v1/projects/{project}/vpcs"),
                        json!({ "name": "net" }),
                    )
                    .await;
                }
                if needs_subnet {
                    post(
                        format!("{base}/v1/projects/{project}/vpcs/net/subnets"),
                        json!({ "name": "sn", "cidr": "10.0.0.0/24" }),
                    )
                    .await;
                }
                if pattern.contains("{port}") {
                    post(
                        format!("{base}/v1/projects/{project}/ports"),
                        json!({ "name": "nic", "subnet": "sn", "security_groups": [] }),
                    )
                    .await;
                }
                if pattern.contains("{sg}") {
                    post(
                        format!("{base}/v1/projects/{project}/security-groups"),
                        json!({ "name": "web" }),
                    )
                    .await;
                }
                let mut rule_id = String::new();
                if pattern.contains("{rule}") {
                    let group = post(
                        format!("{base}/v1/projects/{project}/security-groups/web/rules"),
                        json!({ "direction": "ingress", "protocol": "tcp", "port_min": 22, "cidr": "192.0.2.0/24" }),
                    )
                    .await;
                    rule_id = group["rules"][0]["id"].as_str().unwrap().to_string();
                }
                let mut fip = String::new();
                if pattern.contains("floating-ips") {
                    post(
                        format!("{base}/v1/ip-pools"),
                        json!({ "name": format!("pool{case}"), "cidr": format!("{pool_net}.0/28") }),
                    )
                    .await;
                }
                if pattern.contains("{ip}") {
                    let allocated = post(
                        format!("{base}/v1/projects/{project}/floating-ips"),
                        json!({}),
                    )
                    .await;
                    fip = allocated["ip"].as_str().unwrap().to_string();
                }
                let path = pattern
                    .replace("{vpc}", "net")
                    .replace("{sg}", "web")
                    .replace("{rule}", &rule_id)
                    .replace("{port}", "nic")
                    .replace("{ip}", &fip)
                    .replace("{name}", project)
                    .replace("{user}", target_user)
                    .replace("{id}", token_id)
                    .replace("{node}", "1")
                    .replace("{issuer}", &format!("idp{case}"))
                    .replace("{volume}", "disk")
                    .replace("{snapshot}", "snap")
                    .replace("{image}", &format!("img{case}"))
                    .replace("{vm}", "box");
                // An image upload: the body's bytes are the image ("{}").
                let path = match (method.as_str(), pattern) {
                    ("POST", "/v1/images") => {
                        format!("{path}?name=new{case}&sha256={EMPTY_OBJECT_SHA256}")
                    }
                    ("DELETE", "/v1/users/{user}/roles") => format!("{path}?project={project}"),
                    _ => path,
                };
                if pattern.contains("{image}") {
                    let reply = admin
                        .post(
                            &format!(
                                "{base}/v1/images?name=img{case}&sha256={EMPTY_OBJECT_SHA256}"
                            ),
                            json!({}),
                        )
                        .await
                        .unwrap();
                    ok(reply, "image").await;
                }
                if pattern.contains("{vm}") {
                    let reply = admin
                        .post(
                            &format!("{base}/v1/projects/{project}/vms"),
                            json!({ "name": "box", "vcpus": 1, "memory_bytes": 64 << 20 }),
                        )
                        .await
                        .unwrap();
                    ok(reply, "vm").await;
                }
                if pattern.contains("{volume}") || pattern.ends_with("{vm}/volumes") {
                    let reply = admin
                        .post(
                            &format!("{base}/v1/projects/{project}/volumes"),
                            json!({ "name": "disk", "size_bytes": 1 << 20 }),
                        )
                        .await
                        .unwrap();
                    ok(reply, "volume").await;
                    let reply = admin
                        .post(
                            &format!("{base}/v1/projects/{project}/volumes/disk/snapshots"),
                            json!({ "name": "snap" }),
                        )
                        .await
                        .unwrap();
                    ok(reply, "snapshot").await;
                }
                if pattern.contains("{vm}") && pattern.contains("{volume}") {
                    let reply = admin
                        .post(
                            &format!("{base}/v1/projects/{project}/vms/box/volumes"),
                            json!({ "volume": "disk" }),
                        )
                        .await
                        .unwrap();
                    ok(reply, "attach").await;
                }
                if pattern.contains("{issuer}") {
                    let reply = admin
                        .send(
                            Method::PUT,
                            &format!("{base}/v1/oidc/issuers/idp{case}"),
                            Some(json!({ "issuer": format!("https://idp{case}.example"), "audience": "allod" })),
                        )
                        .await
                        .unwrap();
                    ok(reply, "issuer").await;
                }
                let body = match (method.as_str(), pattern) {
                    ("POST", "/v1/projects") => Some(json!({ "name": format!("new{case}") })),
                    ("PATCH", "/v1/projects/{name}/vms/{vm}") => Some(json!({ "vcpus": 2 })),
                    ("PATCH", "/v1/users/{user}") => Some(json!({ "disabled": true })),
                    ("PATCH", "/v1/storage/config") => Some(json!({ "down_out_after_s": 600 })),
                    ("PATCH", _) => Some(json!({ "description": "changed" })),
                    ("PUT", "/v1/projects/{name}/quota") => Some(json!({ "volumes": 5 })),
                    ("POST", "/v1/projects/{name}/vms") => Some(
                        json!({ "name": format!("new{case}"), "vcpus": 1, "memory_bytes": 64 << 20 }),
                    ),
                    ("POST", "/v1/projects/{name}/vms/{vm}/volumes") => {
                        Some(json!({ "volume": "disk" }))
                    }
                    ("POST", "/v1/projects/{name}/volumes") => {
                        Some(json!({ "name": format!("new{case}"), "size_bytes": 1 << 20 }))
                    }
                    ("POST", "/v1/users") => Some(json!({ "name": format!("new{case}") })),
                    ("POST", "/v1/ip-pools") => Some(
                        json!({ "name": format!("new{case}"), "cidr": format!("{pool_net}.16/28") }),
                    ),
                    ("POST", "/v1/projects/{name}/vpcs") => {
                        Some(json!({ "name": format!("new{case}") }))
                    }
                    ("POST", "/v1/projects/{name}/vpcs/{vpc}/subnets") => {
                        Some(json!({ "name": format!("s{case}"), "cidr": "10.9.0.0/24" }))
                    }
                    ("POST", "/v1/projects/{name}/security-groups") => {
                        Some(json!({ "name": format!("new{case}") }))
                    }
                    ("POST", "/v1/projects/{name}/security-groups/{sg}/rules") => Some(
                        json!({ "direction": "ingress", "protocol": "tcp", "port_min": 22, "cidr": "192.0.2.0/24" }),
                    ),
                    ("POST", "/v1/projects/{name}/ports") => Some(
                        json!({ "name": format!("p{case}"), "subnet": "sn", "security_groups": [] }),
                    ),
                    ("POST", "/v1/projects/{name}/floating-ips") => Some(json!({})),
                    ("POST", "/v1/projects/{name}/floating-ips/{ip}/bind") => {
                        Some(json!({ "port": null }))
                    }
                    ("POST", "/v1/projects/{name}/volumes/{volume}/resize") => {
                        Some(json!({ "size_bytes": 2 << 20 }))
                    }
                    ("POST", "/v1/projects/{name}/volumes/{volume}/snapshots") => {
                        Some(json!({ "name": format!("s{case}") }))
                    }
                    ("POST", "/v1/projects/{name}/volumes/{volume}/rollback") => {
                        Some(json!({ "snapshot": "snap" }))
                    }
                    ("POST", "/v1/projects/{name}/volumes/{volume}/clone") => {
                        Some(json!({ "snapshot": "snap", "name": format!("c{case}") }))
                    }
                    ("POST", "/v1/images") => Some(json!({})),
                    ("POST", "/v1/storage/scrub") => Some(json!({})),
                    ("POST", "/v1/projects/{name}/volumes/{volume}/exports") => {
                        Some(json!({ "read_only": true }))
                    }
                    ("POST", "/v1/users/{user}/roles") => {
                        Some(json!({ "role": "project-viewer", "project": project }))
                    }
                    ("POST", "/v1/users/{user}/tokens") => Some(json!({})),
                    ("PUT", "/v1/nodes/{node}/zone") => Some(json!({ "zone": "OFFICIAL" })),
                    ("POST", "/v1/nodes/{node}/drain") => Some(json!({})),
                    ("POST", "/v1/projects/{name}/vms/{vm}/migrate") => Some(json!({})),
                    ("PUT", "/v1/oidc/issuers/{issuer}") => Some(
                        json!({ "issuer": format!("https://other{case}.example"), "audience": "allod" }),
                    ),
                    _ => None,
                };
                let reply = client
                    .send(method.clone(), &format!("{base}{path}"), body)
                    .await
                    .unwrap();

                let is_admin = caller == Some(Role::ClusterAdmin);
                // Allowed through, then refused by the route itself: the
                // console wants a websocket upgrade and a running VM; a
                // resize wants a stopped VM.
                let allowed: &[u16] = match pattern {
                    "/v1/projects/{name}/vms/{vm}/console" => &[400, 409, 426],
                    "/v1/projects/{name}/vms/{vm}" if method == Method::PATCH => &[409],
                    _ => &[200, 201, 204],
                };
                let expected_status: &[u16] = match rule {
                    Rule::AnyAuthenticated => &[200, 201, 204],
                    // A single node has nowhere to migrate to: refused
                    // by the route, past the permission check.
                    Rule::AdminOnly if is_admin && pattern.ends_with("/migrate") => &[409],
                    // A scrub runs in the background: accepted.
                    Rule::AdminOnly if is_admin => &[200, 201, 202, 204],
                    Rule::AdminOnly => &[403],
                    Rule::ProjectAtLeast(_) if is_admin => allowed,
                    Rule::ProjectAtLeast(_) if !own || caller.is_none() => &[404],
                    Rule::ProjectAtLeast(needed) if at_least(caller.unwrap(), needed) => allowed,
                    Rule::ProjectAtLeast(_) => &[403],
                    Rule::SelfOrAdmin if is_admin || own => &[200, 201, 204],
                    Rule::SelfOrAdmin => &[404],
                };
                assert!(
                    expected_status.contains(&reply.status),
                    "{method} {pattern} as {caller:?} on {} resource: expected {expected_status:?}, got {} {}",
                    if own { "own" } else { "other" },
                    reply.status,
                    reply.body
                );
                checked += 1;
                // Free the node for the next cases.
                for p in [&own_project, &other_project] {
                    for vm in ["box".to_string(), format!("new{case}")] {
                        let _ = admin
                            .send(
                                Method::DELETE,
                                &format!("{base}/v1/projects/{p}/vms/{vm}"),
                                None,
                            )
                            .await;
                    }
                }
                // A drain leaves the only node in maintenance.
                let resumed = admin
                    .send(Method::POST, &format!("{base}/v1/nodes/1/resume"), None)
                    .await
                    .unwrap();
                ok(resumed, "resume the node").await;
            }
        }
    }
    let authenticated_routes = table
        .routes()
        .iter()
        .filter(|r| r.2 != agent::api::authz::Permission::Public)
        .count();
    assert_eq!(checked, authenticated_routes * 10);
    assert_eq!(
        expected.len(),
        authenticated_routes,
        "the matrix lists routes the router does not have"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_shown_once_scoped_expiring_and_revocable_and_login_issues_one() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    for p in ["alpha", "beta"] {
        ok(
            admin
                .post(&format!("{base}/v1/projects"), json!({ "name": p }))
                .await
                .unwrap(),
            "project",
        )
        .await;
    }
    ok(
        admin
            .post(
                &format!("{base}/v1/users"),
                json!({ "name": "dana", "password": "correct horse" }),
            )
            .await
            .unwrap(),
        "user",
    )
    .await;
    ok(
        admin
            .post(
                &format!("{base}/v1/users/dana/roles"),
                json!({ "role": "project-admin", "project": "alpha" }),
            )
            .await
            .unwrap(),
        "grant",
    )
    .await;
    ok(
        admin
            .post(
                &format!("{base}/v1/users/dana/roles"),
                json!({ "role": "project-admin", "project": "beta" }),
            )
            .await
            .unwrap(),
        "grant",
    )
    .await;

    // Login: a wrong password and an unknown user get the same answer.
    let anonymous = ApiClient::new(&cluster.ca_pem, "");
    let wrong = anonymous
        .post(
            &format!("{base}/v1/login"),
            json!({ "user": "dana", "password": "nope" }),
        )
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    let unknown = anonymous
        .post(
            &format!("{base}/v1/login"),
            json!({ "user": "nobody", "password": "nope" }),
        )
        .await
        .unwrap();
    assert_eq!(unknown.body, wrong.body);
    let session = ok(
        anonymous
            .post(
                &format!("{base}/v1/login"),
                json!({ "user": "dana", "password": "correct horse" }),
            )
            .await
            .unwrap(),
        "login",
    )
    .await;
    assert!(session["expires_at_ms"].as_u64().is_some());
    let dana = ApiClient::new(&cluster.ca_pem, session["token"].as_str().unwrap());
    let names: Vec<String> = dana.project_names(&base).await;
    assert_eq!(names, vec!["alpha", "beta"]);

    // A project token sees one project, at most with its role.
    let scoped = ok(
        dana.post(
            &format!("{base}/v1/users/dana/tokens"),
            json!({ "project": "alpha", "role": "project-viewer" }),
        )
        .await
        .unwrap(),
        "scoped",
    )
    .await;
    let viewer = ApiClient::new(&cluster.ca_pem, scoped["token"].as_str().unwrap());
    assert_eq!(viewer.project_names(&base).await, vec!["alpha"]);
    assert_eq!(
        viewer
            .get(&format!("{base}/v1/projects/beta"))
            .await
            .unwrap()
            .status,
        404
    );
    let patch = viewer
        .send(
            Method::PATCH,
            &format!("{base}/v1/projects/alpha"),
            Some(json!({ "description": "x" })),
        )
        .await
        .unwrap();
    assert_eq!(patch.status, 403);
    // Nor can it mint itself a wider token, or touch other tokens.
    let mint = viewer
        .post(&format!("{base}/v1/users/dana/tokens"), json!({}))
        .await
        .unwrap();
    assert_eq!(mint.status, 403, "{}", mint.body);
    let list = viewer
        .get(&format!("{base}/v1/users/dana/tokens"))
        .await
        .unwrap();
    assert_eq!(list.status, 403);
    // The secret is never listed again; only ids are.
    let listed = ok(
        dana.get(&format!("{base}/v1/users/dana/tokens"))
            .await
            .unwrap(),
        "list",
    )
    .await;
    assert!(!listed
        .to_string()
        .contains(scoped["token"].as_str().unwrap()));
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == scoped["id"]));

    // Revoked tokens stop working at once.
    let revoke = dana
        .send(
            Method::DELETE,
            &format!("{base}/v1/tokens/{}", scoped["id"].as_str().unwrap()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(revoke.status, 204);
    assert_eq!(
        viewer
            .get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401
    );

    // Expired tokens too.
    let short = ok(
        admin
            .post(
                &format!("{base}/v1/users/dana/tokens"),
                json!({ "expires_in_secs": 1 }),
            )
            .await
            .unwrap(),
        "short",
    )
    .await;
    let brief = ApiClient::new(&cluster.ca_pem, short["token"].as_str().unwrap());
    assert_eq!(
        brief
            .get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        200
    );
    let expiry = short["expires_at_ms"].as_u64().unwrap();
    common::wait_for(
        "the token's expiry passes",
        std::time::Duration::from_secs(5),
        || agent::cluster::join::now_ms() > expiry,
    )
    .await;
    assert_eq!(
        brief
            .get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401
    );

    // Deleting a project drops the roles in it.
    ok(
        admin
            .send(Method::DELETE, &format!("{base}/v1/projects/beta"), None)
            .await
            .unwrap(),
        "delete",
    )
    .await;
    ok(
        admin
            .post(&format!("{base}/v1/projects"), json!({ "name": "beta" }))
            .await
            .unwrap(),
        "recreate",
    )
    .await;
    assert_eq!(dana.project_names(&base).await, vec!["alpha"]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_and_authentication_failures_land_in_a_verifiable_audit_chain() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    let base = cluster.api_url(1);
    ok(
        admin
            .post(&format!("{base}/v1/projects"), json!({ "name": "audited" }))
            .await
            .unwrap(),
        "create",
    )
    .await;
    let conflict = admin
        .post(
            &format!("{}/v1/projects", cluster.api_url(2)),
            json!({ "name": "audited" }),
        )
        .await
        .unwrap();
    assert_eq!(conflict.status, 409);
    let stranger = ApiClient::new(&cluster.ca_pem, "allod_not_a_token");
    assert_eq!(
        stranger
            .get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401
    );
    // Reads are not audited.
    ok(
        admin
            .get(&format!("{base}/v1/projects/audited"))
            .await
            .unwrap(),
        "read",
    )
    .await;

    let mut entries = Vec::new();
    // Two joins (this is a 3-node cluster), two creates, and the node's
    // summary of the requests it refused unauthenticated.
    common::wait_for_async(
        "five audit entries",
        std::time::Duration::from_secs(10),
        || {
            let admin = admin.clone();
            let base = base.clone();
            async move {
                admin
                    .get(&format!("{base}/v1/audit"))
                    .await
                    .is_ok_and(|r| r.body.as_array().is_some_and(|a| a.len() >= 5))
            }
        },
    )
    .await;
    let listed = ok(
        admin.get(&format!("{base}/v1/audit")).await.unwrap(),
        "audit",
    )
    .await;
    for e in listed.as_array().unwrap() {
        entries.push(serde_json::from_value::<agent::state::audit::AuditEntry>(e.clone()).unwrap());
    }
    assert_eq!(entries.len(), 5, "{listed}");
    let actions: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e.record.context.user.clone(),
                e.record.context.action.clone(),
                e.record.result.clone(),
            )
        })
        .collect();
    let has = |user: &str, action: &str, result: &str| {
        actions.contains(&(user.into(), action.into(), result.into()))
    };
    assert!(has("admin", "POST /v1/projects", "ok"), "{actions:?}");
    assert!(
        has("admin", "POST /v1/projects", "already_exists"),
        "{actions:?}"
    );
    assert!(
        has(
            "-",
            agent::state::audit::REFUSAL_SUMMARY_ACTION,
            "unauthenticated"
        ),
        "{actions:?}"
    );
    let summary = entries
        .iter()
        .find_map(|e| e.record.summary.clone())
        .expect("a summary entry");
    assert_eq!(summary.requests, 1);
    assert_eq!(summary.first_requests, ["GET /v1/projects"]);
    assert_eq!(
        actions
            .iter()
            .filter(|a| a.1 == "POST /v1/cluster/join" && a.2 == "ok")
            .count(),
        2,
        "{actions:?}"
    );
    assert!(entries
        .iter()
        .all(|e| e.record.context.source.starts_with("127.0.0.1")));
    assert_eq!(agent::state::audit::verify(&entries), Ok(5));

    // Filters and the JSON-lines export.
    let only_conflicts = ok(
        admin
            .get(&format!("{base}/v1/audit?user=admin&after=3"))
            .await
            .unwrap(),
        "filter",
    )
    .await;
    assert_eq!(
        only_conflicts.as_array().unwrap().len(),
        1,
        "{only_conflicts}"
    );
    assert_eq!(only_conflicts[0]["result"], "already_exists");
    let export = admin
        .http
        .get(format!("{base}/v1/audit?format=jsonl"))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(export.lines().count(), 5);

    // A copy with an entry edited or removed no longer verifies.
    let mut edited = entries.clone();
    edited[2].record.context.user = "mallory".into();
    assert!(agent::state::audit::verify(&edited).is_err());
    let mut removed = entries.clone();
    removed.remove(1);
    assert!(agent::state::audit::verify(&removed).is_err());
    // Only cluster admins read the log.
    ok(
        admin
            .post(&format!("{base}/v1/users"), json!({ "name": "nosy" }))
            .await
            .unwrap(),
        "user",
    )
    .await;
    let token = ok(
        admin
            .post(&format!("{base}/v1/users/nosy/tokens"), json!({}))
            .await
            .unwrap(),
        "token",
    )
    .await;
    let nosy = ApiClient::new(&cluster.ca_pem, token["token"].as_str().unwrap());
    assert_eq!(
        nosy.get(&format!("{base}/v1/audit")).await.unwrap().status,
        403
    );

    // Read-your-writes across nodes: a role granted and a token created
    // through one node work at once on another.
    for i in 0..10 {
        let name = format!("quick{i}");
        let (a, b, c) = (
            cluster.api_url(i % 3),
            cluster.api_url((i + 1) % 3),
            cluster.api_url((i + 2) % 3),
        );
        ok(
            admin
                .post(&format!("{a}/v1/users"), json!({ "name": name }))
                .await
                .unwrap(),
            "user",
        )
        .await;
        ok(
            admin
                .post(
                    &format!("{b}/v1/users/{name}/roles"),
                    json!({ "role": "project-viewer", "project": "audited" }),
                )
                .await
                .unwrap(),
            "grant",
        )
        .await;
        let token = ok(
            admin
                .post(&format!("{a}/v1/users/{name}/tokens"), json!({}))
                .await
                .unwrap(),
            "token",
        )
        .await;
        let quick = ApiClient::new(&cluster.ca_pem, token["token"].as_str().unwrap());
        let reply = quick
            .get(&format!("{c}/v1/projects/audited"))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_carry_a_fixed_zone_nodes_carry_a_zone_label_and_the_audit_names_the_zone() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let policy = ok(
        admin.get(&format!("{base}/v1/zones")).await.unwrap(),
        "zones",
    )
    .await;
    let names: Vec<&str> = policy
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z["zone"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["OFFICIAL", "OFFICIAL-SENSITIVE", "SECRET"]);

    let secret = ok(
        admin
            .post(
                &format!("{base}/v1/projects"),
                json!({ "name": "vault", "zone": "SECRET" }),
            )
            .await
            .unwrap(),
        "create",
    )
    .await;
    assert_eq!(secret["zone"], "SECRET");
    let plain = ok(
        admin
            .post(&format!("{base}/v1/projects"), json!({ "name": "plain" }))
            .await
            .unwrap(),
        "create",
    )
    .await;
    assert_eq!(plain["zone"], "OFFICIAL");
    let bad = admin
        .post(
            &format!("{base}/v1/projects"),
            json!({ "name": "odd", "zone": "TOP-SECRET" }),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("OFFICIAL-SENSITIVE"),
        "{}",
        bad.body
    );
    // The zone cannot be changed afterwards.
    let change = admin
        .send(
            Method::PATCH,
            &format!("{base}/v1/projects/vault"),
            Some(json!({ "zone": "OFFICIAL" })),
        )
        .await
        .unwrap();
    assert_eq!(change.status, 400);
    assert_eq!(
        ok(
            admin
                .get(&format!("{base}/v1/projects/vault"))
                .await
                .unwrap(),
            "show"
        )
        .await["zone"],
        "SECRET"
    );

    // Node labels.
    let labelled = ok(
        admin
            .send(
                Method::PUT,
                &format!("{base}/v1/nodes/1/zone"),
                Some(json!({ "zone": "SECRET" })),
            )
            .await
            .unwrap(),
        "label",
    )
    .await;
    assert_eq!(labelled["zone"], "SECRET");
    let nodes = ok(
        admin.get(&format!("{base}/v1/nodes")).await.unwrap(),
        "nodes",
    )
    .await;
    assert_eq!(nodes[0]["zone"], "SECRET");
    assert_eq!(
        admin
            .send(
                Method::PUT,
                &format!("{base}/v1/nodes/99/zone"),
                Some(json!({ "zone": "SECRET" }))
            )
            .await
            .unwrap()
            .status,
        404
    );

    // The audit entry of a change to the SECRET project names its zone.
    ok(
        admin
            .send(
                Method::PATCH,
                &format!("{base}/v1/projects/vault"),
                Some(json!({ "description": "keys" })),
            )
            .await
            .unwrap(),
        "patch",
    )
    .await;
    common::wait_for_async(
        "the audit entry of the change",
        std::time::Duration::from_secs(10),
        || {
            let admin = admin.clone();
            let base = base.clone();
            async move {
                admin
                    .get(&format!("{base}/v1/audit?action=PATCH"))
                    .await
                    .is_ok_and(|r| {
                        r.body.as_array().is_some_and(|a| {
                            a.iter().any(|e| {
                                e["zone"] == "SECRET"
                                    && e["object"] == "/v1/projects/vault"
                                    && e["result"] == "ok"
                            })
                        })
                    })
            }
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_with_a_token_revoked_before_it_applies_changes_nothing() {
    use agent::state::{Command, ErrorCode};
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    // As if authorised by a node that had not yet applied the revocation:
    // the command reaches the log carrying a token id that no longer exists.
    let audit = agent::state::audit::AuditContext {
        time_ms: agent::cluster::join::now_ms(),
        user: "dana".into(),
        token_id: "revoked0".into(),
        source: "127.0.0.1:1".into(),
        action: "POST /v1/projects".into(),
        object: "/v1/projects".into(),
        zone: None,
    };
    let create = Command::CreateProject {
        name: "sneaky".into(),
        description: String::new(),
        now_ms: 0,
        zone: Default::default(),
    };
    let outcome = node
        .write(&Command::Audited {
            command: Box::new(create),
            audit,
        })
        .await
        .unwrap();
    assert_eq!(outcome.unwrap_err().code, ErrorCode::Unauthenticated);
    assert!(node.state.project("sneaky").unwrap().is_none());
    let entries = node.state.audit_entries(0).unwrap();
    assert!(
        entries.iter().any(
            |e| e.record.context.token_id == "revoked0" && e.record.result == "unauthenticated"
        ),
        "{entries:?}"
    );
    // With the live admin token the same change goes through.
    let audit = agent::state::audit::AuditContext {
        time_ms: agent::cluster::join::now_ms(),
        user: "admin".into(),
        token_id: "admin".into(),
        source: "127.0.0.1:1".into(),
        action: "POST /v1/projects".into(),
        object: "/v1/projects".into(),
        zone: None,
    };
    let create = Command::CreateProject {
        name: "fine".into(),
        description: String::new(),
        now_ms: 0,
        zone: Default::default(),
    };
    node.write(&Command::Audited {
        command: Box::new(create),
        audit,
    })
    .await
    .unwrap()
    .unwrap();
    assert!(node.state.project("fine").unwrap().is_some());
    cluster.shutdown().await;
}

/// Principals are cached per token; a grant, a revocation or a deleted
/// project must still take effect on the very next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_principals_follow_grants_revocations_and_deletions_at_once() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    for p in ["alpha", "beta"] {
        ok(
            admin
                .post(&format!("{base}/v1/projects"), json!({ "name": p }))
                .await
                .unwrap(),
            "project",
        )
        .await;
    }
    ok(
        admin
            .post(&format!("{base}/v1/users"), json!({ "name": "vera" }))
            .await
            .unwrap(),
        "user",
    )
    .await;
    for p in ["alpha", "beta"] {
        ok(
            admin
                .post(
                    &format!("{base}/v1/users/vera/roles"),
                    json!({ "role": "project-viewer", "project": p }),
                )
                .await
                .unwrap(),
            "grant",
        )
        .await;
    }
    let token = ok(
        admin
            .post(&format!("{base}/v1/users/vera/tokens"), json!({}))
            .await
            .unwrap(),
        "token",
    )
    .await;
    let vera = ApiClient::new(&cluster.ca_pem, token["token"].as_str().unwrap());
    let alpha = format!("{base}/v1/projects/alpha");
    let patch = || {
        vera.send(
            Method::PATCH,
            &alpha,
            Some(json!({ "description": "by vera" })),
        )
    };
    // Seen (and cached) as a viewer.
    assert_eq!(vera.project_names(&base).await, ["alpha", "beta"]);
    assert_eq!(patch().await.unwrap().status, 403);
    ok(
        admin
            .post(
                &format!("{base}/v1/users/vera/roles"),
                json!({ "role": "project-admin", "project": "alpha" }),
            )
            .await
            .unwrap(),
        "grant",
    )
    .await;
    assert_eq!(patch().await.unwrap().status, 200, "the grant counts");
    let reply = admin
        .send(Method::DELETE, &format!("{base}/v1/projects/beta"), None)
        .await
        .unwrap();
    assert_eq!(reply.status, 204);
    assert_eq!(vera.project_names(&base).await, ["alpha"]);
    let reply = admin
        .send(
            Method::DELETE,
            &format!("{base}/v1/tokens/{}", token["id"].as_str().unwrap()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204);
    assert_eq!(
        vera.get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401,
        "a revoked token is refused at once"
    );
    cluster.shutdown().await;
}
