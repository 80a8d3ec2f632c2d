//! The audit context of the API request a task is handling, carried from
//! the authorising middleware into the first write the handler makes.

use crate::state::audit::AuditContext;

/// The audit context of the API request being handled. The first write a
/// handler makes carries it into Raft, where the entry is appended in the
/// same transaction as the change; `recorded` tells the middleware not to
/// append a second one.
pub struct RequestAudit {
    pub context: std::sync::Mutex<AuditContext>,
    pub recorded: std::sync::atomic::AtomicBool,
    /// What the caller proved who they are with: a write forwarded to the
    /// leader carries it, and the leader authorises the write again.
    pub credential: std::sync::Mutex<Option<Credential>>,
}

/// A caller's credential, as a forwarded write carries it to the leader
/// (over the peers' mutual TLS only).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    /// A bearer token: an API token or an OIDC JWT.
    Bearer(String),
    /// A password login, which the leader checks again.
    Password { user: String, password: String },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credential::Password { user, .. } => write!(f, "Password({user:?}, <redacted>)"),
        }
    }
}

/// The current request's credential, for every write it makes.
pub fn current_credential() -> Option<Credential> {
    REQUEST_AUDIT
        .try_with(|audit| audit.credential.lock().expect("credential").clone())
        .ok()
        .flatten()
}

/// Records what the current request's caller authenticated with.
pub fn set_credential(credential: Credential) {
    let _ = REQUEST_AUDIT.try_with(|audit| {
        *audit.credential.lock().expect("credential") = Some(credential);
    });
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
