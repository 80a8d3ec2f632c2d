//! Failure detection and fencing at run time. The leader watches every node
//! through the answers to its AppendEntries (heartbeats included: the
//! heartbeat goes over the peer channel, not through the log) and writes
//! only the transitions, healthy → suspect → dead and back to healthy when
//! heard again; what a death does to VMs is decided where the transition
//! applies (`state::ha`). Each node, for its part, watches whether it is
//! still in touch with a quorum ([`InTouch`]) and stops its own VMs when it
//! has not been for `fence_after` (see the compute reconciler): it does so
//! before the other side can declare it dead, so a restarted VM never runs
//! beside its old copy.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hypervisor::lifecycle::Hypervisor;

use crate::cluster::join::now_ms;
use crate::cluster::node::ClusterNode;
use crate::reconcile::compute::blocking;
use crate::state::ha::{HaCommand, Liveness};
use crate::state::scheduler::Overcommit;
use crate::state::Command;

/// The failure detection's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaOptions {
    /// Unheard this long: suspect (takes no new VMs).
    pub suspect_after: Duration,
    /// Unheard this long: dead (its VMs restart elsewhere).
    pub dead_after: Duration,
    /// A node out of touch with a quorum this long stops its VMs.
    pub fence_after: Duration,
}

impl Default for HaOptions {
    fn default() -> Self {
        Self {
            suspect_after: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            fence_after: Duration::from_secs(10),
        }
    }
}

impl HaOptions {
    /// Refuses timeouts that could let a VM run twice: a node must fence
    /// itself well before the other side can declare it dead.
    pub fn new(suspect_s: u64, dead_s: u64, fence_s: u64) -> Result<Self, String> {
        if suspect_s == 0 || suspect_s >= dead_s {
            return Err(format!(
                "--suspect-after ({suspect_s} s) must be at least 1 s and shorter than --dead-after ({dead_s} s)"
            ));
        }
        if fence_s == 0 || fence_s + 2 > dead_s {
            return Err(format!(
                "--fence-after ({fence_s} s) must be at least 1 s and at least 2 s shorter than --dead-after ({dead_s} s): \
                 a node cut off must stop its VMs before the others restart them"
            ));
        }
        Ok(Self {
            suspect_after: Duration::from_secs(suspect_s),
            dead_after: Duration::from_secs(dead_s),
            fence_after: Duration::from_secs(fence_s),
        })
    }
}

/// What the failure detection makes of a node unheard for `unheard`
/// (`heard`: it answered within the suspect timeout): only real news moves
/// a dead or suspect node back to healthy, and a dead one stays dead until
/// then.
pub fn next_liveness(
    current: Liveness,
    heard: bool,
    unheard: Duration,
    options: &HaOptions,
) -> Liveness {
    if heard {
        Liveness::Healthy
    } else if current == Liveness::Dead || unheard >= options.dead_after {
        Liveness::Dead
    } else if unheard >= options.suspect_after {
        Liveness::Suspect
    } else {
        current
    }
}

/// The leader's failure detection for nodes, checked every half second. A
/// node that just became leader counts time unheard from its own start as
/// leader at most, so it never declares a node dead on an older leader's
/// silence.
pub async fn watch_nodes(node: Weak<ClusterNode>, options: HaOptions) {
    let mut leader_since: Option<Instant> = None;
    let mut placed_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(node) = node.upgrade() else { return };
        if node.leader() != Some(node.id) {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let Ok(nodes) = node.state.nodes() else {
            continue;
        };
        let overcommit = Overcommit::DEFAULT;
        for n in nodes.iter() {
            let last = node.peers.last_heard(n.id);
            let heard = n.id == node.id || last.is_some_and(|d| d < options.suspect_after);
            let unheard = last.unwrap_or(Duration::MAX).min(since.elapsed());
            let next = next_liveness(n.liveness, heard, unheard, &options);
            if next == n.liveness {
                continue;
            }
            let command = Command::Ha {
                command: HaCommand::SetNodeLiveness {
                    id: n.id,
                    liveness: next,
                    at_ms: now_ms(),
                    overcommit_cpu_percent: overcommit.cpu_percent(),
                    overcommit_memory_percent: overcommit.memory_percent(),
                },
            };
            match node.write(&command).await {
                Ok(Ok(_)) => match next {
                    Liveness::Suspect => tracing::warn!(
                        "node {} ({}) has not answered for {} s: suspect; it takes no new VMs, and its VMs restart elsewhere if it stays silent {} s in all",
                        n.id, n.name, unheard.as_secs(), options.dead_after.as_secs()
                    ),
                    Liveness::Dead => tracing::error!(
                        "node {} ({}) has not answered for {} s: dead; its VMs are restarted on other nodes and its writers fenced",
                        n.id, n.name, unheard.as_secs()
                    ),
                    Liveness::Healthy => {
                        tracing::info!("node {} ({}) answers again: healthy", n.id, n.name)
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!("cannot record node {}'s state: {}", n.id, e.message)
                }
                Err(e) => tracing::debug!("node {}'s state not recorded yet: {e}", n.id),
            }
        }
        // VMs waiting for room are tried again every ten seconds (a node
        // coming back or a VM deleted frees room without a transition).
        if placed_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
            && node.state.any_vm_waiting().unwrap_or(false)
        {
            placed_at = Some(Instant::now());
            let command = Command::Ha {
                command: HaCommand::PlaceWaiting {
                    at_ms: now_ms(),
                    overcommit_cpu_percent: overcommit.cpu_percent(),
                    overcommit_memory_percent: overcommit.memory_percent(),
                },
            };
            if let Ok(Ok(placed)) = node.write(&command).await {
                if placed["placed"].as_u64().unwrap_or(0) > 0 {
                    tracing::info!("placed {} VMs that waited for room", placed["placed"]);
                }
            }
        }
    }
}

/// When this node was last in touch with a quorum, as far as it can tell:
/// a new leader has no acknowledgements of its term yet, so the last time
/// known is kept rather than counted from the start.
pub struct InTouch {
    last: Instant,
}

impl Default for InTouch {
    fn default() -> Self {
        Self::new()
    }
}

impl InTouch {
    /// Counting from now: a node that starts cut off fences itself once
    /// `fence_after` has passed since it started.
    pub fn new() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    /// How long this node has been out of touch.
    pub fn out_of_touch(&mut self, node: &ClusterNode) -> Duration {
        let now = Instant::now();
        if let Some(age) = node.quorum_contact_age() {
            let at = now.checked_sub(age).unwrap_or(now);
            self.last = self.last.max(at);
        }
        now.saturating_duration_since(self.last)
    }
}

/// The metadata keys of the nodes the cluster declared dead: their shut-off
/// domains may be defined over where nodes share a libvirtd.
pub fn dead_node_keys(node: &ClusterNode) -> Vec<String> {
    node.state
        .nodes()
        .unwrap_or_default()
        .iter()
        .filter(|n| n.liveness == Liveness::Dead)
        .map(|n| format!("{}-{}", node.config.cluster_id, n.id))
        .collect()
}

/// Self-fencing as the compute reconciler runs it before each pass.
#[derive(Default)]
pub struct Fence {
    in_touch: InTouch,
    fenced: bool,
}

impl Fence {
    /// `None`: the reconciler may make its pass. `Some(ids)`: it may not;
    /// the VMs of `ids` were stopped and undefined. Cut off from a quorum
    /// for `fence_after`, this node stops its VMs before the other side can
    /// declare it dead and restart them, every second while it lasts (so a
    /// start racing the first round is stopped too); back in touch, it
    /// catches up with the cluster before acting on records that may have
    /// moved its VMs meanwhile.
    pub async fn check(
        &mut self,
        node: &ClusterNode,
        hv: &Arc<Hypervisor>,
        fence_after: Duration,
    ) -> Option<Vec<String>> {
        let out = self.in_touch.out_of_touch(node);
        if out >= fence_after {
            let first = !self.fenced;
            self.fenced = true;
            return Some(stop_all(hv, out, first).await);
        }
        if self.fenced {
            if let Err(e) = node.linearizable_read().await {
                tracing::debug!("not caught up with the cluster yet: {e}");
                return Some(Vec::new());
            }
            tracing::warn!(
                "in touch with a quorum again: VMs still placed on this node start again"
            );
            self.fenced = false;
        }
        None
    }
}

/// Stops and undefines every domain of this node; the ids stopped.
async fn stop_all(hv: &Arc<Hypervisor>, out: Duration, first: bool) -> Vec<String> {
    let domains = match blocking(hv, |h| h.list()).await {
        Ok(list) => list,
        Err(e) => {
            tracing::error!(
                "out of touch with the cluster for {} s and cannot list this node's VMs to stop them: {e}",
                out.as_secs()
            );
            return Vec::new();
        }
    };
    if first {
        tracing::error!(
            "out of touch with a quorum of the cluster for {} s: stopping this node's {} VMs so that they can safely run on other nodes",
            out.as_secs(),
            domains.len()
        );
    }
    let mut stopped = Vec::new();
    for domain in domains {
        let id = domain.id.clone();
        match blocking(hv, move |h| h.undefine(&id)).await {
            Ok(()) => {
                tracing::warn!(vm = %domain.id, "stopped: this node is cut off from the cluster")
            }
            Err(e) => {
                tracing::error!(vm = %domain.id, "cannot stop a VM of a node cut off from the cluster: {e}")
            }
        }
        stopped.push(domain.id);
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_moves_on_silence_and_only_news_brings_a_node_back() {
        let o = HaOptions::default();
        let s = Duration::from_secs;
        use Liveness::*;
        for (current, heard, unheard, want) in [
            (Healthy, true, s(0), Healthy),
            (Healthy, false, s(2), Healthy),
            (Healthy, false, s(5), Suspect),
            (Healthy, false, s(15), Dead),
            (Suspect, false, s(14), Suspect),
            (Suspect, false, s(15), Dead),
            (Suspect, true, s(0), Healthy),
            // A new leader has heard nothing for only a moment: a dead
            // node stays dead until it answers.
            (Dead, false, s(1), Dead),
            (Dead, true, s(0), Healthy),
        ] {
            assert_eq!(
                next_liveness(current, heard, unheard, &o),
                want,
                "{current:?} heard={heard} unheard={unheard:?}"
            );
        }
    }

    #[test]
    fn timeouts_that_could_run_a_vm_twice_are_refused() {
        assert!(HaOptions::new(5, 15, 10).is_ok());
        let e = HaOptions::new(5, 15, 14).unwrap_err();
        assert!(e.contains("before the others restart them"), "{e}");
        assert!(HaOptions::new(15, 15, 10).is_err());
        assert!(HaOptions::new(0, 15, 10).is_err());
    }
}
