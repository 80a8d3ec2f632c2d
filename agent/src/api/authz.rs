//! Authentication and authorisation, in one place for every route.
//!
//! Every API route is registered through [`Routes::add`] with the
//! [`Permission`] it needs; the one middleware, [`authorize`], finds the
//! matched route's permission, resolves the caller's bearer token to a
//! [`Principal`], and decides. A route without a permission cannot be
//! registered, and a request that reaches an unregistered route pattern is
//! refused. Resources of a project the caller has no role in answer 404, not
//! 403, so the existence of other tenants' projects does not leak.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use crate::api::ApiError;
use crate::cluster::join::{now_ms, sha256_hex};
use crate::cluster::node::ClusterNode;
use crate::state::auth::Role;
use crate::state::StateView;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// No authentication (health, the CA certificate, join, login).
    Public,
    /// Any valid token.
    Authenticated,
    /// A cluster administrator.
    ClusterAdmin,
    /// At least `Role` in the project named by the path parameter.
    Project { param: &'static str, role: Role },
    /// The user named by the path parameter, or a cluster administrator.
    SelfOrClusterAdmin { param: &'static str },
    /// The owner of the token whose id is the path parameter, or a cluster administrator.
    TokenOwnerOrClusterAdmin { param: &'static str },
}

/// The parameter under which the middleware passes a token's owner to [`decide`].
pub const TOKEN_OWNER_PARAM: &str = "token owner";

/// Who is calling, as resolved from the bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub token_id: String,
    pub cluster_admin: bool,
    /// Roles per project, already narrowed by the token's scope.
    pub project_roles: BTreeMap<String, Role>,
    /// The token is scoped to one project: it may not manage tokens, or it
    /// could mint itself a wider one.
    pub project_scoped: bool,
}

impl Principal {
    pub fn role_in(&self, project: &str) -> Option<Role> {
        if self.cluster_admin {
            return Some(Role::ClusterAdmin);
        }
        self.project_roles.get(project).copied()
    }
}

/// The pure decision: what the answer to a request is, given who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Forbidden(String),
    /// Answer as if the resource did not exist.
    Hidden(String),
}

pub fn decide(
    permission: Permission,
    principal: &Principal,
    params: &HashMap<String, String>,
) -> Decision {
    let param = |name: &str| params.get(name).cloned().unwrap_or_default();
    match permission {
        Permission::Public | Permission::Authenticated => Decision::Allow,
        Permission::ClusterAdmin if principal.cluster_admin => Decision::Allow,
        Permission::ClusterAdmin => Decision::Forbidden("this needs the cluster-admin role".into()),
        Permission::Project { param: name, role } => {
            let project = param(name);
            match principal.role_in(&project) {
                None => Decision::Hidden(format!("project {project:?} does not exist")),
                Some(held) if held >= role => Decision::Allow,
                Some(held) => Decision::Forbidden(format!(
                    "this needs the {} role in project {project:?}; you have {}",
                    role.as_str(),
                    held.as_str()
                )),
            }
        }
        Permission::SelfOrClusterAdmin { .. } | Permission::TokenOwnerOrClusterAdmin { .. } if principal.project_scoped => {
            Decision::Forbidden("a project-scoped token cannot manage users' tokens; use a login session or a cluster-scoped token".into())
        }
        Permission::SelfOrClusterAdmin { param: name } => {
            if principal.cluster_admin || principal.user == param(name) {
                Decision::Allow
            } else {
                Decision::Hidden(format!("user {:?} does not exist", param(name)))
            }
        }
        Permission::TokenOwnerOrClusterAdmin { param: name } => {
            if principal.cluster_admin || params.get(TOKEN_OWNER_PARAM) == Some(&principal.user) {
                Decision::Allow
            } else {
                Decision::Hidden(format!("token {:?} does not exist", param(name)))
            }
        }
    }
}

/// A router under construction that remembers each route's permission.
pub struct Routes<S> {
    router: Router<S>,
    table: HashMap<(Method, &'static str), Permission>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Self {
            router: Router::new(),
            table: HashMap::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn add<H, T>(
        mut self,
        method: Method,
        path: &'static str,
        permission: Permission,
        handler: H,
    ) -> Self
    where
        H: axum::handler::Handler<T, S>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        let previous = self.table.insert((method.clone(), path), permission);
        assert!(previous.is_none(), "route {method} {path} registered twice");
        let method_router: MethodRouter<S> = on(filter, handler);
        self.router = self.router.route(path, method_router);
        self
    }

    pub fn finish(self) -> (Router<S>, Arc<PermissionTable>) {
        let mut by_path: HashMap<&'static str, Vec<(Method, Permission)>> = HashMap::new();
        for ((method, path), permission) in &self.table {
            by_path
                .entry(path)
                .or_default()
                .push((method.clone(), *permission));
        }
        (
            self.router,
            Arc::new(PermissionTable {
                table: self.table,
                by_path,
            }),
        )
    }
}

pub struct PermissionTable {
    table: HashMap<(Method, &'static str), Permission>,
    /// The same, by route pattern, for the per-request lookup.
    by_path: HashMap<&'static str, Vec<(Method, Permission)>>,
}

impl PermissionTable {
    pub fn get(&self, method: &Method, path: &str) -> Option<Permission> {
        self.by_path
            .get(path)?
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, perm)| *perm)
    }

    /// The methods registered for a route pattern, sorted.
    pub fn methods_of(&self, path: &str) -> Vec<&str> {
        let mut methods: Vec<&str> = self
            .table
            .keys()
            .filter(|(_, p)| *p == path)
            .map(|(m, _)| m.as_str())
            .collect();
        methods.sort_unstable();
        methods
    }

    /// Every registered route, for the authorisation matrix test.
    pub fn routes(&self) -> Vec<(Method, &'static str, Permission)> {
        let mut all: Vec<_> = self
            .table
            .iter()
            .map(|((m, p), perm)| (m.clone(), *p, *perm))
            .collect();
        all.sort_by(|a, b| (a.1, a.0.as_str()).cmp(&(b.1, b.0.as_str())));
        all
    }
}

/// Extracts `{name}` parameters of `pattern` from a concrete path.
pub fn path_params(pattern: &str, path: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    for (p, v) in pattern.split('/').zip(path.split('/')) {
        if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            params.insert(name.to_string(), v.to_string());
        }
    }
    params
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header; send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("the token is not valid for this cluster (unknown, revoked or expired); create a new one with `allod token create` or log in again")]
    Invalid,
    #[error(transparent)]
    Oidc(#[from] crate::api::oidc::OidcError),
    #[error(transparent)]
    Read(#[from] crate::state::ReadError),
}

/// How recently this node must have caught up with the leader for a
/// refusal to stand without asking the leader again.
pub const CATCH_UP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a resolved principal is reused without reading the state.
pub const AUTH_CACHE_TTL_MS: u64 = 60_000;
const AUTH_CACHE_ENTRIES: usize = 10_000;

/// Principals of recently seen bearer tokens, so the hot path neither reads
/// the state nor checks a signature on every request. An entry is used only
/// while nothing has been applied that could change it (the state's auth
/// generation and the OIDC key generation are those it was resolved at),
/// before its token expires, and for at most [`AUTH_CACHE_TTL_MS`].
#[derive(Default)]
pub struct AuthCache {
    entries: std::sync::Mutex<HashMap<[u8; 32], CachedPrincipal>>,
}

struct CachedPrincipal {
    principal: Principal,
    generation: (u64, u64),
    valid_until_ms: u64,
}

impl AuthCache {
    fn get(&self, key: &[u8; 32], generation: (u64, u64), now_ms: u64) -> Option<Principal> {
        let entries = self.entries.lock().expect("auth cache");
        entries
            .get(key)
            .filter(|e| e.generation == generation && now_ms < e.valid_until_ms)
            .map(|e| e.principal.clone())
    }

    fn put(&self, key: [u8; 32], entry: CachedPrincipal) {
        let mut entries = self.entries.lock().expect("auth cache");
        if entries.len() >= AUTH_CACHE_ENTRIES {
            let now = now_ms();
            entries.retain(|_, e| e.valid_until_ms > now);
            if entries.len() >= AUTH_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, entry);
    }
}

/// What authenticating callers keeps on a node beyond the cluster state.
#[derive(Default)]
pub struct AuthServices {
    /// Unauthenticated requests refused since the last audit summary.
    pub refusals: Arc<crate::api::abuse::RefusalLog>,
    /// Rate limits and the Argon2 budget of password logins.
    pub login: crate::api::abuse::LoginGuard,
    /// How many unknown tokens this node is seeing.
    pub unknown_tokens: crate::api::abuse::FloodMeter,
    /// Verifies bearer JWTs of the configured OIDC issuers.
    pub oidc: crate::api::oidc::Verifier,
    /// Principals of recently seen bearer tokens.
    pub cache: AuthCache,
    /// Addresses that send only refused requests, refused at accept.
    pub shed: Arc<crate::cluster::serve::Shed>,
    /// How many refused requests of each user get an audit entry of their own.
    pub refused_entries: crate::api::abuse::RefusedEntries,
}

impl AuthServices {
    /// How old a catch-up with the leader may be for the refusal of an
    /// unknown credential (token, join token) to stand: during a flood of
    /// them a second, so the flood costs one round trip a second;
    /// otherwise none, so a credential made a moment ago through another
    /// node is found.
    pub fn catch_up_age_for_unknown(&self) -> std::time::Duration {
        if self.unknown_tokens.note(now_ms()) {
            CATCH_UP_MAX_AGE
        } else {
            std::time::Duration::ZERO
        }
    }
}

/// Resolves an API token or an OIDC JWT to who is calling.
pub async fn authenticate(
    node: &ClusterNode,
    auth: &AuthServices,
    token: &str,
) -> Result<Principal, AuthError> {
    // Read before resolving: a change applied meanwhile makes the entry stale.
    let (key, generation) = cache_key(node, auth, token);
    let now = now_ms();
    if let Some(principal) = auth.cache.get(&key, generation, now) {
        return Ok(principal);
    }
    let (principal, expires_ms) = if crate::api::oidc::looks_like_jwt(token) {
        let issuers = node.state.oidc_issuers()?;
        auth.oidc.verify(&issuers, token).await?
    } else {
        resolve_until(&node.state, token, now)?
    };
    auth.cache.put(
        key,
        CachedPrincipal {
            principal: principal.clone(),
            generation,
            valid_until_ms: expires_ms.min(now + AUTH_CACHE_TTL_MS),
        },
    );
    Ok(principal)
}

/// The principal cache's key for `token`, and the generation of what
/// decides it (tokens and roles, OIDC keys).
fn cache_key(node: &ClusterNode, auth: &AuthServices, token: &str) -> ([u8; 32], (u64, u64)) {
    use sha2::Digest as _;
    let key: [u8; 32] = sha2::Sha256::digest(token.trim().as_bytes()).into();
    let generation = (
        node.auth_generation
            .load(std::sync::atomic::Ordering::Acquire),
        auth.oidc.key_generation(),
    );
    (key, generation)
}

/// Whether `token` is a credential of this cluster, known without a round
/// trip or a key fetch: from the cache, else (Allod's own tokens) from the
/// state. An OIDC token not in the cache does not count.
fn holds_credential(node: &ClusterNode, auth: &AuthServices, token: &str) -> bool {
    let (key, generation) = cache_key(node, auth, token);
    let now = now_ms();
    auth.cache.get(&key, generation, now).is_some()
        || (!crate::api::oidc::looks_like_jwt(token)
            && resolve_until(&node.state, token, now).is_ok())
}

/// Resolves a bearer token to who is calling and what they may do.
pub fn resolve(state: &StateView, token: &str, now_ms: u64) -> Result<Principal, AuthError> {
    resolve_until(state, token, now_ms).map(|(principal, _)| principal)
}

/// [`resolve`], and until when the token is valid.
fn resolve_until(
    state: &StateView,
    token: &str,
    now_ms: u64,
) -> Result<(Principal, u64), AuthError> {
    let record = state
        .api_token(&sha256_hex(token.trim()))?
        .ok_or(AuthError::Invalid)?;
    if record.expires_at_ms.is_some_and(|at| at <= now_ms) {
        return Err(AuthError::Invalid);
    }
    let user = state
        .user(&record.user)?
        .filter(|u| !u.disabled)
        .ok_or(AuthError::Invalid)?;
    let grants = state.grants_of(&user.name)?;
    let project_scoped = matches!(record.scope, crate::state::auth::TokenScope::Project { .. });
    let (cluster_admin, project_roles) = match &record.scope {
        crate::state::auth::TokenScope::Cluster => (user.cluster_admin, grants),
        crate::state::auth::TokenScope::Project { project, role } => {
            // A project token never exceeds what its user holds there.
            let held = if user.cluster_admin {
                Some(Role::ClusterAdmin)
            } else {
                grants.get(project).copied()
            };
            let narrowed = held.map(|h| h.min(*role).min(Role::ProjectAdmin));
            (
                false,
                narrowed
                    .map(|r| [(project.clone(), r)].into_iter().collect())
                    .unwrap_or_default(),
            )
        }
    };
    Ok((
        Principal {
            user: user.name,
            token_id: record.id,
            cluster_admin,
            project_roles,
            project_scoped,
        },
        record.expires_at_ms.unwrap_or(u64::MAX),
    ))
}

fn clone_auth_error(e: &AuthError) -> AuthError {
    match e {
        AuthError::Missing => AuthError::Missing,
        _ => AuthError::Malformed,
    }
}

/// The one authorisation middleware.
pub async fn authorize(
    State((app, table)): State<(crate::api::AppState, Arc<PermissionTable>)>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let pattern = request.extensions().get::<MatchedPath>().cloned();
    let remote = request
        .extensions()
        .get::<crate::cluster::peer::PeerIdentity>()
        .and_then(|p| p.remote_addr);
    let uri = request.uri().clone();
    // On a public route no one looks at the token: kept to see whether the
    // caller holds a credential (elsewhere authentication says so).
    let public = pattern
        .as_ref()
        .is_some_and(|p| table.get(&method, p.as_str()) == Some(Permission::Public));
    let bearer = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .filter(|_| public)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let context = || crate::state::audit::AuditContext {
        time_ms: now_ms(),
        user: "-".into(),
        token_id: "-".into(),
        source: remote.map_or_else(|| "-".into(), |a| a.to_string()),
        action: format!("{method} {}", pattern.as_ref().map_or("", |p| p.as_str())),
        object: uri.path().to_string(),
        zone: None,
    };
    // Only a mutating call carries an audit context into Raft; reads are
    // audited only when their authentication fails.
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let audit = mutating.then(|| {
        Arc::new(crate::cluster::request_audit::RequestAudit {
            context: std::sync::Mutex::new(context()),
            recorded: std::sync::atomic::AtomicBool::new(false),
            credential: std::sync::Mutex::new(None),
        })
    });
    let (response, principal) = match &audit {
        Some(audit) => {
            crate::cluster::request_audit::REQUEST_AUDIT
                .scope(
                    audit.clone(),
                    authorize_inner(&app, &table, request, next, Some(audit)),
                )
                .await
        }
        None => authorize_inner(&app, &table, request, next, None).await,
    };
    let status = response.status();
    let recorded = audit
        .as_ref()
        .is_none_or(|a| a.recorded.load(std::sync::atomic::Ordering::SeqCst));
    let result = result_for_status(status.as_u16());
    let mut response = response;
    if let Some(ip) = remote.map(|a| a.ip()) {
        // A refused call to a public route that carries a valid token (a
        // client with a credential sending a malformed login, say) vouches
        // for its address like an authenticated one: only addresses that
        // show no credential at all are shed. (On other routes the token
        // was authenticated already: a valid one gave a principal.)
        let vouched = principal.is_some()
            || (status.is_client_error()
                && bearer
                    .as_deref()
                    .is_some_and(|t| holds_credential(&app.node, &app.auth, t)));
        let refused = !vouched && status.is_client_error();
        if (vouched || refused)
            && app
                .auth
                .shed
                .note(ip, vouched, crate::cluster::node::mono_ms())
        {
            // Shed from now on: this connection closes after the answer.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
    }
    if principal.is_none() && (status == StatusCode::UNAUTHORIZED || (mutating && !recorded)) {
        // Nobody is accountable for it: counted in memory and summarised
        // in the log once a window, never one Raft write per request.
        let request = format!("{method} {}", uri.path());
        app.auth
            .refusals
            .record(now_ms(), remote.map(|a| a.ip()), result, &request);
    } else if mutating
        && !recorded
        && !principal
            .as_ref()
            .is_some_and(|p| app.auth.refused_entries.admit(&p.user, now_ms()))
    {
        // A user past their budget of refused calls is counted with the
        // unauthenticated refusals, in the node's summary entry.
        let user = principal.as_ref().map_or("-", |p| p.user.as_str());
        let request = format!("{user}: {method} {}", uri.path());
        app.auth
            .refusals
            .record(now_ms(), remote.map(|a| a.ip()), result, &request);
    } else if mutating && !recorded {
        // An authenticated call refused before it reached Raft (bad input,
        // 403, 404) is recorded here, in an entry of its own.
        let mut context = match &audit {
            Some(audit) => audit.context.lock().expect("audit context").clone(),
            None => context(),
        };
        if let Some(p) = &principal {
            context.user = p.user.clone();
            context.token_id = p.token_id.clone();
        }
        let record = context.with_result(result);
        // Proposed after the answer is sent: a node that dies in the next
        // milliseconds can lose an entry for a call that changed nothing.
        let node = app.node.clone();
        tokio::spawn(async move {
            match node
                .write(&crate::state::Command::AppendAudit { record })
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the audit log refused an entry"),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "cannot append to the audit log")
                }
            }
        });
    }
    response
}

async fn authorize_inner(
    app: &crate::api::AppState,
    table: &PermissionTable,
    mut request: Request,
    next: Next,
    audit: Option<&crate::cluster::request_audit::RequestAudit>,
) -> (Response, Option<Principal>) {
    let node = &app.node;
    let Some(matched) = request.extensions().get::<MatchedPath>().cloned() else {
        return (next.run(request).await, None);
    };
    let pattern = matched.as_str();
    let Some(permission) = table.get(request.method(), pattern) else {
        let allowed = table.methods_of(pattern);
        if !allowed.is_empty() {
            let allow = allowed.join(", ");
            let message = format!("{} is not supported here; use {allow}", request.method());
            let mut response = ApiError::method_not_allowed(message).into_response();
            if let Ok(value) = axum::http::HeaderValue::from_str(&allow) {
                response
                    .headers_mut()
                    .insert(axum::http::header::ALLOW, value);
            }
            return (response, None);
        }
        // Unreachable while every route goes through `Routes::add`.
        tracing::error!(method = %request.method(), pattern, "route has no declared permission; refusing");
        return (
            ApiError::forbidden("this route declares no permission").into_response(),
            None,
        );
    };
    if permission == Permission::Public {
        return (next.run(request).await, None);
    }
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .cloned();
    let token: Result<String, AuthError> = match header {
        None => Err(AuthError::Missing),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .ok_or(AuthError::Malformed),
    };
    if let Ok(token) = &token {
        crate::cluster::request_audit::set_credential(
            crate::cluster::request_audit::Credential::Bearer(token.clone()),
        );
    }
    // Only permissions that name a path parameter need them.
    let params = match permission {
        Permission::Public | Permission::Authenticated | Permission::ClusterAdmin => HashMap::new(),
        _ => path_params(pattern, request.uri().path()),
    };
    let evaluate = || async {
        let principal = authenticate(
            &app.node,
            &app.auth,
            token.as_ref().map_err(clone_auth_error)?,
        )
        .await?;
        let mut params = std::borrow::Cow::Borrowed(&params);
        if let Permission::TokenOwnerOrClusterAdmin { param } = permission {
            let id = params.get(param).cloned().unwrap_or_default();
            if let Some(owner) = node.state.token_owner(&id)? {
                params.to_mut().insert(TOKEN_OWNER_PARAM.to_string(), owner);
            }
        }
        let decision = decide(permission, &principal, &params);
        Ok::<_, AuthError>((principal, decision))
    };
    let arrived_ms = crate::cluster::node::mono_ms();
    let mut outcome = evaluate().await;
    // A token, role or object created moments ago through another node may
    // not be applied here yet: catch up with the leader, then decide again.
    // Concurrent refusals share one round trip; during a flood of unknown
    // tokens a catch-up less than a second old is enough, so the flood
    // costs one round trip a second.
    let refused = match &outcome {
        Ok((_, decision)) => *decision != Decision::Allow,
        Err(AuthError::Invalid)
        | Err(AuthError::Oidc(crate::api::oidc::OidcError::UnknownIssuer(_))) => true,
        Err(_) => false,
    };
    let max_age = match &outcome {
        Err(AuthError::Invalid) => app.auth.catch_up_age_for_unknown(),
        _ => std::time::Duration::ZERO,
    };
    if refused && node.caught_up_since(arrived_ms, max_age).await.is_ok() {
        outcome = evaluate().await;
    }
    let (principal, decision) = match outcome {
        Ok(pair) => {
            // The connection proved who is on it: it is kept longest when
            // the listener is full, whatever the handler then takes.
            if let Some(identity) = request
                .extensions()
                .get::<crate::cluster::peer::PeerIdentity>()
            {
                identity
                    .proven
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            pair
        }
        Err(AuthError::Read(e)) => return (ApiError::from(e).into_response(), None),
        Err(e) => {
            return (
                ApiError::unauthenticated(e.to_string()).into_response(),
                None,
            )
        }
    };
    match decision {
        Decision::Allow => {
            // Only an audited (mutating) call needs the project's zone.
            if let Some(audit) = audit {
                let zone = params
                    .get("name")
                    .and_then(|name| node.state.project(name).ok().flatten())
                    .map(|project| project.zone.as_str().to_string());
                let mut context = audit.context.lock().expect("audit context");
                context.user = principal.user.clone();
                context.token_id = principal.token_id.clone();
                context.zone = zone;
            }
            request.extensions_mut().insert(principal.clone());
            (next.run(request).await, Some(principal))
        }
        Decision::Forbidden(message) => (
            ApiError::forbidden(message).into_response(),
            Some(principal),
        ),
        Decision::Hidden(message) => (
            ApiError::not_found(message).into_response(),
            Some(principal),
        ),
    }
}

/// The audit result for an HTTP status the middleware answered itself.
pub fn result_for_status(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        400 => "invalid_argument",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        413 => "payload_too_large",
        429 => "rate_limited",
        503 => "unavailable",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(admin: bool, roles: &[(&str, Role)]) -> Principal {
        Principal {
            user: "u".into(),
            token_id: "t".into(),
            cluster_admin: admin,
            project_roles: roles.iter().map(|(p, r)| (p.to_string(), *r)).collect(),
            project_scoped: false,
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn project_permissions_follow_the_role_order_and_hide_other_projects() {
        let need_member = Permission::Project {
            param: "name",
            role: Role::ProjectMember,
        };
        let p = params(&[("name", "alpha")]);
        assert_eq!(
            decide(need_member, &principal(true, &[]), &p),
            Decision::Allow
        );
        assert_eq!(
            decide(
                need_member,
                &principal(false, &[("alpha", Role::ProjectAdmin)]),
                &p
            ),
            Decision::Allow
        );
        assert_eq!(
            decide(
                need_member,
                &principal(false, &[("alpha", Role::ProjectMember)]),
                &p
            ),
            Decision::Allow
        );
        assert!(matches!(
            decide(
                need_member,
                &principal(false, &[("alpha", Role::ProjectViewer)]),
                &p
            ),
            Decision::Forbidden(_)
        ));
        assert!(matches!(
            decide(
                need_member,
                &principal(false, &[("beta", Role::ProjectAdmin)]),
                &p
            ),
            Decision::Hidden(_)
        ));
        assert!(matches!(
            decide(
                Permission::ClusterAdmin,
                &principal(false, &[("alpha", Role::ProjectAdmin)]),
                &p
            ),
            Decision::Forbidden(_)
        ));
    }

    #[test]
    fn path_parameters_are_read_from_the_pattern() {
        let p = path_params(
            "/v1/projects/{name}/vms/{vm}",
            "/v1/projects/alpha/vms/web1",
        );
        assert_eq!(p.get("name").map(String::as_str), Some("alpha"));
        assert_eq!(p.get("vm").map(String::as_str), Some("web1"));
    }
}
