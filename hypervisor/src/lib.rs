//! Compute on one node: a typed domain specification (vCPUs, memory, NBD
//! disks, bridged NICs, serial console, Allod's metadata tag), its libvirt
//! XML, and lifecycle calls through libvirt (define, start, ACPI shutdown,
//! destroy, reset, undefine, state, the serial console's pty), and live
//! migration to another node's libvirt.
//!
//! It takes plain specs and knows nothing of Raft or of the cluster's state.
//! It touches only domains whose metadata marks them as Allod's and names this
//! node. libvirt (and the LGPL-2.1 `virt` bindings) enter the workspace here.
//!
//! [`spec`] is the typed domain specification and its XML (checked against
//! libvirt's schema); [`lifecycle`] drives libvirt; [`migrate`] moves a
//! running domain to another libvirt. The per-node reconciler
//! that decides what to call lives in the agent.

pub mod lifecycle;
pub mod migrate;
pub mod spec;
