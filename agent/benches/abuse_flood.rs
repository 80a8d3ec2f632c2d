//! What a flood of unauthenticated bad requests costs a 3-node cluster of
//! real `allod` processes: audit entries and Raft log entries per 10,000
//! such requests (the goal is a constant, not a count proportional to the
//! flood), and the latency valid clients see during the flood against
//! without it, in the same run (the goal: p99 at most 2x).
//!
//! The flood comes from one address (127.0.0.2), 32 senders as fast as they
//! are answered, for as long as `ALLOD_BENCH_READS` valid reads (default
//! 10,000) take; an address that sends nothing but refused requests is shed
//! at accept after a while (its connections held unread), which the table
//! counts.
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

fn client(ca: &str, connections: usize, source: [u8; 4], timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(agent::cluster::pki::ca_client_config(ca).unwrap())
        .local_address(std::net::IpAddr::from(source))
        .pool_max_idle_per_host(connections)
        .timeout(timeout)
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

/// What one flood did, and what valid readers saw meanwhile.
struct Flood {
    sent: usize,
    answered: usize,
    secs: f64,
    /// The valid reads' latencies, sorted.
    loud: Vec<f64>,
}

/// Floods the nodes with unauthenticated bad requests from `sources` (32
/// senders, each request from the next address) while `reads` valid reads
/// run; a sender held by a tarpit gives up after 2 s.
async fn flood_during_reads(
    ca: &str,
    urls: &[String],
    token: &str,
    http: &reqwest::Client,
    reads: usize,
    sources: &[[u8; 4]],
) -> Flood {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let clients: Arc<Vec<reqwest::Client>> = Arc::new(
        sources
            .iter()
            .map(|s| client(ca, 64, *s, Duration::from_secs(2)))
            .collect(),
    );
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let reads_done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut senders = Vec::new();
    for f in 0..32 {
        let (clients, sent, answered, reads_done, urls) = (
            clients.clone(),
            sent.clone(),
            answered.clone(),
            reads_done.clone(),
            urls.to_vec(),
        );
        senders.push(tokio::spawn(async move {
            while !reads_done.load(Ordering::Relaxed) {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                let http = &clients[n % clients.len()];
                let url = &urls[(n + f) % urls.len()];
                let request = if n % 2 == 0 {
                    http.get(format!("{url}/v1/projects/{}", "x".repeat(200)))
                        .bearer_auth(format!("allod_{n:064x}"))
                } else {
                    http.post(format!("{url}/v1/login"))
                        .json(&serde_json::json!({}))
                };
                if let Ok(reply) = request.send().await {
                    answered.fetch_add(1, Ordering::Relaxed);
                    let _ = reply.bytes().await;
                }
            }
        }));
    }
    let loud = valid_reads(http, urls, token, 4, reads).await;
    reads_done.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let flood = Flood {
        sent: sent.load(Ordering::Relaxed),
        answered: answered.load(Ordering::Relaxed),
        secs: started.elapsed().as_secs_f64(),
        loud,
    };
    // Let a shed address serve again before the next flood.
    tokio::time::sleep(Duration::from_secs(11)).await;
    flood
}

fn main() {
    let reads: usize = std::env::var("ALLOD_BENCH_READS")
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
        let http = client(&ca, 8, [127, 0, 0, 1], Duration::from_secs(30));
        // Warm up, then the quiet baseline.
        valid_reads(&http, &urls, &token, 4, 400).await;
        let quiet = valid_reads(&http, &urls, &token, 4, reads).await;

        let audit_before = audit_len(&http, &urls[0], &token).await;
        let log_before = applied(&http, &urls[0], &token).await;
        let one: Vec<[u8; 4]> = vec![[127, 0, 0, 2]];
        let many: Vec<[u8; 4]> = (0..=255u8).map(|i| [127, 0, 2, i]).collect();
        let mut floods = Vec::new();
        for sources in [&one, &many] {
            floods.push(flood_during_reads(&ca, &urls, &token, &http, reads, sources).await);
        }
        // Let every node write its summary (once a minute).
        tokio::time::sleep(Duration::from_secs(65)).await;
        let audit_added = audit_len(&http, &urls[0], &token).await - audit_before;
        let log_added = applied(&http, &urls[0], &token).await - log_before;
        let sent_total: usize = floods.iter().map(|f| f.sent).sum();
        println!("| measurement | flood from one address | flood from 256 addresses |");
        println!("|---|---|---|");
        let row = |what: &str, cell: &dyn Fn(&Flood) -> String| {
            println!("| {what} | {} | {} |", cell(&floods[0]), cell(&floods[1]));
        };
        row("bad requests sent (32 senders)", &|f| {
            format!(
                "{} in {:.1} s ({:.0}/s)",
                f.sent,
                f.secs,
                f.sent as f64 / f.secs
            )
        });
        row("of which answered (the rest shed at accept)", &|f| {
            f.answered.to_string()
        });
        row("valid reads p50 / p99, quiet", &|_| {
            format!("{:.2} / {:.2} ms", pct(&quiet, 0.5), pct(&quiet, 0.99))
        });
        row("valid reads p50 / p99, during the flood", &|f| {
            format!("{:.2} / {:.2} ms", pct(&f.loud, 0.5), pct(&f.loud, 0.99))
        });
        row("p99 during / quiet", &|f| {
            format!("**{:.2}x**", pct(&f.loud, 0.99) / pct(&quiet, 0.99))
        });
        println!();
        println!(
            "Both floods together: {sent_total} bad requests, {audit_added} audit entries \
             ({:.1} per 10,000), {log_added} Raft entries (the summaries, and the nodes' \
             own periodic reports).",
            audit_added as f64 * 10_000.0 / sent_total as f64
        );
    });
}
