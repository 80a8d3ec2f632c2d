//! `allod node setup` for real: an agent in a network namespace of its own
//! (with its own UTS namespace) sets its management address, default route
//! and host name through netlink, and takes a loop-device disk, which it
//! wipes only when told to. Needs root, iproute2 and util-linux.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_allod");

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Removes what the test made, even when it fails.
struct Cleanup {
    netns: String,
    veth: String,
    loop_device: String,
    agent: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = run("losetup", &["-d", &self.loop_device]);
    }
}

fn setup(data_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["node", "setup", "--data-dir", data_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(BIN, &args)
}

#[test]
fn node_setup_applies_address_route_hostname_and_wipes_only_when_told() {
    let tmp = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let netns = format!("allod-setup-{id}");
    let (outer, inner) = (format!("vs{id}a"), format!("vs{id}b"));
    let image = tmp.path().join("disk.img");
    // A 64 MiB "disk" with a signature on it.
    let mut bytes = vec![0u8; 64 << 20];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    std::fs::write(&image, &bytes).unwrap();
    let loop_device = ok("losetup", &["-f", "--show", image.to_str().unwrap()])
        .trim()
        .to_string();
    let mut cleanup = Cleanup {
        netns: netns.clone(),
        veth: outer.clone(),
        loop_device: loop_device.clone(),
        agent: None,
    };
    ok("ip", &["netns", "add", &netns]);
    ok("ip", &["-n", &netns, "link", "set", "lo", "up"]);
    ok(
        "ip",
        &[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ],
    );
    ok("ip", &["link", "set", &inner, "netns", &netns]);

    let data_dir = tmp.path().join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
    let agent = Command::new("ip")
        .args(["netns", "exec", &netns, "unshare", "--uts", BIN, "agent"])
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .args([
            "--api-listen",
            "127.0.0.1:7443",
            "--peer-listen",
            "127.0.0.1:7444",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = agent.id().to_string();
    cleanup.agent = Some(agent);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !data_dir.join("admin.sock").exists() {
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let network = [
        "--hostname",
        "setup-test",
        "--interface",
        inner.as_str(),
        "--address",
        "10.77.0.2/24",
        "--gateway",
        "10.77.0.1",
        "--dns",
        "10.77.0.1",
        "--ntp",
        "ntp.example.org",
        "--storage-disk",
        loop_device.as_str(),
    ];
    // The disk holds data: refused as a whole, and nothing changed.
    let out = setup(&data_dir, &network);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("holds data") && stderr.contains("--wipe"),
        "{stderr}"
    );
    let addresses = ok(
        "ip",
        &["-n", &netns, "-4", "-o", "addr", "show", "dev", &inner],
    );
    assert!(!addresses.contains("10.77.0.2"), "{addresses}");
    assert_eq!(&std::fs::read(&image).unwrap()[510..512], &[0x55, 0xaa]);

    // Bad input names what is wrong.
    let out = setup(
        &data_dir,
        &[
            "--interface",
            &inner,
            "--address",
            "10.77.0.2/24",
            "--gateway",
            "10.78.0.1",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not another address"));
    let out = setup(&data_dir, &["--interface", "nope0", "--dhcp"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // With --wipe it applies, and applying it again changes nothing.
    let mut confirmed = network.to_vec();
    confirmed.extend_from_slice(&["--wipe", loop_device.as_str()]);
    for _ in 0..2 {
        let out = setup(&data_dir, &confirmed);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let addresses = ok(
        "ip",
        &["-n", &netns, "-4", "-o", "addr", "show", "dev", &inner],
    );
    assert!(addresses.contains("10.77.0.2/24"), "{addresses}");
    assert_eq!(addresses.lines().count(), 1, "{addresses}");
    let routes = ok("ip", &["-n", &netns, "route", "show", "default"]);
    assert!(routes.contains("via 10.77.0.1"), "{routes}");
    let link = ok("ip", &["-n", &netns, "-o", "link", "show", &inner]);
    assert!(link.contains("UP"), "{link}");
    let hostname = ok("nsenter", &["-t", &pid, "-u", "hostname"]);
    assert_eq!(hostname.trim(), "setup-test");
    assert_eq!(&std::fs::read(&image).unwrap()[510..512], &[0, 0]);
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("setup.json")).unwrap()).unwrap();
    assert_eq!(kept["management"]["address"], "10.77.0.2/24");
    assert_eq!(kept["ntp"][0], "ntp.example.org");
    // The host's own name is untouched.
    assert_ne!(ok("hostname", &[]).trim(), "setup-test");
    drop(cleanup);
}
