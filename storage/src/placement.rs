//! Where an object's replicas live: weighted rendezvous (highest random
//! weight) hashing over the storage map, distinct failure domains first.
//!
//! Every node computes the same answer from the same map, so nobody has to
//! be asked where an object is. Adding a node moves only the objects whose
//! highest scores it now wins, in proportion to its weight.

use serde::{Deserialize, Serialize};

/// One storage node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    pub node: u64,
    /// Relative share of objects (the node's capacity in GiB, at least 1).
    pub weight: u64,
    /// Replicas go to distinct failure domains while there are enough.
    pub failure_domain: String,
}

/// The storage nodes a volume's objects are spread over, as of one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StorageMap {
    pub epoch: u64,
    pub nodes: Vec<MapNode>,
}

impl StorageMap {
    /// How many distinct failure domains the map spans.
    pub fn failure_domains(&self) -> usize {
        let mut domains: Vec<&str> = self
            .nodes
            .iter()
            .map(|n| n.failure_domain.as_str())
            .collect();
        domains.sort_unstable();
        domains.dedup();
        domains.len()
    }

    /// The nodes holding object `index` of volume `volume`, best first.
    /// Returns fewer than `replicas` only when the map has fewer nodes.
    pub fn place(&self, volume: &str, index: u64, replicas: usize) -> Vec<u64> {
        let key = fnv1a(volume.as_bytes()) ^ splitmix(index);
        let mut scored: Vec<(f64, &MapNode)> =
            self.nodes.iter().map(|n| (score(key, n), n)).collect();
        // Highest score first; ties (practically impossible) by node id.
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.node.cmp(&b.1.node)));
        let mut chosen: Vec<u64> = Vec::with_capacity(replicas);
        let mut domains: Vec<&str> = Vec::with_capacity(replicas);
        for (_, n) in &scored {
            if chosen.len() == replicas {
                break;
            }
            if !domains.contains(&n.failure_domain.as_str()) {
                domains.push(&n.failure_domain);
                chosen.push(n.node);
            }
        }
        for (_, n) in &scored {
            if chosen.len() == replicas {
                break;
            }
            if !chosen.contains(&n.node) {
                chosen.push(n.node);
            }
        }
        chosen
    }
}

/// Weighted rendezvous score: `-weight / ln(u)` with `u` uniform in (0, 1)
/// drawn from the hash of (object, node). The node with the highest score
/// wins; a node's chance of winning is proportional to its weight.
fn score(key: u64, node: &MapNode) -> f64 {
    let h = splitmix(key ^ splitmix(node.node));
    // 53 random bits, shifted off zero so ln() is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(node.weight.max(1) as f64) / u.ln()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(nodes: &[(u64, u64, &str)]) -> StorageMap {
        StorageMap {
            epoch: 1,
            nodes: nodes
                .iter()
                .map(|(node, weight, domain)| MapNode {
                    node: *node,
                    weight: *weight,
                    failure_domain: domain.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn same_input_same_answer_and_distinct_nodes() {
        let m = map(&[(1, 10, "a"), (2, 10, "b"), (3, 10, "c"), (4, 10, "d")]);
        for i in 0..1000 {
            let p = m.place("vol-x", i, 3);
            assert_eq!(p, m.place("vol-x", i, 3));
            assert_eq!(p.len(), 3);
            let mut d = p.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 3, "object {i}: {p:?}");
        }
    }

    #[test]
    fn node_order_in_the_map_does_not_matter() {
        let a = map(&[(1, 10, "a"), (2, 20, "b"), (3, 30, "c")]);
        let b = map(&[(3, 30, "c"), (1, 10, "a"), (2, 20, "b")]);
        for i in 0..500 {
            assert_eq!(a.place("v", i, 2), b.place("v", i, 2));
        }
    }

    #[test]
    fn distinct_failure_domains_come_first() {
        // Two racks: r1 has three big nodes, r2 one small one.
        let m = map(&[(1, 100, "r1"), (2, 100, "r1"), (3, 100, "r1"), (4, 1, "r2")]);
        for i in 0..1000 {
            let p = m.place("v", i, 2);
            assert!(p.contains(&4), "object {i} must use both racks: {p:?}");
        }
        // With three replicas and two racks, the third shares a rack.
        for i in 0..200 {
            let p = m.place("v", i, 3);
            assert_eq!(p.len(), 3);
            assert!(p.contains(&4));
        }
    }

    #[test]
    fn fewer_nodes_than_replicas_gives_every_node() {
        let m = map(&[(1, 1, "a"), (2, 1, "b")]);
        let mut p = m.place("v", 7, 3);
        p.sort_unstable();
        assert_eq!(p, vec![1, 2]);
        assert!(StorageMap::default().place("v", 0, 3).is_empty());
    }

    #[test]
    fn primaries_follow_the_weights() {
        let m = map(&[(1, 1, "a"), (2, 2, "b"), (3, 5, "c")]);
        let mut wins = [0u32; 4];
        let n = 40_000;
        for i in 0..n {
            wins[m.place("weights", i, 1)[0] as usize] += 1;
        }
        for (node, share) in [(1usize, 1.0 / 8.0), (2, 2.0 / 8.0), (3, 5.0 / 8.0)] {
            let got = f64::from(wins[node]) / n as f64;
            assert!((got - share).abs() < 0.02, "node {node}: {got} vs {share}");
        }
    }

    #[test]
    fn adding_a_node_moves_only_its_share() {
        let before = map(&[(1, 1, "a"), (2, 1, "b"), (3, 1, "c")]);
        let after = map(&[(1, 1, "a"), (2, 1, "b"), (3, 1, "c"), (4, 1, "d")]);
        let n = 20_000;
        let moved = (0..n)
            .filter(|i| before.place("m", *i, 1) != after.place("m", *i, 1))
            .count();
        let share = moved as f64 / n as f64;
        // The new node should win a quarter; nothing else moves.
        assert!((share - 0.25).abs() < 0.02, "{share}");
        for i in 0..n {
            let a = after.place("m", i, 1)[0];
            if a != 4 {
                assert_eq!(before.place("m", i, 1)[0], a);
            }
        }
    }

    #[test]
    fn failure_domains_are_counted() {
        assert_eq!(
            map(&[(1, 1, "a"), (2, 1, "a"), (3, 1, "b")]).failure_domains(),
            2
        );
    }
}
