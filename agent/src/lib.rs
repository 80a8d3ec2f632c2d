//! The `allod` binary's library: everything that is "the cloud" on a node.
//!
//! It owns the REST API (axum over rustls), authentication, the cluster
//! model's commands, the peer transport that carries Raft between nodes, the
//! local admin socket, the reconcilers that make a node match the cluster's
//! desired state, and the CLI client. It is the only crate that knows HTTP,
//! JSON wire formats and how the other crates fit together; it is also the
//! only crate that depends on `allod-raft`.
//!
//! Its layers import downward only (ARCHITECTURE.md draws them; the test
//! `layers` in `tests/layers.rs` enforces it): `units` ← `state` ← `api_types` ← `cluster` ←
//! `reconcile` ← `api` ← `daemon` ← `cli`, `console`.

pub mod api;
pub mod api_types;
pub mod cli;
pub mod cluster;
pub mod console;
pub mod daemon;
pub mod reconcile;
pub mod state;
pub mod units;

/// An error and all its sources, joined with ": ", for messages and logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// [`error_chain`] for `anyhow` errors.
pub fn error_chain_anyhow(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause_text = cause.to_string();
        if text.contains(&cause_text) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause_text);
    }
    text
}
