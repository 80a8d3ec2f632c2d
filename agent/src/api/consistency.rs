//! How current a read must be: `?consistency=linearizable` (the default)
//! or `?consistency=stale`.
//!
//! A linearizable read reflects every write that completed before it
//! started, wherever it lands: a follower asks the leader for its commit
//! index first (one round trip), and the leader confirms its leadership on
//! its lease or with a quorum. A stale read skips that and answers from what
//! the node that received it has applied: faster on a follower, and it still
//! answers when the node is cut off from the leader, but it may miss recent
//! writes. Its answer says so: `Allod-Consistency: stale`, and
//! `Allod-Applied-Index` gives the last log entry the answer reflects.
//!
//! The parameter is taken off the request before routing, so it is valid on
//! every read; on anything but GET it is refused (writes always go through
//! the leader).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;
use crate::cluster::node::{ClusterError, ClusterNode};

/// The answer's header that marks a stale read.
pub const CONSISTENCY_HEADER: &str = "allod-consistency";
/// The answer's header with the last applied log index a stale read reflects.
pub const APPLIED_INDEX_HEADER: &str = "allod-applied-index";

/// What the request being served allows, and whether it used it.
struct ReadMode {
    stale_allowed: bool,
    served_stale: AtomicBool,
}

tokio::task_local! {
    static READ_MODE: Arc<ReadMode>;
}

/// Makes sure the reads that follow may answer: linearizable unless the
/// request being served asked for a stale read. Every API read calls this
/// before it reads the state.
pub async fn read_barrier(node: &ClusterNode) -> Result<(), ClusterError> {
    let stale = READ_MODE
        .try_with(|mode| {
            if mode.stale_allowed {
                mode.served_stale.store(true, Ordering::Relaxed);
            }
            mode.stale_allowed
        })
        .unwrap_or(false);
    if stale {
        return Ok(());
    }
    node.linearizable_read().await
}

/// Splits `consistency` off the query: the rest of the query, and whether a
/// stale read is allowed when it was given (or why the value is not
/// understood).
fn take_consistency(uri: &Uri) -> Result<(Option<String>, Option<bool>), String> {
    let Some(query) = uri.query() else {
        return Ok((None, None));
    };
    let mut stale = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "consistency" {
            rest.push(pair);
            continue;
        }
        if stale.is_some() {
            return Err("`consistency` is given twice; give it once".into());
        }
        stale = Some(match value {
            "linearizable" => false,
            "stale" => true,
            other => {
                return Err(format!(
                    "`consistency` is `linearizable` (the default) or `stale`, not {other:?}"
                ))
            }
        });
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    Ok((rest, stale))
}

/// The middleware: reads `consistency`, serves the request within its read
/// mode, and marks an answer that a stale read produced.
pub async fn read_consistency(
    axum::extract::State(node): axum::extract::State<Arc<ClusterNode>>,
    mut request: Request,
    next: Next,
) -> Response {
    let (rest, given) = match take_consistency(request.uri()) {
        Ok(taken) => taken,
        Err(message) => return ApiError::invalid(message).into_response(),
    };
    let stale_allowed = given == Some(true);
    if given.is_some() {
        if stale_allowed && request.method() != Method::GET {
            return ApiError::invalid(
                "`consistency=stale` applies to reads (GET); writes always go through the leader",
            )
            .into_response();
        }
        let mut parts = request.uri().clone().into_parts();
        let path = request.uri().path();
        let path_and_query = match &rest {
            Some(rest) => format!("{path}?{rest}"),
            None => path.to_string(),
        };
        parts.path_and_query = path_and_query.parse().ok();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    let mode = Arc::new(ReadMode {
        stale_allowed,
        served_stale: AtomicBool::new(false),
    });
    let mut response = READ_MODE.scope(mode.clone(), next.run(request)).await;
    if mode.served_stale.load(Ordering::Relaxed) {
        let applied = node
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        let headers = response.headers_mut();
        headers.insert(CONSISTENCY_HEADER, HeaderValue::from_static("stale"));
        headers.insert(APPLIED_INDEX_HEADER, HeaderValue::from(applied));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(uri: &str) -> Result<(Option<String>, Option<bool>), String> {
        take_consistency(&uri.parse().unwrap())
    }

    #[test]
    fn consistency_is_taken_off_the_query() {
        assert_eq!(take("/v1/projects"), Ok((None, None)));
        assert_eq!(
            take("/v1/projects?consistency=stale"),
            Ok((None, Some(true)))
        );
        assert_eq!(
            take("/v1/audit?limit=3&consistency=linearizable&user=a"),
            Ok((Some("limit=3&user=a".into()), Some(false)))
        );
        assert_eq!(
            take("/v1/audit?limit=3&user=consistency"),
            Ok((Some("limit=3&user=consistency".into()), None))
        );
    }

    #[test]
    fn a_value_not_understood_is_refused_with_the_choices() {
        let error = take("/v1/projects?consistency=eventual").unwrap_err();
        assert!(
            error.contains("`linearizable`") && error.contains("`stale`"),
            "{error}"
        );
        assert!(take("/v1/projects?consistency=stale&consistency=stale").is_err());
        assert!(take("/v1/projects?consistency").is_err());
    }
}
