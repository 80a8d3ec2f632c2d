//! Shared fixtures for the cluster tests: real agents (real redb, real TLS on
//! port 0, real HTTP) running in this process, each with its own data
//! directory.

#![allow(dead_code)]

pub mod issuer;
pub mod linearizability;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::cluster::node::{ClusterNode, RaftOptions};
use agent::daemon::{Agent, AgentOptions};

/// Polls `condition` until it holds or `timeout` passes.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut condition: F) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`wait_for`] for an async condition.
pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a node's data directory holds of its identity.
pub fn identity_of(dir: &std::path::Path) -> agent::cluster::pki::NodeTls {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    agent::cluster::pki::NodeTls {
        ca_pem: read("ca.pem"),
        cert_pem: read("node.pem"),
        key_pem: read("node.key"),
    }
}

pub struct TestNode {
    pub agent: Arc<Agent>,
    pub dir: PathBuf,
    pub name: String,
}

impl TestNode {
    pub fn node(&self) -> Arc<ClusterNode> {
        self.agent.node().expect("node is configured")
    }
}

pub struct TestCluster {
    pub tmp: tempfile::TempDir,
    /// `None` while a node is stopped.
    pub nodes: Vec<Option<TestNode>>,
    /// The advertised (and listened-on) addresses of every node, kept across restarts.
    pub addrs: Vec<(String, String)>,
    pub options: RaftOptions,
    pub admin_token: String,
    pub ca_pem: String,
}

pub async fn start_agent(
    dir: &std::path::Path,
    api: &str,
    peer: &str,
    name: &str,
    options: &RaftOptions,
) -> Arc<Agent> {
    let mut opts = AgentOptions::new(dir, api, peer);
    opts.name = Some(name.to_string());
    opts.raft = options.clone();
    opts.audit_summary_interval = Duration::from_secs(1);
    // A node that was just stopped may still be releasing its files.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Agent::start(opts.clone()).await {
            Ok(agent) => return agent,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "agent start failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("agent in {} did not start: {e:#}", dir.display()),
        }
    }
}

impl TestCluster {
    /// Starts `size` agents, creates a cluster on the first and joins the
    /// others with fresh join tokens, one after another.
    pub async fn start(size: usize) -> Self {
        Self::start_with(size, RaftOptions::default()).await
    }

    pub async fn start_with(size: usize, options: RaftOptions) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..size {
            let dir = tmp.path().join(format!("n{}", i + 1));
            let name = format!("n{}", i + 1);
            let agent = start_agent(&dir, "127.0.0.1:0", "127.0.0.1:0", &name, &options).await;
            addrs.push((agent.api_addr.clone(), agent.peer_addr.clone()));
            nodes.push(Some(TestNode { agent, dir, name }));
        }
        let first = nodes[0].as_ref().unwrap();
        first.agent.init(Some("test".into())).await.expect("init");
        let admin_token = std::fs::read_to_string(first.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let ca_pem = std::fs::read_to_string(first.dir.join("ca.pem")).unwrap();
        let cluster = Self {
            tmp,
            nodes,
            addrs,
            options,
            admin_token,
            ca_pem,
        };
        for i in 1..size {
            cluster
                .join(i)
                .await
                .unwrap_or_else(|e| panic!("node {} did not join: {e:#}", i + 1));
        }
        cluster
    }

    pub async fn join_token(&self, via: usize) -> String {
        let node = self.live(via).node();
        agent::cluster::join::create_token(&node, 3600)
            .await
            .expect("join token")
            .1
    }

    pub async fn join(&self, index: usize) -> anyhow::Result<agent::daemon::JoinResult> {
        let via = (0..self.nodes.len())
            .find(|&i| {
                i != index
                    && self.nodes[i]
                        .as_ref()
                        .is_some_and(|n| n.agent.node().is_some())
            })
            .unwrap();
        let token = self.join_token(via).await;
        self.live(index).agent.join(&token, &|_| {}).await
    }

    pub fn live(&self, index: usize) -> &TestNode {
        self.nodes[index]
            .as_ref()
            .unwrap_or_else(|| panic!("node {} is stopped", index + 1))
    }

    pub fn node(&self, index: usize) -> Arc<ClusterNode> {
        self.live(index).node()
    }

    pub fn live_indices(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    /// Waits until every live node (or those in `among`) agrees on one
    /// leader that is itself among them, and returns its index.
    pub async fn leader_among(&self, among: &[usize], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<Option<u64>> = among.iter().map(|&i| self.node(i).leader()).collect();
            if let Some(Some(leader)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*leader)) {
                    if let Some(&index) = among.iter().find(|&&i| self.node(i).id == *leader) {
                        return index;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} after {timeout:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self) -> usize {
        self.leader_among(&self.live_indices(), Duration::from_secs(20))
            .await
    }

    /// Stops a node as abruptly as this process allows: its servers and
    /// connections are dropped and Raft halts, without any goodbye to peers.
    pub async fn stop(&mut self, index: usize) {
        let node = self.nodes[index].take().expect("node is running");
        node.agent.shutdown().await;
    }

    pub async fn restart(&mut self, index: usize) {
        assert!(self.nodes[index].is_none(), "node {} is running", index + 1);
        let dir = self.tmp.path().join(format!("n{}", index + 1));
        let name = format!("n{}", index + 1);
        let (api, peer) = self.addrs[index].clone();
        let agent = start_agent(&dir, &api, &peer, &name, &self.options).await;
        self.nodes[index] = Some(TestNode { agent, dir, name });
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.ca_pem, &self.admin_token)
    }

    pub fn api_url(&self, index: usize) -> String {
        format!("https://{}", self.addrs[index].0)
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_some() {
                self.stop(i).await;
            }
        }
    }
}

/// A tenant's view: HTTPS with the cluster CA and a bearer token.
#[derive(Clone)]
pub struct ApiClient {
    pub http: reqwest::Client,
    pub token: String,
}

pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl ApiClient {
    pub fn new(ca_pem: &str, token: &str) -> Self {
        Self::from_address(
            ca_pem,
            token,
            std::net::IpAddr::from([127, 0, 0, 1]),
            Duration::from_secs(15),
        )
    }

    /// A client whose connections come from `source` (any 127.0.0.0/8
    /// address works on loopback) and that gives up after `timeout`.
    pub fn from_address(
        ca_pem: &str,
        token: &str,
        source: std::net::IpAddr,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(agent::cluster::pki::ca_client_config(ca_pem).unwrap())
            .local_address(source)
            .timeout(timeout)
            .build()
            .unwrap();
        Self {
            http,
            token: token.to_string(),
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Reply, reqwest::Error> {
        let mut request = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok(Reply { status, body })
    }

    pub async fn get(&self, url: &str) -> Result<Reply, reqwest::Error> {
        self.send(reqwest::Method::GET, url, None).await
    }

    pub async fn post(&self, url: &str, body: serde_json::Value) -> Result<Reply, reqwest::Error> {
        self.send(reqwest::Method::POST, url, Some(body)).await
    }

    pub async fn project_names(&self, base: &str) -> Vec<String> {
        let reply = self
            .get(&format!("{base}/v1/projects"))
            .await
            .expect("list projects");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let mut names: Vec<String> = reply
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }
}

/// Agent processes of the real binary, killed with SIGKILL when dropped.
pub struct Killed(pub Vec<std::process::Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `allod agent` in `dir` on loopback ports the kernel picks, running no
/// VMs and no tenant networks, logging warnings to `dir.log`.
pub fn agent_process(dir: &std::path::Path, name: &str) -> std::process::Command {
    std::fs::create_dir_all(dir).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_allod"));
    command
        .args([
            "agent",
            "--data-dir",
            dir.to_str().unwrap(),
            "--api-listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
            "--storage-listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--libvirt-uri",
            "none",
            "--network-fabric",
            "off",
        ])
        .env("ALLOD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap());
    command
}

/// Runs the `allod` CLI and returns what it printed; fails the test when
/// the command fails.
pub fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allod"))
        .args(args)
        .output()
        .expect("run allod");
    assert!(
        out.status.success(),
        "allod {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Open files and resident bytes of a process.
pub fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss_kib * 1024)
}
