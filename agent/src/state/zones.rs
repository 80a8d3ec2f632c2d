//! Classification zones: OFFICIAL (shared hosts), OFFICIAL-SENSITIVE
//! (dedicated compute, segmented network) and SECRET (dedicated, isolated
//! hardware). A project's zone is fixed when it is created; every node is
//! labelled with the one zone it serves. Nodes labelled OFFICIAL are the
//! shared pool; a node labelled OFFICIAL-SENSITIVE or SECRET is dedicated to
//! that zone and never hosts another zone's workloads.
//!
//! The policy is data ([`policies`], served at `GET /v1/zones`) and the
//! decisions are pure functions, so the scheduler and the API ask the same
//! question the same way.

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    Default,
    utoipa::ToSchema,
)]
pub enum Zone {
    #[default]
    #[serde(rename = "OFFICIAL")]
    Official,
    #[serde(rename = "OFFICIAL-SENSITIVE")]
    OfficialSensitive,
    #[serde(rename = "SECRET")]
    Secret,
}

impl Zone {
    pub const ALL: [Zone; 3] = [Zone::Official, Zone::OfficialSensitive, Zone::Secret];

    pub fn as_str(self) -> &'static str {
        match self {
            Zone::Official => "OFFICIAL",
            Zone::OfficialSensitive => "OFFICIAL-SENSITIVE",
            Zone::Secret => "SECRET",
        }
    }

    pub fn parse(text: &str) -> Option<Zone> {
        Zone::ALL
            .into_iter()
            .find(|z| z.as_str().eq_ignore_ascii_case(text))
    }
}

/// What a zone demands, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ZonePolicy {
    pub zone: Zone,
    /// Workloads of this zone may share hosts with other projects of the zone.
    pub shared_hosts: bool,
    /// Hosts serving this zone serve no other zone.
    pub dedicated_hosts: bool,
    /// Tenant networks of this zone are kept on their own segments.
    pub segmented_network: bool,
    /// The hardware is meant to be physically isolated (its own racks and uplinks).
    pub isolated_hardware: bool,
    pub description: String,
}

pub fn policies() -> Vec<ZonePolicy> {
    vec![
        ZonePolicy {
            zone: Zone::Official,
            shared_hosts: true,
            dedicated_hosts: false,
            segmented_network: false,
            isolated_hardware: false,
            description: "Routine business. Runs on the shared pool of nodes labelled OFFICIAL.".into(),
        },
        ZonePolicy {
            zone: Zone::OfficialSensitive,
            shared_hosts: false,
            dedicated_hosts: true,
            segmented_network: true,
            isolated_hardware: false,
            description: "Sensitive business. Runs only on nodes dedicated to OFFICIAL-SENSITIVE, on segmented networks.".into(),
        },
        ZonePolicy {
            zone: Zone::Secret,
            shared_hosts: false,
            dedicated_hosts: true,
            segmented_network: true,
            isolated_hardware: true,
            description: "Secret. Runs only on isolated hardware dedicated to SECRET.".into(),
        },
    ]
}

/// Whether a node labelled `node_zone` may host a workload (VM or volume
/// replica) of a project in `project_zone`.
pub fn may_host(project_zone: Zone, node_zone: Zone) -> Result<(), String> {
    if project_zone == node_zone {
        return Ok(());
    }
    Err(match node_zone {
        Zone::Official => format!(
            "the node is in the shared OFFICIAL pool; {} workloads need a node dedicated to {}",
            project_zone.as_str(),
            project_zone.as_str()
        ),
        dedicated => format!(
            "the node is dedicated to {}; it hosts nothing of {}",
            dedicated.as_str(),
            project_zone.as_str()
        ),
    })
}

/// Whether two objects may be connected (a volume attached to a VM, a NIC
/// on a network, a VM booted from an image): never across zones.
pub fn may_connect(a: Zone, b: Zone) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!(
            "{} and {} objects cannot be shared or attached across zones",
            a.as_str(),
            b.as_str()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_project_zone_on_every_node_zone() {
        for project in Zone::ALL {
            for node in Zone::ALL {
                let allowed = may_host(project, node).is_ok();
                assert_eq!(allowed, project == node, "{project:?} on {node:?}");
            }
        }
        let refusal = may_host(Zone::Secret, Zone::Official).unwrap_err();
        assert!(refusal.contains("dedicated to SECRET"), "{refusal}");
        let refusal = may_host(Zone::Official, Zone::Secret).unwrap_err();
        assert!(refusal.contains("dedicated to SECRET"), "{refusal}");
    }

    #[test]
    fn nothing_connects_across_zones() {
        for a in Zone::ALL {
            for b in Zone::ALL {
                assert_eq!(may_connect(a, b).is_ok(), a == b);
            }
        }
    }

    #[test]
    fn zone_names_round_trip_and_policy_covers_every_zone() {
        for zone in Zone::ALL {
            assert_eq!(Zone::parse(zone.as_str()), Some(zone));
            assert_eq!(serde_json::to_value(zone).unwrap(), zone.as_str());
        }
        assert_eq!(Zone::parse("secret"), Some(Zone::Secret));
        assert_eq!(Zone::parse("TOP-SECRET"), None);
        let covered: Vec<Zone> = policies().iter().map(|p| p.zone).collect();
        assert_eq!(covered, Zone::ALL.to_vec());
        assert!(policies()
            .iter()
            .filter(|p| p.zone != Zone::Official)
            .all(|p| p.dedicated_hosts && !p.shared_hosts));
    }
}
