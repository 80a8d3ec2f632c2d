//! The RBD-like block store: volumes split into fixed-size objects, placed on
//! nodes by a deterministic weighted rendezvous hash over the storage map,
//! replicated, snapshotted and cloned copy-on-write; the per-node object
//! store; the framed, mutually authenticated replication protocol between
//! nodes; and the NBD server through which QEMU reaches a volume.
//!
//! It knows nothing of Raft: the agent hands it the storage map and the
//! volume records.

pub mod fsio;
pub mod nbd;
pub mod placement;
pub mod proto;
pub mod range_lock;
pub mod store;
pub mod transport;
pub mod volume;

pub use placement::{MapNode, StorageMap};
pub use store::ObjectStore;
pub use volume::{
    IoError, ParentSpec, Progress, ReplicaSets, ScrubRepair, ScrubReport, Storage, Throttle,
    VolumeHandle, VolumeSpec,
};
