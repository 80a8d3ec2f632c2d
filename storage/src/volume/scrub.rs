//! Scrubbing a volume's replicas, by its writer, while its I/O goes on.
//!
//! Light: every in-sync replica's description of each object (version,
//! snapshot sequence, presence, snapshot copies) is compared with the
//! others'. Deep: each copy's blocks are also read and checked against
//! their CRC32C. A copy that fails either check is replaced whole, under
//! the object's write lock, from a replica whose copy verifies and is the
//! newest; every repair is returned (the caller logs and counts them). An
//! object no replica holds intact is reported as unrepairable and left
//! alone.

use std::sync::atomic::Ordering;

use super::{IoError, Progress, Throttle, VolumeHandle};
use crate::proto::{Request, Response};
use crate::range_lock::ALL;

/// One copy replaced by a scrub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubRepair {
    pub index: u64,
    pub node: u64,
    /// `checksum` (a block did not match its CRC) or `differs` (its
    /// description disagreed with the newest intact copy's).
    pub reason: &'static str,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub objects: u64,
    pub repairs: Vec<ScrubRepair>,
    /// Objects with no intact copy on any in-sync replica.
    pub unrepairable: Vec<u64>,
}

impl VolumeHandle {
    /// Scrubs every object the in-sync replicas hold (see the module doc).
    pub async fn scrub(
        &self,
        deep: bool,
        throttle: &Throttle,
        progress: &Progress,
    ) -> Result<ScrubReport, IoError> {
        self.activate().await?;
        let spec = self.spec();
        let nodes = self.in_sync_members(&spec);
        let indexes = self.indexes_on(&spec, &nodes).await?;
        progress
            .total_bytes
            .fetch_add(indexes.len() as u64 * spec.object_size, Ordering::Relaxed);
        let mut report = ScrubReport::default();
        for index in indexes {
            let lock = self.lock_for(index);
            let _exclusive = lock.lock(ALL, true).await;
            let in_sync = self.in_sync();
            let live: Vec<u64> = spec
                .map
                .place(&spec.id, index, spec.replicas)
                .into_iter()
                .filter(|n| in_sync.contains(n))
                .collect();
            let mut copies = Vec::new();
            for node in &live {
                let info = match self.stat(&spec, *node, index).await {
                    Ok(info) => info,
                    Err(e @ IoError::Fenced(_)) => return Err(e),
                    // Its headers do not read: damaged too.
                    Err(_) => {
                        copies.push((*node, None, false));
                        continue;
                    }
                };
                let intact = if deep && info.is_some() {
                    self.verify(&spec, *node, index).await?
                } else {
                    true
                };
                copies.push((*node, info, intact));
            }
            report.objects += 1;
            let best = copies
                .iter()
                .filter(|(_, _, intact)| *intact)
                .max_by_key(|(_, i, _)| {
                    i.as_ref().map(|i| (!i.uncertain, i.version, i.seq, i.head))
                })
                .cloned();
            let Some((source, best, _)) = best else {
                tracing::error!(volume = %spec.id, "scrub: object {index} has no intact copy on nodes {live:?}; it cannot be repaired");
                report.unrepairable.push(index);
                continue;
            };
            for (node, info, intact) in &copies {
                let reason = if !intact {
                    "checksum"
                } else if *info != best {
                    "differs"
                } else {
                    continue;
                };
                self.copy_object(&spec, index, source, *node).await?;
                tracing::warn!(volume = %spec.id, "scrub: object {index} on node {node} was damaged ({reason}); repaired from node {source}");
                report.repairs.push(ScrubRepair {
                    index,
                    node: *node,
                    reason,
                });
            }
            progress
                .done_bytes
                .fetch_add(spec.object_size, Ordering::Relaxed);
            drop(_exclusive);
            if deep {
                throttle.take(spec.object_size).await;
            }
        }
        Ok(report)
    }

    async fn verify(
        &self,
        spec: &super::VolumeSpec,
        node: u64,
        index: u64,
    ) -> Result<bool, IoError> {
        let req = Request::Verify {
            volume: spec.id.clone(),
            index,
            len: spec.object_size as u32,
        };
        match self.call_checked(spec, node, &req).await? {
            Response::Bool(b) => Ok(b),
            other => Err(IoError::Failed(format!(
                "storage node {node} answered a verify with {other:?}"
            ))),
        }
    }
}
