//! The per-node reconcilers: each reads the desired state for this node
//! from the replicated state, observes what the machine really has, plans
//! the difference with a pure function and carries the plan out. `compute`
//! drives libvirt domains, `network` the tenant networks (netfabric),
//! `storage` the node's block store, `operations` the work recorded for this
//! node (image imports, rollbacks), `ha` the leader's failure detection
//! for nodes and the fencing that keeps a VM from running twice. They report what they observe back
//! through commands and never write desired state on their own.

pub mod compute;
pub mod ha;
pub mod migration;
pub mod network;
pub mod operations;
pub mod storage;
