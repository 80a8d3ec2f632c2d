//! The audit log: every mutating API call and every authentication failure,
//! appended through Raft, each entry chained to the one before by SHA-256,
//! so that a removed, reordered or edited entry breaks the chain and
//! `allod audit verify` names where.

use allod_raft::KvWrite;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{get_json, put_json, ReadError, StateView, KEY_AUDIT_HEAD, PREFIX_AUDIT};

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
    /// Present on the one entry that stands for many refused
    /// unauthenticated requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<RefusalSummary>,
}

impl AuditContext {
    pub fn with_result(self, result: impl Into<String>) -> AuditRecord {
        AuditRecord {
            context: self,
            result: result.into(),
            summary: None,
        }
    }
}

/// The action of an entry that summarises refused unauthenticated requests.
pub const REFUSAL_SUMMARY_ACTION: &str = "refused unauthenticated requests";

/// What one node refused of callers it could not authenticate over a
/// window of time, recorded as one entry rather than one per request: a
/// flood of bad requests costs the log a constant, not its size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RefusalSummary {
    /// The node that refused them.
    pub node: u64,
    pub since_ms: u64,
    pub until_ms: u64,
    /// How many requests were refused.
    pub requests: u64,
    /// Requests by the result they got (`unauthenticated`,
    /// `invalid_argument`, `rate_limited`, ...).
    pub results: std::collections::BTreeMap<String, u64>,
    /// The addresses that sent the most, most first.
    pub top_sources: Vec<SourceCount>,
    /// Requests from addresses not in `top_sources`.
    pub other_requests: u64,
    /// The first requests of the window, `METHOD /path`, each cut at 256 bytes.
    pub first_requests: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourceCount {
    pub source: String,
    pub requests: u64,
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

pub(super) fn append_audit(
    kv: &mut KvWrite<'_>,
    record: AuditRecord,
) -> Result<u64, allod_raft::KvError> {
    let head: Option<AuditHead> = get_json(kv, KEY_AUDIT_HEAD)?;
    let entry = chain(head.as_ref(), record);
    put_json(kv, &format!("{PREFIX_AUDIT}{:020}", entry.seq), &entry)?;
    put_json(
        kv,
        KEY_AUDIT_HEAD,
        &AuditHead {
            seq: entry.seq,
            hash: entry.hash.clone(),
        },
    )?;
    Ok(entry.seq)
}

impl StateView {
    /// Audit entries in order, starting after `after_seq`.
    pub fn audit_entries(&self, after_seq: u64) -> Result<Vec<AuditEntry>, ReadError> {
        Ok(self
            .reader
            .scan(PREFIX_AUDIT)?
            .into_iter()
            .filter(|(key, _)| {
                key[PREFIX_AUDIT.len()..]
                    .parse::<u64>()
                    .is_ok_and(|seq| seq > after_seq)
            })
            .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
            .collect())
    }
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
