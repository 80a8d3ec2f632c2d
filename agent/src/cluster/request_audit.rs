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
