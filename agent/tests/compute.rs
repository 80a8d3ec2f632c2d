//! VMs end to end: three `allod agent` processes running guests on the
//! machine's libvirt (`qemu:///system`, TCG), booted from volumes cloned
//! from an imported image; the serial console through the API websocket;
//! stop, start, reboot, resize, delete; an agent killed mid-create; and
//! requests that must be refused.

mod common;
mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{build_boot_disk, run, Cluster, BIN};

/// Destroys and undefines the domains of the VMs a test made, however it ends.
struct Domains(Vec<String>);

impl Drop for Domains {
    fn drop(&mut self) {
        for id in &self.0 {
            let name = format!("allod-{id}");
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "destroy", &name])
                .output();
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "undefine", &name])
                .output();
        }
    }
}

fn domain_states(id: &str) -> Vec<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&out.stdout).to_string();
    names
        .lines()
        .filter(|n| n.trim() == format!("allod-{id}"))
        .map(|n| {
            let s = Command::new("virsh")
                .args(["-c", "qemu:///system", "domstate", n.trim()])
                .output()
                .unwrap();
            String::from_utf8_lossy(&s.stdout).trim().to_string()
        })
        .collect()
}

async fn wait_state(c: &Cluster, vm: &str, want: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..600 {
        // A node may be restarting: keep asking.
        let out = c.allod(&["vm", "show", vm, "--project", "p", "--output", "json"]);
        if !out.status.success() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        last = serde_json::from_slice(&out.stdout).unwrap();
        if last["state"] == want {
            return last;
        }
        assert_ne!(last["state"], "failed", "VM {vm} failed: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("VM {vm} never became {want}: {last}");
}

/// `allod vm console` in the background: its output, and its stdin.
struct Console {
    child: std::process::Child,
    output: Arc<Mutex<String>>,
}

impl Console {
    fn open(c: &Cluster, vm: &str) -> Self {
        let mut child = Command::new(BIN)
            .args(["vm", "console", vm, "--project", "p"])
            .envs(c.env.iter().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let o = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Console { child, output }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Types a line every half second until the guest echoes one back.
    async fn wait_until_echoing(&mut self) {
        for attempt in 0..240 {
            self.send(&format!("ready-{attempt}\n"));
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.output.lock().unwrap().contains("echo:ready-") {
                return;
            }
        }
        panic!(
            "the guest did not echo within 120 s; the console showed:\n{}",
            self.output.lock().unwrap()
        );
    }

    async fn expect(&mut self, what: &str) {
        for _ in 0..1200 {
            if self.output.lock().unwrap().contains(what) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = self.child.try_wait();
        panic!(
            "no {what:?} on the console after 120 s (console process: {status:?}); it showed:\n{}",
            self.output.lock().unwrap()
        );
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_boot_from_images_and_obey_their_owners_across_three_nodes() {
    // Declared first, dropped last: the agents are gone before their domains
    // are removed, so no reconciler defines them again.
    let mut made = Domains(Vec::new());
    let mut c = Cluster::start_with(&["--virt-type", "qemu", "--stop-timeout", "3"]).await;
    // QEMU runs as libvirt-qemu and must reach the nodes' NBD sockets.
    run("chmod", &["755", c.tmp.path().to_str().unwrap()]);
    c.allod_ok(&["project", "create", "p"]);
    let tmp = tempfile::tempdir().unwrap();
    // The guest echoes every line it reads on its serial console; after
    // `off-in-N` it powers itself off N seconds later.
    let disk = build_boot_disk(
        tmp.path(),
        "while read line < /dev/ttyS0; do \
         case \"$line\" in off-in-*) (sleep ${line#off-in-}; poweroff -f) & ;; esac; \
         echo \"echo:$line\" > /dev/ttyS0; done",
    );
    c.allod_ok(&["image", "import", disk.to_str().unwrap(), "--name", "tiny"]);

    // Bad requests: a clear refusal each, and nothing made.
    let refusals = [
        (vec!["--image", "nope"], "image \"nope\" does not exist"),
        (vec!["--image", "tiny", "--memory", "32M"], "memory_bytes"),
        (vec!["--image", "tiny", "--memory", "2T"], "no node"),
        (vec!["--image", "tiny", "--vcpus", "0"], "vcpus must be"),
    ];
    for (args, why) in refusals {
        let mut all = vec!["vm", "create", "bad", "--project", "p"];
        if !args.contains(&"--memory") {
            all.extend(["--memory", "256M"]);
        }
        all.extend(args.iter());
        let err = c.allod_fails(&all);
        assert!(err.contains(why), "{all:?}: {err}");
    }
    let err = c.allod_fails(&[
        "vm",
        "create",
        "two words",
        "--project",
        "p",
        "--memory",
        "256M",
    ]);
    assert!(
        err.contains("DNS label") || err.contains("lowercase"),
        "{err}"
    );
    let err = c.allod_fails(&[
        "vm",
        "create",
        "x",
        "--project",
        "nobody",
        "--memory",
        "256M",
    ]);
    assert!(err.contains("does not exist"), "{err}");
    c.allod_ok(&["user", "create", "outsider"]);
    let token: serde_json::Value = serde_json::from_str(
        &c.allod_ok(&["token", "create", "--user", "outsider", "--output", "json"]),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "vm",
            "create",
            "x",
            "--project",
            "p",
            "--memory",
            "256M",
            "--image",
            "tiny",
        ])
        .envs(c.env.iter().cloned())
        .env("ALLOD_TOKEN", token["token"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );
    assert_eq!(
        c.json(&["vm", "list", "--project", "p"]),
        serde_json::json!([])
    );
    assert_eq!(
        c.json(&["volume", "list", "--project", "p"]),
        serde_json::json!([])
    );

    // A VM from the image: placed, defined, started; --wait says when it runs.
    let vm = c.json(&[
        "vm",
        "create",
        "web1",
        "--project",
        "p",
        "--image",
        "tiny",
        "--vcpus",
        "1",
        "--memory",
        "256M",
        "--wait",
    ]);
    let id = vm["id"].as_str().unwrap().to_string();
    made.0.push(id.clone());
    assert_eq!(vm["state"], "running", "{vm}");
    assert!(vm["node"].as_u64().is_some(), "{vm}");
    assert_eq!(domain_states(&id), vec!["running"]);

    // The console, through the websocket of the VM's node: a reboot shows
    // the guest booting, and it answers what we type.
    let mut console = Console::open(&c, "web1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.allod_ok(&["vm", "reboot", "web1", "--project", "p"]);
    if tokio::time::timeout(
        Duration::from_secs(60),
        console.expect("ALLOD-GUEST-BOOTED"),
    )
    .await
    .is_err()
    {
        let logs: Vec<String> = c
            .dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d.join("console")).into_iter().flatten())
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .collect();
        panic!(
            "no boot marker on the console; console logs: {logs:?}; VM {}",
            c.json(&["vm", "show", "web1", "--project", "p"])
        );
    }
    console.send("ping-allod\n");
    console.expect("echo:ping-allod").await;
    drop(console);

    // A disk is not pulled from under a running guest.
    let boot = vm["boot_volume"].as_str().unwrap().to_string();
    let err = c.allod_fails(&["vm", "detach", "web1", &boot, "--project", "p"]);
    assert!(err.contains("stop it"), "{err}");

    // Stop: ACPI first; this guest ignores it, so it is forced after 3 s.
    c.allod_ok(&["vm", "stop", "web1", "--project", "p"]);
    wait_state(&c, "web1", "stopped").await;
    assert_eq!(domain_states(&id), vec!["shut off"]);
    // Resized while stopped, then started with the new size.
    let err = c.allod_fails(&["vm", "update", "web1", "--project", "p", "--vcpus", "0"]);
    assert!(err.contains("vcpus"), "{err}");
    let v = c.json(&["vm", "update", "web1", "--project", "p", "--vcpus", "2"]);
    assert_eq!(v["vcpus"], 2);
    c.allod_ok(&["vm", "start", "web1", "--project", "p"]);
    let v = wait_state(&c, "web1", "running").await;
    assert_eq!(v["observed_generation"], v["generation"], "{v}");
    let xml = run(
        "virsh",
        &["-c", "qemu:///system", "dumpxml", &format!("allod-{id}")],
    );
    assert!(xml.contains("<vcpu placement='static'>2</vcpu>"), "{xml}");
    let err = c.allod_fails(&["vm", "update", "web1", "--project", "p", "--vcpus", "1"]);
    assert!(err.contains("must be stopped"), "{err}");
    c.allod_ok(&["vm", "force-stop", "web1", "--project", "p"]);
    wait_state(&c, "web1", "stopped").await;

    // A guest that powers itself off while its node's agent is down (SIGKILL)
    // is not started again behind its owner's back: once the agent is back,
    // the VM is reported stopped and wanted stopped.
    c.allod_ok(&["vm", "start", "web1", "--project", "p"]);
    let v = wait_state(&c, "web1", "running").await;
    let host1 = v["node"].as_u64().unwrap() as usize - 1;
    let mut console = Console::open(&c, "web1");
    // Lines typed before the guest has booted are lost: ask until it echoes.
    console.wait_until_echoing().await;
    console.send("off-in-2\n");
    console.expect("echo:off-in-2").await;
    drop(console);
    c.kill(host1);
    common::wait_for(
        "the guest to power itself off",
        Duration::from_secs(60),
        || domain_states(&id) == vec!["shut off"],
    )
    .await;
    c.restart(host1);
    let v = wait_state(&c, "web1", "stopped").await;
    assert_eq!(v["power"], "stopped", "{v}");
    assert_eq!(domain_states(&id), vec!["shut off"]);

    // An agent killed with SIGKILL right after a create: once it is back,
    // exactly one domain exists and it runs.
    let vm2 = c.json(&[
        "vm",
        "create",
        "web2",
        "--project",
        "p",
        "--image",
        "tiny",
        "--memory",
        "256M",
    ]);
    let id2 = vm2["id"].as_str().unwrap().to_string();
    made.0.push(id2.clone());
    let host = vm2["node"].as_u64().unwrap() as usize - 1;
    c.kill(host);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.restart(host);
    wait_state(&c, "web2", "running").await;
    assert_eq!(domain_states(&id2), vec!["running"]);

    // Deleting a VM removes its domain and its boot volume.
    c.allod_ok(&["vm", "delete", "web2", "--project", "p"]);
    c.allod_ok(&["vm", "delete", "web1", "--project", "p"]);
    common::wait_for("the domains to go", Duration::from_secs(30), || {
        domain_states(&id).is_empty() && domain_states(&id2).is_empty()
    })
    .await;
    assert_eq!(
        c.json(&["volume", "list", "--project", "p"]),
        serde_json::json!([])
    );
}
