//! How log entries and peer messages are encoded, and how that may change.
//!
//! ## Log entries on disk
//!
//! The log stores each entry under its index as one format byte followed by
//! the entry:
//!
//! | format | first byte | encoding |
//! |---|---|---|
//! | 1 | `{` (none of its own) | JSON of openraft's `Entry`; a command is its JSON document |
//! | 2 | `2` | postcard of openraft's `Entry`; a command is its bytes |
//!
//! A node writes the newest format it knows and reads every older one, so
//! a log written before an upgrade stays readable after it (and the
//! `state-format-1` fixture of the agent's tests proves it for format 1).
//! A new format takes the next byte; a format byte a node does not know is
//! refused with an error naming it (the log was written by a newer Allod).
//!
//! ## Peer messages
//!
//! Raft's messages and the leader-only calls between nodes are postcard,
//! sent with the content type [`PEER_CONTENT_TYPE`]. The rule for a cluster
//! of mixed versions: a node asks in the newest encoding it knows and a peer
//! answers in the encoding it was asked in; a peer that does not know it
//! answers 415 (every earlier Allod does, speaking JSON only), and the asker
//! speaks JSON to that peer for a while before trying again. A later
//! encoding gets a new content type, and nodes keep accepting the older ones
//! for at least one release.
//!
//! postcard is not self-describing: a message's fields are its schema. A
//! change to a message that is not a new optional field at its end is a new
//! encoding, under the rule above. Commands are the agent's own encoding
//! (JSON documents), carried as bytes, so they can gain fields without
//! changing either format.

use openraft::Entry;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::TypeConfig;

/// The format byte of log entries written now.
pub const ENTRY_FORMAT: u8 = 2;

/// The content type of peer messages in postcard.
pub const PEER_CONTENT_TYPE: &str = "application/x-allod-peer-1";

/// An entry or a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("log entry in format {format}, which this version of Allod does not know (written by a newer one?)")]
    UnknownFormat { format: u8 },
    #[error("empty log entry")]
    Empty,
    #[error("log entry in the JSON format does not parse")]
    Json(#[from] serde_json::Error),
    #[error("binary encoding")]
    Postcard(#[from] postcard::Error),
}

/// Encodes an entry for the log, in [`ENTRY_FORMAT`].
pub fn encode_entry(entry: &Entry<TypeConfig>) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![ENTRY_FORMAT];
    out = postcard::to_extend(entry, out)?;
    Ok(out)
}

/// Decodes an entry the log stored, in any format this version knows.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, CodecError> {
    match bytes.first() {
        None => Err(CodecError::Empty),
        Some(&ENTRY_FORMAT) => Ok(postcard::from_bytes(&bytes[1..])?),
        Some(b'{') => Ok(serde_json::from_slice(bytes)?),
        Some(&format) => Err(CodecError::UnknownFormat { format }),
    }
}

/// Encodes a peer message as [`PEER_CONTENT_TYPE`].
pub fn to_wire<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_stdvec(message)?)
}

/// Decodes a peer message sent as [`PEER_CONTENT_TYPE`].
pub fn from_wire<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(postcard::from_bytes(bytes)?)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::error::{Fatal, RaftError};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, Vote};

    use super::*;
    use crate::{Command, Member, NodeId};

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entries() -> Vec<Entry<TypeConfig>> {
        let members: BTreeMap<NodeId, Member> = [(
            1,
            Member {
                name: "n1".into(),
                api_addr: "127.0.0.1:1".into(),
                peer_addr: "127.0.0.1:2".into(),
            },
        )]
        .into();
        vec![
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(1, 2),
                payload: EntryPayload::Membership(Membership::new(
                    vec![BTreeSet::from([1])],
                    members,
                )),
            },
            Entry {
                log_id: log_id(2, 3),
                payload: EntryPayload::Normal(Command(
                    br#"{"batch":[{"op":"create_project","name":"p"}]}"#.to_vec(),
                )),
            },
        ]
    }

    #[test]
    fn entries_round_trip_in_the_current_format() {
        for entry in entries() {
            let bytes = encode_entry(&entry).unwrap();
            assert_eq!(bytes[0], ENTRY_FORMAT);
            let back = decode_entry(&bytes).unwrap();
            assert_eq!(back.log_id, entry.log_id);
            assert_eq!(
                format!("{:?}", back.payload),
                format!("{:?}", entry.payload)
            );
        }
    }

    #[test]
    fn an_entry_of_the_first_format_reads_with_its_command_intact() {
        // As the log stored it before format 2 (from a real log).
        let json = br#"{"log_id":{"leader_id":{"term":1,"node_id":1},"index":15},"payload":{"Normal":{"batch":[{"command":{"name":"before-10","op":"create_project"},"op":"audited"}]}}}"#;
        let entry = decode_entry(json).unwrap();
        assert_eq!(entry.log_id, log_id(1, 15));
        let EntryPayload::Normal(command) = entry.payload else {
            panic!("a normal entry");
        };
        let value: serde_json::Value = serde_json::from_slice(&command.0).unwrap();
        assert_eq!(value["batch"][0]["command"]["name"], "before-10");
        // Written again in JSON (to a peer that speaks only JSON), it is the
        // document it was.
        let again = serde_json::to_value(Entry::<TypeConfig> {
            log_id: entry.log_id,
            payload: EntryPayload::Normal(command),
        })
        .unwrap();
        assert_eq!(
            again,
            serde_json::from_slice::<serde_json::Value>(json).unwrap()
        );
    }

    #[test]
    fn an_unknown_format_is_refused_by_name() {
        let error = decode_entry(&[9, 1, 2]).unwrap_err();
        assert!(error.to_string().contains("format 9"), "{error}");
        assert!(matches!(decode_entry(&[]), Err(CodecError::Empty)));
        assert!(decode_entry(&[ENTRY_FORMAT, 0xff]).is_err());
    }

    #[test]
    fn peer_messages_round_trip() {
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(1, 2)),
            entries: entries(),
            leader_commit: Some(log_id(1, 2)),
        };
        let back: AppendEntriesRequest<TypeConfig> =
            from_wire(&to_wire(&request).unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{request:?}"));

        let vote = VoteRequest::new(Vote::new(3, 2), Some(log_id(2, 3)));
        let back: VoteRequest<NodeId> = from_wire(&to_wire(&vote).unwrap()).unwrap();
        assert_eq!(back, vote);

        type Answer = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;
        for answer in [
            Ok(AppendEntriesResponse::Success),
            Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(1, 2)))),
            Ok(AppendEntriesResponse::Conflict),
            Ok(AppendEntriesResponse::HigherVote(Vote::new(4, 3))),
            Err(RaftError::<NodeId>::Fatal(Fatal::Stopped)),
        ] {
            let back: Answer = from_wire(&to_wire(&answer).unwrap()).unwrap();
            assert_eq!(format!("{back:?}"), format!("{answer:?}"));
        }
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_panic() {
        let vote = VoteRequest::new(Vote::new(3, 2), Some(log_id(2, 3)));
        let bytes = to_wire(&vote).unwrap();
        for cut in 0..bytes.len() {
            assert!(from_wire::<VoteRequest<NodeId>>(&bytes[..cut]).is_err());
        }
    }
}
