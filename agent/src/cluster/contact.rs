//! Whether this node is still part of a quorum, for self-fencing: a node
//! cut off from the majority stops its VMs before the leader on the other
//! side can declare it dead and restart them elsewhere.

use std::time::Duration;

use super::node::ClusterNode;

impl ClusterNode {
    /// How long ago this node last knew itself in touch with a quorum: as
    /// leader, since the send time of the AppendEntries that the
    /// quorum-th freshest voter of each configuration last accepted (the
    /// leader counting itself as now); as follower, since it last took an
    /// AppendEntries from its leader. A node that is its cluster's only
    /// voter is always in touch; `None`: not once since this process
    /// started.
    pub fn quorum_contact_age(&self) -> Option<Duration> {
        let metrics = self.raft.metrics().borrow().clone();
        let configs = metrics.membership_config.membership().get_joint_config();
        if configs
            .iter()
            .all(|voters| voters.len() == 1 && voters.contains(&self.id))
        {
            return Some(Duration::ZERO);
        }
        if metrics.state != openraft::ServerState::Leader {
            return self.peers.since_leader_contact();
        }
        let now = std::time::Instant::now();
        let mut oldest = Duration::ZERO;
        for voters in configs {
            let quorum = voters.len() / 2 + 1;
            let mut acked: Vec<std::time::Instant> = voters
                .iter()
                .filter_map(|v| {
                    if *v == self.id {
                        Some(now)
                    } else {
                        self.peers.acked_at(*v, metrics.current_term)
                    }
                })
                .collect();
            if acked.len() < quorum {
                return None;
            }
            acked.sort_unstable_by(|a, b| b.cmp(a));
            oldest = oldest.max(now.duration_since(acked[quorum - 1]));
        }
        Some(oldest)
    }
}
