//! Per-node network plumbing through netlink: bridges, VXLAN devices, FDB and
//! neighbour entries, veth pairs, addresses and routes; security groups, NAT
//! and floating IPs as one nftables table applied atomically; DHCP for tenant
//! subnets. A pure planner (desired node network and observed kernel state in,
//! ordered actions out) drives a thin netlink executor.
//!
//! It knows nothing of Raft: the agent hands it each node's desired network.
//! Nothing is implemented yet.
