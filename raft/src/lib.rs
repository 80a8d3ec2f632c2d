//! Allod's replicated state machine.
//!
//! This crate owns the openraft type configuration, the durable Raft log and
//! vote, and the replicated key/value state that the cluster's commands are
//! applied to, all stored in redb with `Durability::Immediate` so nothing is
//! acknowledged before it is on disk.
//!
//! It knows nothing about projects, VMs or networks: the agent hands it an
//! [`Apply`] implementation that turns one opaque command into changes of
//! the key/value state. How log entries and peer messages are encoded, and
//! how that encoding may change, is in [`codec`]. It knows nothing about HTTP either: the agent carries
//! Raft RPCs between peers.

pub mod codec;
mod io;
mod log_store;
mod state_machine;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use log_store::{LogStore, LogStoreError};
/// A failure of the key/value storage underneath the state machine.
pub use redb::StorageError as KvError;
#[cfg(feature = "scratch")]
pub use state_machine::scratch_kv;
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

/// One client command, opaque to this crate: the agent's encoding of it
/// (today a JSON document, encoded once by the node that proposes it and
/// parsed once where it is applied).
///
/// In the binary formats (log entries on disk, peer messages) it travels as
/// its bytes. In JSON (the log's first format, and peers that do not speak
/// the binary one) it is the JSON document itself, as it always was, so
/// both read and write the older form unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Command(pub Vec<u8>);

/// The result of applying one [`Command`], opaque to this crate. It never
/// leaves the node that applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CommandResult(pub serde_json::Value);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({self})")
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 256;
        let text = String::from_utf8_lossy(&self.0[..self.0.len().min(SHOWN)]);
        let more = if self.0.len() > SHOWN { "…" } else { "" };
        write!(f, "{text}{more}")
    }
}

impl Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            let value: serde_json::Value =
                serde_json::from_slice(&self.0).map_err(serde::ser::Error::custom)?;
            value.serialize(serializer)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a command's bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        if deserializer.is_human_readable() {
            let value = serde_json::Value::deserialize(deserializer)?;
            serde_json::to_vec(&value)
                .map(Command)
                .map_err(serde::de::Error::custom)
        } else {
            deserializer.deserialize_byte_buf(Bytes).map(Command)
        }
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
