//! Committed writes per second and latency of a 3-node Allod cluster, side by
//! side with a 3-member etcd cluster on the same machine in the same run,
//! both behind TLS and driven by the same HTTP load generator (Allod:
//! `POST /v1/projects`; etcd: its v3 JSON gateway, `POST /v3/kv/put`).
//! Then the agent's own footprint: resident memory and idle CPU with 10,000
//! objects in its state, and the time a restarted agent takes to be ready.
//!
//! Run with `bash .ci/bench` (installs etcd-server) or
//! `cargo bench -p agent --bench cluster_vs_etcd` when etcd is installed.
//! `ALLOD_BENCH_OPS` scales the number of requests per measurement;
//! `ALLOD_BENCH_ONLY=allod` skips etcd; `ALLOD_BENCH_PROFILE=1` prints where
//! a lone write's time goes; `ALLOD_BENCH_KEEP=1` keeps the
//! agents' logs (`ALLOD_BENCH_AGENT_LOG` sets their filter) and data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::cluster::pki::{CertificateAuthority, NodeKey};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

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

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
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

struct AllodNode {
    dir: PathBuf,
    api: String,
    peer: String,
}

fn spawn_allod(dir: &Path, name: &str, api: &str, peer: &str) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let _ = std::fs::remove_file(dir.join("listen.json"));
    Command::new(BIN)
        .args([
            "agent",
            "--data-dir",
            dir.to_str().unwrap(),
            "--api-listen",
            api,
            "--peer-listen",
            peer,
            "--name",
            name,
            // The cluster core is measured: each agent its own storage port,
            // no VMs, no tenant networks on this shared machine.
            "--storage-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--libvirt-uri",
            "none",
            "--network-fabric",
            "off",
        ])
        .env(
            "ALLOD_LOG",
            std::env::var("ALLOD_BENCH_AGENT_LOG").unwrap_or_else(|_| {
                if profiling() {
                    PROFILE_LOG.into()
                } else {
                    "warn".into()
                }
            }),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .unwrap()
}

fn start_allod(root: &Path, killer: &mut Killer) -> Vec<AllodNode> {
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let dir = root.join(format!("allod{i}"));
        let (api, peer) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        killer
            .0
            .push(spawn_allod(&dir, &format!("n{i}"), &api, &peer));
        wait_until("allod admin socket", Duration::from_secs(20), || {
            dir.join("admin.sock").exists()
        });
        nodes.push(AllodNode { dir, api, peer });
    }
    cli(&[
        "cluster",
        "init",
        "--data-dir",
        nodes[0].dir.to_str().unwrap(),
    ]);
    for node in &nodes[1..] {
        let token = cli(&[
            "cluster",
            "join-token",
            "--data-dir",
            nodes[0].dir.to_str().unwrap(),
        ]);
        cli(&[
            "cluster",
            "join",
            "--data-dir",
            node.dir.to_str().unwrap(),
            "--token",
            token.trim(),
        ]);
    }
    nodes
}

fn start_etcd(root: &Path, killer: &mut Killer) -> (Vec<String>, String) {
    let ca = CertificateAuthority::create("etcd-bench").unwrap();
    let (key, cert) =
        NodeKey::generate_signed(vec!["127.0.0.1".into(), "localhost".into()], &ca, 1).unwrap();
    let tls = root.join("etcd-tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(tls.join("cert.pem"), &cert).unwrap();
    std::fs::write(tls.join("key.pem"), &key).unwrap();
    let members: Vec<(String, u16, u16)> = (1..=3)
        .map(|i| (format!("e{i}"), free_port(), free_port()))
        .collect();
    let initial: Vec<String> = members
        .iter()
        .map(|(n, _, p)| format!("{n}=https://127.0.0.1:{p}"))
        .collect();
    let initial = initial.join(",");
    for (name, client, peer) in &members {
        let t = |f: &str| tls.join(f).to_str().unwrap().to_string();
        let child = Command::new("etcd")
            .args([
                "--name",
                name,
                "--data-dir",
                root.join(name).to_str().unwrap(),
                "--listen-client-urls",
                &format!("https://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("https://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("https://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("https://127.0.0.1:{peer}"),
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--cert-file",
                &t("cert.pem"),
                "--key-file",
                &t("key.pem"),
                "--peer-cert-file",
                &t("cert.pem"),
                "--peer-key-file",
                &t("key.pem"),
                "--peer-trusted-ca-file",
                &t("ca.pem"),
                "--peer-client-cert-auth",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("etcd is installed (apt-get install etcd-server)");
        killer.0.push(child);
    }
    let urls = members
        .iter()
        .map(|(_, c, _)| format!("https://127.0.0.1:{c}"))
        .collect();
    (urls, ca.cert_pem)
}

/// `ALLOD_BENCH_PROFILE=1`: the agents log the timing of each stage of a
/// write, and the bench prints where a lone write's time goes on the leader.
fn profiling() -> bool {
    std::env::var_os("ALLOD_BENCH_PROFILE").is_some()
}

const PROFILE_LOG: &str = "warn,allod_raft=trace,agent::cluster=trace";

/// The median of `field` in the trace lines with `message` (and, when
/// given, `also` in the line) among `lines`, in microseconds.
fn stage_p50(lines: &[&str], message: &str, also: &str, field: &str) -> Option<(u64, usize)> {
    let key = format!("{field}=");
    let mut values: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains(message) && l.contains(also))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            l[at..].split(' ').next()?.trim().parse().ok()
        })
        .collect();
    values.sort_unstable();
    let p50 = *values.get(values.len() / 2)?;
    Some((p50, values.len()))
}

/// Where a lone write's time goes on the leader, from its trace lines
/// (`log` holds those of the one-client phase).
fn print_profile(log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    let stages = [
        (
            "write proposed to Raft until committed and applied",
            "batch committed and applied",
            "commands=1 ",
            "elapsed_us",
        ),
        (
            "  leader's log append (redb commit, fsync), before replication starts",
            "committed to the Raft log",
            "entries=1 ",
            "elapsed_us",
        ),
        (
            "  AppendEntries to a follower and back (its fsync included)",
            "append_entries sent",
            "entries=1 ",
            "elapsed_us",
        ),
        (
            "  apply (queue, redb transaction without fsync)",
            "state machine transaction",
            "durable=false",
            "committed_us",
        ),
    ];
    println!("A lone write on the leader (p50 of its stages, from the agents' traces):");
    for (label, message, also, field) in stages {
        match stage_p50(&lines, message, also, field) {
            Some((p50, n)) => println!("  {label}: {:.2} ms ({n} samples)", p50 as f64 / 1000.0),
            None => println!("  {label}: no samples"),
        }
    }
}

#[derive(Clone, Copy)]
enum Target {
    Allod,
    Etcd,
}

/// What each request does.
#[derive(Clone, Copy)]
enum Work {
    /// Creates a record (a project; an etcd key of the same size).
    Write,
    /// Reads the record `bc1-0` (made by the first write phase): current
    /// (Allod's default read; etcd's linearizable range), or `stale`
    /// (`?consistency=stale`; etcd's serializable range).
    Read { stale: bool },
}

struct Measurement {
    ops: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
    /// p50 (ms) of the writes sent to each member, in member order.
    p50_by_member_ms: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    target: Target,
    urls: &[String],
    ca_pem: &str,
    token: &str,
    clients: usize,
    total: usize,
    tag: &str,
    work: Work,
) -> Measurement {
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(agent::cluster::pki::ca_client_config(ca_pem).unwrap())
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, next, urls, token, tag) = (
            http.clone(),
            next.clone(),
            urls.to_vec(),
            token.to_string(),
            tag.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return (latencies, errors);
                }
                let member = (n + c) % urls.len();
                let url = &urls[member];
                let name = format!("b{tag}-{n}");
                let t0 = Instant::now();
                let request = match (target, work) {
                    (Target::Allod, Work::Write) => http.post(format!("{url}/v1/projects")).bearer_auth(&token).json(&json!({ "name": name })),
                    (Target::Etcd, Work::Write) => {
                        let value = json!({ "name": name, "description": "", "created_at_ms": 0, "generation": 1 }).to_string();
                        http.post(format!("{url}/v3/kv/put"))
                            .json(&json!({ "key": STANDARD.encode(format!("projects/{name}")), "value": STANDARD.encode(value) }))
                    }
                    (Target::Allod, Work::Read { stale }) => {
                        let query = if stale { "?consistency=stale" } else { "" };
                        http.get(format!("{url}/v1/projects/bc1-0{query}")).bearer_auth(&token)
                    }
                    (Target::Etcd, Work::Read { stale }) => http
                        .post(format!("{url}/v3/kv/range"))
                        .json(&json!({ "key": STANDARD.encode("projects/bc1-0"), "serializable": stale })),
                };
                match request.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push((t0.elapsed(), member));
                    }
                    _ => errors += 1,
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    let pct = |latencies: &[Duration], p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let p50_by_member_ms = (0..urls.len())
        .map(|member| {
            let mut mine: Vec<Duration> = latencies
                .iter()
                .filter(|(_, m)| *m == member)
                .map(|(d, _)| *d)
                .collect();
            mine.sort();
            pct(&mine, 0.50)
        })
        .collect();
    let mut all: Vec<Duration> = latencies.iter().map(|(d, _)| *d).collect();
    all.sort();
    Measurement {
        ops: all.len(),
        seconds,
        p50_ms: pct(&all, 0.50),
        p99_ms: pct(&all, 0.99),
        errors,
        p50_by_member_ms,
    }
}

/// Prints a measurement's table row (`row` names its first two cells) and
/// returns the note with its p50 by member.
fn report(row: &str, note: &str, m: &Measurement) -> String {
    println!(
        "| {row} | {} | {:.0} | {:.2} | {:.2} | {} |",
        m.ops,
        m.ops as f64 / m.seconds,
        m.p50_ms,
        m.p99_ms,
        m.errors
    );
    let by_member: Vec<String> = m
        .p50_by_member_ms
        .iter()
        .enumerate()
        .map(|(i, p50)| format!("member {} {p50:.2}", i + 1))
        .collect();
    format!("{note}: {}", by_member.join(", "))
}

fn proc_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

fn main() {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!(
            "etcd is not installed; run `bash .ci/bench`, which installs Debian's etcd-server"
        );
        std::process::exit(1);
    }
    // For profiling Allod alone: ALLOD_BENCH_ONLY=allod skips the etcd runs.
    let allod_only = std::env::var("ALLOD_BENCH_ONLY").is_ok_and(|v| v == "allod");
    let scale: usize = std::env::var("ALLOD_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // ALLOD_BENCH_KEEP=1 keeps the agents' logs and data after the run.
    let tmp = tempfile::Builder::new()
        .prefix("allod-bench")
        .disable_cleanup(std::env::var_os("ALLOD_BENCH_KEEP").is_some())
        .tempdir()
        .unwrap();
    eprintln!("agent logs: {}/allod*.log", tmp.path().display());
    let mut killer = Killer(Vec::new());

    let allod = start_allod(tmp.path(), &mut killer);
    let allod_urls: Vec<String> = allod.iter().map(|n| format!("https://{}", n.api)).collect();
    let allod_ca = std::fs::read_to_string(allod[0].dir.join("ca.pem")).unwrap();
    let token = std::fs::read_to_string(allod[0].dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let (etcd_urls, etcd_ca) = start_etcd(tmp.path(), &mut killer);
    runtime.block_on(async {
        let probe = reqwest::Client::builder()
            .use_preconfigured_tls(agent::cluster::pki::ca_client_config(&etcd_ca).unwrap())
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last;
        loop {
            let reply = probe
                .post(format!("{}/v3/kv/put", etcd_urls[0]))
                .json(&json!({"key": "cHJvYmU=", "value": "MQ=="}))
                .send()
                .await;
            match reply {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => last = format!("HTTP {}", r.status()),
                Err(e) => last = agent::error_chain(&e),
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(tmp.path().join("e1.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                panic!(
                    "etcd did not come up ({last}); the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    println!("| workload | system | ops | ops/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    // Allod's member 1 made the cluster and leads unless an election moved it.
    let mut notes = Vec::new();
    let mut profile = None;
    // Drives one system with its own addresses, CA and credential.
    let run = |target, clients, total, tag: String, work| {
        let (urls, ca, token) = match target {
            Target::Allod => (&allod_urls, &allod_ca, token.as_str()),
            Target::Etcd => (&etcd_urls, &etcd_ca, ""),
        };
        async move { drive(target, urls, ca, token, clients, total, &tag, work).await }
    };
    for (clients, total) in [(1usize, 300 * scale), (64, 4000 * scale)] {
        let mut pair = Vec::new();
        for (label, target) in [("allod", Target::Allod), ("etcd", Target::Etcd)] {
            if allod_only && label == "etcd" {
                continue;
            }
            let tag = format!("c{clients}");
            let leader_log = allod[0].dir.with_extension("log");
            let log_from = std::fs::metadata(&leader_log).map_or(0, |m| m.len() as usize);
            let m = runtime.block_on(run(target, clients, total, tag, Work::Write));
            notes.push(report(
                &format!("{clients} client(s) | {label}"),
                &format!("{clients} client(s), {label}: p50 ms by the member written to"),
                &m,
            ));
            if profiling() && clients == 1 && label == "allod" {
                let log = std::fs::read(&leader_log).unwrap_or_default();
                let phase = String::from_utf8_lossy(&log[log_from.min(log.len())..]).into_owned();
                profile = Some(phase);
            }
            pair.push(m);
        }
        results.push((clients, pair));
    }
    // Reads by one client: a record, current or stale.
    let reads = 300 * scale;
    for (kind, stale) in [("current", false), ("stale", true)] {
        for (label, target) in [("allod", Target::Allod), ("etcd", Target::Etcd)] {
            if allod_only && label == "etcd" {
                continue;
            }
            let m = runtime.block_on(run(target, 1, reads, "r".into(), Work::Read { stale }));
            notes.push(report(
                &format!("1 client, {kind} reads | {label}"),
                &format!("1 client, {kind} reads, {label}: p50 ms by the member read from"),
                &m,
            ));
        }
    }
    println!();
    for note in &notes {
        println!("{note}");
    }
    if let Some(log) = &profile {
        println!();
        print_profile(log);
    }
    println!();
    for (clients, pair) in results.iter().filter(|(_, p)| p.len() == 2) {
        let (a, e) = (&pair[0], &pair[1]);
        println!(
            "{clients} client(s): allod/etcd throughput ratio {:.2}, p50 ratio {:.2}, p99 ratio {:.2} (below 1 means allod is faster)",
            (a.ops as f64 / a.seconds) / (e.ops as f64 / e.seconds),
            a.p50_ms / e.p50_ms,
            a.p99_ms / e.p99_ms
        );
    }

    // Footprint with 10,000 objects in the state.
    let have: usize = results.iter().map(|(_, p)| p[0].ops).sum();
    let fill = 10_000usize.saturating_sub(have);
    if fill > 0 {
        runtime.block_on(drive(
            Target::Allod,
            &allod_urls,
            &allod_ca,
            &token,
            64,
            fill,
            "fill",
            Work::Write,
        ));
    }
    let pids: Vec<u32> = killer.0[..3].iter().map(|c| c.id()).collect();
    std::thread::sleep(Duration::from_secs(2));
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let before: Vec<u64> = pids.iter().map(|&p| proc_cpu_ticks(p)).collect();
    let idle_window = Duration::from_secs(20);
    std::thread::sleep(idle_window);
    println!();
    for (i, &pid) in pids.iter().enumerate() {
        let cpu =
            (proc_cpu_ticks(pid) - before[i]) as f64 / ticks_per_sec / idle_window.as_secs_f64()
                * 100.0;
        println!("agent n{}: idle CPU {:.2} % of a core over {}s, RSS {:.1} MiB (10,000+ projects in state)", i + 1, cpu, idle_window.as_secs(), proc_rss_kib(pid) as f64 / 1024.0);
    }

    // Restart to ready: SIGTERM a follower, start it again, time until
    // /readyz answers 200 and a linearizable list returns every object.
    let leader_api = runtime.block_on(async {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(agent::cluster::pki::ca_client_config(&allod_ca).unwrap())
            .build()
            .unwrap();
        let c: serde_json::Value = http
            .get(format!("{}/v1/cluster", allod_urls[0]))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let leader = c["leader_id"].as_u64().unwrap();
        c["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == leader)
            .unwrap()["api_addr"]
            .as_str()
            .unwrap()
            .to_string()
    });
    let victim = allod.iter().position(|n| n.api != leader_api).unwrap();
    let node = &allod[victim];
    let status = Command::new("kill")
        .args(["-TERM", &killer.0[victim].id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    killer.0[victim].wait().unwrap();
    let t0 = Instant::now();
    killer.0[victim] = spawn_allod(
        &node.dir,
        &format!("n{}", victim + 1),
        &node.api,
        &node.peer,
    );
    let (ready, listed, count) = runtime.block_on(async {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(agent::cluster::pki::ca_client_config(&allod_ca).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let url = format!("https://{}", node.api);
        loop {
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ready = t0.elapsed();
        let list: Vec<serde_json::Value> = http
            .get(format!("{url}/v1/projects"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (ready, t0.elapsed(), list.len())
    });
    println!(
        "restart to ready: {:.0} ms to /readyz, {:.0} ms to a linearizable list of {count} projects",
        ready.as_secs_f64() * 1000.0,
        listed.as_secs_f64() * 1000.0
    );
}
