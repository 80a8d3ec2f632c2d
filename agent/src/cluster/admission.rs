//! Which node certificates are served: the cluster CA's signature is not
//! enough. Each node's record pins the SHA-256 of the public key it joined
//! with, and node ids are never given out twice, so a certificate is
//! refused once its node is removed (its id is below the id counter and has
//! no record) or when it carries a key its node never joined with (one
//! minted with a copy of the CA key). The peer, API and storage listeners
//! all ask here, per request or when the state moves, so a removal cuts
//! connections already open too.

use std::sync::Arc;

use allod_raft::NodeId;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use crate::cluster::node::ClusterNode;
use crate::cluster::peer::PeerIdentity;
use crate::state::nodes::NodeAdmission;

/// The words a refused node certificate's answer starts with; a node that
/// reads them from most members' answers knows it was removed.
pub const REVOKED: &str = "node certificate refused:";

/// A node certificate as a listener saw it after the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub id: NodeId,
    pub key_sha256: String,
}

impl NodeCert {
    /// The node certificate among a client's certificates, if the first one
    /// is one (common name `node-<id>`).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (id, key_sha256) = crate::cluster::pki::node_identity(der)?;
        Some(Self { id, key_sha256 })
    }
}

impl ClusterNode {
    /// Whether `cert` speaks for a member, by this node's state alone.
    /// `raft`: for Raft's own messages, which are also taken from a node
    /// this state does not know yet when Raft's membership names it (it
    /// joined after what this node has applied) or when it was among the
    /// members whose keys this node was given when it joined (it waits for
    /// the leader's first entries); a key other than the given one is
    /// refused.
    pub fn judge_node_cert(&self, cert: &NodeCert, raft: bool) -> Result<(), String> {
        let admission = self
            .state
            .node_admission(cert.id, &cert.key_sha256)
            .map_err(|e| format!("cannot read the cluster state: {e}"))?;
        match admission {
            NodeAdmission::Member => Ok(()),
            NodeAdmission::Refused(why) => Err(format!("{REVOKED} {why}")),
            NodeAdmission::NotYetKnown => {
                let pinned = self.join_pins.get(&cert.id);
                if pinned.is_some_and(|key| *key != cert.key_sha256) {
                    return Err(format!(
                        "the certificate for node {} carries a key other than the one it joined with",
                        cert.id
                    ));
                }
                if raft && (self.member_of(cert.id).is_some() || pinned.is_some()) {
                    Ok(())
                } else {
                    Err(format!(
                        "node {} is not a member of this cluster as far as node {} knows",
                        cert.id, self.id
                    ))
                }
            }
        }
    }

    /// [`Self::judge_node_cert`] for a request, catching up with the leader
    /// first when the node is not known yet (it may have joined moments
    /// ago through another member).
    pub async fn admit_node_cert(&self, cert: &NodeCert, raft: bool) -> Result<(), String> {
        let first = self.judge_node_cert(cert, raft);
        if first.is_ok() || raft || first.as_ref().is_err_and(|e| e.starts_with(REVOKED)) {
            return first;
        }
        if self
            .caught_up_since(crate::cluster::node::mono_ms(), std::time::Duration::ZERO)
            .await
            .is_err()
        {
            return first;
        }
        self.judge_node_cert(cert, raft)
    }

    /// Tells this node, for certain, that it was removed from the cluster:
    /// the agent then stops serving it, wipes its keys and state, and
    /// returns to unconfigured.
    pub fn mark_removed(&self, how: String) {
        self.peers.removed.send_if_modified(|removed| {
            if removed.is_some() {
                return false;
            }
            tracing::warn!(reason = %how, "this node was removed from the cluster");
            *removed = Some(how);
            true
        });
    }

    /// Waits until some peer claims this node was removed (see
    /// [`Self::confirm_removed`]).
    pub async fn removal_hinted(&self) {
        self.peers.removal_hints.notified().await
    }

    /// Asks every other member Raft's membership names whether it still
    /// serves this node's certificate: removed for certain only when more
    /// than half of them refuse it as revoked. One member's word (a false
    /// notice, a removed node answering the call that removed it) never
    /// makes a node wipe itself.
    pub async fn confirm_removed(&self) -> Option<String> {
        let others: Vec<String> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, member)| member.peer_addr.clone())
            .collect();
        if others.is_empty() {
            return None;
        }
        let asks = others.iter().map(|addr| async move {
            let reply: Result<serde_json::Value, crate::cluster::peer::PeerCallError> = self
                .peers
                .call(addr, "/cluster/read-index", &(), std::time::Duration::from_secs(3))
                .await;
            matches!(reply, Err(crate::cluster::peer::PeerCallError::Refused { status: 403, ref message, .. }) if message.starts_with(REVOKED))
        });
        let refusing = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .filter(|refused| *refused)
            .count();
        tracing::info!(
            refusing,
            asked = others.len(),
            "asked the members whether this node was removed"
        );
        (refusing * 2 > others.len()).then(|| {
            format!(
                "{refusing} of the {} other members refuse this node's certificate as revoked",
                others.len()
            )
        })
    }

    /// Waits until this node knows for certain it was removed, and says how.
    pub async fn removed(&self) -> String {
        let mut watch = self.peers.removed.subscribe();
        loop {
            if let Some(how) = watch.borrow_and_update().clone() {
                return how;
            }
            if watch.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Peer port middleware: every request, on every connection, is served
/// only to a member's certificate (Raft's messages with the allowance
/// [`ClusterNode::judge_node_cert`] describes).
pub async fn members_only(
    State(node): State<Arc<ClusterNode>>,
    Extension(identity): Extension<PeerIdentity>,
    request: Request,
    next: Next,
) -> Response {
    let raft = request.uri().path().starts_with("/raft/");
    let verdict = match &identity.node_cert {
        Some(cert) => node.admit_node_cert(cert, raft).await,
        None => Err("the client certificate does not name a node".to_string()),
    };
    match verdict {
        Ok(()) => {
            // A member's certificate, admitted: kept longest when the
            // listener is full.
            identity
                .proven
                .store(true, std::sync::atomic::Ordering::Relaxed);
            next.run(request).await
        }
        Err(why) => {
            tracing::warn!(remote = ?identity.remote_addr, node = ?identity.node_cert.as_ref().map(|c| c.id), reason = %why, "refused a peer request");
            // Nor does a refused certificate keep its connection.
            (
                StatusCode::FORBIDDEN,
                [(axum::http::header::CONNECTION, "close")],
                why,
            )
                .into_response()
        }
    }
}

/// The storage port's gate: members' certificates only, decided again
/// whenever the state's nodes, volumes or VMs change.
pub struct StorageGate(pub std::sync::Weak<ClusterNode>);

impl storage::transport::PeerGate for StorageGate {
    fn admit(&self, cert_der: &[u8]) -> Result<(), String> {
        let node = self
            .0
            .upgrade()
            .ok_or_else(|| "this node is shutting down".to_string())?;
        let cert = NodeCert::from_der(cert_der)
            .ok_or_else(|| "the client certificate does not name a node".to_string())?;
        // Storage peers are Raft members: one this state does not know yet
        // is served only while Raft's membership names it.
        node.judge_node_cert(&cert, true)
            .and_then(|()| match node.state.cluster() {
                Ok(None) => Err("this node has not caught up with the cluster yet".to_string()),
                _ => Ok(()),
            })
    }

    fn generation(&self) -> u64 {
        // Once the node is gone, `admit` refuses whatever the generation.
        self.0.upgrade().map_or(u64::MAX, |n| *n.applied.borrow())
    }
}
