//! Tenant networks end to end on one node in a network namespace: the CLI
//! of the interface contract, refusals of bad input that leave the kernel
//! untouched, a "VM" namespace on a port getting its address by DHCP, and
//! an agent restart that changes nothing in the kernel. Then a real guest
//! under libvirt (TCG) with a NIC on a subnet, on a node in the host's own
//! namespace (where libvirt makes its taps).

mod common;
mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_allod");
const NS: &str = "anet-node";
const VM: &str = "anet-vm";

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Node {
    child: Child,
    dir: tempfile::TempDir,
    /// The node's namespace; None: the host's.
    netns: Option<&'static str>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
            eprintln!("agent log:\n{log}");
        }
        if self.netns.is_some() {
            for ns in [NS, VM] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }
}

fn start(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    // nsenter, not `ip netns exec`: the latter gives the agent a mount
    // namespace of its own, and the router namespaces it pins would die
    // with it; a node's agent runs in the host's mount namespace.
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NS}"))
        .args([BIN, "up", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--libvirt-uri", "none", "--uplink", "none"])
        .args(["--underlay-address", "10.98.0.1", "--netns-dir"])
        .arg(dir.join("pins"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn allod(node: &Node, args: &[&str]) -> Output {
    let mut command = match node.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    command
        .args(args)
        .arg("--data-dir")
        .arg(node.dir.path().join("data"))
        .output()
        .unwrap()
}

fn json(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = allod(node, &all);
    assert!(
        out.status.success(),
        "allod {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn refused(node: &Node, args: &[&str], says: &str) {
    let out = allod(node, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "allod {args:?} was accepted");
    assert!(
        stderr.contains(says),
        "allod {args:?} said {stderr:?}, not {says:?}"
    );
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What restarting must not change: each link's index, name, master and
/// MTU, and every rule with its handle (packet counters left out: they
/// move with traffic, not with changes).
fn kernel_state() -> String {
    let links = sh(&format!("ip -n {NS} -o link show"));
    let links: Vec<String> = links
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let after = |key: &str| {
                fields
                    .iter()
                    .position(|f| *f == key)
                    .and_then(|i| fields.get(i + 1))
                    .copied()
                    .unwrap_or("-")
            };
            format!(
                "{} {} master {} mtu {}",
                fields[0],
                fields[1],
                after("master"),
                after("mtu")
            )
        })
        .collect();
    let rules: Vec<String> = sh(&format!("ip netns exec {NS} nft -a list ruleset"))
        .lines()
        .map(|l| match l.find("counter packets") {
            Some(at) => {
                let rest = &l[at..];
                let end = rest
                    .find(" bytes ")
                    .and_then(|b| rest[b + 7..].find(' ').map(|e| b + 7 + e))
                    .unwrap_or(rest.len());
                format!("{}counter{}", &l[..at], &rest[end..])
            }
            None => l.to_string(),
        })
        .collect();
    format!("{}\n{}", links.join("\n"), rules.join("\n"))
}

#[test]
fn the_cli_builds_a_vpc_a_vm_gets_its_address_and_a_restart_changes_nothing() {
    for ns in [NS, VM] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
    }
    sh(&format!(
        "ip -n {NS} link add eth0 type veth peer name eth1 && ip -n {NS} link set eth0 up && \
         ip -n {NS} link set eth1 up && ip -n {NS} addr add 10.98.0.1/24 dev eth0"
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node {
        child: start(dir.path()),
        dir,
        netns: Some(NS),
    };
    eventually("the node answers", || {
        allod(&node, &["project", "create", "p"]).status.success()
    });

    let vpc = json(&node, &["vpc", "create", "web", "--project", "p"]);
    let vni = vpc["vni"].as_u64().expect("a VNI");
    let subnet = json(
        &node,
        &[
            "subnet",
            "create",
            "front",
            "--vpc",
            "web",
            "--cidr",
            "10.0.0.0/24",
            "--project",
            "p",
            "--dns",
            "192.0.2.53",
        ],
    );
    assert_eq!(subnet["gateway"], "10.0.0.1");
    json(&node, &["sg", "create", "ssh", "--project", "p"]);
    let sg = json(
        &node,
        &[
            "sg",
            "rule",
            "add",
            "ssh",
            "--project",
            "p",
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--port",
            "22",
            "--cidr",
            "192.0.2.0/24",
        ],
    );
    assert_eq!(sg["rules"][0]["port_min"], 22);
    // A rule goes by its id; a group goes when nothing uses it.
    let id = sg["rules"][0]["id"].as_str().unwrap().to_string();
    let sg = json(
        &node,
        &["sg", "rule", "delete", "ssh", &id, "--project", "p"],
    );
    assert_eq!(sg["rules"], serde_json::json!([]));
    refused(
        &node,
        &["sg", "rule", "delete", "ssh", &id, "--project", "p"],
        "has no rule",
    );
    json(&node, &["sg", "create", "tmp", "--project", "p"]);
    json(
        &node,
        &[
            "sg",
            "rule",
            "add",
            "tmp",
            "--project",
            "p",
            "--protocol",
            "any",
            "--remote-group",
            "ssh",
        ],
    );
    refused(
        &node,
        &["sg", "delete", "ssh", "--project", "p"],
        "is named by a rule of group \"tmp\"",
    );
    assert!(allod(&node, &["sg", "delete", "tmp", "--project", "p"])
        .status
        .success());
    assert!(allod(&node, &["sg", "delete", "ssh", "--project", "p"])
        .status
        .success());
    let groups = json(&node, &["sg", "list", "--project", "p"]);
    assert_eq!(groups.as_array().unwrap().len(), 1, "{groups}");
    assert_eq!(groups[0]["name"], "default");
    json(
        &node,
        &["ip-pool", "create", "public", "--cidr", "198.51.100.0/28"],
    );
    let fip = json(&node, &["fip", "allocate", "--project", "p"]);
    assert_eq!(fip["ip"], "198.51.100.1");

    // Bad input: clear refusals, nothing built.
    let before = kernel_state();
    refused(
        &node,
        &[
            "subnet",
            "create",
            "half",
            "--vpc",
            "web",
            "--cidr",
            "10.0.0.128/25",
            "--project",
            "p",
        ],
        "overlaps subnet \"front\"",
    );
    refused(
        &node,
        &[
            "subnet",
            "create",
            "back",
            "--vpc",
            "web",
            "--cidr",
            "10.0.1.0/24",
            "--gateway",
            "10.0.2.1",
            "--project",
            "p",
        ],
        "is not a host address of 10.0.1.0/24",
    );
    refused(
        &node,
        &[
            "sg",
            "rule",
            "add",
            "default",
            "--project",
            "p",
            "--port",
            "70000",
            "--cidr",
            "0.0.0.0/0",
        ],
        "port 70000 is out of range",
    );
    refused(
        &node,
        &["ip-pool", "create", "clash", "--cidr", "10.0.0.0/16"],
        "overlaps subnet \"front\"",
    );
    assert_eq!(
        kernel_state(),
        before,
        "a refused request changed the kernel"
    );
    assert!(
        !before.contains("albr-"),
        "no port yet, yet a bridge exists"
    );

    // A port, and a "VM" on its host interface asking DHCP.
    let port = json(
        &node,
        &[
            "port",
            "create",
            "vm1",
            "--subnet",
            "front",
            "--project",
            "p",
        ],
    );
    assert_eq!(port["ip"], "10.0.0.2");
    let tap = port["host_interface"].as_str().unwrap();
    let mac = port["mac"].as_str().unwrap();
    sh(&format!(
        "ip link add {tap} netns {NS} type veth peer name eth0 netns {VM} && \
         ip -n {VM} link set eth0 address {mac} up"
    ));
    eventually("the port is on the VPC's bridge", || {
        sh(&format!("ip -n {NS} link show {tap}")).contains(&format!("master albr-{vni}"))
    });
    let script = node.dir.path().join("udhcpc.sh");
    let lease = node.dir.path().join("lease");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip/$mask via $router dns $dns mtu $mtu\" > {}\nexit 0\n",
            lease.display()
        ),
    )
    .unwrap();
    sh(&format!("chmod +x {}", script.display()));
    sh(&format!(
        "ip netns exec {VM} busybox udhcpc -i eth0 -n -q -f -t 10 -T 1 -O mtu -s {}",
        script.display()
    ));
    assert_eq!(
        std::fs::read_to_string(&lease).unwrap().trim(),
        "10.0.0.2/24 via 10.0.0.1 dns 192.0.2.53 mtu 1450"
    );
    sh(&format!("ip -n {VM} addr add 10.0.0.2/24 dev eth0"));
    sh(&format!(
        "ip netns exec {VM} busybox ping -c 1 -W 2 10.0.0.1"
    ));

    // Restart with the state unchanged: the kernel keeps every link and rule.
    let before = kernel_state();
    let _ = node.child.kill();
    let _ = node.child.wait();
    node.child = start(node.dir.path());
    eventually("the restarted node answers", || {
        allod(&node, &["vpc", "list", "--project", "p"])
            .status
            .success()
    });
    // The restarted reconciler's first pass compares everything.
    let log = node.dir.path().join("agent.log");
    eventually("the restarted node checks its network", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("network checked against the kernel after start")
            .count()
            == 2
    });
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("registered this node's underlay address"));
    assert_eq!(kernel_state(), before, "the restart changed the kernel");
    sh(&format!(
        "ip netns exec {VM} busybox ping -c 1 -W 2 10.0.0.1"
    ));
}

/// Removes what the host-namespace node built, however the test ends: the
/// domain, then the VPC's links, the router namespace pin and the tables.
struct HostNetwork {
    vni: Option<u64>,
    domain: Option<String>,
    pins: std::path::PathBuf,
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        if let Some(d) = &self.domain {
            for verb in ["destroy", "undefine"] {
                let _ = Command::new("virsh")
                    .args(["-c", "qemu:///system", verb, d])
                    .output();
            }
        }
        if let Some(vni) = self.vni {
            for link in ["albr", "alvx", "algw", "alex"] {
                let _ = Command::new("ip")
                    .args(["link", "del", &format!("{link}-{vni}")])
                    .output();
            }
            let pin = self.pins.join(format!("alrt-{vni}"));
            let _ = Command::new("umount").arg(&pin).output();
        }
        for family in ["bridge", "inet"] {
            let _ = Command::new("nft")
                .args(["delete", "table", family, "allod"])
                .output();
        }
    }
}

#[test]
fn a_guest_under_libvirt_gets_its_nic_address_by_dhcp_and_reaches_its_gateway() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt-qemu and must reach the node's NBD socket.
    sh(&format!("chmod 755 {}", dir.path().display()));
    let mut host = HostNetwork {
        vni: None,
        domain: None,
        pins: dir.path().join("pins"),
    };
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let child = Command::new(BIN)
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--api-listen",
            &format!("127.0.0.1:{}", support::free_port()),
        ])
        .args([
            "--peer-listen",
            &format!("127.0.0.1:{}", support::free_port()),
        ])
        .args(["--storage-listen", "127.0.0.1:0"])
        .args(["--virt-type", "qemu", "--uplink", "none"])
        // No other node: the VXLAN device needs a source address only.
        .args(["--underlay-address", "10.98.1.1", "--netns-dir"])
        .arg(&host.pins)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let node = Node {
        child,
        dir,
        netns: None,
    };
    eventually("the node answers", || {
        allod(&node, &["project", "create", "p"]).status.success()
    });
    let vpc = json(&node, &["vpc", "create", "v", "--project", "p"]);
    let vni = vpc["vni"].as_u64().unwrap();
    host.vni = Some(vni);
    json(
        &node,
        &[
            "subnet",
            "create",
            "web",
            "--vpc",
            "v",
            "--cidr",
            "10.77.0.0/24",
            "--project",
            "p",
            "--dns",
            "192.0.2.53",
        ],
    );
    // The guest asks for a lease, says what it got on its serial console,
    // takes the address and pings its gateway.
    let kit = tempfile::tempdir().unwrap();
    let disk = support::build_boot_disk(
        kit.path(),
        "printf '#!/bin/sh\n[ \"$1\" = bound ] && echo \"LEASE $ip/$mask via $router dns $dns mtu $mtu\" > /dev/ttyS0 && ip addr add $ip/$mask dev $interface\nexit 0\n' > /bin/lease\n\
         chmod 755 /bin/lease\n\
         ip link set lo up\n\
         ip link set eth0 up\n\
         udhcpc -i eth0 -n -q -f -t 20 -T 2 -O mtu -s /bin/lease\n\
         ping -c 3 -W 5 10.77.0.1 > /dev/null && echo GATEWAY-ANSWERS > /dev/ttyS0\n\
         while true; do sleep 60; done",
    );
    let image = allod(
        &node,
        &["image", "import", disk.to_str().unwrap(), "--name", "tiny"],
    );
    assert!(
        image.status.success(),
        "{}",
        String::from_utf8_lossy(&image.stderr)
    );
    refused(
        &node,
        &[
            "vm",
            "create",
            "bad",
            "--project",
            "p",
            "--memory",
            "256M",
            "--nic",
            "sg=default",
        ],
        "a NIC needs subnet=NAME",
    );
    refused(
        &node,
        &[
            "vm",
            "create",
            "bad",
            "--project",
            "p",
            "--memory",
            "256M",
            "--image",
            "tiny",
            "--nic",
            "subnet=nowhere",
        ],
        "subnet \"nowhere\" does not exist",
    );
    assert_eq!(
        json(&node, &["port", "list", "--project", "p"]),
        serde_json::json!([]),
        "a refused VM left a port behind"
    );
    let vm = json(
        &node,
        &[
            "vm",
            "create",
            "g1",
            "--project",
            "p",
            "--memory",
            "256M",
            "--image",
            "tiny",
            "--nic",
            "subnet=web,sg=default",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_string();
    host.domain = Some(format!("allod-{id}"));
    assert_eq!(vm["nics"][0]["port"], "g1-nic0");
    assert_eq!(vm["nics"][0]["ip"], "10.77.0.2");
    let ports = json(&node, &["port", "list", "--project", "p"]);
    let port = &ports[0];
    assert_eq!(port["name"], "g1-nic0");
    assert_eq!(port["vm"], "g1");
    assert_eq!(port["mac"], vm["nics"][0]["mac"]);
    let tap = port["host_interface"].as_str().unwrap().to_string();
    refused(
        &node,
        &["port", "delete", "g1-nic0", "--project", "p"],
        "is a NIC of VM \"g1\"",
    );

    let console = node.dir.path().join(format!("data/console/{id}.log"));
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("GATEWAY-ANSWERS") {
            assert!(
                text.contains("LEASE 10.77.0.2/24 via 10.77.0.1 dns 192.0.2.53 mtu 1450"),
                "the guest's lease: {text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not reach its gateway in 240 s; its console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        sh(&format!("ip link show {tap}")).contains(&format!("master albr-{vni}")),
        "libvirt's tap is not on the VPC's bridge"
    );

    // Deleting the VM deletes its port; the VPC leaves the node.
    let out = allod(&node, &["vm", "delete", "g1", "--project", "p"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json(&node, &["port", "list", "--project", "p"]),
        serde_json::json!([])
    );
    eventually("the VPC's links are gone from the node", || {
        !sh("ip -o link show").contains(&format!("albr-{vni}"))
    });
}
