//! The qcow2 header, read natively, and the rules for which qcow2 images may
//! be imported. Only the fixed header is read (the layout is QEMU's
//! `docs/interop/qcow2.txt`); tables, header extensions and the backing
//! file's name are not, since a refused image needs none of them.

use crate::{ImageError, MAX_IMAGE_BYTES};

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Incompatible feature bits (version 3).
pub const INCOMPATIBLE_DIRTY: u64 = 1 << 0;
pub const INCOMPATIBLE_CORRUPT: u64 = 1 << 1;
pub const INCOMPATIBLE_EXTERNAL_DATA_FILE: u64 = 1 << 2;
pub const INCOMPATIBLE_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPATIBLE_EXTENDED_L2: u64 = 1 << 4;
const INCOMPATIBLE_KNOWN: u64 = INCOMPATIBLE_DIRTY
    | INCOMPATIBLE_CORRUPT
    | INCOMPATIBLE_EXTERNAL_DATA_FILE
    | INCOMPATIBLE_COMPRESSION_TYPE
    | INCOMPATIBLE_EXTENDED_L2;

/// The header's length in version 2, and the least it may be in version 3.
const HEADER_V2_BYTES: usize = 72;
const HEADER_V3_MIN_BYTES: usize = 104;

/// QEMU's bounds: 512-byte to 2 MiB clusters.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;

/// Why bytes that start like a qcow2 image are not a readable qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    #[error("the file is not a qcow2 image (it does not start with the bytes QFI\\xfb)")]
    NotQcow2,
    #[error("the upload starts like a qcow2 image but ends inside its header ({have_bytes} of {need_bytes} bytes); upload the whole image file")]
    Truncated {
        have_bytes: usize,
        need_bytes: usize,
    },
    #[error("the upload is a qcow2 image of version {version}, but only versions 2 and 3 can be imported; convert it with `qemu-img convert -O qcow2` first")]
    UnsupportedVersion { version: u32 },
    #[error("the upload starts like a qcow2 image but its header is damaged (cluster_bits is {cluster_bits}, not 9 to 21); check it with `qemu-img check`")]
    BadClusterBits { cluster_bits: u32 },
    #[error("the upload starts like a qcow2 image but its header is damaged (header length {header_length} is not between 104 bytes and the cluster size, {cluster_size_bytes} bytes); check it with `qemu-img check`")]
    BadHeaderLength {
        header_length: u32,
        cluster_size_bytes: u64,
    },
}

/// The fields of a qcow2 header that decide whether it can be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Nonzero when the image has a backing file.
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    /// A cluster is `1 << cluster_bits` bytes.
    pub cluster_bits: u32,
    /// The disk size a VM sees (the header's `size`).
    pub virtual_size_bytes: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// `INCOMPATIBLE_*` bits; always 0 in version 2.
    pub incompatible_features: u64,
    /// 72 in version 2.
    pub header_length: u32,
}

impl Header {
    /// Reads the header at the start of `bytes`, which must hold at least
    /// its first 104 bytes (72 for version 2); more is fine. Never panics:
    /// short input is [`Qcow2Error::Truncated`].
    pub fn parse(bytes: &[u8]) -> Result<Header, Qcow2Error> {
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(Qcow2Error::NotQcow2);
        }
        let need = |need_bytes: usize| {
            if bytes.len() < need_bytes {
                Err(Qcow2Error::Truncated {
                    have_bytes: bytes.len(),
                    need_bytes,
                })
            } else {
                Ok(())
            }
        };
        need(8)?;
        let version = be_u32(bytes, 4);
        match version {
            2 => need(HEADER_V2_BYTES)?,
            3 => need(HEADER_V3_MIN_BYTES)?,
            _ => return Err(Qcow2Error::UnsupportedVersion { version }),
        }
        let cluster_bits = be_u32(bytes, 20);
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(Qcow2Error::BadClusterBits { cluster_bits });
        }
        let (incompatible_features, header_length) = if version == 3 {
            let header_length = be_u32(bytes, 100);
            let cluster_size_bytes = 1u64 << cluster_bits;
            if u64::from(header_length) < HEADER_V3_MIN_BYTES as u64
                || u64::from(header_length) > cluster_size_bytes
            {
                return Err(Qcow2Error::BadHeaderLength {
                    header_length,
                    cluster_size_bytes,
                });
            }
            (be_u64(bytes, 72), header_length)
        } else {
            (0, HEADER_V2_BYTES as u32)
        };
        Ok(Header {
            version,
            backing_file_offset: be_u64(bytes, 8),
            backing_file_size: be_u32(bytes, 16),
            cluster_bits,
            virtual_size_bytes: be_u64(bytes, 24),
            crypt_method: be_u32(bytes, 32),
            incompatible_features,
            header_length,
        })
    }
}

/// The virtual size of an image with this header, or why it cannot be
/// imported: it must stand alone (no backing or external data file), be
/// unencrypted, not be marked corrupt, use only features QEMU knows, and
/// describe 1 byte to 64 TiB.
///
/// A dirty image (lazy refcounts not yet written back) is accepted: reading
/// it, which is all a conversion does, is safe.
pub fn check_importable(header: &Header) -> Result<u64, ImageError> {
    if header.backing_file_offset != 0 {
        return Err(ImageError::Qcow2BackingFile);
    }
    if header.incompatible_features & INCOMPATIBLE_EXTERNAL_DATA_FILE != 0 {
        return Err(ImageError::Qcow2ExternalDataFile);
    }
    if header.crypt_method != 0 {
        return Err(ImageError::Qcow2Encrypted {
            crypt_method: header.crypt_method,
        });
    }
    let unknown_bits = header.incompatible_features & !INCOMPATIBLE_KNOWN;
    if unknown_bits != 0 {
        return Err(ImageError::Qcow2UnknownFeatures { unknown_bits });
    }
    if header.incompatible_features & INCOMPATIBLE_CORRUPT != 0 {
        return Err(ImageError::Qcow2Corrupt);
    }
    let virtual_size_bytes = header.virtual_size_bytes;
    if virtual_size_bytes == 0 || virtual_size_bytes > MAX_IMAGE_BYTES {
        return Err(ImageError::Qcow2NoUsableVirtualSize { virtual_size_bytes });
    }
    Ok(virtual_size_bytes)
}

/// The caller has checked that `bytes` holds `offset + 4` bytes.
fn be_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_be_bytes(field)
}

/// The caller has checked that `bytes` holds `offset + 8` bytes.
fn be_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_be_bytes(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    // Images made by the real qemu-img.

    fn qemu_img(args: &[&str]) -> Vec<u8> {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs (install qemu-utils)");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Creates `name` in `dir` with `qemu-img create -f qcow2 <options>` and
    /// returns its path.
    fn create(dir: &Path, name: &str, options: &[&str], size: &str) -> String {
        let path = dir.join(name).to_str().unwrap().to_owned();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(options);
        args.extend_from_slice(&[&path, size]);
        qemu_img(&args);
        path
    }

    /// Parses and checks an image file as the import does.
    fn import(path: &str) -> Result<u64, String> {
        let file = std::fs::read(path).unwrap();
        let first = &file[..file.len().min(crate::HEADER_PROBE_BYTES)];
        Header::parse(first)
            .map_err(ImageError::from)
            .and_then(|header| check_importable(&header))
            .map_err(|e| e.to_string())
    }

    fn qemu_virtual_size(path: &str) -> u64 {
        let info: serde_json::Value =
            serde_json::from_slice(&qemu_img(&["info", "--output=json", "-f", "qcow2", path]))
                .unwrap();
        info["virtual-size"].as_u64().unwrap()
    }

    #[test]
    fn qemu_img_images_are_read_with_qemus_virtual_size() {
        let dir = tempfile::tempdir().unwrap();
        let check = |options: &[&str], size: &str, version: u32| {
            let path = create(dir.path(), "disk.qcow2", options, size);
            let header = Header::parse(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(header.version, version, "{options:?} {size}");
            let want = qemu_virtual_size(&path);
            assert_eq!(import(&path), Ok(want), "{options:?} {size}");
            std::fs::remove_file(&path).unwrap();
        };
        check(&[], "1", 3);
        check(&[], "1M", 3);
        check(&[], "10G", 3);
        check(&[], "64T", 3);
        check(&["-o", "compat=0.10"], "1G", 2);
        check(&["-o", "cluster_size=512"], "3M", 3);
        check(&["-o", "cluster_size=2M"], "5G", 3);
        check(&["-o", "lazy_refcounts=on"], "1G", 3);
        check(&["-o", "extended_l2=on"], "1G", 3);
        check(&["-o", "compression_type=zstd"], "1G", 3);
        check(&["-o", "preallocation=metadata"], "1M", 3);
    }

    #[test]
    fn qemu_img_images_that_are_not_self_contained_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let base = base.to_str().unwrap();
        let data_file = dir.path().join("data.raw");
        let data_file = format!("data_file={}", data_file.to_str().unwrap());
        let check = |options: &[&str], size: &str, want: &str| {
            let path = create(dir.path(), "disk.qcow2", options, size);
            assert_eq!(import(&path), Err(want.to_owned()), "{options:?}");
            std::fs::remove_file(&path).unwrap();
        };
        check(
            &["-b", base, "-F", "raw"],
            "1M",
            "qcow2 images with a backing file cannot be imported (it would read a file of the server); flatten it with `qemu-img convert` first",
        );
        check(
            &["-o", &data_file],
            "1M",
            "qcow2 images with an external data file cannot be imported; convert it first",
        );
        check(
            &["--object", "secret,id=sec0,data=secret", "-o", "encrypt.format=luks,encrypt.key-secret=sec0"],
            "1M",
            "encrypted qcow2 images cannot be imported (the server has no key for them); decrypt it with `qemu-img convert` first",
        );
        check(
            &[],
            "65T",
            "the qcow2 image has no usable virtual size (1 byte to 64 TiB)",
        );
    }

    // Headers made by hand, for what qemu-img does not create.

    /// A valid version 3 header of 1 GiB with 64 KiB clusters, as qemu-img
    /// writes it, with `edit` applied.
    fn v3_header(edit: impl FnOnce(&mut Fields)) -> Vec<u8> {
        let mut fields = Fields {
            version: 3,
            backing_file_offset: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            incompatible_features: 0,
            header_length: 112,
        };
        edit(&mut fields);
        fields.encode()
    }

    struct Fields {
        version: u32,
        backing_file_offset: u64,
        cluster_bits: u32,
        size: u64,
        crypt_method: u32,
        incompatible_features: u64,
        header_length: u32,
    }

    impl Fields {
        fn encode(&self) -> Vec<u8> {
            let mut bytes = vec![0u8; 112];
            bytes[0..4].copy_from_slice(&MAGIC);
            bytes[4..8].copy_from_slice(&self.version.to_be_bytes());
            bytes[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
            bytes[16..20].copy_from_slice(
                &(if self.backing_file_offset == 0 {
                    0u32
                } else {
                    8
                })
                .to_be_bytes(),
            );
            bytes[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
            bytes[24..32].copy_from_slice(&self.size.to_be_bytes());
            bytes[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
            bytes[36..40].copy_from_slice(&16u32.to_be_bytes()); // l1_size
            bytes[40..48].copy_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
            bytes[48..56].copy_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
            bytes[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
            bytes[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            bytes[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
            bytes[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            bytes
        }
    }

    #[test]
    fn hand_made_headers() {
        let check = |bytes: Vec<u8>, want: Result<u64, &str>| {
            let got = Header::parse(&bytes)
                .map_err(ImageError::from)
                .and_then(|header| check_importable(&header))
                .map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "{bytes:02x?}");
        };
        let gib = 1 << 30;
        check(v3_header(|_| {}), Ok(gib));
        check(v3_header(|f| f.size = 1), Ok(1));
        check(v3_header(|f| f.size = MAX_IMAGE_BYTES), Ok(MAX_IMAGE_BYTES));
        check(
            v3_header(|f| f.incompatible_features = INCOMPATIBLE_DIRTY),
            Ok(gib),
        );
        check(
            v3_header(|f| {
                f.incompatible_features = INCOMPATIBLE_COMPRESSION_TYPE | INCOMPATIBLE_EXTENDED_L2
            }),
            Ok(gib),
        );
        check(v3_header(|f| f.cluster_bits = 9), Ok(gib));
        check(v3_header(|f| f.cluster_bits = 21), Ok(gib));
        // Version 2 ends at byte 72: what follows is not read.
        let mut v2 = v3_header(|f| {
            f.version = 2;
            f.incompatible_features = INCOMPATIBLE_CORRUPT;
        });
        check(v2.clone(), Ok(gib));
        v2.truncate(72);
        check(v2, Ok(gib));

        let no_size = "the qcow2 image has no usable virtual size (1 byte to 64 TiB)";
        check(v3_header(|f| f.size = 0), Err(no_size));
        check(v3_header(|f| f.size = MAX_IMAGE_BYTES + 1), Err(no_size));
        check(v3_header(|f| f.size = u64::MAX), Err(no_size));
        check(
            v3_header(|f| f.backing_file_offset = 112),
            Err("qcow2 images with a backing file cannot be imported (it would read a file of the server); flatten it with `qemu-img convert` first"),
        );
        let encrypted = "encrypted qcow2 images cannot be imported (the server has no key for them); decrypt it with `qemu-img convert` first";
        check(v3_header(|f| f.crypt_method = 1), Err(encrypted));
        check(v3_header(|f| f.crypt_method = 2), Err(encrypted));
        check(v3_header(|f| f.crypt_method = 7), Err(encrypted));
        check(
            v3_header(|f| f.incompatible_features = INCOMPATIBLE_CORRUPT),
            Err("the qcow2 image is marked corrupt; repair it with `qemu-img check -r all` or convert it with `qemu-img convert` first"),
        );
        check(
            v3_header(|f| {
                f.incompatible_features = INCOMPATIBLE_EXTERNAL_DATA_FILE | INCOMPATIBLE_CORRUPT
            }),
            Err("qcow2 images with an external data file cannot be imported; convert it first"),
        );
        check(
            v3_header(|f| f.incompatible_features = INCOMPATIBLE_DIRTY | 1 << 5 | 1 << 63),
            Err("the qcow2 image uses features this server does not know (incompatible feature bits 0x8000000000000020); convert it with `qemu-img convert -O qcow2` first"),
        );
        for version in [0, 1, 4, u32::MAX] {
            check(
                v3_header(|f| f.version = version),
                Err(&format!("the upload is a qcow2 image of version {version}, but only versions 2 and 3 can be imported; convert it with `qemu-img convert -O qcow2` first")),
            );
        }
        for cluster_bits in [0, 8, 22, 64, u32::MAX] {
            check(
                v3_header(|f| f.cluster_bits = cluster_bits),
                Err(&format!("the upload starts like a qcow2 image but its header is damaged (cluster_bits is {cluster_bits}, not 9 to 21); check it with `qemu-img check`")),
            );
        }
        check(
            v3_header(|f| f.header_length = 103),
            Err("the upload starts like a qcow2 image but its header is damaged (header length 103 is not between 104 bytes and the cluster size, 65536 bytes); check it with `qemu-img check`"),
        );
        check(
            v3_header(|f| {
                f.cluster_bits = 9;
                f.header_length = 520;
            }),
            Err("the upload starts like a qcow2 image but its header is damaged (header length 520 is not between 104 bytes and the cluster size, 512 bytes); check it with `qemu-img check`"),
        );
        let mut not_qcow2 = v3_header(|_| {});
        not_qcow2[3] = 0xfa;
        check(
            not_qcow2,
            Err("the file is not a qcow2 image (it does not start with the bytes QFI\\xfb)"),
        );
        check(
            b"\0\0\0\0".to_vec(),
            Err("the file is not a qcow2 image (it does not start with the bytes QFI\\xfb)"),
        );
    }

    /// Every prefix too short to hold the header is an error naming what is
    /// missing, never a panic; the shortest sufficient prefix parses.
    #[test]
    fn truncated_headers_are_refused() {
        for (version, need_bytes) in [(3, HEADER_V3_MIN_BYTES), (2, HEADER_V2_BYTES)] {
            let header = v3_header(|f| f.version = version);
            for have_bytes in 0..need_bytes {
                let need_bytes = if have_bytes < 8 { 8 } else { need_bytes };
                assert_eq!(
                    Header::parse(&header[..have_bytes]),
                    Err(Qcow2Error::Truncated {
                        have_bytes,
                        need_bytes
                    }),
                    "version {version}"
                );
            }
            assert_eq!(
                Header::parse(&header[..need_bytes])
                    .unwrap()
                    .virtual_size_bytes,
                1 << 30
            );
        }
        assert_eq!(
            Qcow2Error::Truncated {
                have_bytes: 50,
                need_bytes: 104
            }
            .to_string(),
            "the upload starts like a qcow2 image but ends inside its header (50 of 104 bytes); upload the whole image file"
        );
    }

    #[test]
    fn every_header_field_is_read_from_its_place() {
        let mut bytes = v3_header(|f| {
            f.backing_file_offset = 0x0102_0304_0506_0708;
            f.size = 0x1112_1314_1516_1718;
            f.crypt_method = 0x2122_2324;
            f.incompatible_features = 0x3132_3334_3536_3738;
            f.header_length = 0x1000;
        });
        bytes[16..20].copy_from_slice(&0x4142_4344u32.to_be_bytes());
        assert_eq!(
            Header::parse(&bytes),
            Ok(Header {
                version: 3,
                backing_file_offset: 0x0102_0304_0506_0708,
                backing_file_size: 0x4142_4344,
                cluster_bits: 16,
                virtual_size_bytes: 0x1112_1314_1516_1718,
                crypt_method: 0x2122_2324,
                incompatible_features: 0x3132_3334_3536_3738,
                header_length: 0x1000,
            })
        );
    }
}
