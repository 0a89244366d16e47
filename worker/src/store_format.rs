//! The layout of a model store: a 4 KiB header, then an rkyv archive.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "PROCPOOL"
//!      8     4  format version (little-endian u32)
//!     12     4  header length (4096)
//!     16     8  rkyv format flags (a hash of a probe value's archived bytes:
//!               endianness, pointer width, alignment)
//!     24     8  type fingerprint (archived type's name, size, alignment,
//!               user schema version)
//!     32     8  archive length in bytes
//!     40     8  archive checksum (xxh3-64)
//!     48     8  header checksum (xxh3-64 of the 4096 header bytes with this
//!               field zeroed)
//!     56     2  type name length, then the type name (UTF-8, ≤ 1024 bytes)
//!    ...        zero padding to 4096
//!   4096        the archive (the root object sits at its end)
//! ```
//!
//! The archive starts on a page boundary, so it is aligned for any archived
//! type. The header checksum catches a flipped byte anywhere in the header,
//! the archive checksum one anywhere in the archive, and the exact file length
//! a truncation or trailing garbage.

use std::fmt;

/// The magic bytes at the start of every store.
pub const MAGIC: [u8; 8] = *b"PROCPOOL";
/// The version of this layout.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the archive.
pub const HEADER_LEN: usize = 4096;
const TYPE_NAME_MAX: usize = 1024;

/// The decoded header of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// rkyv format flags of the writer.
    pub format_flags: u64,
    /// Fingerprint of the archived type.
    pub type_fingerprint: u64,
    /// Archive length in bytes.
    pub archive_len: u64,
    /// xxh3-64 of the archive.
    pub checksum: u64,
    /// Name of the archived type, for error messages.
    pub type_name: String,
}

/// What is wrong with a store's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than a header.
    TooShort(u64),
    /// The magic bytes are wrong: not a store.
    BadMagic,
    /// Written by another version of the layout.
    Version(u32),
    /// The header checksum does not match: the header was damaged.
    HeaderChecksum,
    /// The file length does not match the header.
    Length {
        /// Header plus archive length from the header.
        expected: u64,
        /// The real length.
        actual: u64,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::TooShort(n) => write!(
                f,
                "{n} bytes is shorter than a store header ({HEADER_LEN} bytes)"
            ),
            FormatError::BadMagic => write!(f, "not a procpool model store (bad magic bytes)"),
            FormatError::Version(v) => write!(
                f,
                "store format version {v} is not supported (this build reads version {FORMAT_VERSION})"
            ),
            FormatError::HeaderChecksum => {
                write!(f, "store header is corrupted (header checksum mismatch)")
            }
            FormatError::Length { expected, actual } => {
                if actual < expected {
                    write!(
                        f,
                        "store is truncated: {actual} bytes, the header says {expected}"
                    )
                } else {
                    write!(
                        f,
                        "store has {actual} bytes, the header says {expected}: trailing data"
                    )
                }
            }
        }
    }
}

impl std::error::Error for FormatError {}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn header_checksum(header: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&header[..48]);
    h.update(&[0u8; 8]);
    h.update(&header[56..HEADER_LEN]);
    h.digest()
}

impl Header {
    /// Encodes the header into its 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.format_flags.to_le_bytes());
        b[24..32].copy_from_slice(&self.type_fingerprint.to_le_bytes());
        b[32..40].copy_from_slice(&self.archive_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        let mut name = self.type_name.as_bytes();
        if name.len() > TYPE_NAME_MAX {
            let mut cut = TYPE_NAME_MAX;
            while !self.type_name.is_char_boundary(cut) {
                cut -= 1;
            }
            name = &name[..cut];
        }
        b[56..58].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[58..58 + name.len()].copy_from_slice(name);
        let sum = header_checksum(&b);
        b[48..56].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and checks a header; `total_len` is the whole store's length.
    pub fn decode(bytes: &[u8], total_len: u64) -> Result<Header, FormatError> {
        if bytes.len() < HEADER_LEN || total_len < HEADER_LEN as u64 {
            return Err(FormatError::TooShort(total_len.min(bytes.len() as u64)));
        }
        if bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if header_checksum(bytes) != u64_at(bytes, 48) {
            return Err(FormatError::HeaderChecksum);
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let archive_len = u64_at(bytes, 32);
        let expected = archive_len.saturating_add(HEADER_LEN as u64);
        if expected != total_len {
            return Err(FormatError::Length {
                expected,
                actual: total_len,
            });
        }
        let name_len = (u16::from_le_bytes([bytes[56], bytes[57]]) as usize).min(TYPE_NAME_MAX);
        Ok(Header {
            format_flags: u64_at(bytes, 16),
            type_fingerprint: u64_at(bytes, 24),
            archive_len,
            checksum: u64_at(bytes, 40),
            type_name: String::from_utf8_lossy(&bytes[58..58 + name_len]).into_owned(),
        })
    }
}

/// The rkyv format flags of this build: a hash of the archived bytes of a
/// probe value, which change with endianness, pointer width and alignment.
pub fn format_flags() -> u64 {
    static FLAGS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *FLAGS.get_or_init(|| {
        let probe: (u32, u64, Vec<u16>, String) =
            (0x0102_0304, 0x0506_0708_090a_0b0c, vec![1, 2], "p".into());
        match rkyv::to_bytes::<rkyv::rancor::Error>(&probe) {
            Ok(bytes) => xxhash_rust::xxh3::xxh3_64(&bytes),
            Err(_) => 0,
        }
    })
}

/// The fingerprint of an archived type `T` under a user schema version.
pub fn type_fingerprint<T>(schema_version: u32) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(std::any::type_name::<T>().as_bytes());
    h.update(&(std::mem::size_of::<T>() as u64).to_le_bytes());
    h.update(&(std::mem::align_of::<T>() as u64).to_le_bytes());
    h.update(&schema_version.to_le_bytes());
    h.digest()
}
