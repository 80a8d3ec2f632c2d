//! The SHA-256 and length of an upload, checked as it streams in.

use sha2::{Digest, Sha256};

use crate::{ImageError, MAX_IMAGE_BYTES};

/// A streaming SHA-256 of an upload that also counts its bytes and refuses
/// more than [`MAX_IMAGE_BYTES`]. Feed every chunk to [`Checksum::update`]
/// before storing it, then [`Checksum::finish`].
#[derive(Debug, Clone)]
pub struct Checksum {
    expected_sha256: String,
    hasher: Sha256,
    len_bytes: u64,
    limit_bytes: u64,
}

/// An upload whose content matched the SHA-256 the user gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Lowercase hex.
    pub sha256: String,
    pub len_bytes: u64,
}

impl Checksum {
    /// Starts a checksum that must come out as `expected_hex`: 64 hex
    /// digits, in either case.
    pub fn new(expected_hex: &str) -> Result<Self, ImageError> {
        Self::with_limit(expected_hex, MAX_IMAGE_BYTES)
    }

    /// The limit is a parameter only so that tests need not send 64 TiB.
    fn with_limit(expected_hex: &str, limit_bytes: u64) -> Result<Self, ImageError> {
        if expected_hex.len() != 64 || !expected_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::ChecksumNotHex);
        }
        Ok(Checksum {
            expected_sha256: expected_hex.to_ascii_lowercase(),
            hasher: Sha256::new(),
            len_bytes: 0,
            limit_bytes,
        })
    }

    /// Adds the next chunk of the upload. A chunk that would take the upload
    /// over the limit is refused and not counted.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        let len_bytes = u64::try_from(chunk.len())
            .ok()
            .and_then(|chunk_len| self.len_bytes.checked_add(chunk_len))
            .filter(|len_bytes| *len_bytes <= self.limit_bytes)
            .ok_or(ImageError::TooLarge)?;
        self.hasher.update(chunk);
        self.len_bytes = len_bytes;
        Ok(())
    }

    /// The bytes accepted so far (for messages like "the upload broke off
    /// after N bytes").
    pub fn bytes_so_far(&self) -> u64 {
        self.len_bytes
    }

    /// Checks the whole upload: not empty, and the SHA-256 that was given.
    pub fn finish(self) -> Result<Verified, ImageError> {
        if self.len_bytes == 0 {
            return Err(ImageError::Empty);
        }
        let got = hex::encode(self.hasher.finalize());
        if got != self.expected_sha256 {
            return Err(ImageError::ChecksumMismatch {
                got,
                want: self.expected_sha256,
            });
        }
        Ok(Verified {
            sha256: got,
            len_bytes: self.len_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `printf 'hello world' | sha256sum`
    const HELLO_WORLD: &str = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
    /// `sha256sum /dev/null`
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// Feeds `chunks` to a checksum expecting `expected` with `limit_bytes`,
    /// and returns the outcome or the first error's message.
    fn run(expected: &str, limit_bytes: u64, chunks: &[&[u8]]) -> Result<Verified, String> {
        let mut checksum =
            Checksum::with_limit(expected, limit_bytes).map_err(|e| e.to_string())?;
        for chunk in chunks {
            checksum.update(chunk).map_err(|e| e.to_string())?;
        }
        checksum.finish().map_err(|e| e.to_string())
    }

    #[test]
    fn uploads_are_checked_against_the_given_sha256() {
        let ok = |len_bytes| {
            Ok(Verified {
                sha256: HELLO_WORLD.to_owned(),
                len_bytes,
            })
        };
        let check = |expected: &str, chunks: &[&[u8]], want: Result<Verified, String>| {
            assert_eq!(
                run(expected, MAX_IMAGE_BYTES, chunks),
                want,
                "{expected} {chunks:?}"
            );
        };
        check(HELLO_WORLD, &[b"hello world"], ok(11));
        check(HELLO_WORLD, &[b"hello", b"", b" ", b"world"], ok(11));
        check(&HELLO_WORLD.to_ascii_uppercase(), &[b"hello world"], ok(11));
        check(
            HELLO_WORLD,
            &[b"hello world\n"],
            Err(format!(
                "the upload's SHA-256 is a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447, \
                 not the {HELLO_WORLD} given: the file changed or was damaged on the way; nothing was stored"
            )),
        );
        // Empty is refused even with the hash of nothing.
        check(
            EMPTY,
            &[],
            Err("the upload is empty; nothing was stored".into()),
        );
        check(
            EMPTY,
            &[b""],
            Err("the upload is empty; nothing was stored".into()),
        );
    }

    #[test]
    fn the_expected_sha256_must_be_64_hex_digits() {
        let bad_hex = "sha256 must be 64 hexadecimal digits (sha256sum prints them)";
        for expected in [
            "",
            &HELLO_WORLD[..63],
            &format!("{HELLO_WORLD}0"),
            &format!("{}g", &HELLO_WORLD[..63]),
            &format!("sha256:{}", &HELLO_WORLD[..57]),
            &format!(" {}", &HELLO_WORLD[..63]),
            // 64 bytes, but not 64 digits.
            &format!("{}é", &HELLO_WORLD[..62]),
        ] {
            let err = Checksum::new(expected).unwrap_err();
            assert_eq!(err.to_string(), bad_hex, "{expected:?}");
            assert!(!err.is_too_large());
        }
    }

    #[test]
    fn the_upload_may_reach_the_limit_but_not_pass_it() {
        let check = |chunks: &[&[u8]], want: Result<u64, &str>| {
            let got = run(HELLO_WORLD, 11, chunks).map(|v| v.len_bytes);
            assert_eq!(got, want.map_err(str::to_owned), "{chunks:?}");
        };
        check(&[b"hello world"], Ok(11));
        check(&[b"hello", b" world"], Ok(11));
        check(&[b"hello world!"], Err("images are at most 64 TiB"));
        check(&[b"hello world", b"!"], Err("images are at most 64 TiB"));

        let mut checksum = Checksum::with_limit(HELLO_WORLD, 11).unwrap();
        checksum.update(b"hello").unwrap();
        let err = checksum.update(b" world!").unwrap_err();
        assert!(err.is_too_large());
        // The refused chunk was not counted.
        assert_eq!(checksum.bytes_so_far(), 5);
    }

    #[test]
    fn the_byte_count_cannot_overflow() {
        let mut checksum = Checksum::with_limit(HELLO_WORLD, u64::MAX).unwrap();
        checksum.len_bytes = u64::MAX - 1;
        assert!(checksum.update(b"ab").unwrap_err().is_too_large());
        assert_eq!(checksum.bytes_so_far(), u64::MAX - 1);
    }

    #[test]
    fn the_production_limit_is_64_tib() {
        let checksum = Checksum::new(HELLO_WORLD).unwrap();
        assert_eq!(checksum.limit_bytes, 64 * 1024 * 1024 * 1024 * 1024);
    }
}
