//! Serving the object store to other nodes, and calling theirs: the framed
//! protocol of [`crate::proto`] over mutual TLS, pipelined (a connection
//! carries many requests at once; answers come back as they finish).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::proto::{DecodeError, ErrorKind, Request, Response, MAX_FRAME};
use crate::store::{ObjectStore, StoreError};

/// How long a peer may take to answer a read, write or look-up before the
/// writer counts it as failed (a dead peer's connection usually fails at
/// once; this bounds a peer cut off or hung).
pub const IO_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a peer may take to answer a request that syncs or walks files
/// (flush, fence, rollback, resync copies, deletes).
pub const SLOW_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `req` may take. Whole objects travel on threads that yield
/// to everything else (see [`bulk_runtime`]): on a busy node they may wait.
pub fn timeout_for(req: &Request) -> Duration {
    match req {
        _ if req.is_bulk() => SLOW_TIMEOUT,
        Request::Write { .. }
        | Request::Zero { .. }
        | Request::Read { .. }
        | Request::Exists { .. }
        | Request::Stat { .. } => IO_TIMEOUT,
        _ => SLOW_TIMEOUT,
    }
}

/// Answers one request from the local store.
pub async fn handle(store: &Arc<ObjectStore>, req: Request) -> Response {
    match handle_fast(store, &req) {
        Some(r) => into_response(r),
        None => handle_owned_slow(store, req).await,
    }
}

/// Like [`handle`], borrowing the request (cloned only for a slow one).
pub async fn handle_ref(store: &Arc<ObjectStore>, req: &Request) -> Response {
    match handle_fast(store, req) {
        Some(r) => into_response(r),
        None => handle_owned_slow(store, req.clone()).await,
    }
}

/// Reads, writes and look-ups, answered on the calling thread (page-cache
/// work); `None` for the requests that sync or walk files.
fn handle_fast(store: &ObjectStore, req: &Request) -> Option<Result<Response, StoreError>> {
    Some(match req {
        Request::Write {
            volume,
            index,
            offset,
            seq,
            epoch,
            data,
        } => store
            .write(volume, *index, u64::from(*offset), data, *seq, *epoch)
            .map(|()| Response::Done),
        Request::Zero {
            volume,
            index,
            offset,
            len,
            punch,
            seq,
            epoch,
        } => store
            .zero(
                volume,
                *index,
                u64::from(*offset),
                u64::from(*len),
                *punch,
                *seq,
                *epoch,
            )
            .map(|()| Response::Done),
        Request::Read {
            volume,
            index,
            snap,
            offset,
            len,
            epoch,
        } => store
            .read(
                volume,
                *index,
                *snap,
                u64::from(*offset),
                u64::from(*len),
                *epoch,
            )
            .map(|d| d.map_or(Response::Absent, Response::Data)),
        Request::Stat { volume, index } => store
            .stat(volume, *index)
            .map(|i| Response::Objects(i.into_iter().collect())),
        Request::Exists { volume, index } => store.exists(volume, *index).map(Response::Bool),
        Request::List { volume } => store.list(volume).map(Response::Objects),
        _ => return None,
    })
}

/// fsync and directory walks do not belong on the async workers.
async fn handle_owned_slow(store: &Arc<ObjectStore>, req: Request) -> Response {
    let store = store.clone();
    into_response(
        match tokio::task::spawn_blocking(move || handle_slow(&store, req)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Invalid(format!("storage task failed: {e}"))),
        },
    )
}

fn into_response(result: Result<Response, StoreError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => Response::Error {
            kind: match e {
                StoreError::StaleEpoch { .. } => ErrorKind::StaleEpoch,
                StoreError::NotFenced { .. } => ErrorKind::NotFenced,
                StoreError::Checksum { .. } => ErrorKind::Checksum,
                StoreError::Invalid(_) => ErrorKind::Invalid,
                StoreError::Io { .. } => ErrorKind::Io,
            },
            message: e.to_string(),
        },
    }
}

fn handle_slow(store: &ObjectStore, req: Request) -> Result<Response, StoreError> {
    match req {
        Request::Flush { volume } => store.flush(&volume).map(|()| Response::Done),
        Request::Rollback {
            volume,
            snap,
            seq,
            epoch,
        } => store
            .rollback(&volume, snap, seq, epoch)
            .map(|()| Response::Done),
        Request::DeleteVolume { volume } => store.delete_volume(&volume).map(|()| Response::Done),
        Request::TrimSnapshots {
            volume,
            live,
            known_seq,
        } => store
            .trim_snapshots(&volume, &live, known_seq)
            .map(|_| Response::Done),
        Request::Fence { volume, epoch } => store.fence(&volume, epoch).map(Response::Number),
        Request::Hold { volume, map } => store.hold(&volume, map).map(Response::Number),
        Request::Verify { volume, index, len } => store
            .verify(&volume, index, u64::from(len))
            .map(Response::Bool),
        Request::PutClone {
            volume,
            index,
            epoch,
            lo,
            hi,
            version,
            data,
        } => store
            .put_clone(&volume, index, epoch, lo, hi, version, &data)
            .map(|()| Response::Done),
        Request::PutHead {
            volume,
            index,
            epoch,
            version,
            seq,
            absent,
            keep,
            data,
        } => store
            .put_head(&volume, index, epoch, version, seq, absent, &keep, &data)
            .map(|()| Response::Done),
        other => Err(StoreError::Invalid(format!(
            "not a slow request: {other:?}"
        ))),
    }
}

/// Decides whether the node behind a client certificate may use this
/// store: after the TLS handshake, and again before a request whenever
/// [`PeerGate::generation`] has moved (so a node removed from the cluster
/// loses connections it already holds).
pub trait PeerGate: Send + Sync + 'static {
    /// `Err` says why the certificate is refused.
    fn admit(&self, cert_der: &[u8]) -> Result<(), String>;
    /// Moves whenever an earlier decision may no longer hold.
    fn generation(&self) -> u64;
}

/// Any certificate the TLS configuration accepted (a signature by the
/// cluster CA) is enough: for stores outside a cluster.
pub struct CaSignatureOnly;

impl PeerGate for CaSignatureOnly {
    fn admit(&self, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn generation(&self) -> u64 {
        0
    }
}

/// The ALPN protocol of storage connections carrying tenants' I/O.
pub const ALPN: &[u8] = b"allod-storage/1";
/// The ALPN protocol of storage connections carrying whole objects (see
/// [`Request::is_bulk`]): served on [`bulk_runtime`]'s threads.
pub const BULK_ALPN: &[u8] = b"allod-storage-bulk/1";

/// Threads for whole-object transfers, at the lowest CPU priority (nice
/// 19): when the node is busy, tenants' I/O runs first and recovery gets
/// what is left, instead of the two sharing the cores evenly.
pub fn bulk_runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("allod-bulk")
                .enable_all()
                .on_thread_start(|| {
                    // SAFETY: setpriority takes plain integers; with `who`
                    // 0 it changes only the calling thread on Linux (nice
                    // is per thread there).
                    let r = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 19) };
                    if r != 0 {
                        tracing::debug!("cannot lower a bulk thread's priority");
                    }
                })
                .build()
                .expect("cannot start the bulk transfer threads")
        })
        .handle()
}

/// Accepts storage connections (mutual TLS with the cluster CA, then the
/// gate's word on the client's certificate) until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    store: Arc<ObjectStore>,
    gate: Arc<dyn PeerGate>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("storage port: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let store = store.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec())
                        .unwrap_or_default();
                    let admitted = Admitted {
                        gate,
                        cert,
                        checked: AtomicBool::new(false),
                        generation: AtomicU64::new(0),
                    };
                    if let Err(why) = admitted.check() {
                        tracing::warn!("storage connection from {from} refused: {why}");
                        return;
                    }
                    let bulk = tls.get_ref().1.alpn_protocol() == Some(BULK_ALPN);
                    let served = async move {
                        if let Err(e) = serve_gated(tls, store, Some(admitted)).await {
                            tracing::info!("storage connection from {from} closed: {e}");
                        }
                    };
                    if bulk {
                        bulk_runtime().spawn(served);
                    } else {
                        served.await;
                    }
                }
                Ok(Err(e)) => tracing::info!("storage connection from {from} refused: {e}"),
                Err(_) => tracing::info!(
                    "storage connection from {from} refused: no TLS handshake in 10 s"
                ),
            }
        });
    }
}

/// A connection's client certificate and the gate generation it was last
/// admitted at (once `checked`).
struct Admitted {
    gate: Arc<dyn PeerGate>,
    cert: Vec<u8>,
    checked: AtomicBool,
    generation: AtomicU64,
}

impl Admitted {
    /// Asks the gate again if its generation moved since the last answer.
    fn check(&self) -> Result<(), String> {
        let now = self.gate.generation();
        if self.checked.load(Ordering::Acquire) && self.generation.load(Ordering::Relaxed) == now {
            return Ok(());
        }
        self.gate.admit(&self.cert)?;
        self.generation.store(now, Ordering::Relaxed);
        self.checked.store(true, Ordering::Release);
        Ok(())
    }
}

/// Serves one connection: requests are handled concurrently, answers are
/// written in the order they finish.
pub async fn serve_connection<S>(stream: S, store: Arc<ObjectStore>) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    serve_gated(stream, store, None).await
}

async fn serve_gated<S>(
    stream: S,
    store: Arc<ObjectStore>,
    admitted: Option<Admitted>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(write_frames(wr, rx));
    let result = loop {
        let body = match read_frame(&mut rd).await {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if let Some(Err(why)) = admitted.as_ref().map(Admitted::check) {
            break Err(format!(
                "the client's certificate is no longer accepted: {why}"
            ));
        }
        let (id, req) = match Request::decode(&body) {
            Ok(r) => r,
            Err(DecodeError(why)) => break Err(format!("malformed request: {why}")),
        };
        let store = store.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = handle(&store, req).await;
            let _ = tx.send(resp.encode(id));
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

async fn write_frames<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    while let Some(frame) = rx.recv().await {
        wr.write_all(&frame).await?;
        // Gather whatever else is ready into the same flush.
        while let Ok(more) = rx.try_recv() {
            wr.write_all(&more).await?;
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Option<Vec<u8>>, String> {
    let mut len = [0u8; 4];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(9..=MAX_FRAME).contains(&len) {
        return Err(format!("frame of {len} bytes (must be 9 to {MAX_FRAME})"));
    }
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(Some(body))
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("storage node {node}: {message}")]
pub struct PeerError {
    pub node: u64,
    pub message: String,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

type Outbox = mpsc::UnboundedSender<(u64, Vec<u8>, oneshot::Sender<Response>)>;

/// Two TLS connections to one node, made and lost together: one for
/// tenants' I/O, one for whole objects (recovery copies, see
/// [`Request::is_bulk`]), so a small write never waits behind a 4 MiB
/// frame on the same stream.
struct Conn {
    tx: Outbox,
    bulk: Outbox,
    /// Both lanes are alive (either failing ends both).
    alive: Arc<AtomicBool>,
    /// Which connection to its node this is (1, 2, ...): a writer that sees
    /// it change knows the peer may have restarted in between.
    generation: u64,
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// Connections to the other storage nodes, one per node, made on first use
/// and again after a failure. Connecting to one node never holds up calls
/// to the others.
pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    /// `tls` asking for [`BULK_ALPN`] (when `tls` asks for an ALPN at all).
    bulk_tls: Arc<rustls::ClientConfig>,
    addrs: RwLock<HashMap<u64, String>>,
    conns: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    generations: AtomicU64,
}

impl Peers {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        let bulk_tls = if tls.alpn_protocols.is_empty() {
            tls.clone()
        } else {
            let mut c = (*tls).clone();
            c.alpn_protocols = vec![BULK_ALPN.to_vec()];
            Arc::new(c)
        };
        Self {
            tls,
            bulk_tls,
            addrs: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            generations: AtomicU64::new(1),
        }
    }

    /// Sets where each node's storage port is.
    pub fn set_addresses(&self, addrs: HashMap<u64, String>) {
        *self.addrs.write().unwrap() = addrs;
    }

    pub fn address(&self, node: u64) -> Option<String> {
        self.addrs.read().unwrap().get(&node).cloned()
    }

    pub async fn call(&self, node: u64, req: &Request) -> Result<Response, PeerError> {
        self.call_traced(node, req).await.map(|(r, _)| r)
    }

    /// Like [`Peers::call`], also saying which connection answered.
    pub async fn call_traced(
        &self,
        node: u64,
        req: &Request,
    ) -> Result<(Response, u64), PeerError> {
        let err = |message: String| PeerError { node, message };
        let conn = self.connection(node).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        let lane = if req.is_bulk() { &conn.bulk } else { &conn.tx };
        if lane.send((id, req.encode(id), done)).is_err() {
            conn.alive.store(false, Ordering::Release);
            return Err(err("connection closed".into()));
        }
        let limit = timeout_for(req);
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(resp)) => Ok((resp, conn.generation)),
            Ok(Err(_)) => Err(err("connection lost before it answered".into())),
            Err(_) => {
                // A peer that does not answer in time is not trusted with
                // the next request either: connect afresh. A late whole
                // object alone says only that the peer is busy (its bulk
                // threads yield to everything): a hung peer fails its small
                // requests too, and they end the connection.
                if !req.is_bulk() {
                    conn.alive.store(false, Ordering::Release);
                }
                Err(err(format!("no answer in {} s", limit.as_secs())))
            }
        }
    }

    async fn connection(&self, node: u64) -> Result<Arc<Conn>, PeerError> {
        let slot = self.conns.lock().unwrap().entry(node).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let addr = self.address(node).ok_or_else(|| PeerError {
            node,
            message: "its storage address is not known yet".into(),
        })?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let failed = |message| PeerError {
            node,
            message: format!("cannot connect to {addr}: {message}"),
        };
        let here = tokio::runtime::Handle::current();
        let tx = connect(&addr, self.tls.clone(), alive.clone(), &here)
            .await
            .map_err(failed)?;
        let bulk = match connect(&addr, self.bulk_tls.clone(), alive.clone(), bulk_runtime()).await
        {
            Ok(bulk) => bulk,
            Err(message) => {
                alive.store(false, Ordering::Release);
                return Err(failed(message));
            }
        };
        let conn = Arc::new(Conn {
            tx,
            bulk,
            alive,
            generation,
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

/// One TLS connection to `addr`, its tasks on `runtime`; it marks `alive`
/// false when it fails, and stops when it finds it false.
async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    alive: Arc<AtomicBool>,
    runtime: &tokio::runtime::Handle,
) -> Result<Outbox, String> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']']);
    let name =
        ServerName::try_from(host.to_owned()).map_err(|e| format!("bad host {host:?}: {e}"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Vec<u8>, oneshot::Sender<Response>)>();
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let (p, a) = (pending.clone(), alive.clone());
    runtime.spawn(async move {
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        'outer: while let Some((id, frame, done)) = rx.recv().await {
            if !a.load(Ordering::Acquire) {
                break;
            }
            p.lock().unwrap().insert(id, done);
            if wr.write_all(&frame).await.is_err() {
                break;
            }
            while let Ok((id, frame, done)) = rx.try_recv() {
                p.lock().unwrap().insert(id, done);
                if wr.write_all(&frame).await.is_err() {
                    break 'outer;
                }
            }
            if wr.flush().await.is_err() {
                break;
            }
        }
        a.store(false, Ordering::Release);
        p.lock().unwrap().clear();
        // Closing tells the peer, whose end then closes and so ends the
        // reading task too.
        let _ = wr.shutdown().await;
    });
    let (p, a) = (pending, alive);
    runtime.spawn(async move {
        loop {
            if !a.load(Ordering::Acquire) {
                break;
            }
            let body = match read_frame(&mut rd).await {
                Ok(Some(b)) => b,
                _ => break,
            };
            let Ok((id, resp)) = Response::decode(&body) else {
                break;
            };
            if let Some(done) = p.lock().unwrap().remove(&id) {
                let _ = done.send(resp);
            }
        }
        a.store(false, Ordering::Release);
        // Dropping the senders tells every waiting caller the connection is gone.
        p.lock().unwrap().clear();
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole object may wait on a busy peer (its threads yield to
    /// tenants'): it gets the long limit, a tenant's 4 KiB read the short.
    #[test]
    fn whole_objects_may_take_longer_than_small_requests() {
        let read = |len| Request::Read {
            volume: "v".into(),
            index: 0,
            snap: None,
            offset: 0,
            len,
            epoch: 1,
        };
        assert_eq!(timeout_for(&read(4096)), IO_TIMEOUT);
        assert_eq!(timeout_for(&read(4 << 20)), SLOW_TIMEOUT);
    }

    /// A peer that accepts connections and then says nothing (a dead
    /// machine behind a live switch port, or a stuck process) holds up
    /// calls to itself only: a call to another node is answered meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_peer_does_not_hold_up_calls_to_the_others() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                held.push(tcp);
            }
        });
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing_addr = closing.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = closing.accept().await {
                drop(tcp);
            }
        });
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let peers = Arc::new(Peers::new(Arc::new(tls)));
        peers.set_addresses(HashMap::from([
            (1, silent_addr.to_string()),
            (2, closing_addr.to_string()),
        ]));
        let request = Request::Flush { volume: "v".into() };
        let stuck = {
            let peers = peers.clone();
            let request = request.clone();
            tokio::spawn(async move { peers.call(1, &request).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let other = peers.call(2, &request).await;
        assert!(other.is_err(), "the closing peer cannot answer");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a call to node 2 waited {:?} for node 1",
            started.elapsed()
        );
        assert!(!stuck.is_finished(), "node 1 is still being waited for");
        let stuck = stuck.await.unwrap().unwrap_err();
        assert!(stuck.message.contains("timed out"), "{stuck}");
        hold.abort();
    }
}
