//! Who may do what: users, API tokens (stored under the SHA-256 of their
//! secret), roles and grants, and the OIDC issuers the cluster trusts.

use allod_raft::{KvError, KvRead, KvWrite};
use serde::{Deserialize, Serialize};

use super::audit::AuditContext;
use super::{
    domain, get_json, put_json, validate_name, DomainError, ErrorCode, Outcome, ReadError,
    StateView, PREFIX_API_TOKENS, PREFIX_OIDC_ISSUERS, PREFIX_PROJECTS, PREFIX_TOKEN_IDS,
    PREFIX_USERS, PREFIX_USER_GRANTS,
};

/// The user `init` creates, holder of the first admin token.
pub const ADMIN_USER: &str = "admin";

/// How an OIDC caller's token id reads in audit entries: `oidc:<issuer>`.
pub const OIDC_TOKEN_PREFIX: &str = "oidc:";

/// Roles, from most to least powerful within a project.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ProjectViewer,
    ProjectMember,
    ProjectAdmin,
    ClusterAdmin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "cluster-admin" => Some(Role::ClusterAdmin),
            "project-admin" => Some(Role::ProjectAdmin),
            "project-member" => Some(Role::ProjectMember),
            "project-viewer" => Some(Role::ProjectViewer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ClusterAdmin => "cluster-admin",
            Role::ProjectAdmin => "project-admin",
            Role::ProjectMember => "project-member",
            Role::ProjectViewer => "project-viewer",
        }
    }

    pub const ALL: [Role; 4] = [
        Role::ClusterAdmin,
        Role::ProjectAdmin,
        Role::ProjectMember,
        Role::ProjectViewer,
    ];
}

/// An API token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiTokenRecord {
    pub id: String,
    pub user: String,
    pub scope: TokenScope,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenScope {
    /// Everything its user may do.
    Cluster,
    /// One project, at most `role` (and never more than its user holds there).
    Project { project: String, role: Role },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// Argon2id hash in PHC format; `None` for users who only use tokens.
    pub password_phc: Option<String>,
    pub cluster_admin: bool,
    pub created_at_ms: u64,
    /// A disabled user's tokens and password are refused; nothing of the
    /// user is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// An OIDC issuer the cluster trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuer {
    /// The issuer's name in Allod (a DNS label); audit entries say `oidc:NAME`.
    pub name: String,
    /// The exact `iss` of its tokens, an `https://` URL; the discovery
    /// document is read from `ISSUER/.well-known/openid-configuration`.
    pub issuer: String,
    /// The `aud` its tokens must carry (usually the client id).
    pub audience: String,
    /// The claim whose values are mapped to roles; a dotted path reaches
    /// into objects (`realm_access.roles` for Keycloak realm roles).
    #[serde(default = "default_claim")]
    pub claim: String,
    /// Claim values and the roles they give.
    #[serde(default)]
    pub mappings: Vec<ClaimMapping>,
    /// A CA certificate (PEM) to trust for the issuer's HTTPS, besides the
    /// system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

fn default_claim() -> String {
    "groups".into()
}

/// `value` in the claim gives `role`, in `project` for project roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimMapping {
    pub value: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl ClaimMapping {
    /// Parses the CLI form `VALUE=ROLE` or `VALUE=ROLE@PROJECT`.
    pub fn parse(text: &str) -> Result<ClaimMapping, String> {
        let (value, target) = text
            .split_once('=')
            .ok_or_else(|| format!("mapping {text:?} is not VALUE=ROLE or VALUE=ROLE@PROJECT"))?;
        let (role, project) = match target.split_once('@') {
            Some((role, project)) => (role, Some(project.to_string())),
            None => (target, None),
        };
        let role = Role::parse(role).ok_or_else(|| {
            format!("unknown role {role:?} in mapping {text:?}; use cluster-admin, project-admin, project-member or project-viewer")
        })?;
        Ok(ClaimMapping {
            value: value.to_string(),
            role,
            project,
        })
    }
}

pub(super) fn token_still_valid(
    kv: &KvWrite<'_>,
    audit: &AuditContext,
) -> Result<Result<(), DomainError>, allod_raft::KvError> {
    if audit.token_id == "-" {
        return Ok(Ok(()));
    }
    // An OIDC caller's trust ends when its issuer is removed.
    if let Some(issuer) = audit.token_id.strip_prefix(OIDC_TOKEN_PREFIX) {
        return Ok(match kv.get(&format!("{PREFIX_OIDC_ISSUERS}{issuer}"))? {
            Some(_) => Ok(()),
            None => Err(domain(
                ErrorCode::Unauthenticated,
                "the token's OIDC issuer was removed; nothing was changed",
            )),
        });
    }
    let revoked = || {
        domain(
            ErrorCode::Unauthenticated,
            "the token was revoked or has expired; nothing was changed",
        )
    };
    let Some(sha) = get_json::<String>(kv, &format!("{PREFIX_TOKEN_IDS}{}", audit.token_id))?
    else {
        return Ok(Err(revoked()));
    };
    match get_json::<ApiTokenRecord>(kv, &format!("{PREFIX_API_TOKENS}{sha}"))? {
        Some(record) if record.expires_at_ms.is_none_or(|at| at > audit.time_ms) => {
            match get_json::<User>(kv, &format!("{PREFIX_USERS}{}", record.user))? {
                Some(user) if !user.disabled => Ok(Ok(())),
                _ => Ok(Err(domain(
                    ErrorCode::Unauthenticated,
                    "the token's user was deleted or disabled; nothing was changed",
                ))),
            }
        }
        _ => Ok(Err(revoked())),
    }
}

/// A user as the API shows it: never the password hash.
pub fn user_view(user: &User) -> serde_json::Value {
    serde_json::json!({ "name": user.name, "cluster_admin": user.cluster_admin, "has_password": user.password_phc.is_some(), "created_at_ms": user.created_at_ms, "disabled": user.disabled })
}

pub(super) fn create_user(
    kv: &mut KvWrite<'_>,
    name: String,
    password_phc: Option<String>,
    now_ms: u64,
) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_USERS}{name}");
        match validate_name("user", &name) {
            Err(e) => Err(e),
            Ok(()) if kv.get(&key)?.is_some() => Err(domain(
                ErrorCode::AlreadyExists,
                format!("user {name:?} already exists"),
            )),
            Ok(()) => {
                let user = User {
                    name,
                    password_phc,
                    cluster_admin: false,
                    created_at_ms: now_ms,
                    disabled: false,
                };
                put_json(kv, &key, &user)?;
                Ok(user_view(&user))
            }
        }
    })
}

pub(super) fn grant_role(
    kv: &mut KvWrite<'_>,
    user: String,
    project: Option<String>,
    role: Role,
) -> Result<Outcome, KvError> {
    Ok({
        let user_key = format!("{PREFIX_USERS}{user}");
        match (get_json::<User>(kv, &user_key)?, role, project) {
            (None, _, _) => Err(domain(
                ErrorCode::NotFound,
                format!("user {user:?} does not exist"),
            )),
            (Some(mut record), Role::ClusterAdmin, _) => {
                record.cluster_admin = true;
                put_json(kv, &user_key, &record)?;
                Ok(serde_json::json!({ "user": user, "role": role }))
            }
            (Some(_), _, None) => Err(domain(
                ErrorCode::InvalidArgument,
                format!("the {} role needs a project", role.as_str()),
            )),
            (Some(_), _, Some(project))
                if kv.get(&format!("{PREFIX_PROJECTS}{project}"))?.is_none() =>
            {
                Err(domain(
                    ErrorCode::InvalidArgument,
                    format!("project {project:?} does not exist; create it first"),
                ))
            }
            (Some(_), _, Some(project)) => {
                put_json(kv, &format!("{PREFIX_USER_GRANTS}{user}/{project}"), &role)?;
                Ok(serde_json::json!({ "user": user, "project": project, "role": role }))
            }
        }
    })
}

/// Whether some enabled cluster administrator other than `except` remains.
fn another_admin_remains(kv: &KvWrite<'_>, except: &str) -> Result<bool, KvError> {
    Ok(kv
        .scan(PREFIX_USERS)?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<User>(&v).ok())
        .any(|u| u.name != except && u.cluster_admin && !u.disabled))
}

fn last_admin(user: &str, doing: &str) -> DomainError {
    domain(
        ErrorCode::FailedPrecondition,
        format!("{user:?} is the last enabled cluster administrator; {doing} would leave nobody able to manage the cluster. Grant cluster-admin to another user first"),
    )
}

/// Takes `project`'s role from `user`, or with no project the cluster-admin
/// role. Taking a role the user does not hold changes nothing.
pub(super) fn revoke_role(
    kv: &mut KvWrite<'_>,
    user: String,
    project: Option<String>,
) -> Result<Outcome, KvError> {
    let user_key = format!("{PREFIX_USERS}{user}");
    let Some(mut record) = get_json::<User>(kv, &user_key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("user {user:?} does not exist"),
        )));
    };
    match project {
        None => {
            if record.cluster_admin && !record.disabled && !another_admin_remains(kv, &user)? {
                return Ok(Err(last_admin(&user, "revoking the role")));
            }
            record.cluster_admin = false;
            put_json(kv, &user_key, &record)?;
        }
        Some(project) => kv.delete(&format!("{PREFIX_USER_GRANTS}{user}/{project}"))?,
    }
    Ok(Ok(user_view(&record)))
}

/// Disables or enables a user.
pub(super) fn set_user_disabled(
    kv: &mut KvWrite<'_>,
    user: String,
    disabled: bool,
) -> Result<Outcome, KvError> {
    let user_key = format!("{PREFIX_USERS}{user}");
    let Some(mut record) = get_json::<User>(kv, &user_key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("user {user:?} does not exist"),
        )));
    };
    if disabled && record.cluster_admin && !another_admin_remains(kv, &user)? {
        return Ok(Err(last_admin(&user, "disabling the user")));
    }
    record.disabled = disabled;
    put_json(kv, &user_key, &record)?;
    Ok(Ok(user_view(&record)))
}

/// Deletes a user with their roles and tokens.
pub(super) fn delete_user(kv: &mut KvWrite<'_>, user: String) -> Result<Outcome, KvError> {
    let user_key = format!("{PREFIX_USERS}{user}");
    let Some(record) = get_json::<User>(kv, &user_key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("user {user:?} does not exist"),
        )));
    };
    if record.cluster_admin && !record.disabled && !another_admin_remains(kv, &user)? {
        return Ok(Err(last_admin(&user, "deleting the user")));
    }
    for (key, _) in kv.scan(&format!("{PREFIX_USER_GRANTS}{user}/"))? {
        kv.delete(&key)?;
    }
    for (key, value) in kv.scan(PREFIX_API_TOKENS)? {
        let Ok(token) = serde_json::from_slice::<ApiTokenRecord>(&value) else {
            continue;
        };
        if token.user == user {
            kv.delete(&key)?;
            kv.delete(&format!("{PREFIX_TOKEN_IDS}{}", token.id))?;
        }
    }
    kv.delete(&user_key)?;
    Ok(Ok(serde_json::Value::Null))
}

pub(super) fn create_token(
    kv: &mut KvWrite<'_>,
    id: String,
    secret_sha256: String,
    user: String,
    scope: TokenScope,
    now_ms: u64,
    expires_at_ms: Option<u64>,
) -> Result<Outcome, KvError> {
    Ok({
        let project_missing = match &scope {
            TokenScope::Project { project, .. } => {
                kv.get(&format!("{PREFIX_PROJECTS}{project}"))?.is_none()
            }
            TokenScope::Cluster => false,
        };
        if kv.get(&format!("{PREFIX_USERS}{user}"))?.is_none() {
            Err(domain(
                ErrorCode::NotFound,
                format!("user {user:?} does not exist"),
            ))
        } else if project_missing {
            Err(domain(
                ErrorCode::InvalidArgument,
                "the token's project does not exist",
            ))
        } else {
            let record = ApiTokenRecord {
                id: id.clone(),
                user,
                scope,
                created_at_ms: now_ms,
                expires_at_ms,
            };
            put_json(kv, &format!("{PREFIX_API_TOKENS}{secret_sha256}"), &record)?;
            put_json(kv, &format!("{PREFIX_TOKEN_IDS}{id}"), &secret_sha256)?;
            Ok(serde_json::to_value(&record).expect("serialisable"))
        }
    })
}

pub(super) fn revoke_token(kv: &mut KvWrite<'_>, id: String) -> Result<Outcome, KvError> {
    Ok({
        match get_json::<String>(kv, &format!("{PREFIX_TOKEN_IDS}{id}"))? {
            None => Err(domain(
                ErrorCode::NotFound,
                format!("token {id:?} does not exist"),
            )),
            Some(sha) => {
                kv.delete(&format!("{PREFIX_API_TOKENS}{sha}"))?;
                kv.delete(&format!("{PREFIX_TOKEN_IDS}{id}"))?;
                Ok(serde_json::Value::Null)
            }
        }
    })
}

pub(super) fn put_oidc_issuer(
    kv: &mut KvWrite<'_>,
    issuer: OidcIssuer,
) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_OIDC_ISSUERS}{}", issuer.name);
        let clash = kv
            .scan(PREFIX_OIDC_ISSUERS)?
            .into_iter()
            .filter(|(k, _)| *k != key)
            .filter_map(|(_, v)| serde_json::from_slice::<OidcIssuer>(&v).ok())
            .find(|other| other.issuer == issuer.issuer);
        match clash {
            Some(other) => Err(domain(
                ErrorCode::AlreadyExists,
                format!(
                    "issuer {:?} is already configured as {:?}; change that one instead",
                    issuer.issuer, other.name
                ),
            )),
            None => {
                put_json(kv, &key, &issuer)?;
                Ok(serde_json::to_value(&issuer).expect("serialisable"))
            }
        }
    })
}

pub(super) fn delete_oidc_issuer(kv: &mut KvWrite<'_>, name: String) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_OIDC_ISSUERS}{name}");
        if kv.get(&key)?.is_none() {
            Err(domain(
                ErrorCode::NotFound,
                format!("OIDC issuer {name:?} does not exist"),
            ))
        } else {
            kv.delete(&key)?;
            Ok(serde_json::Value::Null)
        }
    })
}

impl StateView {
    pub fn api_token(&self, sha256_hex: &str) -> Result<Option<ApiTokenRecord>, ReadError> {
        self.get(&format!("{PREFIX_API_TOKENS}{sha256_hex}"))
    }

    pub fn oidc_issuers(&self) -> Result<Vec<OidcIssuer>, ReadError> {
        self.list(PREFIX_OIDC_ISSUERS)
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, ReadError> {
        self.get(&format!("{PREFIX_USERS}{name}"))
    }

    pub fn users(&self) -> Result<Vec<User>, ReadError> {
        self.list(PREFIX_USERS)
    }

    /// The user's role in each project.
    pub fn grants_of(
        &self,
        user: &str,
    ) -> Result<std::collections::BTreeMap<String, Role>, ReadError> {
        let prefix = format!("{PREFIX_USER_GRANTS}{user}/");
        Ok(self
            .reader
            .scan(&prefix)?
            .into_iter()
            .filter_map(|(key, bytes)| {
                Some((
                    key[prefix.len()..].to_string(),
                    serde_json::from_slice(&bytes).ok()?,
                ))
            })
            .collect())
    }

    pub fn tokens_of(&self, user: &str) -> Result<Vec<ApiTokenRecord>, ReadError> {
        Ok(self
            .list::<ApiTokenRecord>(PREFIX_API_TOKENS)?
            .into_iter()
            .filter(|t| t.user == user)
            .collect())
    }

    pub fn token_owner(&self, id: &str) -> Result<Option<String>, ReadError> {
        let Some(sha) = self.get::<String>(&format!("{PREFIX_TOKEN_IDS}{id}"))? else {
            return Ok(None);
        };
        Ok(self.api_token(&sha)?.map(|t| t.user))
    }
}
