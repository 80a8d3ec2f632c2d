//! The node-to-node storage protocol: length-prefixed binary frames over
//! mutual TLS, each carrying a request id so many requests share one
//! connection and complete in any order.
//!
//! Frame: `u32 length` (little-endian) then the body. Request body:
//! `u64 id, u8 op, fields`; response body: `u64 id, u8 status, fields`.
//! Strings are `u16 length + UTF-8`; integers little-endian.

use crate::store::ObjectInfo;

/// The largest frame either side accepts: a 16 MiB object write plus room.
pub const MAX_FRAME: usize = (16 << 20) + 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Write {
        volume: String,
        index: u64,
        offset: u32,
        seq: u64,
        epoch: u64,
        data: Vec<u8>,
    },
    Zero {
        volume: String,
        index: u64,
        offset: u32,
        len: u32,
        punch: bool,
        seq: u64,
        epoch: u64,
    },
    /// A read of the head (`snap: None`) must carry the replica's current
    /// writer epoch; a snapshot's bytes never change, so its reads may
    /// carry 0.
    Read {
        volume: String,
        index: u64,
        snap: Option<u64>,
        offset: u32,
        len: u32,
        epoch: u64,
    },
    Exists {
        volume: String,
        index: u64,
    },
    Flush {
        volume: String,
    },
    Rollback {
        volume: String,
        snap: u64,
        seq: u64,
        epoch: u64,
    },
    DeleteVolume {
        volume: String,
    },
    /// Removes snapshot copies no snapshot in `live` needs, among those
    /// of snapshots up to `known_seq` (a newer snapshot's copies are never
    /// touched: the caller did not know of it).
    TrimSnapshots {
        volume: String,
        live: Vec<u64>,
        known_seq: u64,
    },
    List {
        volume: String,
    },
    /// Installs a writer's epoch before its first I/O (durably); answers
    /// the epoch the replica held before.
    Fence {
        volume: String,
        epoch: u64,
    },
    /// A writer moving the volume to storage map `map` may copy objects
    /// here that the current map does not place here (durable before it
    /// answers the map held before); see `ObjectStore::hold`.
    Hold {
        volume: String,
        map: u64,
    },
    /// Deep scrub: whether every block of the object's head and snapshot
    /// copies (over `len` bytes) matches its checksum.
    Verify {
        volume: String,
        index: u64,
        len: u32,
    },
    /// What the replica holds of one object.
    Stat {
        volume: String,
        index: u64,
    },
    /// Resync: one snapshot copy of an object, whole (`data` is its bytes).
    PutClone {
        volume: String,
        index: u64,
        epoch: u64,
        lo: u64,
        hi: u64,
        version: u64,
        data: Vec<u8>,
    },
    /// Resync: an object's head, whole, replacing the replica's; snapshot
    /// copies not in `keep` are removed after it.
    PutHead {
        volume: String,
        index: u64,
        epoch: u64,
        version: u64,
        seq: u64,
        absent: bool,
        keep: Vec<u64>,
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    StaleEpoch = 1,
    Checksum = 2,
    Invalid = 3,
    Io = 4,
    /// The request's epoch is newer than the replica's: it was never fenced
    /// for that writer (it was out of sync, or lost its disk).
    NotFenced = 5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Done,
    Data(Vec<u8>),
    Absent,
    Bool(bool),
    Objects(Vec<ObjectInfo>),
    Number(u64),
    Error { kind: ErrorKind, message: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed storage frame: {0}")]
pub struct DecodeError(pub String);

struct Out(Vec<u8>);

impl Out {
    fn new(id: u64, tag: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&id.to_le_bytes());
        v.push(tag);
        Out(v)
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError(format!("{} bytes missing", n - self.0.len())));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| DecodeError("a string is not UTF-8".into()))
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(format!("{} bytes left over", self.0.len())))
        }
    }
}

const NO_SNAP: u64 = u64::MAX;

/// Reads at least this long travel as bulk (see [`Request::is_bulk`]).
pub const BULK_READ: u32 = 1 << 20;

impl Request {
    /// Whether the request moves a whole object (recovery's copies, large
    /// reads): such requests travel on a connection of their own, so
    /// tenants' small I/O never queues behind them.
    pub fn is_bulk(&self) -> bool {
        match self {
            Request::PutHead { .. } | Request::PutClone { .. } => true,
            Request::Read { len, .. } => *len >= BULK_READ,
            _ => false,
        }
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self, id: u64) -> Vec<u8> {
        match self {
            Request::Write {
                volume,
                index,
                offset,
                seq,
                epoch,
                data,
            } => {
                let mut o = Out::new(id, 1);
                o.str(volume)
                    .u64(*index)
                    .u32(*offset)
                    .u64(*seq)
                    .u64(*epoch)
                    .bytes(data);
                o.finish()
            }
            Request::Zero {
                volume,
                index,
                offset,
                len,
                punch,
                seq,
                epoch,
            } => {
                let mut o = Out::new(id, 2);
                o.str(volume)
                    .u64(*index)
                    .u32(*offset)
                    .u32(*len)
                    .u8(u8::from(*punch))
                    .u64(*seq)
                    .u64(*epoch);
                o.finish()
            }
            Request::Read {
                volume,
                index,
                snap,
                offset,
                len,
                epoch,
            } => {
                let mut o = Out::new(id, 3);
                o.str(volume)
                    .u64(*index)
                    .u64(snap.unwrap_or(NO_SNAP))
                    .u32(*offset)
                    .u32(*len)
                    .u64(*epoch);
                o.finish()
            }
            Request::Exists { volume, index } => {
                let mut o = Out::new(id, 4);
                o.str(volume).u64(*index);
                o.finish()
            }
            Request::Flush { volume } => {
                let mut o = Out::new(id, 5);
                o.str(volume);
                o.finish()
            }
            Request::Rollback {
                volume,
                snap,
                seq,
                epoch,
            } => {
                let mut o = Out::new(id, 6);
                o.str(volume).u64(*snap).u64(*seq).u64(*epoch);
                o.finish()
            }
            Request::DeleteVolume { volume } => {
                let mut o = Out::new(id, 7);
                o.str(volume);
                o.finish()
            }
            Request::TrimSnapshots {
                volume,
                live,
                known_seq,
            } => {
                let mut o = Out::new(id, 8);
                o.str(volume).u64(*known_seq).u32(live.len() as u32);
                for s in live {
                    o.u64(*s);
                }
                o.finish()
            }
            Request::List { volume } => {
                let mut o = Out::new(id, 9);
                o.str(volume);
                o.finish()
            }
            Request::Fence { volume, epoch } => {
                let mut o = Out::new(id, 10);
                o.str(volume).u64(*epoch);
                o.finish()
            }
            Request::Verify { volume, index, len } => {
                let mut o = Out::new(id, 15);
                o.str(volume).u64(*index).u32(*len);
                o.finish()
            }
            Request::Hold { volume, map } => {
                let mut o = Out::new(id, 14);
                o.str(volume).u64(*map);
                o.finish()
            }
            Request::Stat { volume, index } => {
                let mut o = Out::new(id, 11);
                o.str(volume).u64(*index);
                o.finish()
            }
            Request::PutClone {
                volume,
                index,
                epoch,
                lo,
                hi,
                version,
                data,
            } => {
                let mut o = Out::new(id, 12);
                o.str(volume)
                    .u64(*index)
                    .u64(*epoch)
                    .u64(*lo)
                    .u64(*hi)
                    .u64(*version)
                    .bytes(data);
                o.finish()
            }
            Request::PutHead {
                volume,
                index,
                epoch,
                version,
                seq,
                absent,
                keep,
                data,
            } => {
                let mut o = Out::new(id, 13);
                o.str(volume)
                    .u64(*index)
                    .u64(*epoch)
                    .u64(*version)
                    .u64(*seq)
                    .u8(u8::from(*absent))
                    .u32(keep.len() as u32);
                for k in keep {
                    o.u64(*k);
                }
                o.bytes(data);
                o.finish()
            }
        }
    }

    /// Decodes a frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<(u64, Request), DecodeError> {
        let mut i = In(body);
        let id = i.u64()?;
        let op = i.u8()?;
        let req = match op {
            1 => {
                let (volume, index, offset, seq, epoch) =
                    (i.str()?, i.u64()?, i.u32()?, i.u64()?, i.u64()?);
                Request::Write {
                    volume,
                    index,
                    offset,
                    seq,
                    epoch,
                    data: i.rest(),
                }
            }
            2 => Request::Zero {
                volume: i.str()?,
                index: i.u64()?,
                offset: i.u32()?,
                len: i.u32()?,
                punch: i.u8()? != 0,
                seq: i.u64()?,
                epoch: i.u64()?,
            },
            3 => Request::Read {
                volume: i.str()?,
                index: i.u64()?,
                snap: Some(i.u64()?).filter(|s| *s != NO_SNAP),
                offset: i.u32()?,
                len: i.u32()?,
                epoch: i.u64()?,
            },
            4 => Request::Exists {
                volume: i.str()?,
                index: i.u64()?,
            },
            5 => Request::Flush { volume: i.str()? },
            6 => Request::Rollback {
                volume: i.str()?,
                snap: i.u64()?,
                seq: i.u64()?,
                epoch: i.u64()?,
            },
            7 => Request::DeleteVolume { volume: i.str()? },
            8 => {
                let volume = i.str()?;
                let known_seq = i.u64()?;
                let n = i.u32()? as usize;
                if n > body.len() / 8 {
                    return Err(DecodeError(format!(
                        "{n} snapshots cannot fit in the frame"
                    )));
                }
                let live = (0..n).map(|_| i.u64()).collect::<Result<_, _>>()?;
                Request::TrimSnapshots {
                    volume,
                    live,
                    known_seq,
                }
            }
            9 => Request::List { volume: i.str()? },
            10 => Request::Fence {
                volume: i.str()?,
                epoch: i.u64()?,
            },
            15 => Request::Verify {
                volume: i.str()?,
                index: i.u64()?,
                len: i.u32()?,
            },
            14 => Request::Hold {
                volume: i.str()?,
                map: i.u64()?,
            },
            11 => Request::Stat {
                volume: i.str()?,
                index: i.u64()?,
            },
            12 => {
                let (volume, index, epoch, lo, hi, version) =
                    (i.str()?, i.u64()?, i.u64()?, i.u64()?, i.u64()?, i.u64()?);
                Request::PutClone {
                    volume,
                    index,
                    epoch,
                    lo,
                    hi,
                    version,
                    data: i.rest(),
                }
            }
            13 => {
                let (volume, index, epoch, version, seq, absent) = (
                    i.str()?,
                    i.u64()?,
                    i.u64()?,
                    i.u64()?,
                    i.u64()?,
                    i.u8()? != 0,
                );
                let n = i.u32()? as usize;
                if n > body.len() / 8 {
                    return Err(DecodeError(format!(
                        "{n} snapshot copies cannot fit in the frame"
                    )));
                }
                let keep = (0..n).map(|_| i.u64()).collect::<Result<_, _>>()?;
                Request::PutHead {
                    volume,
                    index,
                    epoch,
                    version,
                    seq,
                    absent,
                    keep,
                    data: i.rest(),
                }
            }
            other => return Err(DecodeError(format!("unknown operation {other}"))),
        };
        i.end()?;
        Ok((id, req))
    }
}

impl Response {
    pub fn encode(&self, id: u64) -> Vec<u8> {
        match self {
            Response::Done => Out::new(id, 0).finish(),
            Response::Data(d) => {
                let mut o = Out::new(id, 1);
                o.bytes(d);
                o.finish()
            }
            Response::Absent => Out::new(id, 2).finish(),
            Response::Bool(b) => {
                let mut o = Out::new(id, 3);
                o.u8(u8::from(*b));
                o.finish()
            }
            Response::Objects(list) => {
                let mut o = Out::new(id, 4);
                o.u32(list.len() as u32);
                for obj in list {
                    o.u64(obj.index)
                        .u64(obj.version)
                        .u64(obj.seq)
                        .u8(u8::from(obj.head) | (u8::from(obj.uncertain) << 1))
                        .u32(obj.clones.len() as u32);
                    for (lo, hi) in &obj.clones {
                        o.u64(*lo).u64(*hi);
                    }
                }
                o.finish()
            }
            Response::Number(n) => {
                let mut o = Out::new(id, 6);
                o.u64(*n);
                o.finish()
            }
            Response::Error { kind, message } => {
                let mut o = Out::new(id, 5);
                o.u8(*kind as u8).str(message);
                o.finish()
            }
        }
    }

    pub fn decode(body: &[u8]) -> Result<(u64, Response), DecodeError> {
        let mut i = In(body);
        let id = i.u64()?;
        let resp = match i.u8()? {
            0 => Response::Done,
            1 => Response::Data(i.rest()),
            2 => Response::Absent,
            3 => Response::Bool(i.u8()? != 0),
            4 => {
                let n = i.u32()? as usize;
                if n > body.len() / 29 {
                    return Err(DecodeError(format!("{n} objects cannot fit in the frame")));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let (index, version, seq, flags, m) =
                        (i.u64()?, i.u64()?, i.u64()?, i.u8()?, i.u32()? as usize);
                    if m > body.len() / 16 {
                        return Err(DecodeError(format!("{m} clones cannot fit in the frame")));
                    }
                    let clones = (0..m)
                        .map(|_| Ok((i.u64()?, i.u64()?)))
                        .collect::<Result<_, DecodeError>>()?;
                    list.push(ObjectInfo {
                        index,
                        version,
                        seq,
                        head: flags & 1 != 0,
                        uncertain: flags & 2 != 0,
                        clones,
                    });
                }
                Response::Objects(list)
            }
            5 => {
                let kind = match i.u8()? {
                    1 => ErrorKind::StaleEpoch,
                    2 => ErrorKind::Checksum,
                    3 => ErrorKind::Invalid,
                    5 => ErrorKind::NotFenced,
                    _ => ErrorKind::Io,
                };
                Response::Error {
                    kind,
                    message: i.str()?,
                }
            }
            6 => Response::Number(i.u64()?),
            other => return Err(DecodeError(format!("unknown status {other}"))),
        };
        i.end()?;
        Ok((id, resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<Request> {
        let v = || "vol-1".to_string();
        vec![
            Request::Write {
                volume: v(),
                index: 9,
                offset: 4096,
                seq: 2,
                epoch: 7,
                data: vec![1, 2, 3],
            },
            Request::Zero {
                volume: v(),
                index: 1,
                offset: 0,
                len: 8192,
                punch: true,
                seq: 0,
                epoch: 1,
            },
            Request::Read {
                volume: v(),
                index: 3,
                snap: Some(4),
                offset: 5,
                len: 6,
                epoch: 0,
            },
            Request::Read {
                volume: v(),
                index: 3,
                snap: None,
                offset: 5,
                len: 6,
                epoch: 3,
            },
            Request::Exists {
                volume: v(),
                index: 0,
            },
            Request::Flush { volume: v() },
            Request::Rollback {
                volume: v(),
                snap: 1,
                seq: 3,
                epoch: 2,
            },
            Request::DeleteVolume { volume: v() },
            Request::TrimSnapshots {
                volume: v(),
                live: vec![1, 5],
                known_seq: 6,
            },
            Request::List { volume: v() },
            Request::Fence {
                volume: v(),
                epoch: 4,
            },
            Request::Hold {
                volume: v(),
                map: 7,
            },
            Request::Verify {
                volume: v(),
                index: 3,
                len: 4096,
            },
            Request::Stat {
                volume: v(),
                index: 2,
            },
            Request::PutClone {
                volume: v(),
                index: 2,
                epoch: 4,
                lo: 1,
                hi: 3,
                version: 9,
                data: vec![5; 7],
            },
            Request::PutHead {
                volume: v(),
                index: 2,
                epoch: 4,
                version: 10,
                seq: 3,
                absent: false,
                keep: vec![3],
                data: vec![6; 5],
            },
        ]
    }

    #[test]
    fn requests_and_responses_round_trip() {
        for (n, r) in requests().into_iter().enumerate() {
            let frame = r.encode(n as u64);
            assert_eq!(
                u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
                frame.len() - 4
            );
            assert_eq!(Request::decode(&frame[4..]).unwrap(), (n as u64, r));
        }
        let responses = vec![
            Response::Done,
            Response::Data(vec![9; 10]),
            Response::Absent,
            Response::Bool(true),
            Response::Objects(vec![ObjectInfo {
                index: 1,
                version: 2,
                seq: 1,
                head: true,
                uncertain: true,
                clones: vec![(0, 1)],
            }]),
            Response::Number(7),
            Response::Error {
                kind: ErrorKind::StaleEpoch,
                message: "old".into(),
            },
        ];
        for (n, r) in responses.into_iter().enumerate() {
            let frame = r.encode(n as u64);
            assert_eq!(Response::decode(&frame[4..]).unwrap(), (n as u64, r));
        }
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        for r in requests() {
            let frame = r.encode(1);
            let body = &frame[4..];
            // Write carries its payload as the rest of the frame, so cutting
            // into the payload is still a valid (shorter) write.
            let payload = match &r {
                Request::Write { data, .. }
                | Request::PutClone { data, .. }
                | Request::PutHead { data, .. } => data.len(),
                _ => 0,
            };
            let min = body.len() - payload;
            for cut in 0..min {
                assert!(Request::decode(&body[..cut]).is_err(), "{r:?} cut at {cut}");
            }
        }
        let mut x: u64 = 0x1234_5678;
        for len in 0..2000usize {
            let junk: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Request::decode(&junk);
            let _ = Response::decode(&junk);
        }
        assert!(Request::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 255, 255, 255, 255]).is_err());
    }
}
