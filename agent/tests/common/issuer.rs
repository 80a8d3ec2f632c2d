//! An OIDC issuer on localhost for tests and benchmarks: its own CA and
//! HTTPS, a discovery document, a JWKS it can change (key rotation), and
//! ES256 signing keys.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;

/// A signing key of the test issuer.
pub struct SigningKey {
    kid: String,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    pub fn new(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    pub fn jwk(&self) -> serde_json::Value {
        // Uncompressed point: 0x04 || x || y.
        let raw = self.pair.public_key_raw();
        json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        })
    }

    /// Signs `claims` with this key, naming `kid` in the header.
    pub fn sign_as(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_as(&self.kid, claims)
    }
}

pub struct TestIssuer {
    pub url: String,
    pub ca_pem: String,
    /// The JWKS the issuer currently publishes.
    pub published: Arc<Mutex<serde_json::Value>>,
    pub jwks_fetches: Arc<Mutex<u32>>,
}

impl TestIssuer {
    pub async fn start(keys: &[&SigningKey]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/realms/test",
            listener.local_addr().unwrap().port()
        );
        let published = Arc::new(Mutex::new(
            json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }),
        ));
        let jwks_fetches = Arc::new(Mutex::new(0));
        let discovery = json!({ "issuer": url, "jwks_uri": format!("{url}/certs") });
        let (jwks, fetches) = (published.clone(), jwks_fetches.clone());
        let router = Router::new()
            .route(
                "/realms/test/.well-known/openid-configuration",
                get(move || async move { Json(discovery) }),
            )
            .route(
                "/realms/test/certs",
                get(move || async move {
                    *fetches.lock().unwrap() += 1;
                    Json(jwks.lock().unwrap().clone())
                }),
            );
        let (_keep, mode) = tokio::sync::watch::channel(agent::cluster::serve::ServeMode::Tls(
            Arc::new(tls),
            router,
        ));
        std::mem::forget(_keep);
        agent::cluster::serve::spawn(
            listener,
            mode,
            "test issuer",
            agent::cluster::serve::Limits::API,
            None,
        );
        Self {
            url,
            ca_pem: ca_cert.pem(),
            published,
            jwks_fetches,
        }
    }

    pub fn publish(&self, keys: &[&SigningKey]) {
        *self.published.lock().unwrap() =
            json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() });
    }

    pub fn claims(&self, sub: &str, groups: &[&str]) -> serde_json::Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        json!({
            "iss": self.url, "aud": "allod", "sub": sub, "groups": groups,
            "iat": now, "nbf": now - 5, "exp": now + 300,
        })
    }
}

pub fn forge_unsigned(claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}
