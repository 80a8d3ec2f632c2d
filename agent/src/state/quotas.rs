//! Project quotas and what a project uses.
//!
//! Both live in the project's record and change in the same state-machine
//! transaction as the object that consumes them, so the check happens in log
//! order: concurrent creates through different nodes can never exceed a quota.

use serde::{Deserialize, Serialize};

/// Limits per project; an absent limit is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floating_ips: Option<u64>,
}

/// What a project holds, in the units of [`Quota`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    #[serde(default)]
    pub vcpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// Provisioned (not written) bytes of all volumes, times their replicas
    /// are not counted: a quota is on what the tenant asked for.
    #[serde(default)]
    pub storage_bytes: u64,
    #[serde(default)]
    pub volumes: u64,
    #[serde(default)]
    pub vms: u64,
    #[serde(default)]
    pub floating_ips: u64,
}

impl Usage {
    fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("vcpus", self.vcpus),
            ("memory_bytes", self.memory_bytes),
            ("storage_bytes", self.storage_bytes),
            ("volumes", self.volumes),
            ("vms", self.vms),
            ("floating_ips", self.floating_ips),
        ]
    }

    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            storage_bytes: self.storage_bytes.saturating_add(other.storage_bytes),
            volumes: self.volumes.saturating_add(other.volumes),
            vms: self.vms.saturating_add(other.vms),
            floating_ips: self.floating_ips.saturating_add(other.floating_ips),
        }
    }

    pub fn minus(&self, other: &Usage) -> Usage {
        Usage {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            storage_bytes: self.storage_bytes.saturating_sub(other.storage_bytes),
            volumes: self.volumes.saturating_sub(other.volumes),
            vms: self.vms.saturating_sub(other.vms),
            floating_ips: self.floating_ips.saturating_sub(other.floating_ips),
        }
    }
}

impl Quota {
    fn limits(&self) -> [Option<u64>; 6] {
        [
            self.vcpus,
            self.memory_bytes,
            self.storage_bytes,
            self.volumes,
            self.vms,
            self.floating_ips,
        ]
    }

    /// Refuses limits too large to mean anything (JSON clients often cannot
    /// even represent them); an absent limit is the way to say unlimited.
    pub fn validate(&self) -> Result<(), String> {
        let names = [
            "vcpus",
            "memory_bytes",
            "storage_bytes",
            "volumes",
            "vms",
            "floating_ips",
        ];
        for (name, limit) in names.into_iter().zip(self.limits()) {
            if limit.is_some_and(|l| l > i64::MAX as u64) {
                return Err(format!(
                    "the {name} limit is larger than {}; leave it out for no limit",
                    i64::MAX
                ));
            }
        }
        Ok(())
    }

    /// Whether a project using `used` may add `more`; if not, says which
    /// limit stops it, in words.
    pub fn admits(&self, used: &Usage, more: &Usage) -> Result<(), String> {
        let after = used.plus(more);
        for ((name, wanted), ((_, now), limit)) in after
            .fields()
            .into_iter()
            .zip(used.fields().into_iter().zip(self.limits()))
        {
            if let Some(limit) = limit {
                if wanted > limit && wanted > now {
                    return Err(format!(
                        "the project's {name} quota is {limit} and {now} are in use; this needs {}. \
                         Free some, or ask a cluster admin to raise it (`allod project quota`)",
                        wanted - now
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_only_where_set_and_name_the_resource() {
        let quota = Quota {
            volumes: Some(2),
            storage_bytes: Some(100),
            ..Quota::default()
        };
        let used = Usage {
            volumes: 1,
            storage_bytes: 60,
            ..Usage::default()
        };
        let one = |bytes| Usage {
            volumes: 1,
            storage_bytes: bytes,
            ..Usage::default()
        };
        assert!(quota.admits(&used, &one(40)).is_ok());
        let refused = quota.admits(&used, &one(41)).unwrap_err();
        assert!(refused.contains("storage_bytes quota is 100"), "{refused}");
        let full = used.plus(&one(10));
        assert!(quota
            .admits(&full, &one(0))
            .unwrap_err()
            .contains("volumes quota is 2"));
        // Unlimited resources are never refused.
        assert!(Quota::default()
            .admits(
                &full,
                &Usage {
                    vms: 1_000_000,
                    ..Usage::default()
                }
            )
            .is_ok());
        assert_eq!(full.minus(&one(10)), used);
    }
}
