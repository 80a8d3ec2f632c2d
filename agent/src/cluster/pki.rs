//! The cluster's own certificate authority and the TLS configurations built
//! from it.
//!
//! `cluster init` creates a CA; every node holds a key pair of its own and a
//! certificate the CA signed for it (common name `node-<id>`, usable as TLS
//! server and client). Peers only accept clients that present such a
//! certificate. One crypto provider, ring, serves the whole binary.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the certificate signing request is invalid")]
    BadCsr {
        #[source]
        source: rcgen::Error,
    },
    #[error("{what} is not valid PEM: {reason}")]
    BadPem { what: &'static str, reason: String },
    #[error("cannot build the TLS configuration")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client-certificate verifier: {reason}")]
    Verifier { reason: String },
}

/// The crypto provider every TLS configuration in the binary uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER encoding, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// SHA-256 of the first certificate in a PEM document.
pub fn pem_fingerprint(pem: &str) -> Result<String, PkiError> {
    let certs = parse_certs(pem, "certificate")?;
    Ok(fingerprint(certs[0].as_ref()))
}

/// A freshly created cluster CA.
pub struct CertificateAuthority {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    pub fn create(cluster_id: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "the CA key",
            source,
        })?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|source| PkiError::Generate {
                what: "the CA certificate",
                source,
            })?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Allod cluster CA {cluster_id}"));
        dn.push(DnType::OrganizationName, "Allod");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "the CA certificate",
                source,
            })?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node certificate for `node_id` from the node's CSR. Only the
    /// CSR's public key and subject alternative names are taken from it; the
    /// CA decides the name, usage and lifetime.
    pub fn sign_node_csr(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        csr_pem: &str,
        node_id: u64,
    ) -> Result<String, PkiError> {
        let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| PkiError::BadPem {
            what: "the CA key",
            reason: e.to_string(),
        })?;
        let ca_params =
            CertificateParams::from_ca_cert_pem(ca_cert_pem).map_err(|e| PkiError::BadPem {
                what: "the CA certificate",
                reason: e.to_string(),
            })?;
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|source| PkiError::Generate {
                what: "the CA issuer",
                source,
            })?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|source| PkiError::BadCsr { source })?;
        apply_node_profile(&mut csr.params, node_id);
        let cert = csr
            .signed_by(&ca_cert, &ca_key)
            .map_err(|source| PkiError::Generate {
                what: "the node certificate",
                source,
            })?;
        Ok(cert.pem())
    }
}

fn apply_node_profile(params: &mut CertificateParams, node_id: u64) {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_common_name(node_id));
    dn.push(DnType::OrganizationName, "Allod");
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
}

/// Checks that a CSR parses and carries a valid self-signature.
pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(|source| PkiError::BadCsr { source })
}

pub fn node_common_name(node_id: u64) -> String {
    format!("node-{node_id}")
}

/// Names a node certificate must carry: the hosts of its addresses, plus
/// loopback so local tools can reach it.
pub fn subject_alt_names(addrs: &[&str]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for addr in addrs {
        let host = match addr.rsplit_once(':') {
            Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        if !host.is_empty() && host != "0.0.0.0" && host != "::" && !names.iter().any(|n| n == host)
        {
            names.push(host.to_string());
        }
    }
    names
}

/// A new node key and the CSR for it.
pub struct NodeKey {
    pub key_pem: String,
    pub csr_pem: String,
}

impl NodeKey {
    pub fn generate(sans: Vec<String>) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "the node key",
            source,
        })?;
        let params = CertificateParams::new(sans).map_err(|source| PkiError::Generate {
            what: "the node CSR",
            source,
        })?;
        let csr = params
            .serialize_request(&key)
            .map_err(|source| PkiError::Generate {
                what: "the node CSR",
                source,
            })?;
        let csr_pem = csr.pem().map_err(|source| PkiError::Generate {
            what: "the node CSR",
            source,
        })?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem,
        })
    }

    /// For the first node: the key and its CA-signed certificate in one go.
    pub fn generate_signed(
        sans: Vec<String>,
        ca: &CertificateAuthority,
        node_id: u64,
    ) -> Result<(String, String), PkiError> {
        let node = Self::generate(sans)?;
        let cert =
            CertificateAuthority::sign_node_csr(&ca.cert_pem, &ca.key_pem, &node.csr_pem, node_id)?;
        Ok((node.key_pem, cert))
    }
}

pub fn parse_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::BadPem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            what,
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| PkiError::BadPem {
            what: "the node key",
            reason: e.to_string(),
        })?
        .ok_or(PkiError::BadPem {
            what: "the node key",
            reason: "no PRIVATE KEY block found".into(),
        })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "the CA certificate")? {
        roots.add(cert).map_err(|source| PkiError::Tls { source })?;
    }
    Ok(roots)
}

/// The material a configured node serves and authenticates with.
#[derive(Clone)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeTls {
    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        let mut chain = parse_certs(&self.cert_pem, "the node certificate")?;
        chain.extend(parse_certs(&self.ca_pem, "the CA certificate")?);
        Ok(chain)
    }

    /// Server side of the peer port: only clients with a certificate from the
    /// cluster CA get through the handshake.
    pub fn peer_server_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        let mut config = Arc::unwrap_or_clone(self.server_config(false)?);
        // Peers of this version multiplex every call over one HTTP/2
        // connection; earlier ones speak HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Server side of the tenant API: callers authenticate with bearer
    /// tokens; a client certificate is optional, and one from the cluster
    /// CA must still be a member's (see `admission`).
    pub fn api_server_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        self.server_config(true)
    }

    /// This node's certificate, verifying clients' against the cluster CA
    /// (`optional`: a client may also show none).
    fn server_config(&self, optional: bool) -> Result<Arc<ServerConfig>, PkiError> {
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&self.ca_pem)?), provider());
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        let verifier = builder.build().map_err(|e| PkiError::Verifier {
            reason: e.to_string(),
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| PkiError::Tls { source })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, parse_key(&self.key_pem)?)
            .map_err(|source| PkiError::Tls { source })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client side of the peer and storage ports for a member: like
    /// [`Self::peer_client_config`], and the server's certificate must also
    /// pass `check` (a member's, for its pinned key), so that a copy of the
    /// CA key cannot pose as a member to collect what peers send it.
    pub fn member_client_config(&self, check: ServerCheck) -> Result<ClientConfig, PkiError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(&self.ca_pem)?),
            provider(),
        )
        .build()
        .map_err(|e| PkiError::Verifier {
            reason: e.to_string(),
        })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| PkiError::Tls { source })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberServer { inner, check }))
            .with_client_auth_cert(self.chain()?, parse_key(&self.key_pem)?)
            .map_err(|source| PkiError::Tls { source })?;
        // A resumed session skips the server's certificate: every new
        // connection checks it again (connections are pooled, so this is
        // rare).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// Client side of the peer port: trusts only the cluster CA and presents
    /// this node's certificate.
    pub fn peer_client_config(&self) -> Result<ClientConfig, PkiError> {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| PkiError::Tls { source })?
            .with_root_certificates(roots(&self.ca_pem)?)
            .with_client_auth_cert(self.chain()?, parse_key(&self.key_pem)?)
            .map_err(|source| PkiError::Tls { source })
    }
}

/// Decides whether a server certificate (DER) the CA signed is a member's.
pub type ServerCheck = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// The CA's verification, then [`ServerCheck`].
struct MemberServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: ServerCheck,
}

impl std::fmt::Debug for MemberServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberServer")
    }
}

impl ServerCertVerifier for MemberServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        (self.check)(end_entity.as_ref()).map_err(rustls::Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client that trusts only the given CA (the CLI, a joining node after it
/// checked the CA's fingerprint).
pub fn ca_client_config(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| PkiError::Tls { source })?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth())
}

/// A client that accepts any server certificate. Used for exactly one thing:
/// a joining node downloads the cluster's CA certificate with it and then
/// compares the download's SHA-256 with the fingerprint in its join token
/// before trusting anything else the server says.
pub fn unverified_client_config() -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// SHA-256 of the public key a certificate carries (the bits of its
/// subjectPublicKey), lowercase hex: what the cluster pins for each node.
pub fn cert_key_sha256(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(key_sha256(&cert))
}

fn key_sha256(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    hex::encode(Sha256::digest(&cert.public_key().subject_public_key.data))
}

/// SHA-256 of the public key in a CSR, as [`cert_key_sha256`] computes it
/// for the certificate later signed from the CSR.
pub fn csr_key_sha256(csr_pem: &str) -> Result<String, PkiError> {
    use x509_parser::prelude::FromDer;
    let bad = |reason: String| PkiError::BadPem {
        what: "the certificate signing request",
        reason,
    };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| bad(e.to_string()))?;
    Ok(hex::encode(Sha256::digest(
        &csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data,
    )))
}

/// The node id a node certificate's common name (`node-<id>`) names.
pub fn node_id_of(common_name: &str) -> Option<u64> {
    common_name.strip_prefix("node-")?.parse().ok()
}

/// The node a certificate names (common name `node-<id>`) and the SHA-256
/// of its key (as [`cert_key_sha256`]), from one parse; `None` for a
/// certificate that names no node.
pub fn node_identity(der: &[u8]) -> Option<(u64, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let id = node_id_of(cert.subject().iter_common_name().next()?.as_str().ok()?)?;
    Some((id, key_sha256(&cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_is_signed_by_the_ca_and_named_after_the_node() {
        let ca = CertificateAuthority::create("c1").unwrap();
        let (key, cert) =
            NodeKey::generate_signed(subject_alt_names(&["10.1.2.3:7443"]), &ca, 7).unwrap();
        let der = parse_certs(&cert, "cert").unwrap();
        assert_eq!(node_identity(der[0].as_ref()).map(|(id, _)| id), Some(7));
        let tls = NodeTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: cert,
            key_pem: key,
        };
        tls.peer_server_config().unwrap();
        tls.peer_client_config().unwrap();
        assert_eq!(pem_fingerprint(&ca.cert_pem).unwrap().len(), 64);
        assert_eq!(node_id_of("node-7"), Some(7));
        assert_eq!(node_id_of("Allod cluster CA c1"), None);
    }

    /// The key pinned at join time (from the CSR) is the key the signed
    /// certificate carries, and another key for the same node differs.
    #[test]
    fn the_pinned_key_of_a_csr_is_the_key_of_its_certificate() {
        let ca = CertificateAuthority::create("c1").unwrap();
        let node = NodeKey::generate(subject_alt_names(&[])).unwrap();
        let cert = CertificateAuthority::sign_node_csr(&ca.cert_pem, &ca.key_pem, &node.csr_pem, 3)
            .unwrap();
        let der = parse_certs(&cert, "cert").unwrap();
        let pinned = csr_key_sha256(&node.csr_pem).unwrap();
        assert_eq!(cert_key_sha256(der[0].as_ref()), Some(pinned.clone()));
        let other = NodeKey::generate(subject_alt_names(&[])).unwrap();
        assert_ne!(csr_key_sha256(&other.csr_pem).unwrap(), pinned);
        assert!(csr_key_sha256("not a csr").is_err());
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = CertificateAuthority::create("c1").unwrap();
        let err = CertificateAuthority::sign_node_csr(&ca.cert_pem, &ca.key_pem, "not a csr", 2)
            .unwrap_err();
        assert!(matches!(err, PkiError::BadCsr { .. }), "{err}");
    }

    #[test]
    fn alt_names_include_advertised_hosts() {
        let names =
            subject_alt_names(&["192.0.2.1:7000", "[2001:db8::1]:7001", "node-a.example:1"]);
        assert!(names.contains(&"192.0.2.1".to_string()));
        assert!(names.contains(&"2001:db8::1".to_string()));
        assert!(names.contains(&"node-a.example".to_string()));
    }
}
