//! The real binary: three `allod agent` processes, set up with the CLI
//! (`cluster init`, `join-token`, `join`), then 200 project creates spread
//! over all nodes while the leader is killed with SIGKILL and restarted.
//! Afterwards every node must list exactly the acknowledged projects.
//!
//! Slow (several seconds of real elections); `ALLOD_SKIP_SLOW=1` skips it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli, ApiClient};
use serde_json::json;
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_allod");

fn skip_slow() -> bool {
    std::env::var_os("ALLOD_SKIP_SLOW").is_some_and(|v| v == "1")
}

struct Proc {
    child: Child,
    dir: PathBuf,
    api: String,
    peer: String,
}

fn spawn_agent(dir: &Path, name: &str, api: &str, peer: &str) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    Command::new(BIN)
        .args([
            "agent",
            "--data-dir",
            dir.to_str().unwrap(),
            "--api-listen",
            api,
            "--peer-listen",
            peer,
            "--storage-listen",
            "127.0.0.1:0",
            "--name",
            name,
            // Agents sharing the host's network namespace would each own
            // its `al*` links; this test needs none.
            "--network-fabric",
            "off",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn allod agent")
}

async fn start(dir: &Path, name: &str) -> Proc {
    let _ = std::fs::remove_file(dir.join("listen.json"));
    let child = spawn_agent(dir, name, "127.0.0.1:0", "127.0.0.1:0");
    let listen = dir.join("listen.json");
    common::wait_for("agent writes listen.json", Duration::from_secs(20), || {
        std::fs::read_to_string(&listen)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some()
    })
    .await;
    let addrs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&listen).unwrap()).unwrap();
    Proc {
        child,
        dir: dir.to_path_buf(),
        api: addrs["api_addr"].as_str().unwrap().into(),
        peer: addrs["peer_addr"].as_str().unwrap().into(),
    }
}

async fn wait_admin_socket(dir: &Path) {
    let sock = dir.join("admin.sock");
    common::wait_for("admin socket", Duration::from_secs(20), || sock.exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agent_processes_lose_no_acknowledged_create_across_a_leader_sigkill() {
    if skip_slow() {
        eprintln!("skipped: ALLOD_SKIP_SLOW=1");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();
    for i in 1..=3 {
        let dir = tmp.path().join(format!("n{i}"));
        procs.push(start(&dir, &format!("n{i}")).await);
        wait_admin_socket(&dir).await;
    }
    let d = |i: usize| procs[i].dir.to_str().unwrap().to_string();
    let out = cli(&["cluster", "init", "--data-dir", &d(0)]);
    assert!(out.contains("Created cluster"), "{out}");
    for i in 1..3 {
        let token = cli(&["cluster", "join-token", "--data-dir", &d(0)])
            .trim()
            .to_string();
        let out = cli(&["cluster", "join", "--data-dir", &d(i), "--token", &token]);
        assert!(out.contains("voter"), "{out}");
    }
    let status = cli(&["cluster", "status", "--data-dir", &d(0), "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");

    let token = std::fs::read_to_string(tmp.path().join("n1/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let ca = std::fs::read_to_string(tmp.path().join("n1/ca.pem")).unwrap();
    let client = ApiClient::new(&ca, &token);
    let urls: Vec<String> = procs.iter().map(|p| format!("https://{}", p.api)).collect();

    // 200 creates from 8 concurrent clients, each retrying on another node
    // until it knows the outcome. A 409 on a retry means an earlier attempt
    // committed; a 409 on the first attempt would be a duplicate.
    let next = Arc::new(Mutex::new(0usize));
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (next, acknowledged, client, urls) = (
            next.clone(),
            acknowledged.clone(),
            client.clone(),
            urls.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let n = {
                    let mut next = next.lock().await;
                    if *next == 200 {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                let name = format!("proj-{n:03}");
                let started = Instant::now();
                let mut attempt = 0;
                loop {
                    let url = &urls[(n + w + attempt) % urls.len()];
                    match client
                        .post(&format!("{url}/v1/projects"), json!({ "name": name }))
                        .await
                    {
                        Ok(reply) if reply.status == 201 => break,
                        Ok(reply) if reply.status == 409 && attempt > 0 => break,
                        Ok(reply) if reply.status == 409 => {
                            panic!("{name} existed before it was created: {}", reply.body)
                        }
                        Ok(reply) if reply.status >= 500 => {}
                        Ok(reply) => panic!(
                            "unexpected answer for {name}: {} {}",
                            reply.status, reply.body
                        ),
                        Err(_) => {}
                    }
                    attempt += 1;
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "{name} could not be created within a minute"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                acknowledged.lock().await.insert(name);
            }
        }));
    }

    // Kill the leader once a quarter of the creates are in, then restart it.
    common::wait_for_async("50 creates", Duration::from_secs(60), || async {
        acknowledged.lock().await.len() >= 50
    })
    .await;
    let cluster = client
        .get(&format!("{}/v1/cluster", urls[0]))
        .await
        .unwrap()
        .body;
    let leader_id = cluster["leader_id"].as_u64().expect("a leader");
    let leader = procs
        .iter()
        .position(|p| {
            cluster["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == leader_id && m["peer_addr"] == p.peer.as_str())
        })
        .expect("leader is one of ours");
    let killed_at = Instant::now();
    // SIGKILL: no shutdown path runs.
    procs[leader].child.kill().unwrap();
    procs[leader].child.wait().unwrap();
    let survivor = (leader + 1) % 3;
    common::wait_for_async("a new leader", Duration::from_secs(20), || async {
        match client.get(&format!("{}/v1/cluster", urls[survivor])).await {
            Ok(reply) => reply.body["leader_id"]
                .as_u64()
                .is_some_and(|l| l != leader_id),
            Err(_) => false,
        }
    })
    .await;
    eprintln!("new leader after {:?}", killed_at.elapsed());
    let (api, peer) = (procs[leader].api.clone(), procs[leader].peer.clone());
    let dir = procs[leader].dir.clone();
    procs[leader].child = spawn_agent(&dir, &format!("n{}", leader + 1), &api, &peer);

    for worker in workers {
        worker.await.expect("worker");
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert_eq!(acknowledged.len(), 200);
    let expected: Vec<String> = acknowledged.into_iter().collect();
    for (i, url) in urls.iter().enumerate() {
        common::wait_for_async(
            &format!("node {} serves reads", i + 1),
            Duration::from_secs(30),
            || async {
                client
                    .get(&format!("{url}/v1/projects"))
                    .await
                    .is_ok_and(|r| r.status == 200)
            },
        )
        .await;
        assert_eq!(
            client.project_names(url).await,
            expected,
            "node {} lists other projects than were acknowledged",
            i + 1
        );
    }

    // The CLI finds the API through the environment, then a config file.
    let ca_path = tmp.path().join("n1/ca.pem");
    let run_with = |envs: &[(&str, &str)], args: &[&str]| {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env_remove("ALLOD_URL")
            .env_remove("ALLOD_TOKEN")
            .env_remove("ALLOD_CA");
        command
            .env("HOME", tmp.path())
            .env_remove("XDG_CONFIG_HOME");
        for (k, v) in envs {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let env = [
        ("ALLOD_URL", urls[2].as_str()),
        ("ALLOD_TOKEN", token.as_str()),
        ("ALLOD_CA", ca_path.to_str().unwrap()),
    ];
    let (ok, stdout, stderr) = run_with(
        &env,
        &[
            "project",
            "create",
            "from-env",
            "--description",
            "made by the CLI",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Created project from-env"), "{stdout}");
    let (ok, stdout, _) = run_with(&env, &["project", "show", "from-env"]);
    assert!(ok);
    assert!(
        stdout.starts_with("NAME") && stdout.contains("made by the CLI"),
        "table expected: {stdout}"
    );
    // Quotas and volumes from the CLI, with human sizes.
    let (ok, stdout, stderr) = run_with(
        &env,
        &[
            "project",
            "quota",
            "from-env",
            "--volumes",
            "1",
            "--storage",
            "10G",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("volumes") && stdout.contains("10737418240"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run_with(
        &env,
        &[
            "volume",
            "create",
            "disk",
            "--project",
            "from-env",
            "--size",
            "1G",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 GiB") && stdout.contains("available"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run_with(
        &env,
        &[
            "volume",
            "show",
            "disk",
            "--project",
            "from-env",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{stderr}");
    let volume: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(volume["size_bytes"], 1u64 << 30);
    assert_eq!(volume["replicas"], 3);
    assert!(volume["id"].as_str().is_some_and(|id| !id.is_empty()));
    let (ok, _, stderr) = run_with(
        &env,
        &[
            "volume",
            "create",
            "more",
            "--project",
            "from-env",
            "--size",
            "1G",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("volumes quota is 1"), "{stderr}");
    let (ok, _, stderr) = run_with(
        &env,
        &[
            "volume",
            "create",
            "bad",
            "--project",
            "from-env",
            "--size",
            "1Q",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("unknown size unit"), "{stderr}");
    let (ok, _, stderr) = run_with(&env, &["volume", "delete", "disk", "--project", "from-env"]);
    assert!(ok, "{stderr}");

    let (ok, _, stderr) = run_with(&[], &["project", "list"]);
    assert!(!ok);
    assert!(stderr.contains("no API URL"), "{stderr}");
    let config_dir = tmp.path().join(".config/allod");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config.json"),
        json!({ "url": urls[1], "token": token, "ca": ca_path }).to_string(),
    )
    .unwrap();
    let (ok, stdout, stderr) = run_with(&[], &["project", "list", "--output", "json"]);
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 201);
    let (ok, _, stderr) = run_with(&[], &["project", "delete", "missing"]);
    assert!(!ok);
    assert!(
        stderr.contains("does not exist") && stderr.contains("404"),
        "{stderr}"
    );

    // Users, roles, tokens and login through the CLI.
    let admin_env = [
        ("ALLOD_URL", urls[0].as_str()),
        ("ALLOD_TOKEN", token.as_str()),
        ("ALLOD_CA", ca_path.to_str().unwrap()),
    ];
    let run_stdin = |envs: &[(&str, &str)], args: &[&str], input: &str| {
        use std::io::Write;
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("HOME", tmp.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("ALLOD_URL")
            .env_remove("ALLOD_TOKEN")
            .env_remove("ALLOD_CA");
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, stderr) = run_stdin(
        &admin_env,
        &["user", "create", "erin", "--password-stdin"],
        "a long passphrase\n",
    );
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = run_with(
        &admin_env,
        &[
            "role",
            "grant",
            "erin",
            "--project",
            "proj-007",
            "--role",
            "project-viewer",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("project-viewer"), "{stdout}");
    let (ok, stdout, stderr) = run_with(
        &admin_env,
        &[
            "token",
            "create",
            "--user",
            "erin",
            "--project",
            "proj-007",
            "--role",
            "project-viewer",
            "--expires",
            "24h",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{stderr}");
    let created: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(created["token"].as_str().unwrap().starts_with("allod_"));
    let erin_token = created["token"].as_str().unwrap().to_string();
    let (ok, stdout, _) = run_with(
        &[
            ("ALLOD_URL", urls[1].as_str()),
            ("ALLOD_TOKEN", erin_token.as_str()),
            ("ALLOD_CA", ca_path.to_str().unwrap()),
        ],
        &["project", "list", "-o", "json"],
    );
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (ok, _, stderr) = run_with(
        &admin_env,
        &["token", "revoke", created["id"].as_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run_with(
        &[
            ("ALLOD_URL", urls[1].as_str()),
            ("ALLOD_TOKEN", erin_token.as_str()),
            ("ALLOD_CA", ca_path.to_str().unwrap()),
        ],
        &["project", "list"],
    );
    assert!(!ok && stderr.contains("401"), "{stderr}");
    let (ok, _, stderr) = run_stdin(
        &[],
        &[
            "login",
            "--url",
            &urls[2],
            "--ca",
            ca_path.to_str().unwrap(),
            "--user",
            "erin",
            "--password-stdin",
        ],
        "wrong password\n",
    );
    assert!(!ok && stderr.contains("wrong password"), "{stderr}");
    let (ok, stdout, stderr) = run_stdin(
        &[],
        &[
            "login",
            "--url",
            &urls[2],
            "--ca",
            ca_path.to_str().unwrap(),
            "--user",
            "erin",
            "--password-stdin",
        ],
        "a long passphrase\n",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Logged in as erin"), "{stdout}");
    let (ok, stdout, stderr) = run_with(&[], &["project", "list"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("proj-007") && !stdout.contains("proj-008"),
        "{stdout}"
    );

    // The audit log, from the CLI: listed, verified live, and a tampered export refused.
    let (ok, stdout, stderr) = run_with(&admin_env, &["audit", "list", "--output", "json"]);
    assert!(ok, "{stderr}");
    let entries: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "POST /v1/users" && e["user"] == "admin"),
        "{stdout}"
    );
    // Operator actions on the admin socket are in the log too.
    for action in [
        "ADMIN cluster init",
        "ADMIN cluster join-token",
        "ADMIN cluster join",
    ] {
        assert!(
            entries
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == action
                    && e["user"] == "local-admin"
                    && e["result"] == "ok"),
            "{action} missing: {stdout}"
        );
    }
    let (ok, stdout, stderr) = run_with(&admin_env, &["audit", "verify"]);
    assert!(ok && stdout.contains("intact"), "{stdout}{stderr}");
    let lines: Vec<String> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let export = tmp.path().join("audit.jsonl");
    std::fs::write(&export, lines.join("\n")).unwrap();
    let (ok, stdout, stderr) = run_with(
        &[],
        &["audit", "verify", "--file", export.to_str().unwrap()],
    );
    assert!(ok, "{stdout}{stderr}");
    let tampered: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, l)| l.clone())
        .collect();
    std::fs::write(&export, tampered.join("\n")).unwrap();
    let (ok, _, stderr) = run_with(
        &[],
        &["audit", "verify", "--file", export.to_str().unwrap()],
    );
    assert!(!ok && stderr.contains("broken"), "{stderr}");

    for p in &mut procs {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}
