//! What authentication costs on the hot path: requests per second of
//! `GET /v1/projects/{p}` on one node with an Allod API token, with an OIDC
//! JWT (ES256, from an issuer on localhost), and with no authentication
//! layer at all (the `bench-unauthenticated` build switch), measured in the
//! same process and run, in interleaved rounds.
//!
//! Run with `cargo bench -p agent --bench auth_cost --features bench-unauthenticated`.
//! `ALLOD_BENCH_SECS` sets the seconds per measurement (default 2),
//! `ALLOD_BENCH_ROUNDS` the rounds (default 7),
//! `ALLOD_BENCH_CLIENTS` the concurrent clients (default 16).

// Shared with the tests, which use more of it.
#[allow(dead_code)]
#[path = "../tests/common/issuer.rs"]
mod issuer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::daemon::{Agent, AgentOptions};
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(agent::cluster::pki::ca_client_config(ca_pem).unwrap())
        .build()
        .unwrap()
}

/// Requests per second of `url` with `token` from `clients` concurrent
/// clients over `secs` seconds; every answer must be 200.
async fn measure(ca_pem: &str, url: &str, token: Option<&str>, clients: u64, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = client(ca_pem);
        let (url, token, done) = (url.to_string(), token.map(str::to_string), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut request = http.get(&url);
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                let reply = request.send().await.expect("request");
                assert_eq!(reply.status(), 200, "{}", reply.text().await.unwrap());
                reply.bytes().await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_or("ALLOD_BENCH_SECS", 2);
    let clients = env_or("ALLOD_BENCH_CLIENTS", 16);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentOptions::new(dir.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    agent.init(None).await.unwrap();
    let node = agent.node().unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let admin_token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let base = format!("https://{}", agent.api_addr);
    let admin = client(&ca_pem);
    let send = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        admin
            .request(method, format!("{base}{path}"))
            .bearer_auth(admin_token.trim())
            .json(&body)
            .send()
    };
    let reply = send(
        reqwest::Method::POST,
        "/v1/projects",
        json!({ "name": "p" }),
    )
    .await
    .unwrap();
    assert_eq!(reply.status(), 201);

    // An OIDC issuer whose token makes its bearer a viewer of p.
    let key = issuer::SigningKey::new("bench");
    let idp = issuer::TestIssuer::start(&[&key]).await;
    let reply = send(
        reqwest::Method::PUT,
        "/v1/oidc/issuers/corp",
        json!({
            "issuer": idp.url, "audience": "allod", "ca_pem": idp.ca_pem,
            "mappings": [{ "value": "viewers", "role": "project-viewer", "project": "p" }],
        }),
    )
    .await
    .unwrap();
    assert_eq!(reply.status(), 200);
    let jwt = key.sign(&idp.claims("bench-user", &["viewers"]));
    // A project-scoped API token of the same power.
    let reply = send(
        reqwest::Method::POST,
        "/v1/users/admin/tokens",
        json!({ "project": "p", "role": "project-viewer" }),
    )
    .await
    .unwrap();
    let token = reply.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();

    // The same node's API without the authentication layer, on its own port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_addr = listener.local_addr().unwrap();
    let (_mode_tx, mode) = tokio::sync::watch::channel(agent::cluster::serve::ServeMode::Tls(
        node.tls.api_server_config().unwrap(),
        agent::api::router_unauthenticated(agent::api::AppState::new(
            node.clone(),
            Default::default(),
        )),
    ));
    agent::cluster::serve::spawn(
        listener,
        mode,
        "unauthenticated api",
        agent::cluster::serve::Limits::API,
        None,
    );

    let authed_url = format!("{base}/v1/projects/p");
    let open_url = format!("https://{open_addr}/v1/projects/p");
    // Warm up every path (TLS sessions, the JWKS fetch).
    measure(&ca_pem, &open_url, None, clients, 1).await;
    measure(&ca_pem, &authed_url, Some(&token), clients, 1).await;
    measure(&ca_pem, &authed_url, Some(&jwt), clients, 1).await;

    // The machine's speed drifts; each round measures the three side by
    // side, and the ratios are taken per round, then their median.
    let rounds = env_or("ALLOD_BENCH_ROUNDS", 7) as usize;
    let (mut none, mut api_token, mut oidc) = (Vec::new(), Vec::new(), Vec::new());
    let (mut token_ratio, mut oidc_ratio) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let n = measure(&ca_pem, &open_url, None, clients, secs).await;
        let t = measure(&ca_pem, &authed_url, Some(&token), clients, secs).await;
        let o = measure(&ca_pem, &authed_url, Some(&jwt), clients, secs).await;
        let n2 = measure(&ca_pem, &open_url, None, clients, secs).await;
        let baseline = (n + n2) / 2.0;
        eprintln!(
            "round {}: none {n:.0}/s and {n2:.0}/s, API token {t:.0}/s, OIDC JWT {o:.0}/s",
            round + 1
        );
        none.push(baseline);
        api_token.push(t);
        oidc.push(o);
        token_ratio.push(t / baseline);
        oidc_ratio.push(o / baseline);
    }
    let (token_ratio, oidc_ratio) = (median(token_ratio), median(oidc_ratio));
    println!(
        "GET /v1/projects/p, {clients} clients, {rounds} rounds of {secs} s \
         (medians; ratios per round against the unauthenticated runs around them):"
    );
    println!("  no authentication  {:>8.0} req/s", median(none));
    println!(
        "  API token          {:>8.0} req/s  ({token_ratio:.3} of none, cost {:.1} %)",
        median(api_token),
        100.0 * (1.0 - token_ratio)
    );
    println!(
        "  OIDC JWT (ES256)   {:>8.0} req/s  ({oidc_ratio:.3} of none, cost {:.1} %)",
        median(oidc),
        100.0 * (1.0 - oidc_ratio)
    );
    agent.shutdown().await;
}
