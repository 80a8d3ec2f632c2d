//! The image catalog: import of raw and qcow2 images with SHA-256 checks and
//! signatures, conversion into base volumes that VMs clone from, and
//! cloud-init NoCloud seeds.
//!
//! It knows nothing of Raft. Nothing is implemented yet.
