//! Join tokens, in the style of Incus: a base64url-encoded JSON document
//! naming the cluster, the SHA-256 fingerprint of its CA certificate, the
//! members' addresses, and a single-use secret. The cluster stores only the
//! secret's hash; spending a token is a Raft command, so a token can be used
//! once across the whole cluster.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::node::{ClusterError, ClusterNode};

pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenMember {
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    pub cluster_id: String,
    pub ca_fingerprint: String,
    pub members: Vec<TokenMember>,
    pub id: String,
    pub secret: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "the join token is empty; pass the token printed by `allod cluster join-token` on a member"
    )]
    Empty,
    #[error("the join token is malformed: it is not valid base64 ({reason}); it was probably truncated or mistyped, copy it again in full")]
    NotBase64 { reason: String },
    #[error("the join token is malformed: its contents do not parse ({reason}); it was probably truncated or edited, copy it again in full")]
    BadContents { reason: String },
    #[error("the join token names no cluster members to contact; create a new one with `allod cluster join-token`")]
    NoMembers,
    #[error("the join token expired {ago_secs} s ago; create a new one with `allod cluster join-token` on a member")]
    Expired { ago_secs: u64 },
    #[error("the join token is malformed: {what}; it was probably edited, copy it again in full from `allod cluster join-token`")]
    Invalid { what: String },
}

/// The longest join token accepted, in characters.
pub const MAX_TOKEN_CHARS: usize = 16 * 1024;
const MAX_TOKEN_MEMBERS: usize = 64;
const MAX_TOKEN_FIELD: usize = 512;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl JoinToken {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("tokens serialise"))
    }

    /// Parses a token and checks what can be checked without the cluster.
    pub fn decode(text: &str, now_ms: u64) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        if text.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Invalid {
                what: format!(
                    "it is {} characters long, more than the {MAX_TOKEN_CHARS} a token can have",
                    text.len()
                ),
            });
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| TokenError::NotBase64 {
                reason: e.to_string(),
            })?;
        let token: JoinToken =
            serde_json::from_slice(&bytes).map_err(|e| TokenError::BadContents {
                reason: e.to_string(),
            })?;
        if token.members.is_empty() {
            return Err(TokenError::NoMembers);
        }
        let invalid = |what: String| Err(TokenError::Invalid { what });
        if token.ca_fingerprint.len() != 64
            || !token.ca_fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return invalid("its CA fingerprint is not 64 hexadecimal digits".into());
        }
        if token.members.len() > MAX_TOKEN_MEMBERS {
            return invalid(format!(
                "it names {} members, more than {MAX_TOKEN_MEMBERS}",
                token.members.len()
            ));
        }
        let fields = [&token.cluster_id, &token.id, &token.secret]
            .into_iter()
            .chain(
                token
                    .members
                    .iter()
                    .flat_map(|m| [&m.name, &m.api_addr, &m.peer_addr]),
            );
        for field in fields {
            if field.len() > MAX_TOKEN_FIELD || field.chars().any(char::is_control) {
                return invalid(
                    "a field is over 512 bytes long or holds control characters".into(),
                );
            }
        }
        if token.expires_at_ms <= now_ms {
            return Err(TokenError::Expired {
                ago_secs: (now_ms - token.expires_at_ms) / 1000,
            });
        }
        Ok(token)
    }
}

/// Issues a new single-use join token on a member.
pub async fn create_token(
    node: &ClusterNode,
    ttl_secs: u64,
) -> Result<(JoinToken, String), ClusterError> {
    let info = node.state.cluster()?.ok_or(ClusterError::Raft {
        message: "the cluster record is missing".into(),
    })?;
    let id = random_hex(8);
    let secret = random_hex(32);
    let now = now_ms();
    let expires_at_ms = now + ttl_secs.saturating_mul(1000);
    let command = crate::state::Command::CreateJoinToken {
        id: id.clone(),
        secret_sha256: sha256_hex(&secret),
        now_ms: now,
        expires_at_ms,
    };
    node.write(&command).await??;
    let members = node
        .members()
        .into_iter()
        .map(|m| TokenMember {
            name: m.name,
            api_addr: m.api_addr,
            peer_addr: m.peer_addr,
        })
        .collect();
    let token = JoinToken {
        cluster_id: info.cluster_id,
        ca_fingerprint: info.ca_fingerprint,
        members,
        id,
        secret,
        expires_at_ms,
    };
    let text = token.encode();
    Ok((token, text))
}

/// The request a joining node sends to a member's API.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token_id: String,
    pub secret: String,
    /// The joining node's name, a DNS label.
    #[schema(pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub csr_pem: String,
}

/// What the member answers: the new node's identity and credentials.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinResponse {
    pub node_id: u64,
    pub cluster_id: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Every member can sign the certificates of later joiners, so none is
    /// special; the key travels only over TLS pinned to the CA fingerprint.
    pub ca_key_pem: String,
    /// The members' pinned keys (SHA-256 of each node's public key, by node
    /// id): until it has the cluster's state, the joining node takes Raft's
    /// messages only from these.
    #[serde(default)]
    pub member_keys: std::collections::BTreeMap<u64, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(expires_at_ms: u64) -> JoinToken {
        JoinToken {
            cluster_id: "c".into(),
            ca_fingerprint: "ab".repeat(32),
            members: vec![TokenMember {
                name: "n1".into(),
                api_addr: "127.0.0.1:1".into(),
                peer_addr: "127.0.0.1:2".into(),
            }],
            id: "id".into(),
            secret: "s".into(),
            expires_at_ms,
        }
    }

    #[test]
    fn tokens_with_impossible_fields_are_refused_in_words() {
        let mut token = sample(2_000);
        token.ca_fingerprint = "é".repeat(32);
        let err = JoinToken::decode(&token.encode(), 1_000).unwrap_err();
        assert!(err.to_string().contains("CA fingerprint"), "{err}");
        let mut token = sample(2_000);
        token.members[0].api_addr = "a".repeat(10_000);
        assert!(matches!(
            JoinToken::decode(&token.encode(), 1_000),
            Err(TokenError::Invalid { .. })
        ));
        let mut token = sample(2_000);
        token.secret = "s\u{1b}[2J".into();
        assert!(JoinToken::decode(&token.encode(), 1_000).is_err());
        let long = "A".repeat(MAX_TOKEN_CHARS + 1);
        assert!(JoinToken::decode(&long, 1_000)
            .unwrap_err()
            .to_string()
            .contains("more than"));
    }

    #[test]
    fn tokens_round_trip_and_reject_damage() {
        let token = sample(2_000);
        let text = token.encode();
        assert_eq!(JoinToken::decode(&text, 1_000).unwrap(), token);
        assert_eq!(
            JoinToken::decode(&format!("  {text}\n"), 1_000).unwrap(),
            token
        );
        assert_eq!(
            JoinToken::decode(&text, 5_000),
            Err(TokenError::Expired { ago_secs: 3 })
        );
        assert_eq!(JoinToken::decode("", 0), Err(TokenError::Empty));
        assert!(matches!(
            JoinToken::decode(&text[..text.len() / 2], 0),
            Err(TokenError::BadContents { .. } | TokenError::NotBase64 { .. })
        ));
        assert!(matches!(
            JoinToken::decode("!!!", 0),
            Err(TokenError::NotBase64 { .. })
        ));
        let mut no_members = sample(2_000);
        no_members.members.clear();
        assert_eq!(
            JoinToken::decode(&no_members.encode(), 0),
            Err(TokenError::NoMembers)
        );
    }
}
