//! Where a VM runs: a pure function of the nodes as the cluster state knows
//! them and the VM's request. No I/O, so it is tested exhaustively.
//!
//! Filters, in order: the node is alive (not suspect or dead in the
//! leader's failure detection), it accepts work (not in maintenance), its zone
//! may host the project's zone ([`crate::state::zones::may_host`]: a dedicated node
//! never hosts another zone, and the shared pool never hosts OFFICIAL-SENSITIVE
//! or SECRET), it has room for the vCPUs and memory after overcommit, and it
//! holds no VM of the same anti-affinity group. Among the nodes left, the
//! least loaded wins (spread), ties to the lowest id so that the answer is
//! deterministic.

use std::collections::BTreeMap;

use crate::state::zones::Zone;

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: u64,
    pub name: String,
    pub zone: Zone,
    /// A node in maintenance takes no new VMs.
    pub maintenance: bool,
    /// A node the failure detection holds suspect or dead takes none either.
    pub down: bool,
    pub vcpus: u64,
    pub memory_bytes: u64,
    /// What the VMs already placed here ask for.
    pub used_vcpus: u64,
    pub used_memory_bytes: u64,
    /// Anti-affinity groups of the VMs placed here, with their counts.
    pub groups: BTreeMap<String, u32>,
}

/// What a VM needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub zone: Zone,
    pub vcpus: u64,
    pub memory_bytes: u64,
    pub anti_affinity: Option<String>,
}

/// How far the sum of VMs may exceed a node's real capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overcommit {
    pub cpu: f64,
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Overcommit {
    /// Four vCPUs per core; memory is not overcommitted.
    pub const DEFAULT: Overcommit = Overcommit {
        cpu: 4.0,
        memory: 1.0,
    };

    /// As commands carry it: vCPUs and memory per 100 physical units.
    pub fn from_percent(cpu_percent: u32, memory_percent: u32) -> Self {
        Self {
            cpu: f64::from(cpu_percent) / 100.0,
            memory: f64::from(memory_percent) / 100.0,
        }
    }

    pub fn cpu_percent(&self) -> u32 {
        (self.cpu * 100.0).round() as u32
    }

    pub fn memory_percent(&self) -> u32 {
        (self.memory * 100.0).round() as u32
    }
}

pub fn default_cpu_percent() -> u32 {
    Overcommit::default().cpu_percent()
}

pub fn default_memory_percent() -> u32 {
    Overcommit::default().memory_percent()
}

/// Why no node fits, counted per reason, so the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refusal {
    pub down: usize,
    pub maintenance: usize,
    /// Nodes that joined but have not yet reported their capacity.
    pub not_reporting: usize,
    pub wrong_zone: usize,
    pub no_cpu: usize,
    pub no_memory: usize,
    pub anti_affinity: usize,
    pub zone: Option<Zone>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut reasons = Vec::new();
        let mut add = |count: usize, what: String| {
            if count > 0 {
                reasons.push(format!("{count} {what}"));
            }
        };
        let zone = self.zone.map_or("this", |z| z.as_str());
        add(
            self.wrong_zone,
            format!("not dedicated to the project's {zone} zone (label one with `PUT /v1/nodes/ID/zone`)"),
        );
        add(self.down, "down or not answering".into());
        add(self.maintenance, "in maintenance".into());
        add(
            self.not_reporting,
            "not yet reporting their capacity (a node reports it a few seconds after it starts; try again shortly)".into(),
        );
        add(self.no_cpu, "without enough free vCPUs".into());
        add(self.no_memory, "without enough free memory".into());
        add(
            self.anti_affinity,
            "already running a VM of its anti-affinity group".into(),
        );
        if reasons.is_empty() {
            write!(f, "no node can host the VM: the cluster has no nodes")
        } else {
            write!(f, "no node can host the VM: {}", reasons.join(", "))
        }
    }
}

fn room(capacity: u64, ratio: f64, used: u64) -> u64 {
    ((capacity as f64 * ratio) as u64).saturating_sub(used)
}

/// The node a VM should run on, or why there is none.
pub fn place(
    nodes: &[Candidate],
    request: &Request,
    overcommit: Overcommit,
) -> Result<u64, Refusal> {
    let mut refusal = Refusal {
        zone: Some(request.zone),
        ..Refusal::default()
    };
    let mut best: Option<(f64, u64)> = None;
    for node in nodes {
        if crate::state::zones::may_host(request.zone, node.zone).is_err() {
            refusal.wrong_zone += 1;
            continue;
        }
        if node.down {
            refusal.down += 1;
            continue;
        }
        if node.maintenance {
            refusal.maintenance += 1;
            continue;
        }
        if node.vcpus == 0 || node.memory_bytes == 0 {
            refusal.not_reporting += 1;
            continue;
        }
        let free_cpu = room(node.vcpus, overcommit.cpu, node.used_vcpus);
        let free_memory = room(node.memory_bytes, overcommit.memory, node.used_memory_bytes);
        if free_cpu < request.vcpus {
            refusal.no_cpu += 1;
            continue;
        }
        if free_memory < request.memory_bytes {
            refusal.no_memory += 1;
            continue;
        }
        if request
            .anti_affinity
            .as_ref()
            .is_some_and(|g| node.groups.get(g).copied().unwrap_or(0) > 0)
        {
            refusal.anti_affinity += 1;
            continue;
        }
        // Spread: the node whose busiest resource would be least loaded.
        let load = |used: u64, asked: u64, capacity: u64, ratio: f64| {
            (used + asked) as f64 / (capacity as f64 * ratio).max(1.0)
        };
        let score = load(node.used_vcpus, request.vcpus, node.vcpus, overcommit.cpu).max(load(
            node.used_memory_bytes,
            request.memory_bytes,
            node.memory_bytes,
            overcommit.memory,
        ));
        if best.is_none_or(|(s, id)| score < s || (score == s && node.id < id)) {
            best = Some((score, node.id));
        }
    }
    best.map(|(_, id)| id).ok_or(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(id: u64, zone: Zone) -> Candidate {
        Candidate {
            id,
            name: format!("n{id}"),
            zone,
            maintenance: false,
            down: false,
            vcpus: 8,
            memory_bytes: 32 * GIB,
            used_vcpus: 0,
            used_memory_bytes: 0,
            groups: BTreeMap::new(),
        }
    }

    fn request(zone: Zone) -> Request {
        Request {
            zone,
            vcpus: 2,
            memory_bytes: 4 * GIB,
            anti_affinity: None,
        }
    }

    /// Every project zone against every pool: a VM lands only on a node of
    /// its own zone, whatever else is free.
    #[test]
    fn every_zone_lands_only_on_its_own_nodes() {
        for wanted in Zone::ALL {
            for pool in [
                vec![Zone::Official],
                vec![Zone::OfficialSensitive],
                vec![Zone::Secret],
                Zone::ALL.to_vec(),
                vec![Zone::Official, Zone::Official, Zone::Secret],
            ] {
                let nodes: Vec<Candidate> = pool
                    .iter()
                    .enumerate()
                    .map(|(i, z)| node(i as u64 + 1, *z))
                    .collect();
                match place(&nodes, &request(wanted), Overcommit::default()) {
                    Ok(id) => {
                        let chosen = nodes.iter().find(|n| n.id == id).unwrap();
                        assert_eq!(chosen.zone, wanted, "{wanted:?} placed on {chosen:?}");
                    }
                    Err(refusal) => {
                        assert!(!pool.contains(&wanted), "{wanted:?} refused in {pool:?}");
                        assert_eq!(refusal.wrong_zone, pool.len());
                        assert!(refusal.to_string().contains(wanted.as_str()));
                    }
                }
            }
        }
    }

    #[test]
    fn capacity_counts_overcommit_and_says_what_is_short() {
        let mut busy = node(1, Zone::Official);
        busy.used_vcpus = 31;
        let mut full = node(2, Zone::Official);
        full.used_memory_bytes = 30 * GIB;
        let nodes = [busy.clone(), full.clone()];
        let refusal = place(&nodes, &request(Zone::Official), Overcommit::default()).unwrap_err();
        assert_eq!((refusal.no_cpu, refusal.no_memory), (1, 1));
        let text = refusal.to_string();
        assert!(text.contains("1 without enough free vCPUs") && text.contains("memory"));
        // With more CPU overcommit the busy node fits.
        let generous = Overcommit {
            cpu: 8.0,
            memory: 1.0,
        };
        assert_eq!(place(&nodes, &request(Zone::Official), generous), Ok(1));
        // Exactly full is still a fit.
        let mut exact = node(3, Zone::Official);
        exact.used_memory_bytes = 28 * GIB;
        assert_eq!(
            place(&[exact], &request(Zone::Official), Overcommit::default()),
            Ok(3)
        );
    }

    #[test]
    fn spreads_to_the_least_loaded_and_breaks_ties_by_id() {
        let mut a = node(1, Zone::Official);
        a.used_vcpus = 4;
        let b = node(2, Zone::Official);
        let c = node(3, Zone::Official);
        assert_eq!(
            place(&[a, c, b], &request(Zone::Official), Overcommit::default()),
            Ok(2)
        );
    }

    #[test]
    fn overcommit_travels_in_commands_as_whole_percents() {
        let carried = Overcommit::from_percent(
            Overcommit::DEFAULT.cpu_percent(),
            Overcommit::DEFAULT.memory_percent(),
        );
        assert_eq!(carried, Overcommit::DEFAULT);
        assert_eq!(
            (default_cpu_percent(), default_memory_percent()),
            (400, 100)
        );
        assert_eq!(Overcommit::from_percent(150, 120).cpu_percent(), 150);
    }

    #[test]
    fn a_node_not_yet_reporting_capacity_is_refused_as_such_not_as_in_maintenance() {
        let mut fresh = node(1, Zone::Official);
        fresh.vcpus = 0;
        fresh.memory_bytes = 0;
        let refusal = place(&[fresh], &request(Zone::Official), Overcommit::default()).unwrap_err();
        assert_eq!((refusal.not_reporting, refusal.maintenance), (1, 0));
        let message = refusal.to_string();
        assert!(
            message.contains("1 not yet reporting their capacity"),
            "{message}"
        );
        assert!(!message.contains("maintenance"), "{message}");
    }

    #[test]
    fn a_node_down_or_suspect_takes_nothing_and_the_refusal_says_so() {
        let mut a = node(1, Zone::Official);
        a.down = true;
        let b = node(2, Zone::Official);
        assert_eq!(
            place(
                &[a.clone(), b],
                &request(Zone::Official),
                Overcommit::default()
            ),
            Ok(2)
        );
        let refusal = place(&[a], &request(Zone::Official), Overcommit::default()).unwrap_err();
        assert_eq!(refusal.down, 1);
        assert!(
            refusal.to_string().contains("1 down or not answering"),
            "{refusal}"
        );
    }

    #[test]
    fn anti_affinity_and_maintenance_exclude_nodes() {
        let mut a = node(1, Zone::Official);
        a.groups.insert("db".into(), 1);
        let mut b = node(2, Zone::Official);
        b.maintenance = true;
        let c = node(3, Zone::Official);
        let mut wanted = request(Zone::Official);
        wanted.anti_affinity = Some("db".into());
        assert_eq!(
            place(&[a.clone(), b.clone(), c], &wanted, Overcommit::default()),
            Ok(3)
        );
        let refusal = place(&[a, b], &wanted, Overcommit::default()).unwrap_err();
        assert_eq!((refusal.anti_affinity, refusal.maintenance), (1, 1));
        assert_eq!(
            place(&[], &wanted, Overcommit::default())
                .unwrap_err()
                .to_string(),
            "no node can host the VM: the cluster has no nodes"
        );
    }
}
