//! The audit log: every mutating API call and every authentication failure,
//! appended through Raft, each entry chained to the one before by SHA-256,
//! so that a removed, reordered or edited entry breaks the chain and
//! `allod audit verify` names where.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Who is acting and on what, known before the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditContext {
    pub time_ms: u64,
    /// The authenticated user, or "-" when authentication failed.
    pub user: String,
    /// The id of the token used, or "-".
    pub token_id: String,
    /// The client's address as this node saw it.
    pub source: String,
    /// `METHOD /route/pattern`.
    pub action: String,
    /// The concrete path, naming the object acted on.
    pub object: String,
    /// The classification zone of the object, if it has one.
    pub zone: Option<String>,
}

/// What happened, as the API edge saw it: the context and its outcome.
/// Serialised flat, fields in declaration order (the hash covers that JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    #[serde(flatten)]
    pub context: AuditContext,
    /// `ok`, or the error code the caller got (`already_exists`,
    /// `unauthenticated`, `forbidden`, ...).
    pub result: String,
}

impl AuditContext {
    pub fn with_result(self, result: impl Into<String>) -> AuditRecord {
        AuditRecord {
            context: self,
            result: result.into(),
        }
    }
}

/// The audit context of the API request being handled. The first write a
/// handler makes carries it into Raft, where the entry is appended in the
/// same transaction as the change; `recorded` tells the middleware not to
/// append a second one.
pub struct RequestAudit {
    pub context: std::sync::Mutex<AuditContext>,
    pub recorded: std::sync::atomic::AtomicBool,
}

tokio::task_local! {
    pub static REQUEST_AUDIT: std::sync::Arc<RequestAudit>;
}

/// Takes the current request's audit context for one write, once.
pub fn take_request_context() -> Option<AuditContext> {
    REQUEST_AUDIT
        .try_with(|audit| {
            (!audit
                .recorded
                .swap(true, std::sync::atomic::Ordering::SeqCst))
            .then(|| audit.context.lock().expect("audit context").clone())
        })
        .ok()
        .flatten()
}

/// The audit result for an HTTP status the middleware answered itself.
pub fn result_for_status(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        400 => "invalid_argument",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        413 => "payload_too_large",
        503 => "unavailable",
        _ => "error",
    }
}

/// One link of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    pub prev_hash: String,
    pub hash: String,
    #[serde(flatten)]
    pub record: AuditRecord,
}

/// The chain's state: the last entry's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

/// Bounds how many authentication failures per second a node records, so a
/// flood of bad tokens cannot turn into a flood of Raft writes. Failures
/// beyond the budget are counted and the count is logged.
pub struct FailureBudget {
    window: std::sync::Mutex<(u64, u32, u64)>,
    per_second: u32,
}

impl FailureBudget {
    pub fn new(per_second: u32) -> Self {
        Self {
            window: std::sync::Mutex::new((0, 0, 0)),
            per_second,
        }
    }

    /// Whether a failure at `now_ms` may be recorded.
    pub fn admit(&self, now_ms: u64) -> bool {
        let mut window = self.window.lock().expect("failure budget");
        let (second, _, dropped) = &mut *window;
        if now_ms / 1000 != *second {
            if *dropped > 0 {
                tracing::warn!(
                    dropped = *dropped,
                    "authentication failures beyond the audit budget were not recorded"
                );
            }
            *window = (now_ms / 1000, 0, 0);
        }
        let (_, used, dropped) = &mut *window;
        if *used < self.per_second {
            *used += 1;
            true
        } else {
            *dropped += 1;
            false
        }
    }
}

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry: SHA-256 over the previous hash, the sequence
/// number and the record's JSON (fields in declaration order).
pub fn entry_hash(prev_hash: &str, seq: u64, record: &AuditRecord) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(seq.to_string().as_bytes());
    hasher.update(b"\n");
    hasher.update(serde_json::to_vec(record).expect("records serialise"));
    hex::encode(hasher.finalize())
}

/// Links a record after `head`.
pub fn chain(head: Option<&AuditHead>, record: AuditRecord) -> AuditEntry {
    let (seq, prev_hash) = match head {
        Some(head) => (head.seq + 1, head.hash.clone()),
        None => (1, GENESIS_HASH.to_string()),
    };
    let hash = entry_hash(&prev_hash, seq, &record);
    AuditEntry {
        seq,
        prev_hash,
        hash,
        record,
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("entry {seq}: expected sequence number {expected}; an entry before it was removed or the entries were reordered")]
    Gap { seq: u64, expected: u64 },
    #[error("entry {seq}: its previous-hash does not match entry {}'s hash; an entry was removed or altered", .seq - 1)]
    Link { seq: u64 },
    #[error("entry {seq}: its contents do not match its hash; the entry was altered")]
    Altered { seq: u64 },
}

/// Checks a complete log, from entry 1, in order.
pub fn verify(entries: &[AuditEntry]) -> Result<u64, ChainBreak> {
    let mut prev_hash = GENESIS_HASH.to_string();
    for (i, entry) in entries.iter().enumerate() {
        let expected = i as u64 + 1;
        if entry.seq != expected {
            return Err(ChainBreak::Gap {
                seq: entry.seq,
                expected,
            });
        }
        if entry.prev_hash != prev_hash {
            return Err(ChainBreak::Link { seq: entry.seq });
        }
        if entry_hash(&entry.prev_hash, entry.seq, &entry.record) != entry.hash {
            return Err(ChainBreak::Altered { seq: entry.seq });
        }
        prev_hash = entry.hash.clone();
    }
    Ok(entries.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> AuditRecord {
        AuditContext {
            time_ms: n,
            user: "admin".into(),
            token_id: "admin".into(),
            source: "127.0.0.1:1".into(),
            action: "POST /v1/projects".into(),
            object: format!("/v1/projects/p{n}"),
            zone: None,
        }
        .with_result("ok")
    }

    #[test]
    fn records_serialise_flat_in_field_order() {
        let json = serde_json::to_string(&record(7)).unwrap();
        assert_eq!(
            json,
            r#"{"time_ms":7,"user":"admin","token_id":"admin","source":"127.0.0.1:1","action":"POST /v1/projects","object":"/v1/projects/p7","zone":null,"result":"ok"}"#
        );
    }

    fn log(n: u64) -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = Vec::new();
        for i in 0..n {
            let head = entries.last().map(|e| AuditHead {
                seq: e.seq,
                hash: e.hash.clone(),
            });
            entries.push(chain(head.as_ref(), record(i)));
        }
        entries
    }

    #[test]
    fn the_failure_budget_resets_every_second() {
        let budget = FailureBudget::new(2);
        assert!(budget.admit(1_000) && budget.admit(1_500));
        assert!(!budget.admit(1_999));
        assert!(budget.admit(2_000));
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&log(5)), Ok(5));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn removing_reordering_or_editing_an_entry_is_detected() {
        let mut removed = log(5);
        removed.remove(2);
        assert_eq!(
            verify(&removed),
            Err(ChainBreak::Gap {
                seq: 4,
                expected: 3
            })
        );

        let mut edited = log(5);
        edited[1].record.result = "forbidden".into();
        assert_eq!(verify(&edited), Err(ChainBreak::Altered { seq: 2 }));

        // Removing an entry and renumbering the rest still breaks the links.
        let mut renumbered = log(5);
        renumbered.remove(2);
        for (i, e) in renumbered.iter_mut().enumerate() {
            e.seq = i as u64 + 1;
        }
        assert_eq!(verify(&renumbered), Err(ChainBreak::Link { seq: 3 }));

        let mut swapped = log(5);
        swapped.swap(1, 2);
        assert!(verify(&swapped).is_err());
    }
}
