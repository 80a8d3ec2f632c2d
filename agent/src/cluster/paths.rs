//! The layout of a node's data directory and the node's own configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where everything of one node lives.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn node_config(&self) -> PathBuf {
        self.root.join("node.json")
    }
    pub fn listen_file(&self) -> PathBuf {
        self.root.join("listen.json")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.root.join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }
    pub fn raft_log(&self) -> PathBuf {
        self.root.join("raft-log.redb")
    }
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.redb")
    }
    /// The members' pinned keys a joining node was given (see
    /// `JoinResponse::member_keys`).
    pub fn join_pins(&self) -> PathBuf {
        self.root.join("join-pins.json")
    }
    pub fn path(&self) -> &Path {
        &self.root
    }
}

/// Written once when the node joins or creates a cluster; its presence is
/// what makes a node "configured".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    pub cluster_id: String,
    pub name: String,
    /// Advertised addresses, as peers and clients reach this node.
    pub api_addr: String,
    pub peer_addr: String,
}

/// The addresses the running agent actually listens on (useful when asked
/// for port 0), rewritten at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenAddrs {
    pub api_addr: String,
    pub peer_addr: String,
    #[serde(default)]
    pub storage_addr: String,
    pub pid: u32,
}
