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
        let mut oldest = Duration::ZERO;
        for voters in configs {
            oldest = oldest.max(self.quorum_acked_age(voters, metrics.current_term)?);
        }
        Some(oldest)
    }

    /// On the leader of `term`, how long ago the AppendEntries that a
    /// quorum of `voters` last accepted was sent (the quorum-th freshest;
    /// the leader counts as now); `None` while fewer than a quorum have
    /// accepted one of this term.
    pub(super) fn quorum_acked_age(
        &self,
        voters: &std::collections::BTreeSet<allod_raft::NodeId>,
        term: u64,
    ) -> Option<Duration> {
        let quorum = voters.len() / 2 + 1;
        let now = std::time::Instant::now();
        let mut acked: Vec<std::time::Instant> = voters
            .iter()
            .filter_map(|v| {
                if *v == self.id {
                    Some(now)
                } else {
                    self.peers.acked_at(*v, term)
                }
            })
            .collect();
        if acked.len() < quorum {
            return None;
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        Some(now.duration_since(acked[quorum - 1]))
    }
}
