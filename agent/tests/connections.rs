//! What idle and abusive connections can do to a real agent process: it
//! starts with systemd's default soft limit of 1,024 open files, a client
//! holds 1,100 idle TCP connections to its API port, and a real client is
//! still served; the idle ones are closed when their TLS handshake does not
//! come, and the agent's descriptors return to where they were.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{footprint, ApiClient, Killed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_stop_a_real_client() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let mut command = common::agent_process(&dir, "n1");
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the
    // parent's; this runs in the child between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 1024, 8192)
                .map_err(std::io::Error::from)
        });
    }
    let agent = Killed(vec![command.spawn().unwrap()]);
    let pid = agent.0[0].id();
    common::wait_for("the admin socket", Duration::from_secs(20), || {
        dir.join("admin.sock").exists()
    })
    .await;
    common::cli(&["cluster", "init", "--data-dir", dir.to_str().unwrap()]);
    let listen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("listen.json")).unwrap()).unwrap();
    let api = listen["api_addr"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let client = ApiClient::new(&ca, token.trim());
    let url = format!("https://{api}/v1/projects");
    assert_eq!(client.get(&url).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = footprint(pid).0;

    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(tokio::net::TcpStream::connect(&api).await.unwrap());
    }
    // A new client, on a new connection, is answered, well before the
    // idle ones time out.
    let fresh = ApiClient::new(&ca, token.trim());
    let reply = tokio::time::timeout(Duration::from_secs(4), fresh.get(&url))
        .await
        .expect("a real client is answered within 4 s")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);

    // The idle ones never start TLS: each is closed by the agent.
    let mut closed = 0;
    for stream in idle.iter_mut().take(50) {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read(stream, &mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    assert_eq!(
        closed, 50,
        "idle connections without a handshake are closed"
    );
    drop(idle);
    common::wait_for(
        "the agent's open files back to their baseline",
        Duration::from_secs(20),
        || footprint(pid).0 <= baseline + 5,
    )
    .await;
}
