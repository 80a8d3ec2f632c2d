//! The `allod` binary's library: everything that is "the cloud" on a node.
//!
//! It owns the REST API (axum over rustls), authentication, the cluster
//! model's commands, the peer transport that carries Raft between nodes, the
//! local admin socket, and the CLI client. It is the only crate that knows
//! HTTP, JSON wire formats and how the other crates fit together; it is also
//! the only crate that depends on `allod-raft`.

pub mod admin;
pub mod api;
pub mod audit;
pub mod authz;
pub mod blockstore;
pub mod cli;
pub mod cli_network;
pub mod compute;
pub mod console;
pub mod console_client;
pub mod daemon;
pub mod join;
pub mod logring;
pub mod model;
pub mod netnode;
pub mod network;
pub mod node;
pub mod oidc;
pub mod paths;
pub mod peer;
pub mod pki;
pub mod proposer;
pub mod quota;
pub mod reconciler;
pub mod scheduler;
pub mod serve;
pub mod setup;
pub mod volumes;
pub mod zones;

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
