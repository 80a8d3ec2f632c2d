//! Live migration of a running domain to another node's libvirt.
//!
//! The source's libvirt daemon drives it peer to peer and tunnels the
//! memory stream through its own connection to the destination's daemon
//! (`qemu+tls://…` between appliances), so nothing but that one connection
//! crosses the network: the disks are network disks and are not copied.
//!
//! The domain arrives paused ([`FLAGS`] has `PAUSED`): whoever decides that
//! the migration succeeded (the cluster, through Raft) hands the disks'
//! writer over first, and only then does the destination
//! [resume](Hypervisor::resume) it. A migration that fails leaves the
//! domain running on the source, as libvirt resumes it there.

use virt::domain::MigrateParameters;
use virt::sys;

use crate::lifecycle::{domain_err, HvError, Hypervisor};

/// Live, peer to peer, tunnelled, arriving paused, defined on the
/// destination and removed from the source when it worked; a guest that
/// dirties memory faster than it can be sent is slowed until it converges.
pub const FLAGS: u32 = sys::VIR_MIGRATE_LIVE
    | sys::VIR_MIGRATE_PEER2PEER
    | sys::VIR_MIGRATE_TUNNELLED
    | sys::VIR_MIGRATE_PAUSED
    | sys::VIR_MIGRATE_ABORT_ON_ERROR
    | sys::VIR_MIGRATE_PERSIST_DEST
    | sys::VIR_MIGRATE_UNDEFINE_SOURCE
    | sys::VIR_MIGRATE_AUTO_CONVERGE;

/// How far a running migration is, in bytes of the domain's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub total: u64,
    pub sent: u64,
    pub remaining: u64,
}

/// Rewrites a domain's XML for another node: every attribute value equal
/// to a pair's first string (its node's key in the metadata, its NBD
/// socket, its console log) becomes the second. Refused when one is not
/// found, so that a change in libvirt's formatting cannot send a domain
/// off still pointing at this node.
pub fn retarget(xml: &str, pairs: &[(&str, &str)]) -> Result<String, String> {
    let mut out = xml.to_string();
    for (old, new) in pairs {
        let (old, new) = (crate::spec::escape(old), crate::spec::escape(new));
        let mut found = false;
        for quote in ['\'', '"'] {
            let from = format!("={quote}{old}{quote}");
            if out.contains(&from) {
                found = true;
                out = out.replace(&from, &format!("={quote}{new}{quote}"));
            }
        }
        if !found {
            return Err(format!(
                "the domain's definition has no attribute with the value {old:?} to rewrite for the destination"
            ));
        }
    }
    Ok(out)
}

impl Hypervisor {
    /// The running domain's definition as a destination must receive it.
    pub fn migratable_xml(&self, id: &str) -> Result<String, HvError> {
        self.with(id, |d| {
            d.xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE | sys::VIR_DOMAIN_XML_SECURE)
        })?
        .ok_or_else(|| HvError::Domain {
            name: format!("allod-{id}"),
            message: "is not defined on this node".into(),
        })
    }

    /// Moves the running domain to the libvirt at `dest_uri` (as this
    /// node's libvirt daemon reaches it) with the definition `dest_xml`,
    /// pausing the guest for at most about `max_downtime_ms` at the switch.
    /// Blocks until the migration ends; [`Hypervisor::progress`] tells how
    /// far it is meanwhile.
    pub fn migrate(
        &self,
        id: &str,
        dest_uri: &str,
        dest_xml: &str,
        max_downtime_ms: u64,
    ) -> Result<(), HvError> {
        let name = format!("allod-{id}");
        let dom = self.lookup(id)?.ok_or_else(|| HvError::Domain {
            name: name.clone(),
            message: "is not defined on this node".into(),
        })?;
        // Taken by libvirt only for a job that runs; set before it starts.
        let _ = dom.migrate_set_max_downtime(max_downtime_ms, 0);
        let parameters = MigrateParameters {
            dest_xml: Some(dest_xml.to_string()),
            persist_xml: Some(dest_xml.to_string()),
            ..Default::default()
        };
        dom.migrate_to_uri3(Some(dest_uri), parameters, FLAGS)
            .map_err(domain_err(&name))
    }

    /// How far the domain's migration is, or `None` when it has no job.
    pub fn progress(&self, id: &str) -> Result<Option<Progress>, HvError> {
        // Not `job_stats`: the bindings build a Vec from the parameter
        // array libvirt returns, which is null when there is no job (the
        // process aborts on it).
        let stats = self.with(id, |d| d.job_info())?;
        Ok(stats
            .filter(|s| {
                s.r#type == sys::VIR_DOMAIN_JOB_BOUNDED as i32
                    || s.r#type == sys::VIR_DOMAIN_JOB_UNBOUNDED as i32
            })
            .map(|s| Progress {
                total: s.mem_total.or(s.data_total).unwrap_or(0),
                sent: s.mem_processed.or(s.data_processed).unwrap_or(0),
                remaining: s.mem_remaining.or(s.data_remaining).unwrap_or(0),
            }))
    }

    /// Whether a domain of this name is defined, asked without touching
    /// the domain itself: while libvirt tears down a migrated guest's old
    /// QEMU (a second or two), calls on the domain wait for it.
    pub fn defined(&self, id: &str) -> Result<bool, HvError> {
        let name = format!("allod-{id}");
        match self.conn().lookup_domain_by_name(&name) {
            Ok(_) => Ok(true),
            Err(e)
                if e.code() == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain) =>
            {
                Ok(false)
            }
            Err(e) => Err(domain_err(&name)(e)),
        }
    }

    /// Runs a paused guest again.
    pub fn resume(&self, id: &str) -> Result<(), HvError> {
        self.with(id, |d| d.resume()).map(drop)
    }

    /// Cancels the domain's running migration (it goes on running here).
    pub fn abort_migration(&self, id: &str) -> Result<(), HvError> {
        self.with(id, |d| {
            // SAFETY: `d` is a live domain handle for the whole call.
            let r = unsafe { sys::virDomainAbortJob(d.as_ptr()) };
            if r < 0 {
                Err(virt::error::Error::last_error())
            } else {
                Ok(())
            }
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retarget_rewrites_every_value_and_refuses_a_missing_one() {
        let xml = "<allod:instance node='c-1' id='v'/>\n<host transport='unix' socket='/run/a/nbd.sock'/>\n\
                   <host socket=\"/run/a/nbd.sock\"/>\n<log file='/d/1/console/v.log' append='on'/>";
        let out = retarget(
            xml,
            &[
                ("c-1", "c-2"),
                ("/run/a/nbd.sock", "/run/b/nbd.sock"),
                ("/d/1/console/v.log", "/d/2/console/v.log"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "<allod:instance node='c-2' id='v'/>\n<host transport='unix' socket='/run/b/nbd.sock'/>\n\
             <host socket=\"/run/b/nbd.sock\"/>\n<log file='/d/2/console/v.log' append='on'/>"
        );
        // A prefix is not a value: `c-1` inside `c-10` stays.
        let err = retarget("<x node='c-10'/>", &[("c-1", "c-2")]).unwrap_err();
        assert!(err.contains("\"c-1\""), "{err}");
    }
}
