//! Linearizability of the API under leader kills: concurrent clients write
//! and read one register (a project's description) through random nodes
//! (so most writes are forwarded to the leader, and reads on it go by its
//! lease) while the leader is stopped, with forwarded calls in flight, and
//! restarted; the recorded history must be linearizable.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::linearizability::{check, Event, Op, Verdict};
use common::TestCluster;
use rand::Rng;
use serde_json::json;
use tokio::sync::Mutex;

mod checker {
    use super::common::linearizability::{check, event, Op, Verdict};

    fn w(v: &str) -> Op {
        Op::Write(v.into())
    }
    fn r(v: Option<&str>) -> Op {
        Op::Read(v.map(str::to_string))
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            event(0, w("a"), 0, Some(10)),
            event(1, r(Some("a")), 20, Some(30)),
            event(0, w("b"), 40, Some(50)),
            event(1, r(Some("b")), 60, Some(70)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = [
            event(0, w("a"), 0, Some(10)),
            event(1, r(None), 20, Some(30)),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        let h = [
            event(0, w("a"), 0, Some(10)),
            event(0, w("b"), 20, Some(30)),
            event(1, r(Some("a")), 40, Some(50)),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn overlapping_operations_may_take_effect_in_either_order() {
        let h = [
            event(0, w("a"), 0, Some(100)),
            event(1, r(None), 10, Some(20)),
            event(2, r(Some("a")), 30, Some(40)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // But once a read has seen the new value, a later read cannot see the old one.
        let h = [
            event(0, w("a"), 0, Some(100)),
            event(1, r(Some("a")), 10, Some(20)),
            event(2, r(None), 30, Some(40)),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn writes_with_unknown_outcome_may_or_may_not_have_happened() {
        let happened = [
            event(0, w("a"), 0, None),
            event(1, r(Some("a")), 50, Some(60)),
        ];
        assert_eq!(check(&happened), Verdict::Linearizable);
        let never = [event(0, w("a"), 0, None), event(1, r(None), 50, Some(60))];
        assert_eq!(check(&never), Verdict::Linearizable);
        let invented = [
            event(0, w("a"), 0, None),
            event(1, r(Some("z")), 50, Some(60)),
        ];
        assert_eq!(check(&invented), Verdict::NotLinearizable);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_history_under_leader_kills_is_linearizable() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let reply = client
        .post(
            &format!("{}/v1/projects", cluster.api_url(0)),
            json!({ "name": "reg" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201);

    let origin = Instant::now();
    let history = Arc::new(Mutex::new(Vec::<Event>::new()));
    let urls: Vec<String> = (0..3).map(|i| cluster.api_url(i)).collect();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (history, client, urls) = (history.clone(), client.clone(), urls.clone());
        clients.push(tokio::spawn(async move {
            for seq in 0..40 {
                let (target, is_write) = {
                    let mut rng = rand::thread_rng();
                    (rng.gen_range(0..urls.len()), rng.gen_bool(0.5))
                };
                let url = &urls[target];
                let call_ns = origin.elapsed().as_nanos();
                let event = if is_write {
                    let value = format!("c{c}-{seq}");
                    let reply = client
                        .send(
                            reqwest::Method::PATCH,
                            &format!("{url}/v1/projects/reg"),
                            Some(json!({ "description": value })),
                        )
                        .await;
                    let done = matches!(&reply, Ok(r) if r.status == 200);
                    Some(Event {
                        client: c,
                        op: Op::Write(value),
                        call_ns,
                        return_ns: done.then(|| origin.elapsed().as_nanos()),
                    })
                } else {
                    match client.get(&format!("{url}/v1/projects/reg")).await {
                        Ok(r) if r.status == 200 => {
                            let seen = r.body["description"]
                                .as_str()
                                .filter(|s| !s.is_empty())
                                .map(str::to_string);
                            Some(Event {
                                client: c,
                                op: Op::Read(seen),
                                call_ns,
                                return_ns: Some(origin.elapsed().as_nanos()),
                            })
                        }
                        // A failed read observed nothing.
                        _ => None,
                    }
                };
                if let Some(event) = event {
                    history.lock().await.push(event);
                }
                let pause = Duration::from_millis(rand::thread_rng().gen_range(5..30));
                tokio::time::sleep(pause).await;
            }
        }));
    }

    // Two rounds of: kill the leader while followers have writes in flight
    // to it (forwarded over their connection to it), let the others elect,
    // bring it back.
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let leader = cluster.leader().await;
        let followers: Vec<_> = cluster
            .live_indices()
            .into_iter()
            .filter(|&i| i != leader)
            .map(|i| cluster.node(i))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while followers.iter().all(|n| n.forwards_in_flight() == 0) {
            assert!(
                Instant::now() < deadline,
                "round {round}: no forwarded call was ever in flight"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        cluster.stop(leader).await;
        let survivors = cluster.live_indices();
        cluster
            .leader_among(&survivors, Duration::from_secs(15))
            .await;
        cluster.restart(leader).await;
    }
    for c in clients {
        c.await.unwrap();
    }
    let history = history.lock().await.clone();
    let completed = history.iter().filter(|e| e.return_ns.is_some()).count();
    eprintln!(
        "{} operations recorded, {completed} with a known outcome",
        history.len()
    );
    assert!(
        completed > 60,
        "too few operations completed to say anything: {completed}"
    );
    assert!(
        history.iter().any(|e| matches!(e.op, Op::Read(Some(_)))),
        "no read observed a write"
    );
    assert_eq!(
        check(&history),
        Verdict::Linearizable,
        "history: {history:#?}"
    );
    cluster.shutdown().await;
}
