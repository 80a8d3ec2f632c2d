//! Bearer JWTs from the organisation's OpenID Connect issuers (Keycloak or
//! any other).
//!
//! The cluster state holds the issuers it trusts ([`OidcIssuer`]): the exact
//! `iss`, the audience (client id) tokens must carry, the claim whose values
//! map to roles, and optionally a CA to trust for the issuer's HTTPS. Every
//! node verifies tokens itself: it fetches the discovery document and the
//! JWKS, caches the keys, and fetches them again when a token names a key id
//! it does not know (the issuer rotated its keys) or the cache is older than
//! [`KEYS_MAX_AGE`]. Only asymmetric algorithms are accepted, and only with a
//! key of the matching type, so `alg: none` and HMAC-with-the-public-key
//! tokens never verify.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::api::authz::Principal;
use crate::state::auth::{OidcIssuer, Role, OIDC_TOKEN_PREFIX};
use crate::state::{DomainError, ErrorCode};

/// Keys older than this are fetched again before use.
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(300);
/// An unknown key id makes a node fetch the JWKS at most this often per
/// issuer, so a flood of forged tokens cannot become a flood on the issuer.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(2);
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid(message: String) -> DomainError {
    DomainError {
        code: ErrorCode::InvalidArgument,
        message,
    }
}

impl OidcIssuer {
    /// Checks a configuration before it is stored.
    pub fn validate(&self) -> Result<(), DomainError> {
        crate::state::validate_name("issuer", &self.name)?;
        let url = reqwest::Url::parse(&self.issuer)
            .map_err(|e| invalid(format!("issuer {:?} is not a URL: {e}", self.issuer)))?;
        if url.scheme() != "https" || url.host_str().is_none() {
            return Err(invalid(format!(
                "issuer {:?} must be an https:// URL, exactly as its tokens' `iss` claim",
                self.issuer
            )));
        }
        if self.audience.is_empty() || self.claim.is_empty() {
            return Err(invalid(
                "audience and claim must not be empty; the audience is usually the client id"
                    .into(),
            ));
        }
        for mapping in &self.mappings {
            match (mapping.role, &mapping.project) {
                (Role::ClusterAdmin, Some(_)) => {
                    return Err(invalid(format!(
                        "mapping of {:?}: cluster-admin takes no project",
                        mapping.value
                    )))
                }
                (Role::ClusterAdmin, None) => {}
                (role, None) => {
                    return Err(invalid(format!(
                        "mapping of {:?}: the {} role needs a project (VALUE={}@PROJECT)",
                        mapping.value,
                        role.as_str(),
                        role.as_str()
                    )))
                }
                (_, Some(project)) => crate::state::validate_name("project", project)?,
            }
        }
        if let Some(pem) = &self.ca_pem {
            certificates(pem).map_err(invalid)?;
        }
        Ok(())
    }

    /// The roles a token's claims give under this issuer's mappings.
    pub fn roles_for(&self, claims: &serde_json::Value) -> (bool, BTreeMap<String, Role>) {
        let mut node = claims;
        for part in self.claim.split('.') {
            node = node.get(part).unwrap_or(&serde_json::Value::Null);
        }
        let values: Vec<&str> = match node {
            serde_json::Value::String(s) => vec![s.as_str()],
            serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let mut cluster_admin = false;
        let mut roles: BTreeMap<String, Role> = BTreeMap::new();
        for mapping in self.mappings.iter().filter(|m| values.contains(&&*m.value)) {
            match &mapping.project {
                None => cluster_admin |= mapping.role == Role::ClusterAdmin,
                Some(project) => {
                    let held = roles.entry(project.clone()).or_insert(mapping.role);
                    *held = (*held).max(mapping.role);
                }
            }
        }
        (cluster_admin, roles)
    }
}

fn certificates(pem: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| format!("ca_pem is not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("ca_pem holds no certificate".into());
    }
    Ok(certs)
}

/// Why a JWT was refused, in words for the caller.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the bearer token is neither an Allod API token nor a JWT")]
    NotAJwt,
    #[error("JWT refused: algorithm {0} is not accepted (only RS*, PS*, ES256/ES384 and EdDSA)")]
    Algorithm(String),
    #[error("JWT refused: issuer {0:?} is not configured in this cluster (`allod oidc list`)")]
    UnknownIssuer(String),
    #[error("JWT refused: the issuer has no key {0:?} (unknown or rotated out)")]
    UnknownKey(String),
    #[error("JWT refused: {0}")]
    Invalid(String),
    #[error("JWT refused: the issuer's keys could not be fetched: {0}")]
    Fetch(String),
}

/// The asymmetric algorithms accepted, by the key type they need.
fn key_fits(alg: Algorithm, jwk: &Jwk) -> bool {
    use Algorithm::*;
    let family_ok = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(_) => matches!(alg, ES256 | ES384),
        AlgorithmParameters::OctetKeyPair(_) => alg == EdDSA,
        // Symmetric keys are never used: the "public" key would be the secret.
        AlgorithmParameters::OctetKey(_) => false,
    };
    let declared_ok = jwk
        .common
        .key_algorithm
        .is_none_or(|declared| format!("{declared:?}") == format!("{alg:?}"));
    family_ok && declared_ok
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Jwk>,
    /// Keys without a `kid`, tried in turn for tokens without one.
    anonymous: Vec<Jwk>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

struct IssuerClient {
    config: OidcIssuer,
    /// The verifier's count of key-set changes, bumped on every change.
    key_changes: Arc<std::sync::atomic::AtomicU64>,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<KeyCache>,
}

impl IssuerClient {
    fn new(
        config: OidcIssuer,
        key_changes: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<Self, OidcError> {
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::limited(3));
        if let Some(pem) = &config.ca_pem {
            for cert in certificates(pem).map_err(OidcError::Fetch)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder
                .build()
                .map_err(|e| OidcError::Fetch(e.to_string()))?,
            config,
            key_changes,
            cache: tokio::sync::Mutex::new(KeyCache::default()),
        })
    }

    async fn fetch_json(&self, url: &str) -> Result<serde_json::Value, OidcError> {
        let reply = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| OidcError::Fetch(format!("GET {url}: {}", crate::error_chain(&e))))?;
        if !reply.status().is_success() {
            return Err(OidcError::Fetch(format!("GET {url}: {}", reply.status())));
        }
        reply
            .json()
            .await
            .map_err(|e| OidcError::Fetch(format!("GET {url}: not JSON: {e}")))
    }

    /// Reads the discovery document and the JWKS into the cache.
    async fn refresh(&self, cache: &mut KeyCache) -> Result<(), OidcError> {
        cache.last_attempt = Some(Instant::now());
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let discovery = self.fetch_json(&discovery_url).await?;
        if discovery["issuer"].as_str() != Some(self.config.issuer.as_str()) {
            return Err(OidcError::Fetch(format!(
                "the discovery document names issuer {} rather than {:?}",
                discovery["issuer"], self.config.issuer
            )));
        }
        let jwks_uri = discovery["jwks_uri"].as_str().ok_or_else(|| {
            OidcError::Fetch("the discovery document has no jwks_uri".to_string())
        })?;
        let jwks = self.fetch_json(jwks_uri).await?;
        let mut keys = HashMap::new();
        let mut anonymous = Vec::new();
        // Keys of kinds this library does not know are skipped, not fatal.
        for value in jwks["keys"].as_array().into_iter().flatten() {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
                continue;
            };
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            match jwk.common.key_id.clone() {
                Some(kid) => {
                    keys.insert(kid, jwk);
                }
                None => anonymous.push(jwk),
            }
        }
        tracing::info!(
            issuer = self.config.name,
            keys = keys.len() + anonymous.len(),
            "fetched the OIDC issuer's signing keys"
        );
        if cache.keys != keys || cache.anonymous != anonymous {
            self.key_changes
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        cache.keys = keys;
        cache.anonymous = anonymous;
        cache.fetched_at = Some(Instant::now());
        Ok(())
    }

    /// The keys that may have signed a token with this `kid`, fetching the
    /// JWKS again when they are stale or the key id is new.
    async fn candidate_keys(&self, kid: Option<&str>) -> Result<Vec<Jwk>, OidcError> {
        let mut cache = self.cache.lock().await;
        let stale = cache
            .fetched_at
            .is_none_or(|at| at.elapsed() > KEYS_MAX_AGE);
        let unknown = match kid {
            Some(kid) => !cache.keys.contains_key(kid),
            None => cache.anonymous.is_empty() && cache.keys.is_empty(),
        };
        let may_retry = cache
            .last_attempt
            .is_none_or(|at| at.elapsed() > UNKNOWN_KID_REFETCH);
        if stale || (unknown && may_retry) {
            if let Err(e) = self.refresh(&mut cache).await {
                // Stale keys still verify while the issuer is unreachable.
                if cache.fetched_at.is_none() {
                    return Err(e);
                }
                tracing::warn!(issuer = self.config.name, error = %e, "could not refresh OIDC keys; using cached ones");
            }
        }
        Ok(match kid {
            Some(kid) => cache.keys.get(kid).cloned().into_iter().collect(),
            None => cache
                .anonymous
                .iter()
                .chain(cache.keys.values())
                .cloned()
                .collect(),
        })
    }
}

/// Verifies bearer JWTs against the issuers configured in the cluster.
#[derive(Default)]
pub struct Verifier {
    clients: Mutex<HashMap<String, Arc<IssuerClient>>>,
    /// Moves on whenever an issuer's published keys change, so principals
    /// cached from tokens of a retired key are not used again.
    key_changes: Arc<std::sync::atomic::AtomicU64>,
}

/// True when a bearer token has the shape of a JWT rather than an Allod token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2 && !token.starts_with("allod_")
}

fn unverified_issuer(token: &str) -> Result<String, OidcError> {
    let payload = token.split('.').nth(1).ok_or(OidcError::NotAJwt)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| OidcError::NotAJwt)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| OidcError::NotAJwt)?;
    claims["iss"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| OidcError::Invalid("the token has no `iss` claim".into()))
}

impl Verifier {
    fn client_for(&self, config: &OidcIssuer) -> Result<Arc<IssuerClient>, OidcError> {
        let mut clients = self.clients.lock().expect("oidc clients");
        if let Some(client) = clients.get(&config.issuer) {
            if client.config == *config {
                return Ok(client.clone());
            }
        }
        let client = Arc::new(IssuerClient::new(config.clone(), self.key_changes.clone())?);
        clients.insert(config.issuer.clone(), client.clone());
        Ok(client)
    }

    /// How many times any issuer's keys changed.
    pub fn key_generation(&self) -> u64 {
        self.key_changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Verifies `token` against `issuers` and says who is calling, and until
    /// when (the token's `exp`, in milliseconds since the epoch).
    pub async fn verify(
        &self,
        issuers: &[OidcIssuer],
        token: &str,
    ) -> Result<(Principal, u64), OidcError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::Json(_) => {
                OidcError::Algorithm("in the header (none or unknown)".into())
            }
            _ => OidcError::NotAJwt,
        })?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(OidcError::Algorithm(format!("{:?}", header.alg)));
        }
        let iss = unverified_issuer(token)?;
        let config = issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| OidcError::UnknownIssuer(iss.clone()))?;
        let client = self.client_for(config)?;
        let keys = client.candidate_keys(header.kid.as_deref()).await?;
        let usable: Vec<&Jwk> = keys.iter().filter(|k| key_fits(header.alg, k)).collect();
        if usable.is_empty() {
            return Err(match header.kid {
                Some(kid) if keys.is_empty() => OidcError::UnknownKey(kid),
                _ => OidcError::Invalid(format!(
                    "no key of the issuer fits algorithm {:?}",
                    header.alg
                )),
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let mut last_error = None;
        for jwk in usable {
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| OidcError::Invalid(format!("the issuer's key is unusable: {e}")))?;
            match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
                Ok(data) => {
                    let expires_ms = data.claims["exp"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_mul(1000);
                    return Ok((self.principal(config, &data.claims), expires_ms));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(OidcError::Invalid(describe(
            last_error.expect("at least one key was tried"),
        )))
    }

    fn principal(&self, config: &OidcIssuer, claims: &serde_json::Value) -> Principal {
        let subject = claims["sub"].as_str().unwrap_or_default();
        let (cluster_admin, project_roles) = config.roles_for(claims);
        Principal {
            user: format!("{subject}@{}", config.name),
            token_id: format!("{OIDC_TOKEN_PREFIX}{}", config.name),
            cluster_admin,
            project_roles,
            project_scoped: false,
        }
    }
}

fn describe(e: jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        ExpiredSignature => "the token has expired".into(),
        ImmatureSignature => "the token is not valid yet (nbf)".into(),
        InvalidAudience => "the token is for another audience".into(),
        InvalidIssuer => "the token is from another issuer".into(),
        InvalidSignature => "the signature does not verify".into(),
        MissingRequiredClaim(claim) => format!("the token has no `{claim}` claim"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::auth::ClaimMapping;

    fn issuer(mappings: &[&str]) -> OidcIssuer {
        OidcIssuer {
            name: "corp".into(),
            issuer: "https://idp.example/realms/corp".into(),
            audience: "allod".into(),
            claim: "groups".into(),
            mappings: mappings
                .iter()
                .map(|m| ClaimMapping::parse(m).unwrap())
                .collect(),
            ca_pem: None,
        }
    }

    #[test]
    fn claims_map_to_the_strongest_role_per_project() {
        let config = issuer(&[
            "ops=cluster-admin",
            "web-dev=project-member@web",
            "web-lead=project-admin@web",
            "auditors=project-viewer@db",
        ]);
        let (admin, roles) =
            config.roles_for(&serde_json::json!({ "groups": ["web-dev", "web-lead", "other"] }));
        assert!(!admin);
        assert_eq!(roles.get("web"), Some(&Role::ProjectAdmin));
        assert_eq!(roles.len(), 1);
        let (admin, _) = config.roles_for(&serde_json::json!({ "groups": "ops" }));
        assert!(admin);
        let (admin, roles) = config.roles_for(&serde_json::json!({ "groups": 7 }));
        assert!(!admin && roles.is_empty());
    }

    #[test]
    fn dotted_claims_reach_into_objects() {
        let mut config = issuer(&["ops=cluster-admin"]);
        config.claim = "realm_access.roles".into();
        let (admin, _) =
            config.roles_for(&serde_json::json!({ "realm_access": { "roles": ["ops"] } }));
        assert!(admin);
    }

    #[test]
    fn configurations_are_checked() {
        assert!(issuer(&["ops=cluster-admin"]).validate().is_ok());
        let mut plain = issuer(&[]);
        plain.issuer = "http://idp.example".into();
        assert!(plain.validate().unwrap_err().message.contains("https://"));
        assert!(issuer(&["x=project-admin"])
            .validate()
            .unwrap_err()
            .message
            .contains("needs a project"));
        assert!(issuer(&["x=cluster-admin@web"]).validate().is_err());
        assert!(ClaimMapping::parse("nothing").is_err());
        assert!(ClaimMapping::parse("x=king").is_err());
        let mut bad_ca = issuer(&[]);
        bad_ca.ca_pem = Some("not a pem".into());
        assert!(bad_ca.validate().is_err());
    }

    #[test]
    fn jwt_shape_is_told_from_allod_tokens() {
        assert!(looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("allod_0123"));
        assert!(!looks_like_jwt("a.b"));
    }
}
