//! Builds one node of the network benchmark (`.ci/bench-network`) in the
//! current network namespace, and times rule changes.
//!
//! ```text
//! fabric_bench NODE NETNS_DIR RULES [CHANGES]
//! ```
//!
//! Two nodes (NODE 0 and 1, underlay 10.99.0.1 and .2) share VPC 7 with the
//! subnet 10.7.0.0/24; node N hosts port 10.7.0.1N behind host interface
//! `alpbenchN`. Both ports carry one security group: a rule letting in
//! everything from the subnet, and RULES − 1 more TCP rules from other
//! networks. With CHANGES, one rule is then added and removed CHANGES times
//! and each apply is timed. Prints one JSON object.

use std::net::Ipv4Addr;
use std::time::Instant;

use netfabric::{
    Direction, Fabric, Ipv4Net, Location, NodeNetwork, Peer, Port, Protocol, Rule, SecurityGroup,
    Subnet, Vpc,
};

const GROUP: &str = "bench/sg";

fn network(node: usize, rules: usize) -> NodeNetwork {
    let underlay = |n: usize| Ipv4Addr::new(10, 99, 0, 1 + n as u8);
    let ports = (0..2)
        .map(|n| Port {
            id: format!("bench{n}"),
            mac: [0x02, 0, 0, 7, 0, 0x10 + n as u8],
            ip: Ipv4Addr::new(10, 7, 0, 10 + n as u8),
            location: if n == node {
                Location::Local {
                    ifname: format!("alpbench{n}"),
                    security_groups: vec![GROUP.into()],
                    floating_ip: None,
                    hostname: format!("vm{n}"),
                }
            } else {
                Location::Remote { vtep: underlay(n) }
            },
        })
        .collect();
    let mut group = SecurityGroup {
        rules: vec![Rule {
            direction: Direction::Ingress,
            protocol: Protocol::Any,
            ports: None,
            peer: Peer::Cidr("10.7.0.0/24".parse().unwrap()),
        }],
        members: vec![Ipv4Addr::new(10, 7, 0, 10), Ipv4Addr::new(10, 7, 0, 11)],
    };
    for i in 1..rules {
        let port = 1024 + (i % 60_000) as u16;
        let base = u32::from(Ipv4Addr::new(172, 16, 0, 0)) + ((i as u32) << 4);
        group.rules.push(Rule {
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            ports: Some((port, port)),
            peer: Peer::Cidr(Ipv4Net::new(Ipv4Addr::from(base), 28).unwrap()),
        });
    }
    NodeNetwork {
        underlay: Some(underlay(node)),
        underlay_mtu: 1500,
        uplink: None,
        fip_pools: Vec::new(),
        vpcs: vec![Vpc {
            vni: 7,
            subnets: vec![Subnet {
                cidr: "10.7.0.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 7, 0, 1),
                dns: Vec::new(),
            }],
            remote_vteps: vec![underlay(1 - node)],
            ports,
        }],
        security_groups: [(GROUP.to_string(), group)].into(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fabric_bench NODE(0|1) NETNS_DIR RULES [CHANGES]";
    let (Some(node), Some(dir), Some(rules)) = (
        args.first().and_then(|a| a.parse::<usize>().ok()),
        args.get(1),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    if node > 1 || rules == 0 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let changes: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut fabric = Fabric::new(dir);
        let base = network(node, rules);
        let started = Instant::now();
        if let Err(e) = fabric.apply(&base).await {
            eprintln!("cannot build the node: {e}");
            std::process::exit(1);
        }
        let build_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut added = network(node, rules);
        added
            .security_groups
            .get_mut(GROUP)
            .unwrap()
            .rules
            .push(Rule {
                direction: Direction::Ingress,
                protocol: Protocol::Tcp,
                ports: Some((22, 22)),
                peer: Peer::Cidr("192.0.2.0/24".parse().unwrap()),
            });
        let mut change_ms = Vec::new();
        for i in 0..changes {
            let next = if i % 2 == 0 { &added } else { &base };
            let started = Instant::now();
            match fabric.apply(next).await {
                Ok(report) if report.firewall_changes > 0 && report.actions.is_empty() => {}
                Ok(report) => {
                    eprintln!("a rule change did not change only the firewall: {report:?}");
                    std::process::exit(1);
                }
                Err(e) => {
                    eprintln!("cannot apply a rule change: {e}");
                    std::process::exit(1);
                }
            }
            change_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{}",
            serde_json::json!({ "rules": rules, "build_ms": build_ms, "change_ms": change_ms })
        );
    });
}
