//! Why a model store could not be written, read or trusted.

use std::fmt;
use std::io;

use procpool_worker::store_format::FormatError;

/// Why a model store could not be written, read or trusted.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Other {
///     names: Vec<String>,
/// }
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("model.store");
/// procpool::persist_to_path(&Model { weights: vec![1.0; 1000] }, &path)?;
/// assert!(procpool::ModelStore::<Model>::load(&path).is_ok());
///
/// let err = procpool::ModelStore::<Other>::load(&path).unwrap_err();
/// assert!(err.is_type_mismatch());
///
/// let mut bytes = std::fs::read(&path)?;
/// let last = bytes.len() - 1;
/// bytes[last] ^= 1; // one flipped bit in the archive
/// std::fs::write(&path, &bytes)?;
/// assert!(procpool::ModelStore::<Model>::load(&path).unwrap_err().is_corrupted());
///
/// std::fs::write(&path, &bytes[..bytes.len() / 2])?;
/// assert!(procpool::ModelStore::<Model>::load(&path).unwrap_err().is_truncated());
///
/// let missing = procpool::ModelStore::<Model>::load(dir.path().join("none"));
/// assert!(missing.unwrap_err().is_io());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
}

#[derive(Debug)]
enum StoreErrorKind {
    Io(String, io::Error),
    Format(FormatError),
    Checksum { expected: u64, actual: u64 },
    TypeMismatch { expected: String, found: String },
    FormatFlags,
    Invalid(String),
    Serialize(String),
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>, err: io::Error) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Io(what.into(), err),
        }
    }
    pub(crate) fn format(err: FormatError) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Format(err),
        }
    }
    pub(crate) fn checksum(expected: u64, actual: u64) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Checksum { expected, actual },
        }
    }
    pub(crate) fn type_mismatch(expected: String, found: String) -> StoreError {
        StoreError {
            kind: StoreErrorKind::TypeMismatch { expected, found },
        }
    }
    pub(crate) fn format_flags() -> StoreError {
        StoreError {
            kind: StoreErrorKind::FormatFlags,
        }
    }
    pub(crate) fn invalid(msg: String) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Invalid(msg),
        }
    }
    pub(crate) fn serialize(msg: String) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Serialize(msg),
        }
    }

    /// True for a file that is not a store, or whose bytes were damaged:
    /// bad magic, a header or archive checksum mismatch, or an archive that
    /// fails validation.
    ///
    /// See the example on [`StoreError`].
    pub fn is_corrupted(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Format(FormatError::BadMagic | FormatError::HeaderChecksum)
                | StoreErrorKind::Checksum { .. }
                | StoreErrorKind::Invalid(_)
        ) || self.is_truncated()
    }

    /// True if the file is shorter (or longer) than its header says.
    ///
    /// See the example on [`StoreError`].
    pub fn is_truncated(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Format(FormatError::Length { .. } | FormatError::TooShort(_))
        )
    }

    /// True if the store holds another type than the one asked for.
    ///
    /// See the example on [`StoreError`].
    pub fn is_type_mismatch(&self) -> bool {
        matches!(self.kind, StoreErrorKind::TypeMismatch { .. })
    }

    /// True if the store was written by another format version, or by a
    /// build with other rkyv format settings (endianness, pointer width).
    ///
    /// See the example on [`StoreError`].
    pub fn is_version_mismatch(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Format(FormatError::Version(_)) | StoreErrorKind::FormatFlags
        )
    }

    /// True if reading or writing the file or memory failed.
    ///
    /// See the example on [`StoreError`].
    pub fn is_io(&self) -> bool {
        matches!(self.kind, StoreErrorKind::Io(..))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            StoreErrorKind::Io(what, e) => write!(f, "cannot {what}: {e}"),
            StoreErrorKind::Format(e) => write!(f, "{e}"),
            StoreErrorKind::Checksum { expected, actual } => write!(
                f,
                "store archive is corrupted (checksum {actual:016x}, the header says {expected:016x})"
            ),
            StoreErrorKind::TypeMismatch { expected, found } => {
                write!(f, "store holds `{found}`, not the requested `{expected}`")
            }
            StoreErrorKind::FormatFlags => write!(
                f,
                "store was written with other rkyv format settings (endianness, pointer width or alignment)"
            ),
            StoreErrorKind::Invalid(m) => write!(f, "store archive is invalid: {m}"),
            StoreErrorKind::Serialize(m) => write!(f, "cannot serialize the model: {m}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            StoreErrorKind::Io(_, e) => Some(e),
            StoreErrorKind::Format(e) => Some(e),
            _ => None,
        }
    }
}
