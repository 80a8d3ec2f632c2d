//! Accept loops for the API and peer ports.
//!
//! A listener is bound when the agent starts, before the node is
//! configured, so the addresses are known (and can be advertised) from the
//! first moment. What it serves is read per connection from a watch value:
//! an unconfigured API port answers plain-HTTP `/healthz` only, an
//! unconfigured peer port closes connections, and both switch to TLS when the
//! node joins or creates a cluster. Dropping the loop's task drops every
//! connection it accepted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::cluster::peer::PeerIdentity;

#[derive(Clone)]
pub enum ServeMode {
    /// Refuse every connection.
    Closed,
    /// Plain HTTP (only for the unconfigured node's health endpoint).
    Plain(Router),
    /// HTTPS; the router sees the client certificate's identity, if any.
    Tls(Arc<ServerConfig>, Router),
}

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; beyond it the oldest connection that has
    /// not proven who it is (no client certificate, no authenticated
    /// request) is closed for the new one, or the new one is refused.
    pub max_connections: usize,
    /// From accepting a connection to the end of its TLS handshake.
    pub handshake_timeout: Duration,
    /// To read a request's headers, and the longest an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
}

impl Limits {
    /// The API port: tenants, operators, and anyone else.
    pub const API: Limits = Limits {
        max_connections: 4096,
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(60),
    };
    /// The peer port: other members, which keep connections pooled for
    /// 30 s, so the server keeps them longer and the client closes first.
    pub const PEER: Limits = Limits {
        max_connections: 1024,
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(120),
    };
}

/// Unauthenticated refusals in one second from one address, with no
/// authenticated request from it in the [`VOUCH_FOR_MS`] before, after
/// which the address is refused at accept, before any TLS or HTTP work,
/// for [`SHED_FOR_MS`].
pub const SHED_AFTER_REFUSALS: u32 = 100;
pub const SHED_FOR_MS: u64 = 10_000;
/// How long an authenticated request vouches for its address: a client
/// with a credential that then sends a long burst of malformed or
/// anonymous calls (a fuzzer, a broken script behind a real user's NAT) is
/// answered, not held unread.
pub const VOUCH_FOR_MS: u64 = 10 * 60 * 1000;
const MAX_SHED_SOURCES: usize = 4096;
/// Connections of shed addresses held open unread at most, each for at
/// most [`SHED_FOR_MS`]; beyond it the oldest is closed.
const MAX_HELD: usize = 1024;

/// Addresses that only send what is refused, shed at accept: a flood from
/// one address then costs an accept per connection, not a TLS handshake
/// and a parse per request, and its connections are held unread (up to
/// [`MAX_HELD`], for up to [`SHED_FOR_MS`]) so that its sender waits rather
/// than retrying at once. An address that also makes
/// authenticated requests (a NAT with real users behind it) is not shed.
#[derive(Default)]
pub struct Shed {
    sources: std::sync::Mutex<HashMap<std::net::IpAddr, Source>>,
}

#[derive(Default)]
struct Source {
    second: u64,
    refused: u32,
    authenticated_ms: u64,
    shed_until_ms: u64,
}

impl Shed {
    /// Counts a request from `ip` (`authenticated`, or refused without a
    /// caller); answers whether the address is shed from now on.
    pub fn note(&self, ip: std::net::IpAddr, authenticated: bool, now_ms: u64) -> bool {
        let mut sources = self.sources.lock().expect("shed sources");
        if sources.len() >= MAX_SHED_SOURCES && !sources.contains_key(&ip) {
            sources.retain(|_, s| {
                s.shed_until_ms > now_ms || s.authenticated_ms + VOUCH_FOR_MS > now_ms
            });
            if sources.len() >= MAX_SHED_SOURCES {
                // Forget the lot rather than grow.
                sources.clear();
            }
        }
        let source = sources.entry(ip).or_default();
        if authenticated {
            source.authenticated_ms = now_ms;
            source.shed_until_ms = 0;
            return false;
        }
        let second = now_ms / 1000;
        if source.second != second {
            source.second = second;
            source.refused = 0;
        }
        source.refused += 1;
        let vouched =
            source.authenticated_ms > 0 && source.authenticated_ms + VOUCH_FOR_MS > now_ms;
        if source.refused >= SHED_AFTER_REFUSALS && !vouched {
            if source.shed_until_ms <= now_ms {
                tracing::warn!(%ip, refusals = source.refused, "an address sends only refused requests; refusing its connections for {} s", SHED_FOR_MS / 1000);
            }
            source.shed_until_ms = now_ms + SHED_FOR_MS;
        }
        source.shed_until_ms > now_ms
    }

    /// Whether connections from `ip` are refused at accept.
    pub fn is_shed(&self, ip: std::net::IpAddr, now_ms: u64) -> bool {
        self.sources
            .lock()
            .expect("shed sources")
            .get(&ip)
            .is_some_and(|s| s.shed_until_ms > now_ms)
    }
}

/// One open connection: when it was accepted, whether it has proven who it
/// is, and how to close it.
struct Open {
    seq: u64,
    proven: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
}

pub fn spawn(
    listener: TcpListener,
    mode: watch::Receiver<ServeMode>,
    what: &'static str,
    limits: Limits,
    shed: Option<Arc<Shed>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        let mut open: HashMap<tokio::task::Id, Open> = HashMap::new();
        let mut seq = 0u64;
        let mut refused = 0u64;
        // Connections of shed addresses, held unread until they expire (a
        // tarpit: the sender waits instead of retrying at once).
        let mut held: std::collections::VecDeque<(tokio::net::TcpStream, u64)> =
            std::collections::VecDeque::new();
        loop {
            let now = crate::cluster::node::mono_ms();
            while held.front().is_some_and(|(_, at)| at + SHED_FOR_MS <= now) {
                held.pop_front();
            }
            tokio::select! {
                // Cancel-safe: `accept` loses nothing when another arm wins.
                accepted = listener.accept() => {
                    let (stream, remote) = match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of descriptors, most likely: wait a moment
                            // rather than spin on the same error.
                            tracing::warn!(error = %e, listener = what, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let now = crate::cluster::node::mono_ms();
                    if shed.as_ref().is_some_and(|s| s.is_shed(remote.ip(), now)) {
                        if held.len() >= MAX_HELD {
                            held.pop_front();
                        }
                        held.push_back((stream, now));
                        continue;
                    }
                    if open.len() >= limits.max_connections {
                        let oldest_unproven = open
                            .iter()
                            .filter(|(_, c)| !c.proven.load(Ordering::Relaxed))
                            .min_by_key(|(_, c)| c.seq)
                            .map(|(id, _)| *id);
                        match oldest_unproven.and_then(|id| open.remove(&id)) {
                            Some(shed) => shed.abort.abort(),
                            None => {
                                refused += 1;
                                if refused.is_power_of_two() {
                                    tracing::warn!(listener = what, refused, limit = limits.max_connections, "too many connections that proved who they are; refusing new ones");
                                }
                                continue;
                            }
                        }
                    }
                    let _ = stream.set_nodelay(true);
                    let current = mode.borrow().clone();
                    let proven = Arc::new(AtomicBool::new(false));
                    let conn_proven = proven.clone();
                    let abort = connections.spawn(async move {
                        if let Err(e) = serve_connection(stream, remote, current, conn_proven, limits).await {
                            tracing::debug!(%remote, listener = what, error = %e, "connection ended with an error");
                        }
                    });
                    seq += 1;
                    open.insert(abort.id(), Open { seq, proven, abort });
                }
                // Cancel-safe: reaping a finished connection task.
                // Wakes to let held connections go when nothing else happens.
                _ = tokio::time::sleep(Duration::from_secs(1)), if !held.is_empty() => {}
                Some(done) = connections.join_next_with_id(), if !connections.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => e.id(),
                    };
                    open.remove(&id);
                }
            }
        }
    })
}

/// Calls in flight at once on one peer's HTTP/2 connection.
const MAX_STREAMS: u32 = 1024;

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    mode: ServeMode,
    proven: Arc<AtomicBool>,
    limits: Limits,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    match mode {
        ServeMode::Closed => Ok(()),
        ServeMode::Plain(router) => {
            let service = TowerToHyperService::new(router.layer(Extension(PeerIdentity {
                node_cert: None,
                remote_addr: Some(remote),
                proven,
            })));
            Ok(builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await?)
        }
        ServeMode::Tls(config, router) => {
            let tls = tokio::time::timeout(
                limits.handshake_timeout,
                TlsAcceptor::from(config).accept(stream),
            )
            .await
            .map_err(|_| "the TLS handshake took too long")??;
            let node_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| crate::cluster::admission::NodeCert::from_der(cert.as_ref()));
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let service = TowerToHyperService::new(router.layer(Extension(PeerIdentity {
                node_cert,
                remote_addr: Some(remote),
                proven,
            })));
            if h2 {
                // Only the peer port offers HTTP/2 (see `pki`).
                let mut h2 =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                h2.timer(hyper_util::rt::TokioTimer::new())
                    .initial_stream_window_size(4 << 20)
                    .initial_connection_window_size(16 << 20)
                    .max_concurrent_streams(MAX_STREAMS)
                    .keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5));
                return Ok(h2.serve_connection(TokioIo::new(tls), service).await?);
            }
            Ok(builder
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    /// An address that sends only refused requests is shed for a while;
    /// one that also authenticates (real users behind a NAT) is not.
    #[test]
    fn only_an_address_that_sends_nothing_but_refusals_is_shed() {
        let shed = Shed::default();
        let (flood, mixed) = (
            std::net::IpAddr::from([192, 0, 2, 1]),
            std::net::IpAddr::from([192, 0, 2, 2]),
        );
        let now = 5_000;
        assert!(!shed.note(mixed, true, now));
        for i in 0..SHED_AFTER_REFUSALS - 1 {
            assert!(!shed.note(flood, false, now + u64::from(i)));
        }
        assert!(!shed.is_shed(flood, now + 200));
        assert!(shed.note(flood, false, now + 200));
        assert!(shed.is_shed(flood, now + 200));
        assert!(!shed.is_shed(flood, now + 200 + SHED_FOR_MS));
        for i in 0..2 * SHED_AFTER_REFUSALS {
            shed.note(mixed, false, now + u64::from(i));
        }
        assert!(!shed.is_shed(mixed, now + 500));
        // A burst of refusals a minute after the address last authenticated
        // (a fuzzer's anonymous phase after its logged-in one) is still
        // answered.
        let later = now + 60_000;
        for i in 0..2 * SHED_AFTER_REFUSALS {
            assert!(!shed.note(mixed, false, later + u64::from(i)));
        }
        // Past the vouching window it is shed like any other.
        let much_later = now + VOUCH_FOR_MS + 1_000;
        let mut shed_at = None;
        for i in 0..SHED_AFTER_REFUSALS {
            if shed.note(mixed, false, much_later + u64::from(i)) {
                shed_at = Some(i);
            }
        }
        assert_eq!(shed_at, Some(SHED_AFTER_REFUSALS - 1));
    }

    /// A full listener closes its oldest connection that never proved who
    /// it is for the newcomer, and keeps the proven ones.
    #[tokio::test]
    async fn a_full_listener_sheds_the_oldest_unproven_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let (_tx, mode) = watch::channel(ServeMode::Plain(router));
        let limits = Limits {
            max_connections: 3,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(60),
        };
        let server = spawn(listener, mode, "test", limits, None);
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answer = tokio::time::timeout(Duration::from_secs(5), get(addr))
            .await
            .expect("answered")
            .unwrap();
        assert!(answer.ends_with("ok"), "{answer}");
        // The oldest idle connection was closed for it.
        let mut buf = [0u8; 1];
        let first = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
            .await
            .expect("the oldest is closed");
        assert!(matches!(first, Ok(0) | Err(_)));
        server.abort();
    }
}
