//! The model store: a model archived once with rkyv into shared memory, which
//! every worker maps and reads in place.
//!
//! [`persist`] writes the archive behind a checked header
//! (see `procpool_worker::store_format`) into a sealed `memfd`: anonymous
//! shared memory that the kernel refuses to modify once sealed and frees when
//! the last process holding it ends, even if the parent is killed. Workers
//! inherit the descriptor and map it read-only, so the model exists once in
//! RAM however many workers there are, and no worker deserialises anything.
//!
//! [`persist_to_path`] writes the same bytes to a file instead, to reuse a
//! model across runs. [`ModelStore::load`] copies such a file into a sealed
//! memfd (safe); [`ModelStore::open_mapped`] maps it directly (no copy, but
//! `unsafe`: the caller promises nobody modifies the file).

use std::fs::File;
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use procpool_worker::store_format::{self, HEADER_LEN, Header};
use rkyv::Portable;
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::Positional;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::writer::IoWriter;
use rkyv::util::AlignedVec;

use crate::error::StoreError;

/// What an archived model type must offer: rkyv's portable layout and
/// validation. Every `#[derive(rkyv::Archive)]` type's archived form with
/// `bytecheck` (rkyv's default) qualifies.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// fn takes_archived<A: procpool::ArchivedModel>() {}
/// takes_archived::<ArchivedModel>();
/// # let _ = Model { weights: vec![] }.weights;
/// ```
pub trait ArchivedModel: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>> {}

impl<T> ArchivedModel for T where T: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>> {}

/// What a model type must offer to be persisted: rkyv serialisation into an
/// archive whose form is an [`ArchivedModel`]. Every type with
/// `#[derive(rkyv::Archive, rkyv::Serialize)]` qualifies.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// fn takes_model<M: procpool::Model>(_: &M) {}
/// takes_model(&Model { weights: vec![] });
/// ```
pub trait Model:
    rkyv::Archive<Archived: ArchivedModel>
    + for<'a> rkyv::Serialize<HighSerializer<IoWriter<StoreSink>, ArenaHandle<'a>, rancor::Error>>
{
}

impl<M> Model for M where
    M: rkyv::Archive<Archived: ArchivedModel>
        + for<'a> rkyv::Serialize<HighSerializer<IoWriter<StoreSink>, ArenaHandle<'a>, rancor::Error>>
{
}

/// Where [`persist`] streams the archive: straight into the store's file or
/// shared memory, checksummed on the way, with no intermediate copy of the
/// model. It appears only in the [`Model`] bound; there is nothing to call.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// // Named by the `Model` bound that every derived model meets.
/// fn persists<M: procpool::Model>(model: &M) -> bool {
///     procpool::persist(model).is_ok()
/// }
/// assert!(persists(&Model { weights: vec![1.0] }));
/// ```
pub struct StoreSink {
    out: std::io::BufWriter<File>,
    hasher: xxhash_rust::xxh3::Xxh3,
}

impl std::fmt::Debug for StoreSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSink").finish_non_exhaustive()
    }
}

impl Write for StoreSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Writes a whole store into `file` (empty, at offset 0): a placeholder
/// header, the archive streamed from `model`, then the real header.
fn write_store<M: Model>(
    file: File,
    model: &M,
    schema_version: u32,
    what: &dyn Fn() -> String,
) -> Result<File, StoreError> {
    use std::os::unix::fs::FileExt;
    let io = |e| StoreError::io(what(), e);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
    let sink = StoreSink {
        out,
        hasher: xxhash_rust::xxh3::Xxh3::new(),
    };
    let writer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(model, IoWriter::new(sink))
        .map_err(|e| StoreError::serialize(e.to_string()))?;
    let archive_len = writer.pos() as u64;
    let StoreSink { out, hasher } = writer.into_inner();
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    let header = Header {
        format_flags: store_format::format_flags(),
        type_fingerprint: store_format::type_fingerprint::<M::Archived>(schema_version),
        archive_len,
        checksum: hasher.digest(),
        type_name: std::any::type_name::<M>().to_string(),
    };
    file.write_all_at(&header.encode(), 0).map_err(io)?;
    Ok(file)
}

/// A persisted model: a cheap, clonable handle to one immutable archive.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Weights { values: Vec<f32> }
///
/// let store = procpool::persist(&Weights { values: vec![0.5, 1.5] }).unwrap();
/// let archived = store.archived(); // an &ArchivedWeights, read in place
/// assert_eq!(archived.values.len(), 2);
/// assert_eq!(archived.values[1], 1.5);
/// ```
pub struct ModelStore<M: rkyv::Archive> {
    inner: Arc<StoreInner>,
    _model: PhantomData<fn() -> M>,
}

/// A [`ModelStore`]'s mapping, without its model type.
#[derive(Clone)]
pub(crate) struct UntypedStore(Arc<StoreInner>);

impl UntypedStore {
    /// The archive's bytes, after the header.
    pub(crate) fn archive_bytes(&self) -> &[u8] {
        &self.0.map[HEADER_LEN..]
    }

    /// The store's descriptor, to hand to workers.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.0.fd.as_fd()
    }
}

struct StoreInner {
    fd: OwnedFd,
    map: Mmap,
}

impl<M: rkyv::Archive> Clone for ModelStore<M> {
    fn clone(&self) -> Self {
        ModelStore {
            inner: Arc::clone(&self.inner),
            _model: PhantomData,
        }
    }
}

impl<M: rkyv::Archive> std::fmt::Debug for ModelStore<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("type", &std::any::type_name::<M>())
            .field("archive_bytes", &self.archive_len())
            .finish()
    }
}

/// Archives `model` into a new sealed shared-memory store.
///
/// The archive is checksummed; workers map it read-only. The store lives as
/// long as a handle or a worker holds it.
///
/// # Errors
///
/// Fails if rkyv cannot serialise the model or shared memory cannot be
/// created (for example when memory is exhausted).
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// let store = procpool::persist(&Model { weights: vec![0.5; 1000] })?;
/// assert_eq!(store.archived().weights.len(), 1000);
/// # Ok::<(), procpool::StoreError>(())
/// ```
pub fn persist<M: Model>(model: &M) -> Result<ModelStore<M>, StoreError> {
    persist_with_schema(model, 0)
}

/// Like [`persist`], with a schema version of your own that a later
/// [`ModelStore::load_with_schema`] must match (bump it when the model's
/// meaning changes but not its Rust type); a store of another schema is
/// refused as of another type.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("v2.store");
/// procpool::persist_with_schema(&Model { weights: vec![1.0] }, 2)?.save(&path)?;
/// assert!(procpool::ModelStore::<Model>::load_with_schema(&path, 2).is_ok());
/// // The schema is part of the type's fingerprint.
/// assert!(procpool::ModelStore::<Model>::load(&path).unwrap_err().is_type_mismatch());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn persist_with_schema<M: Model>(
    model: &M,
    schema_version: u32,
) -> Result<ModelStore<M>, StoreError> {
    let file = write_store(new_memfd()?, model, schema_version, &|| {
        "write the model into shared memory".into()
    })?;
    let fd = seal(file)?;
    // Freshly written from a real `M`: no need to validate what we just made.
    ModelStore::from_trusted_fd(fd)
}

/// Archives `model` into a store file at `path`, to reopen later with
/// [`ModelStore::load`] or [`ModelStore::open_mapped`].
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("model.store");
/// procpool::persist_to_path(&Model { weights: vec![1.0; 10] }, &path)?;
/// let store = procpool::ModelStore::<Model>::load(&path)?;
/// assert_eq!(store.archived().weights.len(), 10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn persist_to_path<M: Model>(model: &M, path: impl AsRef<Path>) -> Result<(), StoreError> {
    let path = path.as_ref();
    let what = || format!("write the model store {}", path.display());
    let file = File::create(path).map_err(|e| StoreError::io(what(), e))?;
    let file = write_store(file, model, 0, &what)?;
    file.sync_all().map_err(|e| StoreError::io(what(), e))
}

/// A new, empty memfd that can be sealed.
fn new_memfd() -> Result<File, StoreError> {
    // SAFETY: the name is a NUL-terminated literal; the flags are constants.
    let raw = unsafe {
        libc::memfd_create(
            c"procpool-model".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(StoreError::io(
            "create shared memory for the model",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
}

/// Seals a memfd against every change: writes, growth, shrinking, new seals.
fn seal(file: File) -> Result<OwnedFd, StoreError> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS takes an int of seal flags on a memfd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(StoreError::io(
            "seal the model's shared memory",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(OwnedFd::from(file))
}

impl<M: rkyv::Archive> ModelStore<M>
where
    M::Archived: ArchivedModel,
{
    /// Reads a store file written by [`persist_to_path`], checks it (header,
    /// checksum, type, rkyv validation), and copies it into a sealed
    /// shared-memory store. Safe whatever happens to the file afterwards.
    ///
    /// # Errors
    ///
    /// A missing or unreadable file, or one that is truncated, corrupted
    /// (any flipped byte), of another type, or of another format version,
    /// gives an error naming the problem.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("model.store");
    /// procpool::persist_to_path(&Model { weights: vec![2.0] }, &path)?;
    /// let store = procpool::ModelStore::<Model>::load(&path)?;
    /// assert_eq!(store.archived().weights[0].to_native(), 2.0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<ModelStore<M>, StoreError> {
        Self::load_with_schema(path, 0)
    }

    /// Like [`load`](Self::load), requiring the schema version given to
    /// [`persist_with_schema`].
    ///
    /// See the example on [`persist_with_schema`].
    pub fn load_with_schema(
        path: impl AsRef<Path>,
        schema_version: u32,
    ) -> Result<ModelStore<M>, StoreError> {
        let path = path.as_ref();
        let what = || format!("read the model store {}", path.display());
        let mut file = File::open(path).map_err(|e| StoreError::io(what(), e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(what(), e))?;
        check_bytes::<M>(&bytes, schema_version)?;
        let mut file = new_memfd()?;
        file.write_all(&bytes)
            .map_err(|e| StoreError::io("copy the model store into shared memory", e))?;
        drop(bytes);
        let fd = seal(file)?;
        ModelStore::from_trusted_fd(fd)
    }

    /// Maps a store file directly, without copying it, after the same checks
    /// as [`load`](Self::load).
    ///
    /// # Safety
    ///
    /// Nobody may modify or truncate the file while any handle or worker of
    /// this store is alive. The checks run once, here; a later change to the
    /// file would change the model under running workers (undefined
    /// behaviour), and a truncation would kill them with SIGBUS. Use
    /// [`load`](Self::load) unless the file is read-only to everyone.
    pub unsafe fn open_mapped(path: impl AsRef<Path>) -> Result<ModelStore<M>, StoreError> {
        let path = path.as_ref();
        let what = || format!("open the model store {}", path.display());
        let file = File::open(path).map_err(|e| StoreError::io(what(), e))?;
        // SAFETY: the caller promises that nobody modifies the file.
        let map =
            unsafe { MmapOptions::new().map(&file) }.map_err(|e| StoreError::io(what(), e))?;
        check_bytes::<M>(&map, 0)?;
        Ok(ModelStore {
            inner: Arc::new(StoreInner {
                fd: OwnedFd::from(file),
                map,
            }),
            _model: PhantomData,
        })
    }

    fn from_trusted_fd(fd: OwnedFd) -> Result<ModelStore<M>, StoreError> {
        // SAFETY: the descriptor is a sealed memfd: the kernel refuses every
        // write and resize, so the mapping cannot change.
        let map = unsafe { MmapOptions::new().map(&File::from(dup(&fd)?)) }
            .map_err(|e| StoreError::io("map the model store", e))?;
        Ok(ModelStore {
            inner: Arc::new(StoreInner { fd, map }),
            _model: PhantomData,
        })
    }

    /// The archived model, read in place.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// let store = procpool::persist(&Model { weights: vec![1.0, 2.0] })?;
    /// let sum: f32 = store.archived().weights.iter().map(|w| w.to_native()).sum();
    /// assert_eq!(sum, 3.0);
    /// # Ok::<(), procpool::StoreError>(())
    /// ```
    pub fn archived(&self) -> &M::Archived {
        // SAFETY: every constructor validated the archive as `M::Archived`
        // (or wrote it from a real `M`), and the bytes are immutable: a
        // sealed memfd, or a file under `open_mapped`'s contract.
        unsafe { rkyv::access_unchecked::<M::Archived>(self.archive_bytes()) }
    }
}

impl<M: rkyv::Archive> ModelStore<M> {
    /// The archive bytes (after the header).
    pub(crate) fn archive_bytes(&self) -> &[u8] {
        &self.inner.map[HEADER_LEN..]
    }

    /// The whole store as a file holds it: header, then archive.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn file_bytes(&self) -> &[u8] {
        &self.inner.map
    }

    /// The mapped store without its model type, for code that must not
    /// name it (it keeps the mapping alive).
    pub(crate) fn untyped(&self) -> UntypedStore {
        UntypedStore(self.inner.clone())
    }

    /// The size of the archive in bytes.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// let store = procpool::persist(&Model { weights: vec![0.0; 1024] })?;
    /// assert!(store.archive_len() >= 4096);
    /// # Ok::<(), procpool::StoreError>(())
    /// ```
    pub fn archive_len(&self) -> usize {
        self.inner.map.len() - HEADER_LEN
    }

    /// Writes this store's bytes to a file, to [`load`](ModelStore::load) later.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// let dir = tempfile::tempdir()?;
    /// let store = procpool::persist(&Model { weights: vec![1.0] })?;
    /// store.save(dir.path().join("copy.store"))?;
    /// assert!(procpool::ModelStore::<Model>::load(dir.path().join("copy.store")).is_ok());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), StoreError> {
        let path = path.as_ref();
        let what = || format!("write the model store {}", path.display());
        let mut file = File::create(path).map_err(|e| StoreError::io(what(), e))?;
        file.write_all(&self.inner.map)
            .map_err(|e| StoreError::io(what(), e))?;
        file.sync_all().map_err(|e| StoreError::io(what(), e))
    }
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, StoreError> {
    procpool_worker::sys::dup_owned(fd)
        .map_err(|e| StoreError::io("duplicate the model descriptor", e))
}

/// Every check a store's bytes must pass before anyone reads the archive.
fn check_bytes<M: rkyv::Archive>(bytes: &[u8], schema_version: u32) -> Result<(), StoreError>
where
    M::Archived: ArchivedModel,
{
    let header = Header::decode(bytes, bytes.len() as u64).map_err(StoreError::format)?;
    if header.format_flags != store_format::format_flags() {
        return Err(StoreError::format_flags());
    }
    if header.type_fingerprint != store_format::type_fingerprint::<M::Archived>(schema_version) {
        return Err(StoreError::type_mismatch(
            std::any::type_name::<M>().to_string(),
            header.type_name,
        ));
    }
    let archive = &bytes[HEADER_LEN..];
    let actual = xxhash_rust::xxh3::xxh3_64(archive);
    if actual != header.checksum {
        return Err(StoreError::checksum(header.checksum, actual));
    }
    // The archive starts on a page boundary of the mapping or of a fresh
    // Vec; rkyv checks alignment and every relative pointer.
    if !(archive.as_ptr() as usize).is_multiple_of(16) {
        let mut aligned = AlignedVec::<16>::with_capacity(archive.len());
        aligned.extend_from_slice(archive);
        return procpool_worker::worker::task::validate_archive::<M::Archived>(&aligned)
            .map_err(StoreError::invalid);
    }
    procpool_worker::worker::task::validate_archive::<M::Archived>(archive)
        .map_err(StoreError::invalid)
}
