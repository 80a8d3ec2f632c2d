//! A small NBD client (fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple
//! replies, one request at a time) for tests that must know exactly which
//! writes and flushes were acknowledged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct NbdClient {
    stream: UnixStream,
    cookie: u64,
    pub size: u64,
}

const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

impl NbdClient {
    /// Connects to `socket` and opens `export` (a volume id).
    pub fn connect(socket: &Path, export: &str) -> std::io::Result<Self> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        if &greeting[..8] != b"NBDMAGIC" {
            return Err(std::io::Error::other("not an NBD server"));
        }
        // Fixed newstyle, no zeroes.
        let mut hello = 3u32.to_be_bytes().to_vec();
        hello.extend_from_slice(b"IHAVEOPT");
        hello.extend_from_slice(&1u32.to_be_bytes());
        hello.extend_from_slice(&(export.len() as u32).to_be_bytes());
        hello.extend_from_slice(export.as_bytes());
        stream.write_all(&hello)?;
        let mut info = [0u8; 10];
        stream.read_exact(&mut info)?;
        Ok(Self {
            stream,
            cookie: 0,
            size: u64::from_be_bytes(info[..8].try_into().unwrap()),
        })
    }

    /// Asks `NBD_OPT_INFO` for `export` and returns its size, opening
    /// nothing.
    pub fn info(socket: &Path, export: &str) -> std::io::Result<u64> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let mut hello = 3u32.to_be_bytes().to_vec();
        hello.extend_from_slice(b"IHAVEOPT");
        hello.extend_from_slice(&6u32.to_be_bytes());
        hello.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        hello.extend_from_slice(&(export.len() as u32).to_be_bytes());
        hello.extend_from_slice(export.as_bytes());
        hello.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&hello)?;
        let mut size = None;
        loop {
            let mut head = [0u8; 20];
            stream.read_exact(&mut head)?;
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data)?;
            match kind {
                1 => break,
                3 if data.len() >= 10 && data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                3 => {}
                _ => {
                    return Err(std::io::Error::other(format!(
                        "refused: {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
        // NBD_OPT_ABORT, politely.
        let mut bye = b"IHAVEOPT".to_vec();
        bye.extend_from_slice(&2u32.to_be_bytes());
        bye.extend_from_slice(&0u32.to_be_bytes());
        let _ = stream.write_all(&bye);
        size.ok_or_else(|| std::io::Error::other("no size in the answer"))
    }

    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.stream.write_all(&r)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().unwrap());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(reply[8..].try_into().unwrap());
        if magic != REPLY_MAGIC || cookie != self.cookie {
            return Err(std::io::Error::other(format!(
                "bad reply: magic {magic:#x}, cookie {cookie} for {}",
                self.cookie
            )));
        }
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        let mut out = Vec::new();
        if cmd == 0 {
            out.resize(len as usize, 0);
            self.stream.read_exact(&mut out)?;
        }
        Ok(out)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.request(0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(1, offset, data.len() as u32, data).map(drop)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(3, 0, 0, &[]).map(drop)
    }
}

/// A 4 KiB block holding `value` (8 bytes, little-endian) over and over.
pub fn block_of(value: u64) -> Vec<u8> {
    value.to_le_bytes().repeat(512)
}

/// The value a block holds; panics on a torn or foreign block.
pub fn value_of(block: &[u8]) -> u64 {
    let v = u64::from_le_bytes(block[..8].try_into().unwrap());
    assert!(
        block.chunks(8).all(|c| c == v.to_le_bytes()),
        "a block holds a mix of values (torn): starts with {v}"
    );
    v
}
