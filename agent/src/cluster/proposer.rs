//! Batches concurrent writes into one Raft entry.
//!
//! openraft (0.9) appends each proposal to the log on its own and waits for
//! that append's fsync before taking the next, so one proposal per client
//! write caps a node at one write per fsync. The proposer owns the path into
//! Raft in one task: it keeps at most [`MAX_IN_FLIGHT`] entries in flight,
//! and everything that arrives meanwhile becomes the next entry, a batch
//! applied in order and answered one outcome per command. Under load one
//! fsync then carries many writes; alone, a write goes out at once: a
//! proposal that finds a free slot and an empty queue is handed to Raft in
//! the same turn, with no wait for company.

use std::sync::Arc;

use allod_raft::{Command as RaftCommand, Member, NodeId, Raft};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::state::Outcome;

/// Entries in flight at once; while they are, new writes queue into the next batch.
const MAX_IN_FLIGHT: usize = 2;
/// Commands per entry, which bounds an entry's size (each command is < 64 KiB).
const MAX_BATCH: usize = 256;
const QUEUE_DEPTH: usize = 4096;

#[derive(Debug, Clone)]
pub enum ProposeError {
    /// This node is not the leader; nothing was proposed.
    ForwardToLeader {
        leader_id: Option<NodeId>,
        leader_node: Option<Member>,
    },
    /// Raft failed or stopped; the outcome is unknown.
    Failed { message: String },
}

pub type ProposeResult = Result<Outcome, ProposeError>;

struct Proposal {
    /// The command's JSON text.
    command: Vec<u8>,
    reply: oneshot::Sender<ProposeResult>,
}

#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Proposal>,
}

impl Proposer {
    pub fn spawn(raft: Raft) -> Self {
        let (queue, proposals) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(raft, proposals));
        Self { queue }
    }

    /// Commits one command, its JSON text (as part of a batch), and
    /// returns its outcome.
    pub async fn propose(&self, command: Vec<u8>) -> ProposeResult {
        let (reply, answer) = oneshot::channel();
        let stopped = || ProposeError::Failed {
            message: "this node's Raft instance has stopped".into(),
        };
        self.queue
            .send(Proposal { command, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Wraps commands (each a JSON text) the way `ClusterApply` expects a
/// batch: the texts are joined as they are, never parsed again here.
pub fn batch_command(commands: &[Vec<u8>]) -> Vec<u8> {
    let length: usize = commands.iter().map(|c| c.len() + 1).sum();
    let mut out = Vec::with_capacity(length + 12);
    out.extend_from_slice(b"{\"batch\":[");
    for (i, command) in commands.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(command);
    }
    out.extend_from_slice(b"]}");
    out
}

async fn run(raft: Raft, mut proposals: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        // Take a slot before taking proposals, so that while all slots are
        // busy the queue fills up and becomes the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = proposals.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match proposals.try_recv() {
                Ok(proposal) => batch.push(proposal),
                Err(_) => break,
            }
        }
        // A caller that already gave up was told the outcome is unknown;
        // not proposing its write keeps that answer as harmless as possible.
        batch.retain(|proposal| !proposal.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (commands, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let count = commands.len();
            let started = std::time::Instant::now();
            let result = raft
                .client_write(RaftCommand(batch_command(&commands)))
                .await;
            tracing::trace!(
                commands = count,
                elapsed_us = started.elapsed().as_micros() as u64,
                "batch committed and applied"
            );
            let answers: Vec<ProposeResult> = match result {
                Ok(response) => match serde_json::from_value::<Vec<Outcome>>(response.data.0) {
                    Ok(outcomes) if outcomes.len() == count => {
                        outcomes.into_iter().map(Ok).collect()
                    }
                    Ok(outcomes) => vec![
                        Err(ProposeError::Failed {
                            message: format!(
                                "a batch of {count} commands produced {} outcomes",
                                outcomes.len()
                            )
                        });
                        count
                    ],
                    Err(e) => vec![
                        Err(ProposeError::Failed {
                            message: format!("unreadable batch result: {e}")
                        });
                        count
                    ],
                },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    vec![
                        Err(ProposeError::ForwardToLeader {
                            leader_id: forward.leader_id,
                            leader_node: forward.leader_node
                        });
                        count
                    ]
                }
                Err(e) => vec![
                    Err(ProposeError::Failed {
                        message: e.to_string()
                    });
                    count
                ],
            };
            for (reply, answer) in replies.into_iter().zip(answers) {
                // A caller that gave up (timed out) no longer listens.
                let _ = reply.send(answer);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_the_commands_texts_in_a_json_list() {
        let commands = vec![
            br#"{"op":"a"}"#.to_vec(),
            br#"{"op":"b","n":[1,2]}"#.to_vec(),
        ];
        let batch: serde_json::Value = serde_json::from_slice(&batch_command(&commands)).unwrap();
        assert_eq!(
            batch,
            serde_json::json!({"batch": [{"op": "a"}, {"op": "b", "n": [1, 2]}]})
        );
        let empty: serde_json::Value = serde_json::from_slice(&batch_command(&[])).unwrap();
        assert_eq!(empty, serde_json::json!({"batch": []}));
    }
}
