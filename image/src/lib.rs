//! Image import, the pure part: checking an uploaded raw or qcow2 image
//! (its SHA-256 against the one the user gave, its size, its qcow2 header)
//! and planning the `qemu-img convert` that turns it into a base volume.
//!
//! It performs no I/O of its own and runs no process: the caller streams the
//! upload through [`Checksum`], hands [`plan`] the first bytes of the stored
//! file, and runs `qemu-img` with [`ConversionPlan::qemu_img_args`]. It knows
//! nothing of Raft, HTTP or the agent. Image signatures and cloud-init NoCloud
//! seeds are not built yet; nothing here handles them.

mod checksum;
pub mod qcow2;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use checksum::{Checksum, Verified};

/// The largest image, and the largest virtual disk an image may describe.
pub const MAX_IMAGE_BYTES: u64 = 64 << 40;

/// How many leading bytes of the stored file [`plan`] should be given (or
/// the whole file, if it is shorter). The qcow2 header fields it reads end at
/// byte 104 (72 for version 2); the rest is headroom.
pub const HEADER_PROBE_BYTES: usize = 4096;

/// Volumes are made of 512-byte sectors.
const SECTOR_BYTES: u64 = 512;

/// The format of an uploaded image, told by its content, never by a name or
/// a user's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name `qemu-img -f` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// qcow2 if the bytes start with its magic, else raw. Fewer than four
    /// bytes are raw: no qcow2 image is that short.
    pub fn detect(first_bytes: &[u8]) -> Format {
        if first_bytes.starts_with(&qcow2::MAGIC) {
            Format::Qcow2
        } else {
            Format::Raw
        }
    }
}

/// Why an upload cannot become an image. Every message is meant for the
/// user: it says what is wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("sha256 must be 64 hexadecimal digits (sha256sum prints them)")]
    ChecksumNotHex,
    /// The only variant that is not a plain bad request: the upload is too big.
    #[error("images are at most 64 TiB")]
    TooLarge,
    #[error("the upload is empty; nothing was stored")]
    Empty,
    #[error("the upload's SHA-256 is {got}, not the {want} given: the file changed or was damaged on the way; nothing was stored")]
    ChecksumMismatch { got: String, want: String },
    #[error(transparent)]
    Qcow2Header(#[from] qcow2::Qcow2Error),
    #[error("qcow2 images with a backing file cannot be imported (it would read a file of the server); flatten it with `qemu-img convert` first")]
    Qcow2BackingFile,
    #[error("qcow2 images with an external data file cannot be imported; convert it first")]
    Qcow2ExternalDataFile,
    #[error("encrypted qcow2 images cannot be imported (the server has no key for them); decrypt it with `qemu-img convert` first")]
    Qcow2Encrypted { crypt_method: u32 },
    #[error("the qcow2 image is marked corrupt; repair it with `qemu-img check -r all` or convert it with `qemu-img convert` first")]
    Qcow2Corrupt,
    #[error("the qcow2 image uses features this server does not know (incompatible feature bits {unknown_bits:#x}); convert it with `qemu-img convert -O qcow2` first")]
    Qcow2UnknownFeatures { unknown_bits: u64 },
    #[error("the qcow2 image has no usable virtual size (1 byte to 64 TiB)")]
    Qcow2NoUsableVirtualSize { virtual_size_bytes: u64 },
}

impl ImageError {
    /// True when the upload is refused for its size alone (HTTP 413); every
    /// other error is bad input (HTTP 400).
    pub fn is_too_large(&self) -> bool {
        matches!(self, ImageError::TooLarge)
    }
}

/// What to do with a checked upload: convert it from `format` into a fresh,
/// zeroed volume of `volume_size_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionPlan {
    pub format: Format,
    /// The disk size the image describes: the file length for raw, the
    /// header's size for qcow2.
    pub virtual_size_bytes: u64,
    /// The virtual size rounded up to whole 512-byte sectors.
    pub volume_size_bytes: u64,
}

/// Plans the conversion of a stored upload of `file_len` bytes, given its
/// first `min(HEADER_PROBE_BYTES, file_len)` bytes (more is fine).
pub fn plan(first_bytes_of_file: &[u8], file_len: u64) -> Result<ConversionPlan, ImageError> {
    let format = Format::detect(first_bytes_of_file);
    let virtual_size_bytes = match format {
        Format::Raw if file_len == 0 => return Err(ImageError::Empty),
        Format::Raw if file_len > MAX_IMAGE_BYTES => return Err(ImageError::TooLarge),
        Format::Raw => file_len,
        Format::Qcow2 => {
            let header = qcow2::Header::parse(first_bytes_of_file)?;
            qcow2::check_importable(&header)?
        }
    };
    Ok(ConversionPlan {
        format,
        virtual_size_bytes,
        volume_size_bytes: virtual_size_bytes.div_ceil(SECTOR_BYTES) * SECTOR_BYTES,
    })
}

impl ConversionPlan {
    /// The arguments of `qemu-img` that copy `source` into `target`, a volume
    /// of `volume_size_bytes` that already exists (an NBD URL, or a file in
    /// tests). When it `target_is_zero` (a new volume) zero ranges are
    /// skipped; a volume an interrupted copy already wrote to gets them
    /// written.
    ///
    /// A relative `source` is given a leading `./`, so that qemu-img cannot
    /// read a name like `nbd:…` or `json:{…}` as a protocol, nor `-x` as an
    /// option.
    pub fn qemu_img_args(
        &self,
        source: &Path,
        target: &str,
        target_is_zero: bool,
    ) -> Vec<OsString> {
        let source: PathBuf = if source.is_absolute() {
            source.to_owned()
        } else {
            Path::new(".").join(source)
        };
        let zero: &[&str] = if target_is_zero {
            &["--target-is-zero"]
        } else {
            &[]
        };
        let mut args: Vec<OsString> = ["convert", "-n"]
            .iter()
            .chain(zero)
            .chain(&["-f", self.format.as_str(), "-O", "raw"])
            .map(OsString::from)
            .collect();
        args.push(source.into_os_string());
        args.push(target.into());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn detect_looks_at_the_magic_only() {
        let check =
            |bytes: &[u8], want: Format| assert_eq!(Format::detect(bytes), want, "{bytes:?}");
        check(b"", Format::Raw);
        check(b"QFI", Format::Raw);
        check(b"QFI\xfb", Format::Qcow2);
        check(b"QFI\xfb\0\0\0\x03", Format::Qcow2);
        check(b"QFI\xfa\0\0\0\x03", Format::Raw);
        check(b"\xebc\x90", Format::Raw);
        assert_eq!(Format::Raw.as_str(), "raw");
        assert_eq!(Format::Qcow2.as_str(), "qcow2");
    }

    #[test]
    fn raw_plans_round_the_file_length_up_to_sectors() {
        let check = |file_len: u64, want: Result<(u64, u64), &str>| {
            let got = plan(b"\0\0\0\0", file_len)
                .map(|p| {
                    assert_eq!(p.format, Format::Raw);
                    (p.virtual_size_bytes, p.volume_size_bytes)
                })
                .map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "file_len {file_len}");
        };
        check(0, Err("the upload is empty; nothing was stored"));
        check(1, Ok((1, 512)));
        check(512, Ok((512, 512)));
        check(1000, Ok((1000, 1024)));
        check(
            MAX_IMAGE_BYTES - 1,
            Ok((MAX_IMAGE_BYTES - 1, MAX_IMAGE_BYTES)),
        );
        check(MAX_IMAGE_BYTES, Ok((MAX_IMAGE_BYTES, MAX_IMAGE_BYTES)));
        check(MAX_IMAGE_BYTES + 1, Err("images are at most 64 TiB"));
        assert!(plan(b"", MAX_IMAGE_BYTES + 1).unwrap_err().is_too_large());
    }

    #[test]
    fn qemu_img_args_are_exactly_the_convert_command() {
        let target = "nbd+unix:///v1?socket=/run/nbd.sock";
        let check = |format: Format, source: &str, want_source: &str| {
            let plan = ConversionPlan {
                format,
                virtual_size_bytes: 1000,
                volume_size_bytes: 1024,
            };
            let want = [
                "convert",
                "-n",
                "--target-is-zero",
                "-f",
                format.as_str(),
                "-O",
                "raw",
                want_source,
                target,
            ];
            assert_eq!(
                plan.qemu_img_args(Path::new(source), target, true),
                want.map(OsString::from).to_vec()
            );
            let over_old_data: Vec<OsString> = want
                .iter()
                .filter(|a| **a != "--target-is-zero")
                .map(OsString::from)
                .collect();
            assert_eq!(
                plan.qemu_img_args(Path::new(source), target, false),
                over_old_data
            );
        };
        let absolute = "/var/lib/allod/import-ab12.part";
        check(Format::Qcow2, absolute, absolute);
        check(Format::Raw, absolute, absolute);
        check(Format::Raw, "import.part", "./import.part");
        check(Format::Qcow2, "json:{}", "./json:{}");
        check(Format::Raw, "-x", "./-x");
    }

    /// The plan, run by the real qemu-img into a zeroed file, reproduces the
    /// image's content, from raw and from qcow2.
    #[test]
    fn planned_conversion_copies_the_image_into_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &content).unwrap();
        let qcow2 = dir.path().join("disk.qcow2");
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &qcow2]);

        for (source, format) in [(&raw, Format::Raw), (&qcow2, Format::Qcow2)] {
            let file = std::fs::read(source).unwrap();
            let first = &file[..file.len().min(HEADER_PROBE_BYTES)];
            let plan = plan(first, file.len() as u64).unwrap();
            assert_eq!(plan.format, format);
            assert_eq!(plan.volume_size_bytes, 1024, "{format:?}");

            let target = dir.path().join(format!("volume-{}", format.as_str()));
            std::fs::File::create(&target)
                .unwrap()
                .set_len(plan.volume_size_bytes)
                .unwrap();
            let out = Command::new("qemu-img")
                .args(plan.qemu_img_args(source, target.to_str().unwrap(), true))
                .output()
                .expect("qemu-img runs (install qemu-utils)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let volume = std::fs::read(&target).unwrap();
            assert_eq!(volume.len(), 1024);
            assert_eq!(&volume[..1000], &content[..], "{format:?}");
            assert!(volume[1000..].iter().all(|b| *b == 0), "{format:?}");
        }
    }

    fn qemu_img(args: &[&str], paths: &[&Path]) {
        let out = Command::new("qemu-img")
            .args(args)
            .args(paths)
            .output()
            .expect("qemu-img runs (install qemu-utils)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
