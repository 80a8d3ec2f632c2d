//! `allod console` end to end: two real agents on this machine, each
//! console driven in tmux (send-keys, capture-pane) at 80x24. Node 1
//! creates the cluster and shows a join token; node 2 first tries tokens
//! with a wrong fingerprint, an unreachable member and an expiry in the past
//! (each stopped at pre-flight, node 2 left unconfigured), then joins; both
//! dashboards show two members.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_allod");

struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent(dir: &Path, name: &str) -> Agent {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let child = Command::new(BIN)
        .args(["agent", "--data-dir", dir.to_str().unwrap(), "--name", name])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--storage-listen", "127.0.0.1:0"])
        // Agents sharing the host's network namespace would each own its
        // `al*` links; this test needs none.
        .args(["--network-fabric", "off"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn allod agent");
    Agent { child }
}

/// One tmux server of this test's own, so nothing else is disturbed.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is installed (.ci/test installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn console(&self, session: &str, dir: &Path) {
        let command = format!("{BIN} console --data-dir {}", dir.display());
        self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "80",
            "-y",
            "24",
            &command,
        ]);
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        for key in keys {
            self.run(&["send-keys", "-t", session, key]);
        }
    }

    fn type_text(&self, session: &str, text: &str) {
        self.run(&["send-keys", "-t", session, "-l", text]);
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    /// Waits until the screen shows `text`, and returns the screen.
    fn wait_for(&self, session: &str, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen(session);
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{session} never showed {text:?}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The token shown between "paste:" and "It can be used", without borders.
fn token_on(screen: &str) -> String {
    screen
        .lines()
        .skip_while(|l| !l.contains("paste:"))
        .skip(1)
        .take_while(|l| !l.contains("It can be used"))
        .map(|l| l.trim_matches(|c: char| c == '|' || c.is_whitespace()))
        .collect()
}

fn try_join(tmux: &Tmux, session: &str, token: &str, reason: &str) {
    tmux.keys(session, &["j"]);
    tmux.wait_for(session, "Token:");
    tmux.type_text(session, token);
    tmux.keys(session, &["Enter"]);
    tmux.wait_for(session, "fingerprint");
    tmux.keys(session, &["y"]);
    let screen = tmux.wait_for(session, "check(s) failed");
    assert!(screen.contains(reason), "expected {reason:?}:\n{screen}");
    assert!(screen.contains("[FAIL]"));
    // J does nothing after a failed check; Esc goes back to the start.
    tmux.keys(session, &["j", "Escape"]);
    tmux.wait_for(session, "not part of a cluster yet");
}

#[test]
fn two_consoles_create_and_join_and_preflight_stops_bad_tokens() {
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is required for this test; .ci/test installs it");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (one, two): (PathBuf, PathBuf) = (tmp.path().join("one"), tmp.path().join("two"));
    let _agents = [agent(&one, "alpha"), agent(&two, "beta")];
    let tmux = Tmux {
        socket: format!("allod-test-{}", std::process::id()),
    };

    tmux.console("c1", &one);
    let first = tmux.wait_for("c1", "not part of a cluster yet");
    assert!(first.contains("Create a new cluster") && first.contains("Join an existing cluster"));
    tmux.keys("c1", &["c"]);
    tmux.type_text("c1", "demo");
    tmux.keys("c1", &["Enter"]);
    tmux.wait_for("c1", "Done: this node is node 1");
    tmux.keys("c1", &["Enter"]);
    let dashboard = tmux.wait_for("c1", "Members (1)");
    assert!(dashboard.contains("of cluster demo"), "{dashboard}");
    tmux.keys("c1", &["t"]);
    tmux.wait_for("c1", "Create a single-use join token");
    tmux.keys("c1", &["y"]);
    let token = token_on(&tmux.wait_for("c1", "It can be used once"));
    let parsed =
        agent::cluster::join::JoinToken::decode(&token, 0).expect("the screen shows a whole token");

    tmux.console("c2", &two);
    tmux.wait_for("c2", "not part of a cluster yet");
    let mut wrong_ca = parsed.clone();
    wrong_ca.ca_fingerprint = "00".repeat(32);
    try_join(&tmux, "c2", &wrong_ca.encode(), "the member presents CA");
    let mut unreachable = parsed.clone();
    for member in &mut unreachable.members {
        member.peer_addr = format!("127.0.0.1:{}", free_port());
        member.api_addr = member.peer_addr.clone();
    }
    try_join(&tmux, "c2", &unreachable.encode(), "cannot connect");
    let mut expired = parsed.clone();
    expired.expires_at_ms = agent::cluster::join::now_ms() - 60_000;
    try_join(&tmux, "c2", &expired.encode(), "the token expired");
    assert!(
        !two.join("node.json").exists(),
        "node 2 must stay unconfigured after failed pre-flights"
    );

    tmux.keys("c2", &["j"]);
    tmux.wait_for("c2", "Token:");
    tmux.type_text("c2", &token);
    tmux.keys("c2", &["Enter"]);
    tmux.wait_for("c2", "fingerprint");
    tmux.keys("c2", &["y"]);
    tmux.wait_for("c2", "All checks passed");
    tmux.keys("c2", &["j"]);
    tmux.wait_for("c2", "Done: this node is node 2");
    tmux.keys("c2", &["Enter"]);
    let dashboard = tmux.wait_for("c2", "Members (2)");
    assert!(
        dashboard.contains("alpha") && dashboard.contains("beta"),
        "{dashboard}"
    );
    tmux.keys("c1", &["Enter"]);
    let dashboard = tmux.wait_for("c1", "Members (2)");
    assert!(dashboard.contains("beta"), "{dashboard}");
    // The leader's dashboard shows the new member replicating.
    tmux.wait_for("c1", "in sync");
    // Maintenance, behind a confirmation.
    tmux.keys("c1", &["m"]);
    tmux.wait_for("c1", "Put this node into maintenance?");
    tmux.keys("c1", &["y"]);
    tmux.wait_for("c1", "[MAINTENANCE]");
    // Ctrl-C leaves the console; the agent keeps running.
    tmux.keys("c1", &["C-c"]);
}
