//! Allod's replicated state machine.
//!
//! This crate owns the openraft type configuration, the durable Raft log and
//! vote, and the replicated key/value state that the cluster's commands are
//! applied to, all stored in redb with `Durability::Immediate` so nothing is
//! acknowledged before it is on disk.
//!
//! It knows nothing about projects, VMs or networks: the agent hands it an
//! [`Apply`] implementation that turns one opaque JSON command into changes of
//! the key/value state. It knows nothing about HTTP either: the agent carries
//! Raft RPCs between peers.

mod io;
mod log_store;
mod state_machine;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use log_store::{LogStore, LogStoreError};
/// A failure of the key/value storage underneath the state machine.
pub use redb::StorageError as KvError;
pub use state_machine::{
    Apply, KvRead, KvWrite, StateMachineError, StateMachineStore, StateReader,
};

/// A cluster member as Raft sees it: the addresses its peers and clients use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Human-readable node name (the host name by default).
    pub name: String,
    /// `host:port` of the tenant-facing HTTPS API.
    pub api_addr: String,
    /// `host:port` of the mutual-TLS peer endpoint.
    pub peer_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (peer {}, api {})",
            self.name, self.peer_addr, self.api_addr
        )
    }
}

/// One client command, opaque to this crate. The agent defines its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub serde_json::Value);

/// The result of applying one [`Command`], opaque to this crate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CommandResult(pub serde_json::Value);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

openraft::declare_raft_types!(
    /// Allod's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle specialised to Allod's types.
pub type Raft = openraft::Raft<TypeConfig>;
/// Node ids are small integers allocated by the cluster at join time.
pub type NodeId = u64;
