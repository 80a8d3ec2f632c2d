//! Peers of different versions: a node asks its peers in postcard, and one
//! that refuses it (as every earlier Allod does, with 415, its handlers
//! taking JSON only) is asked again in JSON and then spoken to in JSON,
//! without the call failing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::TestCluster;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_speaks_only_json_is_asked_again_in_json_and_then_spoken_to_in_json() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let identity = common::identity_of(&cluster.live(0).dir);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    // An earlier version's handler: JSON in, JSON out.
    let router = axum::Router::new().route(
        "/cluster/read-index",
        axum::routing::post(move |headers: HeaderMap| {
            let record = record.clone();
            async move {
                let content_type = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                record.lock().unwrap().push(content_type.clone());
                if content_type != "application/json" {
                    return (
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "Expected request with `Content-Type: application/json`",
                    )
                        .into_response();
                }
                axum::Json(json!({ "Ok": null })).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_keep, mode) = tokio::sync::watch::channel(agent::cluster::serve::ServeMode::Tls(
        identity.peer_server_config().unwrap(),
        router,
    ));
    agent::cluster::serve::spawn(
        listener,
        mode,
        "earlier version",
        agent::cluster::serve::Limits::PEER,
        None,
    );

    for _ in 0..2 {
        let answer: Value = node
            .peers
            .call(&addr, "/cluster/read-index", &(), Duration::from_secs(5))
            .await
            .expect("the call succeeds in JSON");
        assert_eq!(answer, json!({ "Ok": null }));
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [
            allod_raft::codec::PEER_CONTENT_TYPE,
            "application/json",
            "application/json"
        ],
        "asked in postcard once, then in JSON"
    );
    cluster.shutdown().await;
}
