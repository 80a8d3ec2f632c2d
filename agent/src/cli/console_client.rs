//! `allod vm console`: this terminal on a VM's serial console, through the
//! websocket of the API of the node that runs the VM.

use std::sync::Arc;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::ApiArgs;

/// Ctrl-] leaves the console, as with `virsh console` and telnet.
const ESCAPE: u8 = 0x1d;

/// The websocket URL of a VM's console on the node that runs it.
pub async fn console_url(
    client: &crate::cli::ApiClient,
    project: &str,
    name: &str,
) -> anyhow::Result<String> {
    let vm = client
        .call(
            reqwest::Method::GET,
            &format!("/v1/projects/{project}/vms/{name}"),
            None,
        )
        .await?;
    let node = vm["node"].as_u64().context("the VM has no node")?;
    let nodes = client.call(reqwest::Method::GET, "/v1/nodes", None).await?;
    let addr = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"].as_u64() == Some(node))
        .and_then(|n| n["api_addr"].as_str().map(str::to_string))
        .with_context(|| format!("node {node}, which runs VM {name}, is not a member"))?;
    Ok(format!(
        "wss://{addr}/v1/projects/{project}/vms/{}/console",
        vm["id"].as_str().unwrap_or(name)
    ))
}

/// Opens the console websocket with the client's token and CA.
pub async fn connect(
    client: &crate::cli::ApiClient,
    url: &str,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", client.token).parse()?);
    let tls = crate::cluster::pki::ca_client_config(&client.ca_pem)?;
    let (socket, _) = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls))),
    )
    .await
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let message = crate::cli::error_message(&body);
            anyhow::anyhow!("{message} (HTTP {})", response.status().as_u16())
        }
        other => anyhow::anyhow!("cannot open the console at {url}: {other}"),
    })?;
    Ok(socket)
}

/// Restores the terminal however the console ends.
struct RawMode(bool);

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.0 {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

pub async fn attach(api: &ApiArgs, project: &str, name: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let client = api.resolve()?;
    let url = console_url(&client, project, name).await?;
    let socket = connect(&client, &url).await?;
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("Connected to the console of {name} (Ctrl-] leaves).\r");
    }
    let _raw = RawMode(tty && crossterm::terminal::enable_raw_mode().is_ok());
    let (mut tx, mut rx) = socket.split();
    let input = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // Without input, keep showing output until the far end closes.
                    std::future::pending::<()>().await;
                    return;
                }
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if let Some(at) = chunk.iter().position(|b| *b == ESCAPE) {
                if at > 0 {
                    let _ = tx.send(Message::Binary(chunk[..at].to_vec().into())).await;
                }
                let _ = tx.send(Message::Close(None)).await;
                return;
            }
            if tx
                .send(Message::Binary(chunk.to_vec().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let output = async move {
        let mut stdout = tokio::io::stdout();
        while let Some(Ok(msg)) = rx.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if stdout.write_all(&data).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = input => {}
        () = output => {}
    }
    if tty {
        eprintln!("\r\nLeft the console of {name}.\r");
    }
    Ok(())
}
