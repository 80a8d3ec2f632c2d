//! The NBD server QEMU and tools reach volumes through: fixed newstyle
//! negotiation (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`) and simple replies for READ,
//! WRITE, FLUSH, TRIM, WRITE_ZEROES (with NO_HOLE), FUA and DISCONNECT.
//! What an export name opens is the agent's to decide ([`Exports`]).
//!
//! A malformed request gets the NBD error the protocol names for it, or, when
//! the stream cannot be trusted any more (a bad magic number, a payload too
//! large to skip), the connection is closed; nothing else is affected.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};

use crate::volume::{IoError, VolumeHandle};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// The largest READ or WRITE accepted (what qemu and nbdkit use too).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Option payloads beyond this are refused; beyond 16 times it the
/// connection is closed rather than read.
const MAX_OPTION: u32 = 64 << 10;
/// Requests one connection may have in flight (until their replies are
/// written to the client).
const IN_FLIGHT: usize = 128;
/// Bytes of request and reply payload one connection may hold (at least
/// one request of the largest size fits).
const BYTE_BUDGET: u32 = 2 * MAX_REQUEST;
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What an export name can be opened as.
pub struct Export {
    pub handle: Arc<VolumeHandle>,
    pub read_only: bool,
    /// Set when the credential the connection was opened with is
    /// withdrawn (it expired, or a VM took the volume): the connection then
    /// serves no further request and is closed.
    pub withdrawn: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Standby: a live migration's destination serves its guest's disks
    /// so until the switch makes it the writer (see [`Standby`]).
    pub standby: Option<Standby>,
}

/// An export opened before this node may write it: reads are served (at
/// the current writer's epoch, as the incoming guest's devices read while
/// the guest still runs elsewhere), and the first other request, or the
/// first request once `switched` says so, waits for `activate`, whose
/// handle serves the connection from then on. The connection ends with
/// `activate`'s error if it fails.
pub struct Standby {
    pub switched: Box<dyn Fn() -> bool + Send + Sync>,
    pub activate: BoxFuture<'static, Result<Arc<VolumeHandle>, String>>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `NBD_OPT_INFO` tells of an export.
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
}

/// The agent's side: resolving export names to open volumes.
pub trait Exports: Send + Sync + 'static {
    /// Opens an export for `NBD_OPT_GO` (it may make this node the
    /// volume's writer); the error is shown to the client.
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Export, String>>;
    /// Describes an export for `NBD_OPT_INFO`, opening nothing and taking
    /// no lease.
    fn describe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ExportInfo, String>>;
    /// Names offered to `NBD_OPT_LIST`.
    fn list(&self) -> BoxFuture<'_, Vec<String>>;
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no negotiation within {} s", NEGOTIATION_TIMEOUT.as_secs())]
    Timeout,
}

/// Serves clients on a unix socket until the listener fails.
pub async fn serve_unix(listener: tokio::net::UnixListener, exports: Arc<dyn Exports>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => spawn_client(s, exports.clone(), "unix socket".into()),
            Err(e) => {
                tracing::warn!("NBD socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves clients on TCP until the listener fails.
pub async fn serve_tcp(listener: tokio::net::TcpListener, exports: Arc<dyn Exports>) {
    loop {
        match listener.accept().await {
            Ok((s, from)) => {
                let _ = s.set_nodelay(true);
                spawn_client(s, exports.clone(), from.to_string());
            }
            Err(e) => {
                tracing::warn!("NBD TCP: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn spawn_client<S>(stream: S, exports: Arc<dyn Exports>, from: String)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        match serve_client(stream, exports).await {
            Ok(()) => tracing::debug!("NBD client {from} disconnected"),
            Err(e) => tracing::info!("NBD client {from} dropped: {e}"),
        }
    });
}

/// Serves one client from negotiation to disconnect.
pub async fn serve_client<S>(stream: S, exports: Arc<dyn Exports>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let negotiated =
        tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&mut rd, &mut wr, &*exports))
            .await
            .map_err(|_| NbdError::Timeout)??;
    let Some(export) = negotiated else {
        return Ok(());
    };
    transmit(rd, wr, export).await
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut h = Vec::with_capacity(20 + data.len());
    h.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&opt.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&(data.len() as u32).to_be_bytes());
    h.extend_from_slice(data);
    wr.write_all(&h).await?;
    Ok(())
}

/// `TF_CAN_MULTI_CONN` is not offered: it promises that a flush on one
/// connection makes every connection's completed writes durable, and here a
/// flush on a second connection while the first one's fsync runs can
/// return before that fsync ends. Clients then use one connection.
fn transmission_flags(read_only: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    if read_only {
        f |= TF_READ_ONLY;
    }
    f
}

/// The negotiation phase. `Ok(None)`: the client left (or aborted) politely.
async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &dyn Exports,
) -> Result<Option<Export>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&NBDMAGIC.to_be_bytes()).await?;
    wr.write_all(&IHAVEOPT.to_be_bytes()).await?;
    wr.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(NbdError::Protocol(
            "the client does not speak fixed newstyle negotiation".into(),
        ));
    }
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        wr.flush().await?;
        let magic = match rd.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "option magic {magic:#x} is wrong"
            )));
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION {
            if len > 16 * MAX_OPTION {
                return Err(NbdError::Protocol(format!(
                    "option {opt} carries {len} bytes"
                )));
            }
            tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
            reply(wr, opt, REP_ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let export = match exports.open(&name).await {
                    Ok(e) => e,
                    // This option has no error reply: the protocol says to close.
                    Err(why) => return Err(NbdError::Protocol(format!("export {name:?}: {why}"))),
                };
                wr.write_all(&export.handle.spec().size.to_be_bytes())
                    .await?;
                wr.write_all(&transmission_flags(export.read_only).to_be_bytes())
                    .await?;
                if !no_zeroes {
                    wr.write_all(&[0u8; 124]).await?;
                }
                wr.flush().await?;
                return Ok(Some(export));
            }
            OPT_ABORT => {
                reply(wr, opt, REP_ACK, &[]).await?;
                wr.flush().await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(wr, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for name in exports.list().await {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    reply(wr, opt, REP_SERVER, &d).await?;
                }
                reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info(&data) else {
                    reply(wr, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data").await?;
                    continue;
                };
                // INFO only describes; GO opens (and may take the lease).
                let (export, info) = if opt == OPT_GO {
                    match exports.open(&name).await {
                        Ok(e) => {
                            let info = ExportInfo {
                                size: e.handle.spec().size,
                                read_only: e.read_only,
                            };
                            (Some(e), info)
                        }
                        Err(why) => {
                            reply(wr, opt, REP_ERR_UNKNOWN, why.as_bytes()).await?;
                            continue;
                        }
                    }
                } else {
                    match exports.describe(&name).await {
                        Ok(info) => (None, info),
                        Err(why) => {
                            reply(wr, opt, REP_ERR_UNKNOWN, why.as_bytes()).await?;
                            continue;
                        }
                    }
                };
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&info.size.to_be_bytes());
                d.extend_from_slice(&transmission_flags(info.read_only).to_be_bytes());
                reply(wr, opt, REP_INFO, &d).await?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut d = Vec::with_capacity(14);
                    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&4096u32.to_be_bytes());
                    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    reply(wr, opt, REP_INFO, &d).await?;
                }
                reply(wr, opt, REP_ACK, &[]).await?;
                if let Some(export) = export {
                    wr.flush().await?;
                    return Ok(Some(export));
                }
            }
            _ => reply(wr, opt, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
}

fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(data.get(4..4usize.checked_add(n)?)?)
        .ok()?
        .to_owned();
    let rest = &data[4 + n..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

fn errno(e: &IoError, write: bool) -> u32 {
    match e {
        IoError::OutOfRange(_) if write => ENOSPC,
        IoError::OutOfRange(_) | IoError::Invalid(_) => EINVAL,
        IoError::Fenced(_) | IoError::Failed(_) => EIO,
    }
}

fn simple_reply(err: u32, cookie: u64, data: Option<Vec<u8>>) -> Vec<u8> {
    let mut r = Vec::with_capacity(16 + data.as_ref().map_or(0, Vec::len));
    r.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&err.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    if let Some(d) = data {
        r.extend_from_slice(&d);
    }
    r
}

async fn transmit<R, W>(mut rd: R, wr: W, export: Export) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // A reply keeps its request's slot and bytes until it is written, so a
    // client that does not read its replies stops being served instead of
    // growing the server's memory.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, Held)>();
    let writer = tokio::spawn(async move {
        let mut wr = wr;
        while let Some((r, held)) = rx.recv().await {
            wr.write_all(&r).await?;
            drop(held);
            while let Ok((more, held)) = rx.try_recv() {
                wr.write_all(&more).await?;
                drop(held);
            }
            wr.flush().await?;
        }
        wr.flush().await?;
        Ok::<_, std::io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(BYTE_BUDGET as usize));
    let mut handle = export.handle;
    let withdrawn = export.withdrawn;
    let mut standby = export.standby;
    let result = loop {
        let mut h = [0u8; 28];
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
        let flags = u16::from_be_bytes(h[4..6].try_into().expect("2"));
        let cmd = u16::from_be_bytes(h[6..8].try_into().expect("2"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("8"));
        let len = u32::from_be_bytes(h[24..28].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!(
                "request magic {magic:#x} is wrong"
            )));
        }
        if standby
            .as_ref()
            .is_some_and(|s| cmd != CMD_READ || (s.switched)())
        {
            let s = standby.take().expect("checked");
            match s.activate.await {
                Ok(active) => handle = active,
                Err(e) => {
                    break Err(NbdError::Protocol(format!(
                        "the export was held in standby and cannot be served: {e}"
                    )))
                }
            }
        }
        if withdrawn
            .as_ref()
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::Acquire))
        {
            break Err(NbdError::Protocol(
                "the credential this connection was opened with was withdrawn (it expired, or a VM took the volume)".into(),
            ));
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let bytes = if matches!(cmd, CMD_WRITE | CMD_READ) && len <= MAX_REQUEST {
            Some(
                budget
                    .clone()
                    .acquire_many_owned(len)
                    .await
                    .expect("never closed"),
            )
        } else {
            None
        };
        let held = Held {
            _slot: permit,
            _bytes: bytes,
        };
        let payload = if cmd == CMD_WRITE {
            if len > MAX_REQUEST {
                break Err(NbdError::Protocol(format!(
                    "a write of {len} bytes (at most {MAX_REQUEST})"
                )));
            }
            let mut d = vec![0u8; len as usize];
            if let Err(e) = rd.read_exact(&mut d).await {
                break Err(e.into());
            }
            Some(d)
        } else {
            None
        };
        if cmd == CMD_DISC {
            break Ok(());
        }
        let (handle, tx, read_only) = (handle.clone(), tx.clone(), export.read_only);
        tokio::spawn(async move {
            let fua = flags & CMD_FLAG_FUA != 0;
            let reply = match cmd {
                CMD_READ if len > MAX_REQUEST => simple_reply(EINVAL, cookie, None),
                CMD_READ => match handle.read(offset, u64::from(len)).await {
                    Ok(d) => simple_reply(0, cookie, Some(d)),
                    Err(e) => {
                        tracing::debug!("NBD read: {e}");
                        simple_reply(errno(&e, false), cookie, None)
                    }
                },
                CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if read_only => {
                    simple_reply(EPERM, cookie, None)
                }
                CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                    let r = match cmd {
                        CMD_WRITE => {
                            handle
                                .write(offset, payload.as_deref().unwrap_or_default())
                                .await
                        }
                        CMD_TRIM => handle.zero(offset, u64::from(len), true).await,
                        _ => {
                            handle
                                .zero(offset, u64::from(len), flags & CMD_FLAG_NO_HOLE == 0)
                                .await
                        }
                    };
                    let r = match r {
                        Ok(()) if fua => handle.flush().await,
                        other => other,
                    };
                    match r {
                        Ok(()) => simple_reply(0, cookie, None),
                        Err(e) => {
                            tracing::info!("NBD write to volume {}: {e}", handle.spec().id);
                            simple_reply(errno(&e, true), cookie, None)
                        }
                    }
                }
                CMD_FLUSH => match handle.flush().await {
                    Ok(()) => simple_reply(0, cookie, None),
                    Err(e) => {
                        tracing::warn!("NBD flush of volume {}: {e}", handle.spec().id);
                        simple_reply(EIO, cookie, None)
                    }
                },
                _ => simple_reply(EINVAL, cookie, None),
            };
            let _ = tx.send((reply, held));
        });
    };
    // Let requests already started finish and answer before closing.
    drop(tx);
    let _ = writer.await;
    result
}

/// What a request holds until its reply is written: its slot and, for a
/// read or write, its bytes of the connection's budget.
struct Held {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}
