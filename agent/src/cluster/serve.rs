//! Accept loops for the API and peer ports.
//!
//! A listener is bound when the agent starts, before the node is
//! configured, so the addresses are known (and can be advertised) from the
//! first moment. What it serves is read per connection from a watch value:
//! an unconfigured API port answers plain-HTTP `/healthz` only, an
//! unconfigured peer port closes connections, and both switch to TLS when the
//! node joins or creates a cluster. Dropping the loop's task drops every
//! connection it accepted.

use std::sync::Arc;

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

pub fn spawn(
    listener: TcpListener,
    mode: watch::Receiver<ServeMode>,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                // Cancel-safe: `accept` loses nothing when another arm wins.
                accepted = listener.accept() => {
                    let (stream, remote) = match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            tracing::warn!(error = %e, listener = what, "accept failed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let current = mode.borrow().clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(stream, remote, current).await {
                            tracing::debug!(%remote, listener = what, error = %e, "connection ended with an error");
                        }
                    });
                }
                // Cancel-safe: reaping a finished connection task.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    mode: ServeMode,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let builder = hyper::server::conn::http1::Builder::new();
    match mode {
        ServeMode::Closed => Ok(()),
        ServeMode::Plain(router) => {
            let service = TowerToHyperService::new(router.layer(Extension(PeerIdentity {
                common_name: None,
                remote_addr: Some(remote),
            })));
            Ok(builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await?)
        }
        ServeMode::Tls(config, router) => {
            let tls = TlsAcceptor::from(config).accept(stream).await?;
            let common_name = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| crate::cluster::pki::peer_common_name(cert.as_ref()));
            let service = TowerToHyperService::new(router.layer(Extension(PeerIdentity {
                common_name,
                remote_addr: Some(remote),
            })));
            Ok(builder
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await?)
        }
    }
}
