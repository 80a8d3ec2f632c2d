//! What a flood of unauthenticated bad requests costs a 3-node cluster of
//! real `allod` processes: audit entries and Raft log entries per 10,000
//! such requests (the goal is a constant, not a count proportional to the
//! flood), and the latency valid clients see during the flood against
//! without it, in the same run (the goal: p99 at most 2x).
//!
//! The flood comes from one address (127.0.0.2) and lasts as long as the
//! valid reads do, and at least `ALLOD_BENCH_FLOOD` requests (default
//! 10,000); an address that sends nothing but refused requests is refused
//! at accept after a while, which the table counts.
//!
//! Run with `cargo bench -p agent --bench abuse_flood`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_allod");

struct Killer(Vec<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "allod {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn start(root: &Path, killer: &mut Killer) -> (Vec<PathBuf>, Vec<String>) {
    let mut dirs = Vec::new();
    let mut urls = Vec::new();
    for i in 1..=3 {
        let dir = root.join(format!("n{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let child = Command::new(BIN)
            .args([
                "agent",
                "--data-dir",
                dir.to_str().unwrap(),
                "--api-listen",
                &api,
                "--peer-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--storage-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--name",
                &format!("n{i}"),
                "--libvirt-uri",
                "none",
                "--network-fabric",
                "off",
            ])
            .env("ALLOD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        killer.0.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("admin.sock").exists() {
            assert!(Instant::now() < deadline, "agent {i} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        dirs.push(dir);
        urls.push(format!("https://{api}"));
    }
    let first = dirs[0].to_str().unwrap().to_string();
    cli(&["cluster", "init", "--data-dir", &first]);
    for dir in &dirs[1..] {
        let token = cli(&["cluster", "join-token", "--data-dir", &first]);
        cli(&[
            "cluster",
            "join",
            "--data-dir",
            dir.to_str().unwrap(),
            "--token",
            token.trim(),
        ]);
    }
    (dirs, urls)
}

fn client(ca: &str, connections: usize, source: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(agent::cluster::pki::ca_client_config(ca).unwrap())
        .local_address(std::net::IpAddr::from(source))
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `total` reads of the project list by `clients` valid clients, spread
/// over the nodes: latencies in milliseconds, sorted.
async fn valid_reads(
    http: &reqwest::Client,
    urls: &[String],
    token: &str,
    clients: usize,
    total: usize,
) -> Vec<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, next, urls, token) =
            (http.clone(), next.clone(), urls.to_vec(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return latencies;
                }
                let t0 = Instant::now();
                let reply = http
                    .get(format!("{}/v1/projects", urls[(n + c) % urls.len()]))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(reply.status(), 200, "a valid client was refused");
                let _ = reply.bytes().await;
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    all
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `GET url` as the admin, as JSON.
async fn get_json(http: &reqwest::Client, url: String, token: &str) -> serde_json::Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn audit_len(http: &reqwest::Client, url: &str, token: &str) -> usize {
    let entries = get_json(http, format!("{url}/v1/audit"), token).await;
    entries.as_array().unwrap().len()
}

async fn applied(http: &reqwest::Client, url: &str, token: &str) -> u64 {
    let cluster = get_json(http, format!("{url}/v1/cluster"), token).await;
    cluster["applied_index"].as_u64().unwrap()
}

fn main() {
    let flood: usize = std::env::var("ALLOD_BENCH_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir().unwrap();
    let mut killer = Killer(Vec::new());
    let (dirs, urls) = start(tmp.path(), &mut killer);
    let token = std::fs::read_to_string(dirs[0].join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let ca = std::fs::read_to_string(dirs[0].join("ca.pem")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = client(&ca, 8, [127, 0, 0, 1]);
        // Warm up, then the quiet baseline.
        valid_reads(&http, &urls, &token, 4, 400).await;
        let quiet = valid_reads(&http, &urls, &token, 4, 2000).await;

        let audit_before = audit_len(&http, &urls[0], &token).await;
        let log_before = applied(&http, &urls[0], &token).await;
        // The flood comes from an address of its own and lasts as long as
        // the valid reads do (and at least `flood` requests).
        let strangers = client(&ca, 64, [127, 0, 0, 2]);
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reads_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Instant::now();
        let mut flooders = Vec::new();
        for f in 0..32 {
            let (http, sent, answered, reads_done, urls) = (
                strangers.clone(),
                sent.clone(),
                answered.clone(),
                reads_done.clone(),
                urls.clone(),
            );
            flooders.push(tokio::spawn(async move {
                loop {
                    let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= flood && reads_done.load(std::sync::atomic::Ordering::Relaxed) {
                        sent.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    let url = &urls[(n + f) % urls.len()];
                    let request = if n % 2 == 0 {
                        http.get(format!("{url}/v1/projects/{}", "x".repeat(200)))
                            .bearer_auth(format!("allod_{n:064x}"))
                    } else {
                        http.post(format!("{url}/v1/login"))
                            .json(&serde_json::json!({}))
                    };
                    if let Ok(reply) = request.send().await {
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = reply.bytes().await;
                    }
                }
            }));
        }
        let loud = valid_reads(&http, &urls, &token, 4, 2000).await;
        reads_done.store(true, std::sync::atomic::Ordering::Relaxed);
        for f in flooders {
            f.await.unwrap();
        }
        let flood_secs = started.elapsed().as_secs_f64();
        let flood = sent.load(std::sync::atomic::Ordering::Relaxed);
        let answered = answered.load(std::sync::atomic::Ordering::Relaxed);
        // Let every node write its summary (once a minute).
        tokio::time::sleep(Duration::from_secs(65)).await;
        let audit_added = audit_len(&http, &urls[0], &token).await - audit_before;
        let log_added = applied(&http, &urls[0], &token).await - log_before;
        let scale = 10_000.0 / flood as f64;
        println!("| measurement | value |");
        println!("|---|---|");
        println!(
            "| bad requests sent, one source address | {flood} in {flood_secs:.1} s ({:.0}/s) |",
            flood as f64 / flood_secs
        );
        println!("| of which answered (the rest refused at accept) | {answered} |");
        println!(
            "| audit entries added | {audit_added} ({:.1} per 10,000) |",
            audit_added as f64 * scale
        );
        println!(
            "| Raft entries added (summaries, and the nodes' own periodic reports) | {log_added} |"
        );
        println!(
            "| valid reads p50 / p99, quiet | {:.2} / {:.2} ms |",
            pct(&quiet, 0.5),
            pct(&quiet, 0.99)
        );
        println!(
            "| valid reads p50 / p99, during the flood | {:.2} / {:.2} ms |",
            pct(&loud, 0.5),
            pct(&loud, 0.99)
        );
        println!(
            "| p99 during / quiet | **{:.2}x** |",
            pct(&loud, 0.99) / pct(&quiet, 0.99)
        );
    });
}
