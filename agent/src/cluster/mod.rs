//! The node as a member of the cluster: its Raft instance and the one path
//! for writes and linearizable reads (`node`, `proposer`), the peer
//! transport over mutual TLS (`peer`), the cluster CA and certificates
//! (`pki`), which node certificates are served (`admission`), join tokens (`join`), the accept loops (`serve`) and the data
//! directory (`paths`). It knows the state's commands and records, and
//! nothing of the API, the reconcilers or the CLI.

pub mod admission;
pub mod contact;
pub mod join;
pub mod node;
pub mod paths;
pub mod peer;
pub mod pki;
pub mod proposer;
pub mod request_audit;
pub mod serve;
