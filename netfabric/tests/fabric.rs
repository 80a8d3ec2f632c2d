//! The fabric in network namespaces: two "nodes" joined by veth to an
//! underlay switch, an "outside" host on the same switch, and "VMs" as
//! namespaces whose veth the node sees as the VM's tap. Each node's fabric
//! runs on threads inside its namespace, as an agent would.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use netfabric::{
    Direction, Fabric, Ipv4Net, Location, NodeNetwork, Peer, Port, Protocol, Report, Rule,
    SecurityGroup, Subnet, Vpc,
};

fn sh(args: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(args)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "{args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ok(args: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("namespace exists");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap()
}

type Job = (
    NodeNetwork,
    bool,
    std::sync::mpsc::Sender<Result<Report, String>>,
);

/// A node: its namespace and a fabric running inside it.
struct Node {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    underlay: Ipv4Addr,
}

impl Node {
    fn start(ns: &str, underlay: Ipv4Addr, pins: PathBuf) -> Node {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Worker threads are spawned from here and share the namespace.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut fabric = Fabric::new(&pins);
                let mut dhcp = netfabric::dhcp::Dhcp::new();
                while let Some((network, restart, reply)) = rx.recv().await {
                    if restart {
                        fabric = Fabric::new(&pins);
                        dhcp = netfabric::dhcp::Dhcp::new();
                    }
                    let result = fabric.apply(&network).await.map_err(|e| {
                        let mut text = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            text.push_str(&format!(": {s}"));
                            source = s.source();
                        }
                        text
                    });
                    dhcp.update(&network);
                    let _ = reply.send(result);
                }
            });
        });
        Node { jobs, underlay }
    }

    fn apply(&self, network: &NodeNetwork) -> Report {
        self.send(network, false)
    }

    fn restart_and_apply(&self, network: &NodeNetwork) -> Report {
        self.send(network, true)
    }

    fn send(&self, network: &NodeNetwork, restart: bool) -> Report {
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs.send((network.clone(), restart, tx)).unwrap();
        rx.recv().unwrap().expect("fabric applies")
    }
}

/// The test world; everything is removed on drop.
struct World {
    prefix: String,
    namespaces: Vec<String>,
    _pins: tempfile::TempDir,
    nodes: Vec<Node>,
}

const OUTSIDE: &str = "10.99.0.100";

impl World {
    fn new(prefix: &str) -> World {
        let pins = tempfile::tempdir().unwrap();
        let mut world = World {
            prefix: prefix.to_string(),
            namespaces: Vec::new(),
            _pins: pins,
            nodes: Vec::new(),
        };
        let sw = world.ns("sw");
        sh(&format!(
            "ip -n {sw} link add sw type bridge && ip -n {sw} link set sw up && ip -n {sw} link set lo up"
        ));
        for (i, addr) in [(1, "10.99.0.1"), (2, "10.99.0.2")] {
            let node = world.ns(&format!("n{i}"));
            world.plug(&sw, &node, "eth0", &format!("{addr}/24"));
            let pins = world._pins.path().join(format!("n{i}"));
            world.nodes.push(Node::start(&node, ip(addr), pins));
        }
        let out = world.ns("out");
        world.plug(&sw, &out, "eth0", &format!("{OUTSIDE}/24"));
        world
    }

    fn ns(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &full]).output();
        sh(&format!(
            "ip netns add {full} && ip -n {full} link set lo up"
        ));
        self.namespaces.push(full.clone());
        full
    }

    fn plug(&self, sw: &str, ns: &str, dev: &str, addr: &str) {
        let port = format!("p{}", self.namespaces.len());
        sh(&format!(
            "ip link add {port} netns {sw} type veth peer name {dev} netns {ns} && \
             ip -n {sw} link set {port} master sw up && \
             ip -n {ns} addr add {addr} dev {dev} && ip -n {ns} link set {dev} up"
        ));
    }

    /// A "VM" on node `node` (0-based): a namespace whose `eth0` has `mac`
    /// and, unless it is to ask DHCP, `addr`; the node side is `ifname`.
    fn vm(
        &mut self,
        name: &str,
        node: usize,
        ifname: &str,
        mac: &str,
        addr: Option<(&str, &str)>,
    ) -> String {
        let vm = self.ns(name);
        let node_ns = format!("{}-n{}", self.prefix, node + 1);
        sh(&format!(
            "ip link add {ifname} netns {node_ns} type veth peer name eth0 netns {vm} && \
             ip -n {vm} link set eth0 address {mac} mtu 1450 up && ip -n {node_ns} link set {ifname} mtu 1450 up"
        ));
        if let Some((addr, gateway)) = addr {
            sh(&format!(
                "ip -n {vm} addr add {addr} dev eth0 && ip -n {vm} route add default via {gateway}"
            ));
        }
        vm
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn ping(from: &str, to: &str) -> bool {
    ok(&format!("ip netns exec {from} busybox ping -c 1 -W 1 {to}"))
}

/// Waits until `f` holds, for up to 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP server in `ns` on `port` that greets each client with
/// "`name` <client address>" and then echoes lines.
fn serve(ns: &str, port: u16, name: &'static str) {
    let listener = in_ns(ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let peer = stream.peer_addr().unwrap();
                let _ = writeln!(stream, "{name} {}", peer.ip());
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    let _ = stream.write_all(line.as_bytes());
                    line.clear();
                }
            });
        }
    });
}

/// Connects from `ns` (optionally from `source`) and reads the greeting.
fn connect(ns: &str, to: &str, port: u16, source: Option<&str>) -> Option<(String, TcpStream)> {
    let to: SocketAddr = format!("{to}:{port}").parse().unwrap();
    let source: Option<SocketAddr> = source.map(|s| format!("{s}:0").parse().unwrap());
    let stream = in_ns(ns, move || -> Option<TcpStream> {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        if let Some(source) = source {
            socket.bind(&source.into()).ok()?;
        }
        socket
            .connect_timeout(&to.into(), Duration::from_secs(2))
            .ok()?;
        Some(socket.into())
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).ok()?;
    Some((greeting.trim().to_string(), stream))
}

fn echo(stream: &mut TcpStream, text: &str) -> bool {
    if writeln!(stream, "{text}").is_err() {
        return false;
    }
    let mut buf = vec![0u8; text.len() + 1];
    stream.read_exact(&mut buf).is_ok() && buf.starts_with(text.as_bytes())
}

fn port(
    id: &str,
    mac: &str,
    addr: &str,
    here: bool,
    node: &Node,
    groups: &[&str],
    fip: Option<&str>,
) -> Port {
    Port {
        id: id.into(),
        mac: netfabric::parse_mac(mac).unwrap(),
        ip: ip(addr),
        location: if here {
            Location::Local {
                ifname: format!("alp{id}"),
                security_groups: groups.iter().map(|g| g.to_string()).collect(),
                floating_ip: fip.map(ip),
                hostname: id.into(),
            }
        } else {
            Location::Remote {
                vtep: node.underlay,
            }
        },
    }
}

fn allow_all(cidr: &str) -> SecurityGroup {
    SecurityGroup {
        rules: vec![Rule {
            direction: Direction::Ingress,
            protocol: Protocol::Any,
            ports: None,
            peer: Peer::Cidr(net(cidr)),
        }],
        members: vec![],
    }
}

/// (VNI, id, MAC, address, node, security groups, floating IP).
type PortSpec<'a> = (
    u32,
    &'a str,
    &'a str,
    &'a str,
    usize,
    &'a [&'a str],
    Option<&'a str>,
);

/// The network of node `me` given every VPC's ports as (VPC, port, node).
fn network_for(
    world: &World,
    me: usize,
    vpcs: &[(u32, Vec<Subnet>)],
    ports: &[PortSpec],
    groups: &BTreeMap<String, SecurityGroup>,
) -> NodeNetwork {
    NodeNetwork {
        underlay: Some(world.nodes[me].underlay),
        underlay_mtu: 1500,
        uplink: Some("eth0".into()),
        fip_pools: vec![net("10.99.0.200/29")],
        vpcs: vpcs
            .iter()
            .map(|(vni, subnets)| {
                let here: Vec<_> = ports.iter().filter(|p| p.0 == *vni).collect();
                Vpc {
                    vni: *vni,
                    subnets: subnets.clone(),
                    remote_vteps: here
                        .iter()
                        .filter(|p| p.4 != me)
                        .map(|p| world.nodes[p.4].underlay)
                        .collect(),
                    ports: here
                        .iter()
                        .map(|p| port(p.1, p.2, p.3, p.4 == me, &world.nodes[p.4], p.5, p.6))
                        .collect(),
                }
            })
            .collect(),
        security_groups: groups.clone(),
    }
}

fn subnet(cidr: &str, gateway: &str) -> Subnet {
    Subnet {
        cidr: net(cidr),
        gateway: ip(gateway),
        dns: vec![ip("192.0.2.53")],
    }
}

#[test]
fn same_subnet_works_across_nodes_and_equal_vpcs_stay_apart() {
    let mut w = World::new("nfa");
    let g: BTreeMap<String, SecurityGroup> =
        [("open".to_string(), allow_all("10.0.0.0/24"))].into();
    let vpcs = vec![
        (10, vec![subnet("10.0.0.0/24", "10.0.0.1")]),
        (11, vec![subnet("10.0.0.0/24", "10.0.0.1")]),
    ];
    let open: &[&str] = &["open"];
    // The same addresses in both VPCs, and a third VM only in VPC 11.
    let ports = [
        (10, "a1", "02:00:00:00:0a:01", "10.0.0.2", 0, open, None),
        (10, "a2", "02:00:00:00:0a:02", "10.0.0.3", 1, open, None),
        (11, "b1", "02:00:00:00:0b:01", "10.0.0.2", 0, open, None),
        (11, "b2", "02:00:00:00:0b:02", "10.0.0.3", 1, open, None),
        (11, "b3", "02:00:00:00:0b:03", "10.0.0.4", 1, open, None),
    ];
    for (name, node, mac, addr) in [
        ("a1", 0, "02:00:00:00:0a:01", "10.0.0.2/24"),
        ("a2", 1, "02:00:00:00:0a:02", "10.0.0.3/24"),
        ("b1", 0, "02:00:00:00:0b:01", "10.0.0.2/24"),
        ("b2", 1, "02:00:00:00:0b:02", "10.0.0.3/24"),
        ("b3", 1, "02:00:00:00:0b:03", "10.0.0.4/24"),
    ] {
        w.vm(
            name,
            node,
            &format!("alp{name}"),
            mac,
            Some((addr, "10.0.0.1")),
        );
    }
    for me in 0..2 {
        let n = network_for(&w, me, &vpcs, &ports, &g);
        w.nodes[me].apply(&n);
    }
    let ns = |n: &str| format!("nfa-{n}");
    eventually("a1 pings a2 on the other node", || {
        ping(&ns("a1"), "10.0.0.3")
    });
    assert!(ping(&ns("b1"), "10.0.0.3"), "b1 pings b2");
    serve(&ns("a2"), 7000, "a2");
    serve(&ns("b2"), 7000, "b2");
    let (greeting, mut stream) =
        connect(&ns("a1"), "10.0.0.3", 7000, None).expect("a1 reaches a2 over TCP");
    assert_eq!(greeting, "a2 10.0.0.2");
    assert!(
        echo(&mut stream, &"x".repeat(1400)),
        "a full-size segment crosses the overlay"
    );
    let (greeting, _) = connect(&ns("b1"), "10.0.0.3", 7000, None).expect("b1 reaches b2");
    assert_eq!(
        greeting, "b2 10.0.0.2",
        "VPC 11 reaches its own 10.0.0.3, never VPC 10's"
    );
    // 10.0.0.4 exists only in VPC 11: VPC 10 cannot reach it, either way.
    assert!(ping(&ns("b1"), "10.0.0.4"));
    assert!(
        !ping(&ns("a1"), "10.0.0.4"),
        "VPC 10 reaches a VM of VPC 11"
    );
    // b3 reaches 10.0.0.2 of its own VPC (b1), never a1.
    serve(&ns("a1"), 7001, "a1");
    serve(&ns("b1"), 7001, "b1");
    let (greeting, _) = connect(&ns("b3"), "10.0.0.2", 7001, None).expect("b3 reaches b1");
    assert_eq!(greeting, "b1 10.0.0.4");

    // A restarted fabric with the same network changes nothing.
    for me in 0..2 {
        let n = network_for(&w, me, &vpcs, &ports, &g);
        let report = w.nodes[me].restart_and_apply(&n);
        assert!(
            report.actions.is_empty(),
            "node {me} after restart: {:?}",
            report.actions
        );
        assert_eq!(
            report.firewall_changes, 0,
            "node {me} firewall after restart"
        );
    }
    assert!(
        echo(&mut stream, "still here"),
        "the connection outlives a restart"
    );
}

#[test]
fn routes_between_subnets_nats_egress_and_serves_floating_ips() {
    let mut w = World::new("nfb");
    let g: BTreeMap<String, SecurityGroup> = [("open".to_string(), allow_all("0.0.0.0/0"))].into();
    let vpcs = vec![(
        20,
        vec![
            subnet("10.1.1.0/24", "10.1.1.1"),
            subnet("10.1.2.0/24", "10.1.2.1"),
        ],
    )];
    let open: &[&str] = &["open"];
    let ports = [
        (20, "x", "02:00:00:00:01:01", "10.1.1.10", 0, open, None),
        (
            20,
            "y",
            "02:00:00:00:01:02",
            "10.1.2.10",
            1,
            open,
            Some("10.99.0.201"),
        ),
    ];
    w.vm(
        "x",
        0,
        "alpx",
        "02:00:00:00:01:01",
        Some(("10.1.1.10/24", "10.1.1.1")),
    );
    w.vm(
        "y",
        1,
        "alpy",
        "02:00:00:00:01:02",
        Some(("10.1.2.10/24", "10.1.2.1")),
    );
    for me in 0..2 {
        let n = network_for(&w, me, &vpcs, &ports, &g);
        w.nodes[me].apply(&n);
    }
    eventually("x reaches y in another subnet on another node", || {
        ping("nfb-x", "10.1.2.10")
    });
    serve("nfb-y", 7000, "y");
    serve("nfb-out", 7000, "out");
    let (greeting, _) = connect("nfb-x", "10.1.2.10", 7000, None).expect("routed TCP");
    assert_eq!(greeting, "y 10.1.1.10", "routing keeps the source address");
    // Egress NAT: the outside sees the node's own address.
    let (greeting, _) = connect("nfb-x", OUTSIDE, 7000, None).expect("x reaches the outside");
    assert_eq!(greeting, "out 10.99.0.1");
    // A floating IP: reachable from outside, and y's own traffic leaves from it.
    let (greeting, mut stream) =
        connect("nfb-out", "10.99.0.201", 7000, None).expect("the floating IP answers");
    assert_eq!(greeting, format!("y {OUTSIDE}"), "y sees the real client");
    assert!(echo(&mut stream, "through the floating IP"));
    let local = stream.peer_addr().unwrap();
    assert_eq!(
        local.ip().to_string(),
        "10.99.0.201",
        "the reply comes from the floating IP"
    );
    let (greeting, _) = connect("nfb-y", OUTSIDE, 7000, None).expect("y reaches the outside");
    assert_eq!(
        greeting, "out 10.99.0.201",
        "y's egress leaves from its floating IP"
    );

    // Moving the floating IP away stops it answering.
    let ports2 = [
        ports[0],
        (20, "y", "02:00:00:00:01:02", "10.1.2.10", 1, open, None),
    ];
    for me in 0..2 {
        let n = network_for(&w, me, &vpcs, &ports2, &g);
        w.nodes[me].apply(&n);
    }
    assert!(connect("nfb-out", "10.99.0.201", 7000, None).is_none());
}

#[test]
fn security_groups_filter_statefully_and_drop_spoofing() {
    let mut w = World::new("nfc");
    let ssh = SecurityGroup {
        rules: vec![Rule {
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            ports: Some((22, 22)),
            peer: Peer::Cidr(net("10.2.0.0/28")),
        }],
        members: vec![],
    };
    let mut g: BTreeMap<String, SecurityGroup> = [
        ("ssh".to_string(), ssh),
        ("none".to_string(), SecurityGroup::default()),
    ]
    .into();
    let vpcs = vec![(30, vec![subnet("10.2.0.0/24", "10.2.0.1")])];
    let ports = [
        (
            30,
            "s",
            "02:00:00:00:02:01",
            "10.2.0.2",
            1,
            &["ssh"][..],
            None,
        ),
        (
            30,
            "c1",
            "02:00:00:00:02:05",
            "10.2.0.5",
            0,
            &["none"][..],
            None,
        ),
        (
            30,
            "c2",
            "02:00:00:00:02:20",
            "10.2.0.20",
            0,
            &["none"][..],
            None,
        ),
    ];
    w.vm(
        "s",
        1,
        "alps",
        "02:00:00:00:02:01",
        Some(("10.2.0.2/24", "10.2.0.1")),
    );
    w.vm(
        "c1",
        0,
        "alpc1",
        "02:00:00:00:02:05",
        Some(("10.2.0.5/24", "10.2.0.1")),
    );
    w.vm(
        "c2",
        0,
        "alpc2",
        "02:00:00:00:02:20",
        Some(("10.2.0.20/24", "10.2.0.1")),
    );
    let apply = |w: &World, g: &BTreeMap<String, SecurityGroup>| {
        for me in 0..2 {
            let n = network_for(w, me, &vpcs, &ports, g);
            w.nodes[me].apply(&n);
        }
    };
    apply(&w, &g);
    serve("nfc-s", 22, "s22");
    serve("nfc-s", 23, "s23");
    serve("nfc-c1", 22, "c1");
    let mut held = None;
    eventually("c1 reaches s on tcp/22", || {
        held = connect("nfc-c1", "10.2.0.2", 22, None);
        held.is_some()
    });
    let (_, mut held) = held.unwrap();
    assert!(
        connect("nfc-c2", "10.2.0.2", 22, None).is_none(),
        "c2 is outside the rule's CIDR"
    );
    assert!(
        connect("nfc-c1", "10.2.0.2", 23, None).is_none(),
        "tcp/23 is not open"
    );
    assert!(!ping("nfc-c1", "10.2.0.2"), "ICMP is not open");
    // Ingress is denied by default: s cannot open a connection to c1, though
    // c1 answered s's... replies to s's own connections pass.
    assert!(
        connect("nfc-s", "10.2.0.5", 22, None).is_none(),
        "c1 takes nothing in"
    );
    // An interface on the VPC's bridge that is no port of Allod's (here an
    // address the rule would let in) gets nothing through.
    w.vm(
        "x",
        0,
        "alpzz",
        "02:00:00:00:02:09",
        Some(("10.2.0.9/24", "10.2.0.1")),
    );
    sh("ip -n nfc-n1 link set alpzz master albr-30");
    assert!(
        connect("nfc-x", "10.2.0.2", 22, None).is_none(),
        "an unknown interface on the bridge reached s"
    );
    apply(&w, &g);
    let link = Command::new("ip")
        .args(["-n", "nfc-n1", "link", "show", "alpzz"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("master"),
        "the fabric left an unknown interface on its bridge"
    );
    // A spoofed source inside the allowed CIDR is dropped at c1's port.
    sh("ip -n nfc-c1 addr add 10.2.0.6/24 dev eth0");
    assert!(
        connect("nfc-c1", "10.2.0.2", 22, Some("10.2.0.6")).is_none(),
        "a source address that is not c1's own gets through"
    );
    // Changing the rules keeps the established connection.
    g.get_mut("ssh").unwrap().rules.push(Rule {
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        ports: Some((23, 23)),
        peer: Peer::Cidr(net("10.2.0.16/28")),
    });
    apply(&w, &g);
    assert!(echo(&mut held, "after a rule was added"));
    assert!(
        connect("nfc-c2", "10.2.0.2", 23, None).is_some(),
        "the new rule lets c2 in on 23"
    );
    g.get_mut("ssh").unwrap().rules.remove(0);
    apply(&w, &g);
    assert!(
        echo(&mut held, "after its own rule was removed"),
        "established connections stay"
    );
    assert!(
        connect("nfc-c1", "10.2.0.2", 22, None).is_none(),
        "new connections follow the new rules"
    );

    // A rule naming another group lets that group's members in, and no one
    // else.
    g.insert(
        "peers".into(),
        SecurityGroup {
            rules: vec![],
            members: vec![ip("10.2.0.20")],
        },
    );
    g.get_mut("ssh").unwrap().rules.push(Rule {
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        ports: Some((24, 24)),
        peer: Peer::Group("peers".into()),
    });
    serve("nfc-s", 24, "s24");
    apply(&w, &g);
    assert_eq!(
        connect("nfc-c2", "10.2.0.2", 24, None).map(|c| c.0),
        Some("s24 10.2.0.20".to_string()),
        "a member of the peer group is let in"
    );
    assert!(
        connect("nfc-c1", "10.2.0.2", 24, None).is_none(),
        "c1 is not a member of the peer group"
    );

    // Egress is open until a group restricts it, then only what its rules
    // allow leaves the port.
    assert!(connect("nfc-c2", "10.2.0.2", 23, None).is_some());
    g.get_mut("none").unwrap().rules.push(Rule {
        direction: Direction::Egress,
        protocol: Protocol::Tcp,
        ports: Some((24, 24)),
        peer: Peer::Cidr(net("10.2.0.2/32")),
    });
    apply(&w, &g);
    assert!(
        connect("nfc-c2", "10.2.0.2", 24, None).is_some(),
        "the egress rule allows tcp/24 to s"
    );
    assert!(
        connect("nfc-c2", "10.2.0.2", 23, None).is_none(),
        "egress to tcp/23 is no longer allowed"
    );
}

#[test]
fn dhcp_hands_out_the_ipam_address_router_dns_and_mtu() {
    let mut w = World::new("nfd");
    let g: BTreeMap<String, SecurityGroup> =
        [("none".to_string(), SecurityGroup::default())].into();
    let vpcs = vec![(40, vec![subnet("10.3.0.0/24", "10.3.0.1")])];
    let ports = [(
        40,
        "d",
        "02:00:00:00:03:07",
        "10.3.0.7",
        0,
        &["none"][..],
        None,
    )];
    let vm = w.vm("d", 0, "alpd", "02:00:00:00:03:07", None);
    let n = network_for(&w, 0, &vpcs, &ports, &g);
    w.nodes[0].apply(&n);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script");
    let out = dir.path().join("lease");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu\" > {}\nexit 0\n",
            out.display()
        ),
    )
    .unwrap();
    sh(&format!("chmod +x {}", script.display()));
    sh(&format!(
        "ip netns exec {vm} busybox udhcpc -i eth0 -n -q -f -t 5 -T 1 -O mtu -s {}",
        script.display()
    ));
    let lease = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        lease.trim(),
        "ip=10.3.0.7 mask=24 router=10.3.0.1 dns=192.0.2.53 mtu=1450"
    );
}
