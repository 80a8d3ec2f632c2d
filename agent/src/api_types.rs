//! The request bodies of the API, shared by the server (which deserialises
//! them) and the CLI (which builds them), so the two cannot drift apart.
//! Responses are the state's records. Knows nothing of HTTP.

use serde::{Deserialize, Serialize};

use crate::state::auth::Role;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    Json,
    Jsonl,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetZone {
    #[schema(value_type = crate::state::zones::Zone)]
    pub zone: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVpc {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubnet {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// The subnet's range, /8 to /29 (e.g. 10.0.0.0/24); ranges may repeat
    /// across VPCs but not overlap within one.
    pub cidr: String,
    /// Default: the first host address.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Announced by DHCP.
    #[serde(default)]
    pub dns: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecurityGroup {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddRule {
    /// `ingress` or `egress`.
    pub direction: String,
    /// `tcp`, `udp`, `icmp` or `any`.
    pub protocol: String,
    /// TCP/UDP port or first port of a range, 1-65535.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 65535)]
    pub port_min: Option<u32>,
    /// Last port of the range (default: `port_min`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 65535)]
    pub port_max: Option<u32>,
    /// Peer addresses (e.g. 192.0.2.0/24)…
    #[serde(default)]
    pub cidr: Option<String>,
    /// …or the ports of this security group.
    #[serde(default)]
    pub remote_group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePort {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Subnet name, or VPC/SUBNET when several VPCs have one of that name.
    pub subnet: String,
    /// Default: `["default"]`.
    #[serde(default)]
    pub security_groups: Option<Vec<String>>,
    /// The node whose host interface this is (default: the first node that
    /// may host the project's zone); it must be one that may.
    #[serde(default)]
    pub node: Option<u64>,
    /// Default: the lowest free address of the subnet.
    #[serde(default)]
    pub ip: Option<String>,
}

/// A NIC of a new VM: a port made with the VM, on the VM's node.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNicRequest {
    /// Subnet name, or VPC/SUBNET when several VPCs have one of that name.
    pub subnet: String,
    /// Default: `["default"]`.
    #[serde(default)]
    pub security_groups: Option<Vec<String>>,
    /// Default: the lowest free address of the subnet.
    #[serde(default)]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocateFip {
    /// Default: the first pool with a free address.
    #[serde(default)]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindFip {
    /// The port to forward to; absent or null: unbind.
    #[serde(default)]
    pub port: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Public addresses routed (or proxy-ARPed) to the nodes' uplinks.
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// A DNS label: 1-63 lowercase letters, digits or '-', starting with a letter.
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// At most 1024 bytes.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: String,
    /// OFFICIAL (default), OFFICIAL-SENSITIVE or SECRET; fixed for the project's life.
    #[serde(default)]
    #[schema(value_type = Option<crate::state::zones::Zone>)]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    #[schema(max_length = 1024)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// At least 8 characters; users without one log in only with tokens.
    #[serde(default)]
    #[schema(min_length = 8)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRole {
    #[schema(value_type = Role)]
    pub role: String,
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Scope the token to this project (at most `role` there).
    #[serde(default)]
    pub project: Option<String>,
    /// The role of a project token; `project-viewer` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Role>)]
    pub role: Option<String>,
    /// Lifetime in seconds (1 to 10 years' worth); no expiry when absent.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub expires_in_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    /// `true` refuses the user's tokens and password from now on.
    #[serde(default)]
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub user: String,
    pub password: String,
}

/// An OIDC issuer as configured with `PUT /v1/oidc/issuers/{issuer}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuerSpec {
    /// The exact `iss` of its tokens (an https:// URL).
    pub issuer: String,
    /// The `aud` its tokens must carry.
    pub audience: String,
    /// The claim mapped to roles (default `groups`; dotted paths allowed).
    #[serde(default)]
    pub claim: Option<String>,
    #[serde(default)]
    pub mappings: Vec<crate::state::auth::ClaimMapping>,
    /// A CA certificate (PEM) to trust for the issuer's HTTPS.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 256)]
    pub vcpus: Option<u64>,
    #[serde(default)]
    #[schema(
        minimum = 67_108_864,
        maximum = 4_398_046_511_104_u64,
        multiple_of = 1_048_576
    )]
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[schema(minimum = 1, maximum = 256)]
    pub vcpus: u64,
    /// A multiple of 1 MiB, from 64 MiB to 4 TiB.
    #[schema(
        minimum = 67_108_864,
        maximum = 4_398_046_511_104_u64,
        multiple_of = 1_048_576
    )]
    pub memory_bytes: u64,
    /// VMs of one group never share a node.
    #[serde(default)]
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub anti_affinity: Option<String>,
    /// Boot from a new volume cloned from this image (instant).
    #[serde(default)]
    pub image: Option<String>,
    /// Start it once created (default true); false only defines it.
    #[serde(default)]
    pub start: Option<bool>,
    /// The boot volume's size (default: the image's; a multiple of 512).
    #[serde(default)]
    #[schema(minimum = 512, maximum = 70_368_744_177_664_u64, multiple_of = 512)]
    pub disk_size_bytes: Option<u64>,
    /// NICs on the project's subnets, eth0 first; each gets a port named
    /// `<vm>-nic<N>`, deleted with the VM.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub nics: Vec<VmNicRequest>,
    /// What happens when its node dies: `always` (the default),
    /// `best-effort` or `never`.
    #[serde(default)]
    pub restart_policy: Option<crate::state::ha::RestartPolicy>,
    /// Restarts after a node's death place higher priorities first
    /// (default 0).
    #[serde(default)]
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    /// The volume's name.
    pub volume: String,
    /// The volume's project when it is not the VM's (same zone only; the
    /// caller needs the member role there).
    #[serde(default)]
    pub project: Option<String>,
}

/// A snapshot of another volume of the same project.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    pub volume: String,
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// A multiple of 512, at most 64 TiB. Thin: costs nothing until written.
    /// Optional for clones (default: the source's size).
    #[serde(default)]
    #[schema(minimum = 512, maximum = 70_368_744_177_664_u64, multiple_of = 512)]
    pub size_bytes: Option<u64>,
    /// Copies of every byte, on distinct nodes; default 3 (or as many
    /// storage nodes as there are, when fewer).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3)]
    pub replicas: Option<u8>,
    /// In-sync copies a write needs before it is acknowledged (at most
    /// `replicas`); default 2, or 1 for a single replica. With fewer in
    /// sync, writes fail (the volume is `degraded`) until a replica returns.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3)]
    pub min_replicas: Option<u8>,
    /// Clone an image (copy-on-write: instant, whatever its size).
    #[serde(default)]
    pub from_image: Option<String>,
    /// Clone a snapshot of a volume of this project.
    #[serde(default)]
    pub from_snapshot: Option<SnapshotRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    /// The new size: larger than the current one (volumes only grow).
    #[schema(minimum = 512, maximum = 70_368_744_177_664_u64, multiple_of = 512)]
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
}

/// A short-lived NBD credential for a volume, on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExport {
    /// Refuse writes through it.
    #[serde(default)]
    pub read_only: bool,
    /// Seconds it stays valid (default 3600, at most 7 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604_800)]
    pub ttl_secs: Option<u64>,
    /// The node whose NBD socket accepts it (default: the node answering).
    #[serde(default)]
    pub node: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVolume {
    pub snapshot: String,
    /// The new volume's name.
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Default: the source's size; may be larger.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3)]
    pub replicas: Option<u8>,
}

/// `POST /v1/storage/scrub`: ask for a scrub of one volume, or of every
/// volume.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScrubRequest {
    /// Read every block and check it against its checksum (default: only
    /// compare the replicas' descriptions of each object).
    #[serde(default)]
    pub deep: bool,
    /// With `volume`: the one volume to scrub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// The node to move to (name or id); without it, the scheduler picks
    /// one among the nodes that take part in live migration.
    #[serde(default)]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainNode {
    /// Restart its running VMs on other nodes (their guests reboot);
    /// without it, a node running VMs is not drained.
    #[serde(default)]
    pub restart_unmovable: bool,
}
