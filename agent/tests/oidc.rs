//! OIDC bearer tokens against an issuer this test runs on localhost: its own
//! CA, HTTPS, discovery document and JWKS, and ES256 keys it rotates.

mod common;

use std::time::Duration;

use common::issuer::{forge_unsigned, SigningKey, TestIssuer};
use common::{ApiClient, TestCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_are_verified_mapped_to_roles_and_follow_key_rotation() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let first = SigningKey::new("k1");
    let issuer = TestIssuer::start(&[&first]).await;

    for name in ["web", "db"] {
        let reply = admin
            .post(&format!("{base}/v1/projects"), json!({ "name": name }))
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    // An http:// issuer is refused with a reason.
    let reply = admin
        .send(
            reqwest::Method::PUT,
            &format!("{base}/v1/oidc/issuers/corp"),
            Some(json!({ "issuer": "http://127.0.0.1:1/realms/test", "audience": "allod" })),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.to_string().contains("https://"));
    let reply = admin
        .send(
            reqwest::Method::PUT,
            &format!("{base}/v1/oidc/issuers/corp"),
            Some(json!({
                "issuer": issuer.url, "audience": "allod", "ca_pem": issuer.ca_pem,
                "mappings": [
                    { "value": "ops", "role": "cluster-admin" },
                    { "value": "web-devs", "role": "project-member", "project": "web" },
                ],
            })),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);

    // A web developer sees and may use only the web project, as a member.
    let alice = ApiClient::new(
        &cluster.ca_pem,
        &first.sign(&issuer.claims("alice", &["web-devs", "unrelated"])),
    );
    assert_eq!(alice.project_names(&base).await, ["web"]);
    assert_eq!(
        alice
            .get(&format!("{base}/v1/projects/db"))
            .await
            .unwrap()
            .status,
        404
    );
    let reply = alice
        .send(
            reqwest::Method::PATCH,
            &format!("{base}/v1/projects/web"),
            Some(json!({ "description": "x" })),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 403, "a member is not a project admin");
    assert_eq!(
        alice
            .post(&format!("{base}/v1/projects"), json!({ "name": "nope" }))
            .await
            .unwrap()
            .status,
        403
    );

    // An operator is a cluster admin, and the audit log names the subject.
    let bob = ApiClient::new(
        &cluster.ca_pem,
        &first.sign(&issuer.claims("bob", &["ops"])),
    );
    let reply = bob
        .post(&format!("{base}/v1/projects"), json!({ "name": "bobs" }))
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let audit = admin
        .get(&format!("{base}/v1/audit?action=POST"))
        .await
        .unwrap();
    let entry = audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["object"] == "/v1/projects" && e["user"] == "bob@corp")
        .expect("the OIDC caller's change is audited");
    assert_eq!(entry["token_id"], "oidc:corp");
    assert_eq!(entry["result"], "ok");

    // Every kind of bad token is refused with 401 and a reason.
    let stranger = SigningKey::new("k1");
    let mut expired = issuer.claims("carol", &["ops"]);
    expired["exp"] = json!(expired["iat"].as_u64().unwrap() - 3600);
    expired["nbf"] = json!(expired["iat"].as_u64().unwrap() - 7200);
    let mut wrong_audience = issuer.claims("carol", &["ops"]);
    wrong_audience["aud"] = json!("someone-else");
    let mut wrong_issuer = issuer.claims("carol", &["ops"]);
    wrong_issuer["iss"] = json!("https://127.0.0.1:1/realms/other");
    let mut not_yet = issuer.claims("carol", &["ops"]);
    not_yet["nbf"] = json!(not_yet["iat"].as_u64().unwrap() + 3600);
    let cases = [
        ("expired", first.sign(&expired), "expired"),
        ("wrong audience", first.sign(&wrong_audience), "audience"),
        ("wrong issuer", first.sign(&wrong_issuer), "not configured"),
        ("not yet valid", first.sign(&not_yet), "not valid yet"),
        (
            "unknown kid",
            first.sign_as("k9", &issuer.claims("carol", &["ops"])),
            "no key",
        ),
        (
            "alg none",
            forge_unsigned(&issuer.claims("carol", &["ops"])),
            "algorithm",
        ),
        (
            "another key",
            stranger.sign(&issuer.claims("carol", &["ops"])),
            "signature",
        ),
        ("garbage", "a.b.c".to_string(), "JWT"),
    ];
    for (what, token, reason) in cases {
        let reply = ApiClient::new(&cluster.ca_pem, &token)
            .get(&format!("{base}/v1/projects"))
            .await
            .unwrap();
        assert_eq!(reply.status, 401, "{what}: {}", reply.body);
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(reason),
            "{what}: {}",
            reply.body
        );
    }

    // The issuer rotates to a new key: tokens signed with it are accepted
    // (the unknown kid makes the node fetch the JWKS again), tokens of the
    // retired key are not.
    let second = SigningKey::new("k2");
    issuer.publish(&[&second]);
    let fetches_before = *issuer.jwks_fetches.lock().unwrap();
    tokio::time::sleep(agent::api::oidc::UNKNOWN_KID_REFETCH + Duration::from_millis(100)).await;
    let dave = ApiClient::new(
        &cluster.ca_pem,
        &second.sign(&issuer.claims("dave", &["web-devs"])),
    );
    assert_eq!(dave.project_names(&base).await, ["web"]);
    assert!(*issuer.jwks_fetches.lock().unwrap() > fetches_before);
    tokio::time::sleep(agent::api::oidc::UNKNOWN_KID_REFETCH + Duration::from_millis(100)).await;
    let reply = alice.get(&format!("{base}/v1/projects")).await.unwrap();
    assert_eq!(
        reply.status, 401,
        "a token of the retired key: {}",
        reply.body
    );

    // Removing the issuer ends its users' access at once.
    let reply = admin
        .send(
            reqwest::Method::DELETE,
            &format!("{base}/v1/oidc/issuers/corp"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204, "{}", reply.body);
    assert_eq!(
        dave.get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        401
    );
    cluster.shutdown().await;
}
