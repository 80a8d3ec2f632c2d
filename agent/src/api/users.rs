//! Users, roles, API tokens, password login and trusted OIDC issuers.

use crate::api_types::{CreateToken, CreateUser, GrantRole, IssuerSpec, Login, UpdateUser};
use std::sync::Arc;

use crate::api::{ApiError, ApiJson, ApiResult, Principal};
use crate::cluster::node::ClusterNode;
use crate::state::auth::{ApiTokenRecord, Role, TokenScope};
use crate::state::{validate_name, Command};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub(super) const MIN_PASSWORD_CHARS: usize = 8;

/// Hashes a password with Argon2id off the async workers.
pub(super) async fn hash_password(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
    .map_err(|e| ApiError::internal(&std::io::Error::other(e.to_string())))
}

pub(super) async fn verify_password(password: String, phc: String) -> bool {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(&phc).is_ok_and(|hash| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false)
}

/// A user as the API shows it: never the password hash.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub name: String,
    pub cluster_admin: bool,
    pub has_password: bool,
    pub created_at_ms: u64,
    /// A disabled user's tokens and password are refused.
    #[serde(default)]
    pub disabled: bool,
    /// The user's role in each project (only in listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<std::collections::BTreeMap<String, Role>>,
}

/// What a role grant changed.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoleGrant {
    pub user: String,
    /// Absent for `cluster-admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub role: Role,
}

/// Reads a command's outcome as the type the API answers with.
pub(super) fn outcome_as<T: DeserializeOwned>(value: serde_json::Value) -> ApiResult<T> {
    serde_json::from_value(value).map_err(|e| ApiError::internal(&e))
}

#[utoipa::path(get, path = "/v1/users", tag = "users",
    responses((status = 200, description = "Every user with their project roles", body = Vec<UserView>)))]
pub(super) async fn list_users(
    State(node): State<Arc<ClusterNode>>,
) -> ApiResult<Json<Vec<UserView>>> {
    crate::api::consistency::read_barrier(&node).await?;
    let mut users = Vec::new();
    for user in node.state.users()? {
        let mut view: UserView = outcome_as(crate::state::auth::user_view(&user))?;
        view.projects = Some(node.state.grants_of(&user.name)?.into_iter().collect());
        users.push(view);
    }
    Ok(Json(users))
}

#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, description = "The new user", body = UserView)))]
pub(super) async fn create_user(
    State(node): State<Arc<ClusterNode>>,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    validate_name("user", &body.name)?;
    let password_phc = match body.password {
        Some(p) if p.chars().count() < MIN_PASSWORD_CHARS => {
            return Err(ApiError::invalid(format!(
                "the password must have at least {MIN_PASSWORD_CHARS} characters"
            )));
        }
        Some(p) => Some(hash_password(p).await?),
        None => None,
    };
    let outcome = node
        .write(&Command::CreateUser {
            name: body.name,
            password_phc,
            now_ms: crate::cluster::join::now_ms(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(outcome_as(outcome?)?)))
}

#[utoipa::path(patch, path = "/v1/users/{user}", tag = "users", params(("user" = String, Path, description = "User name")), request_body = UpdateUser,
    responses((status = 200, description = "The user as changed", body = UserView)))]
pub(super) async fn update_user(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<UpdateUser>,
) -> ApiResult<Json<UserView>> {
    let Some(disabled) = body.disabled else {
        return Err(ApiError::invalid(
            "nothing to change; send {\"disabled\": true} or {\"disabled\": false}",
        ));
    };
    let outcome = node
        .write(&Command::SetUserDisabled { user, disabled })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(delete, path = "/v1/users/{user}", tag = "users", params(("user" = String, Path, description = "User name")),
    responses((status = 204, description = "Deleted, with the user's roles and tokens")))]
pub(super) async fn delete_user(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteUser { user }).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Which role to take: `project=P` for the role in P, or
/// `role=cluster-admin`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RevokeRoleQuery {
    /// The project whose role is taken.
    pub project: Option<String>,
    /// `cluster-admin` to take the cluster-admin role.
    pub role: Option<String>,
}

#[utoipa::path(delete, path = "/v1/users/{user}/roles", tag = "users", params(("user" = String, Path, description = "User name"), RevokeRoleQuery),
    responses((status = 200, description = "The user as changed; taking a role the user does not hold changes nothing", body = UserView)))]
pub(super) async fn revoke_role(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
    crate::api::ApiQuery(query): crate::api::ApiQuery<RevokeRoleQuery>,
) -> ApiResult<Json<UserView>> {
    let project = match (query.project, query.role.as_deref()) {
        (Some(project), None) => Some(project),
        (None, Some("cluster-admin")) => None,
        _ => {
            return Err(ApiError::invalid(
                "name one role to take: `?project=P` for the role in project P, or `?role=cluster-admin`",
            ))
        }
    };
    let outcome = node.write(&Command::RevokeRole { user, project }).await?;
    Ok(Json(outcome_as(outcome?)?))
}

pub(super) fn parse_role(text: &str) -> ApiResult<Role> {
    Role::parse(text).ok_or_else(|| {
        ApiError::invalid(format!("unknown role {text:?}; use cluster-admin, project-admin, project-member or project-viewer"),
        )
    })
}

#[utoipa::path(post, path = "/v1/users/{user}/roles", tag = "users", params(("user" = String, Path, description = "User name")), request_body = GrantRole,
    responses((status = 200, description = "The role granted", body = RoleGrant)))]
pub(super) async fn grant_role(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<GrantRole>,
) -> ApiResult<Json<RoleGrant>> {
    let role = parse_role(&body.role)?;
    let outcome = node
        .write(&Command::GrantRole {
            user,
            project: body.project,
            role,
        })
        .await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewToken {
    id: String,
    /// The secret, shown only in this answer.
    token: String,
    user: String,
    scope: TokenScope,
    expires_at_ms: Option<u64>,
}

pub(super) async fn issue_token(
    node: &ClusterNode,
    user: String,
    scope: TokenScope,
    expires_in_secs: Option<u64>,
) -> ApiResult<NewToken> {
    let id = crate::cluster::join::random_hex(8);
    let token = format!("allod_{}", crate::cluster::join::random_hex(32));
    let now_ms = crate::cluster::join::now_ms();
    let expires_at_ms = expires_in_secs.map(|s| now_ms.saturating_add(s.saturating_mul(1000)));
    node.write(&Command::CreateToken {
        id: id.clone(),
        secret_sha256: crate::cluster::join::sha256_hex(&token),
        user: user.clone(),
        scope: scope.clone(),
        now_ms,
        expires_at_ms,
    })
    .await??;
    Ok(NewToken {
        id,
        token,
        user,
        scope,
        expires_at_ms,
    })
}

#[utoipa::path(post, path = "/v1/users/{user}/tokens", tag = "tokens", params(("user" = String, Path, description = "User name")), request_body = CreateToken,
    responses((status = 201, description = "The new token; its secret is shown only here", body = NewToken)))]
pub(super) async fn create_token(
    State(node): State<Arc<ClusterNode>>,
    Extension(caller): Extension<Principal>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<NewToken>)> {
    let scope = match (body.project, body.role) {
        (None, None) => TokenScope::Cluster,
        (Some(project), role) => {
            let role = parse_role(role.as_deref().unwrap_or("project-viewer"))?;
            if role == Role::ClusterAdmin {
                return Err(ApiError::invalid(
                    "a project token cannot carry the cluster-admin role",
                ));
            }
            // Nobody learns of a project through a token request: a project
            // that does not exist and one without a role look the same.
            if caller.role_in(&project).is_none() {
                return Err(ApiError::project_not_found(&project));
            }
            TokenScope::Project { project, role }
        }
        (None, Some(_)) => return Err(ApiError::invalid("a token role needs --project")),
    };
    if let Some(secs) = body.expires_in_secs {
        if secs == 0 || secs > MAX_TOKEN_SECS {
            return Err(ApiError::invalid(format!(
                "expires_in_secs must be between 1 and {MAX_TOKEN_SECS} (ten years); \
                     leave it out for a token that does not expire"
            )));
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(issue_token(&node, user, scope, body.expires_in_secs).await?),
    ))
}

#[utoipa::path(get, path = "/v1/users/{user}/tokens", tag = "tokens", params(("user" = String, Path, description = "User name")),
    responses((status = 200, description = "The user's tokens (never their secrets)", body = Vec<ApiTokenRecord>)))]
pub(super) async fn list_tokens(
    State(node): State<Arc<ClusterNode>>,
    Path(user): Path<String>,
) -> ApiResult<Json<Vec<ApiTokenRecord>>> {
    crate::api::consistency::read_barrier(&node).await?;
    Ok(Json(node.state.tokens_of(&user)?))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked")))]
pub(super) async fn revoke_token(
    State(node): State<Arc<ClusterNode>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::RevokeToken { id }).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// The longest lifetime a token can be given.
pub(super) const MAX_TOKEN_SECS: u64 = 10 * 365 * 24 * 3600;

/// Sessions from `allod login` last a day.
pub(super) const LOGIN_TOKEN_SECS: u64 = 24 * 3600;

#[utoipa::path(post, path = "/v1/login", tag = "tokens", request_body = Login,
    responses((status = 200, description = "A cluster-scoped token valid for a day", body = NewToken)))]
pub(super) async fn login(
    State(node): State<Arc<ClusterNode>>,
    State(auth): State<Arc<crate::api::authz::AuthServices>>,
    peer: Option<Extension<crate::cluster::peer::PeerIdentity>>,
    ApiJson(body): ApiJson<Login>,
) -> ApiResult<Json<NewToken>> {
    let source = peer.and_then(|p| p.remote_addr).map(|a| a.ip());
    if let Err(limited) = auth
        .login
        .admit(source, &body.user, crate::cluster::join::now_ms())
    {
        let whose = if limited.by_user {
            "this user name"
        } else {
            "your address"
        };
        return Err(ApiError::rate_limited(
            format!(
                "too many login attempts for {whose}; try again in {} s",
                limited.retry_after_secs
            ),
            limited.retry_after_secs,
        ));
    }
    let refused = || ApiError::unauthenticated("unknown user or wrong password");
    let user = node.state.user(&body.user)?;
    let phc = user
        .as_ref()
        .filter(|u| !u.disabled)
        .and_then(|u| u.password_phc.clone());
    // An unknown user, or one without a password, is checked against a
    // decoy hash: the refusal takes as long as a wrong password's.
    let password = body.password.clone();
    if !auth.login.verify(body.password, phc).await {
        tracing::info!(
            user = body.user,
            "login refused: unknown user or wrong password"
        );
        return Err(refused());
    }
    let Some(user) = user else {
        return Err(refused());
    };
    auth.login.succeeded(source, &user.name);
    // The leader checks the password again before a follower's token is
    // written (see `api::forwarded`).
    crate::cluster::request_audit::set_credential(
        crate::cluster::request_audit::Credential::Password {
            user: user.name.clone(),
            password,
        },
    );
    Ok(Json(
        issue_token(
            &node,
            user.name,
            TokenScope::Cluster,
            Some(LOGIN_TOKEN_SECS),
        )
        .await?,
    ))
}

#[utoipa::path(get, path = "/v1/oidc/issuers", tag = "oidc",
    responses((status = 200, description = "The OIDC issuers this cluster trusts", body = Vec<crate::state::auth::OidcIssuer>)))]
pub(super) async fn list_issuers(
    State(node): State<Arc<ClusterNode>>,
) -> ApiResult<Json<Vec<crate::state::auth::OidcIssuer>>> {
    crate::api::consistency::read_barrier(&node).await?;
    Ok(Json(node.state.oidc_issuers()?))
}

#[utoipa::path(put, path = "/v1/oidc/issuers/{issuer}", tag = "oidc",
    params(("issuer" = String, Path, description = "The issuer's name in Allod")), request_body = IssuerSpec,
    responses((status = 200, description = "The issuer as stored", body = crate::state::auth::OidcIssuer)))]
pub(super) async fn put_issuer(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<IssuerSpec>,
) -> ApiResult<Json<crate::state::auth::OidcIssuer>> {
    let issuer = crate::state::auth::OidcIssuer {
        name,
        issuer: body.issuer,
        audience: body.audience,
        claim: body.claim.unwrap_or_else(|| "groups".into()),
        mappings: body.mappings,
        ca_pem: body.ca_pem,
    };
    issuer.validate()?;
    let outcome = node.write(&Command::PutOidcIssuer { issuer }).await?;
    Ok(Json(outcome_as(outcome?)?))
}

#[utoipa::path(delete, path = "/v1/oidc/issuers/{issuer}", tag = "oidc",
    params(("issuer" = String, Path, description = "The issuer's name in Allod")),
    responses((status = 204, description = "Removed; its tokens are refused from now on")))]
pub(super) async fn delete_issuer(
    State(node): State<Arc<ClusterNode>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    node.write(&Command::DeleteOidcIssuer { name }).await??;
    Ok(StatusCode::NO_CONTENT)
}
