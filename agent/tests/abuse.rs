//! What strangers on the network can make a cluster do: unauthenticated
//! floods and password guessing, against real agents over real TLS.

mod common;

use std::time::{Duration, Instant};

use common::{ApiClient, TestCluster};
use serde_json::json;

fn last_log_index(cluster: &TestCluster, index: usize) -> u64 {
    cluster
        .node(index)
        .raft
        .metrics()
        .borrow()
        .last_log_index
        .unwrap_or(0)
}

async fn audit_len(admin: &ApiClient, base: &str) -> usize {
    let reply = admin.get(&format!("{base}/v1/audit")).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body.as_array().unwrap().len()
}

/// Up to 1,500 bad requests (unknown tokens, malformed logins, joins with a
/// made-up token) from one address against one follower: the audit log
/// grows by at most one summary per node per window and counts every one
/// that was answered, Raft writes stay a constant, the follower asks the
/// leader about unknown tokens about once a second, not once a request,
/// and once the address has sent nothing but refused requests for a
/// while its connections are refused at accept, while others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_costs_a_bounded_audit_and_few_round_trips_and_is_shed() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    let leader = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let base = cluster.api_url(follower);
    // Let the joins' entries and any summary of the start settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let audit_before = audit_len(&admin, &base).await;
    let log_before = last_log_index(&cluster, leader);
    let rounds_before = cluster.node(follower).read_index_rounds();

    // A well-formed join request with a made-up token: only the token is wrong.
    let csr = agent::cluster::pki::NodeKey::generate(vec!["127.0.0.1".into()])
        .unwrap()
        .csr_pem;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..15 {
        let base = base.clone();
        let ca = cluster.ca_pem.clone();
        let csr = csr.clone();
        tasks.spawn(async move {
            // A shed address's new connection is held unread: give up soon.
            let stranger = ApiClient::from_address(
                &ca,
                &format!("allod_bad{worker}"),
                std::net::IpAddr::from([127, 0, 0, 2]),
                Duration::from_secs(2),
            );
            let mut statuses = Vec::new();
            for i in 0..100 {
                let reply = if i % 6 == 5 {
                    let join = json!({
                        "token_id": format!("t{worker}x{i}"),
                        "secret": "guess",
                        "name": format!("n{worker}x{i}"),
                        "api_addr": "127.0.0.1:1",
                        "peer_addr": "127.0.0.1:2",
                        "csr_pem": csr,
                    });
                    stranger
                        .post(&format!("{base}/v1/cluster/join"), join)
                        .await
                } else if i % 3 == 2 {
                    stranger.post(&format!("{base}/v1/login"), json!({})).await
                } else {
                    let path = format!("{base}/v1/projects/{}", "x".repeat(2000 + i));
                    stranger.get(&path).await
                };
                // No answer: shed, the connection held unread at accept.
                match reply {
                    Ok(reply) => statuses.push(reply.status),
                    Err(_) => return (statuses, true),
                }
            }
            (statuses, false)
        });
    }
    let (mut answered, mut shed) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (statuses, was_shed) = done.unwrap();
        answered.extend(statuses);
        shed += usize::from(was_shed);
    }
    let elapsed = started.elapsed().as_secs() + 1;
    assert!(
        answered.iter().all(|s| *s == 401 || *s == 400 || *s == 422),
        "{answered:?}"
    );
    assert!(
        shed > 0 && answered.len() >= agent::cluster::serve::SHED_AFTER_REFUSALS as usize,
        "{} answered; {shed} of 15 senders were shed",
        answered.len()
    );
    // Another address is served meanwhile.
    assert_eq!(
        admin
            .get(&format!("{base}/v1/projects"))
            .await
            .unwrap()
            .status,
        200
    );
    let rounds = cluster.node(follower).read_index_rounds() - rounds_before;
    assert!(
        rounds <= 2 * elapsed + 25,
        "{rounds} read-index round trips for 1,000 unknown tokens in {elapsed} s"
    );

    // Every refusal is counted in the summaries, which are few.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = admin.get(&format!("{base}/v1/audit")).await.unwrap();
        let counted: u64 = reply.body.as_array().unwrap()[audit_before..]
            .iter()
            .filter_map(|e| e["summary"]["requests"].as_u64())
            .sum();
        if counted == answered.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the summaries count {counted} of {} refusals",
            answered.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let windows = started.elapsed().as_secs() + 2;
    let added = audit_len(&admin, &base).await - audit_before;
    assert!(
        (1..=windows as usize).contains(&added),
        "{added} audit entries for the bad requests over {windows} windows"
    );
    let writes = last_log_index(&cluster, leader) - log_before;
    assert!(
        writes <= windows + 5,
        "{writes} Raft entries for the bad requests"
    );
    let reply = admin.get(&format!("{base}/v1/audit")).await.unwrap();
    let summaries: Vec<&serde_json::Value> = reply.body.as_array().unwrap()[audit_before..]
        .iter()
        .filter(|e| e["summary"].is_object())
        .collect();
    assert!(summaries
        .iter()
        .all(|e| e["summary"]["node"] == cluster.node(follower).id));
    assert!(summaries.iter().all(|e| e["summary"]["first_requests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r.as_str().unwrap().len() <= 256)));
    assert_eq!(
        summaries[0]["summary"]["top_sources"][0]["source"],
        "127.0.0.2"
    );
    cluster.shutdown().await;
}

/// A real token created through one node is accepted at once by another,
/// flood or no flood elsewhere: the catch-up that makes it so is shared,
/// not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_created_through_one_node_works_at_once_on_another() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    for round in 0..20 {
        let created = admin
            .post(
                &format!("{}/v1/users/admin/tokens", cluster.api_url(round % 3)),
                json!({}),
            )
            .await
            .unwrap();
        assert_eq!(created.status, 201, "{}", created.body);
        let fresh = ApiClient::new(&cluster.ca_pem, created.body["token"].as_str().unwrap());
        let reply = fresh
            .get(&format!("{}/v1/projects", cluster.api_url((round + 1) % 3)))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "round {round}: {}", reply.body);
    }
    cluster.shutdown().await;
}

/// A client holding a valid token that sends a burst of refused calls to
/// a public route (a fuzzer, a broken script: 300 malformed logins from 15
/// connections) is never shed: every call is answered, and so is its next
/// real request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_presenting_a_valid_token_is_not_shed_for_refused_public_calls() {
    let cluster = TestCluster::start(1).await;
    let base = cluster.api_url(0);
    let from = std::net::IpAddr::from([127, 0, 0, 7]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..15 {
        let (base, ca, token) = (
            base.clone(),
            cluster.ca_pem.clone(),
            cluster.admin_token.clone(),
        );
        tasks.spawn(async move {
            // A shed address's new connection is held unread: give up soon.
            let client = ApiClient::from_address(&ca, &token, from, Duration::from_secs(2));
            let mut statuses = Vec::new();
            for _ in 0..20 {
                match client.post(&format!("{base}/v1/login"), json!({})).await {
                    Ok(reply) => statuses.push(reply.status),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(statuses)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let statuses = done
            .unwrap()
            .expect("a call went unanswered: the address was shed");
        assert!(
            statuses.iter().all(|s| *s == 400 || *s == 422),
            "{statuses:?}"
        );
    }
    let client = ApiClient::from_address(
        &cluster.ca_pem,
        &cluster.admin_token,
        from,
        Duration::from_secs(2),
    );
    let reply = client.get(&format!("{base}/v1/projects")).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    cluster.shutdown().await;
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Logs in from the loopback address `from` (the agents listen on
/// 127.0.0.1; all of 127/8 reaches them), timing the answer.
async fn login_from(
    cluster: &TestCluster,
    from: [u8; 4],
    user: &str,
    password: &str,
) -> (
    reqwest::StatusCode,
    Option<u64>,
    serde_json::Value,
    Duration,
) {
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(agent::cluster::pki::ca_client_config(&cluster.ca_pem).unwrap())
        .local_address(std::net::IpAddr::from(from))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let response = http
        .post(format!("{}/v1/login", cluster.api_url(0)))
        .json(&json!({ "user": user, "password": password }))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    let status = response.status();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = response.json().await.unwrap();
    (status, retry, body, took)
}

/// Password guessing: an unknown user is refused no faster than a wrong
/// password (no user enumeration by timing), a user name tried from many
/// addresses gets 429 with `Retry-After`, and so does one address trying
/// many names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_rate_limited_and_an_unknown_user_costs_a_wrong_passwords_time() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let created = admin
        .post(
            &format!("{}/v1/users", cluster.api_url(0)),
            json!({ "name": "carol", "password": "correct horse" }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);

    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    for i in 0..4 {
        let (status, _, _, took) =
            login_from(&cluster, [127, 0, 0, 2], &format!("ghost{i}"), "pw").await;
        assert_eq!(status, 401);
        unknown.push(took);
        let (status, _, _, took) =
            login_from(&cluster, [127, 0, 0, 3], "carol", "wrong horse").await;
        assert_eq!(status, 401);
        wrong.push(took);
    }
    let (unknown, wrong) = (median(unknown), median(wrong));
    assert!(
        unknown * 2 >= wrong,
        "an unknown user is refused in {unknown:?}, a wrong password in {wrong:?}"
    );

    // carol's name, tried from ever new addresses, runs out of attempts.
    let mut limited = None;
    for k in 0..30 {
        let (status, retry, body, _) =
            login_from(&cluster, [127, 0, 1, k], "carol", "wrong horse").await;
        if status == 429 {
            limited = Some((retry, body));
            break;
        }
        assert_eq!(status, 401);
    }
    let (retry, body) = limited.expect("a user name tried again and again is limited");
    let retry = retry.expect("a Retry-After header");
    assert!((1..=6).contains(&retry), "Retry-After: {retry}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("this user name"));

    // One address trying many names at once runs out as well.
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..15 {
        let cluster_ca = cluster.ca_pem.clone();
        let url = cluster.api_url(0);
        tries.spawn(async move {
            let http = reqwest::Client::builder()
                .use_preconfigured_tls(agent::cluster::pki::ca_client_config(&cluster_ca).unwrap())
                .local_address(std::net::IpAddr::from([127, 0, 0, 4]))
                .build()
                .unwrap();
            let response = http
                .post(format!("{url}/v1/login"))
                .json(&json!({ "user": format!("name{i}"), "password": "pw" }))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body)
        });
    }
    let mut by_address = 0;
    while let Some(done) = tries.join_next().await {
        let (status, body) = done.unwrap();
        if status == 429 {
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("your address"));
            by_address += 1;
        } else {
            assert_eq!(status, 401);
        }
    }
    assert!(by_address >= 4, "{by_address} of 15 refused");

    // After waiting as told, carol logs in.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (status, _, body, _) = login_from(&cluster, [127, 0, 0, 5], "carol", "correct horse").await;
    assert_eq!(status, 200, "{body}");
    cluster.shutdown().await;
}

/// A user who loops on a call they may not make gets an audit entry of
/// their own for the first refusals only; the rest are counted in the
/// node's summary, so the permanent log grows by a bounded amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_callers_refused_calls_are_bounded_in_the_audit_log_and_all_counted() {
    let cluster = TestCluster::start(1).await;
    let admin = cluster.client();
    let base = cluster.api_url(0);
    let created = admin
        .post(&format!("{base}/v1/users"), json!({ "name": "mallory" }))
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let token = admin
        .post(&format!("{base}/v1/users/mallory/tokens"), json!({}))
        .await
        .unwrap();
    assert_eq!(token.status, 201, "{}", token.body);
    let mallory = ApiClient::new(&cluster.ca_pem, token.body["token"].as_str().unwrap());
    let audit_before = audit_len(&admin, &base).await;

    let started = Instant::now();
    const CALLS: u64 = 300;
    for i in 0..CALLS {
        let reply = mallory
            .post(
                &format!("{base}/v1/projects"),
                json!({ "name": format!("p{i}") }),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 403, "{}", reply.body);
    }
    let elapsed = started.elapsed().as_secs() + 1;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = admin.get(&format!("{base}/v1/audit")).await.unwrap();
        let entries = &reply.body.as_array().unwrap()[audit_before..];
        let own = entries.iter().filter(|e| e["user"] == "mallory").count() as u64;
        let counted: u64 = entries
            .iter()
            .filter_map(|e| e["summary"]["requests"].as_u64())
            .sum();
        let bound = u64::from(agent::api::abuse::REFUSED_ENTRIES_BURST) + elapsed;
        assert!(
            own <= bound,
            "{own} entries of their own for {CALLS} refused calls in {elapsed} s"
        );
        if own + counted == CALLS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{own} entries and {counted} summarised of {CALLS} refused calls"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}
