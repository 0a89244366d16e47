//! A model's trip to the nodes: the client publishes a store's bytes to
//! the NATS Object Store under their SHA-256 digest, once; each node
//! downloads a digest once into its cache directory (checked against the
//! digest, then renamed into place, read-only) and its agent maps it from
//! there for all its workers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use async_nats::jetstream;
use async_nats::jetstream::object_store::{GetErrorKind, ObjectStore};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::ClusterError;

/// The Object Store bucket of every model.
pub(crate) const BUCKET: &str = "procpool_models";

/// The object holding the store whose SHA-256 is `digest` (hex).
pub(crate) fn object_name(digest: &str) -> String {
    format!("sha256-{digest}")
}

/// The SHA-256 of `bytes`, in hex.
pub(crate) fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Whether `digest` is what [`digest`] makes: 64 lowercase hex digits (a
/// digest from a message becomes a file name).
pub(crate) fn is_digest(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The models bucket, made if it is not there.
pub(crate) async fn bucket(js: &jetstream::Context) -> Result<ObjectStore, ClusterError> {
    if let Ok(bucket) = js.get_object_store(BUCKET).await {
        return Ok(bucket);
    }
    js.create_object_store(jetstream::object_store::Config {
        bucket: BUCKET.to_string(),
        description: Some("procpool model stores, by SHA-256".to_string()),
        ..Default::default()
    })
    .await
    .map_err(|e| ClusterError::new(format!("cannot make the object store {BUCKET}: {e}")))
}

/// Puts `bytes` (a whole model store) in the bucket unless an object of
/// the same digest and size is there already; its digest.
pub(crate) async fn publish(js: &jetstream::Context, bytes: &[u8]) -> Result<String, ClusterError> {
    let digest = digest(bytes);
    let name = object_name(&digest);
    let bucket = bucket(js).await?;
    if let Ok(info) = bucket.info(&name).await
        && info.size == bytes.len()
        && !info.deleted
    {
        return Ok(digest);
    }
    let mut reader = bytes;
    bucket
        .put(name.as_str(), &mut reader)
        .await
        .map_err(|e| ClusterError::new(format!("cannot publish the model {name}: {e}")))?;
    Ok(digest)
}

/// Deletes the object of `digest` from the bucket.
pub(crate) async fn delete(js: &jetstream::Context, digest: &str) -> Result<(), ClusterError> {
    let name = object_name(digest);
    bucket(js)
        .await?
        .delete(&name)
        .await
        .map_err(|e| ClusterError::new(format!("cannot delete the model {name}: {e}")))
}

/// A node's model files, one per digest, in a directory that agents on
/// the node may share.
pub(crate) struct ModelCache {
    dir: PathBuf,
}

impl ModelCache {
    pub(crate) fn new(dir: PathBuf) -> ModelCache {
        ModelCache { dir }
    }

    /// Where the store of `digest` is kept.
    pub(crate) fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.store", object_name(digest)))
    }

    /// The file of `digest`, downloaded first if the node does not have it
    /// yet. One agent of the node downloads it while the others wait (a
    /// lock file); the download is checked against the digest before it is
    /// renamed into place, so the file is there whole or not at all.
    pub(crate) fn file(
        &self,
        rt: &tokio::runtime::Runtime,
        js: &jetstream::Context,
        digest: &str,
    ) -> Result<PathBuf, String> {
        if !is_digest(digest) {
            return Err(format!("{digest:?} is not a model digest"));
        }
        let path = self.path(digest);
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot make the model cache {}: {e}", self.dir.display()))?;
        let _lock = lock(&self.dir.join(format!("{}.lock", object_name(digest))))?;
        if path.exists() {
            return Ok(path); // another agent of this node fetched it
        }
        let part = self.dir.join(format!(
            ".{}.{}.part",
            object_name(digest),
            std::process::id()
        ));
        // A server restarting mid-download is waited out a little; bytes
        // that do not match the digest are not tried again.
        let mut fetched = Err(Fetch::Retry(String::new()));
        for attempt in 0..3u64 {
            fetched = rt.block_on(download(js, digest, &part));
            match &fetched {
                Err(Fetch::Retry(why)) => {
                    log::warn!(target: "procpool", "fetching the model {digest}: {why}");
                    std::thread::sleep(std::time::Duration::from_millis(500 * (attempt + 1)));
                }
                _ => break,
            }
        }
        let fetched = fetched.map_err(|e| match e {
            Fetch::Retry(why) | Fetch::Refused(why) => why,
        });
        let finished = fetched.and_then(|()| {
            std::fs::set_permissions(&part, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .map_err(|e| format!("cannot make {} read-only: {e}", part.display()))?;
            std::fs::rename(&part, &path)
                .map_err(|e| format!("cannot move the model into {}: {e}", path.display()))?;
            // The rename itself is durable once the directory is.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", self.dir.display()))
        });
        if finished.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        finished.map(|()| path)
    }

    /// Removes the file of `digest` (it failed its checks): the next use
    /// downloads it again.
    pub(crate) fn evict(&self, digest: &str) {
        if is_digest(digest) {
            let _ = std::fs::remove_file(self.path(digest));
        }
    }
}

/// Why a download failed: worth another try (the server, the network), or
/// not (the bytes are not the digest's, the disk refuses).
enum Fetch {
    Retry(String),
    Refused(String),
}

/// Downloads the object of `digest` into `part`, checking its SHA-256.
async fn download(js: &jetstream::Context, digest: &str, part: &Path) -> Result<(), Fetch> {
    let name = object_name(digest);
    let bucket = bucket(js).await.map_err(|e| Fetch::Retry(e.to_string()))?;
    let mut object = bucket.get(&name).await.map_err(|e| {
        let why = format!("cannot get the model {name}: {e}");
        match e.kind() {
            GetErrorKind::NotFound | GetErrorKind::InvalidName => Fetch::Refused(why),
            _ => Fetch::Retry(why),
        }
    })?;
    let disk = |e: std::io::Error| Fetch::Refused(format!("cannot write {}: {e}", part.display()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(part)
        .map_err(disk)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = object
            .read(&mut buf)
            .await
            .map_err(|e| Fetch::Retry(format!("cannot download the model {name}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(disk)?;
    }
    let got = hex(&hasher.finalize());
    if got != digest {
        return Err(Fetch::Refused(format!(
            "the model {name} downloaded has the SHA-256 {got}: not what its name says"
        )));
    }
    file.sync_all().map_err(disk)
}

/// Holds an exclusive lock on `path` (made if missing) until dropped.
fn lock(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open the lock {}: {e}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns; it touches no
    // memory of ours. The lock goes with the descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "cannot lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// Where a node keeps its models unless told otherwise:
/// `$PROCPOOL_CACHE_DIR`, else `$XDG_CACHE_HOME/procpool/models`, else
/// `~/.cache/procpool/models`, else the temporary directory.
pub(crate) fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROCPOOL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("procpool").join("models");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home)
            .join(".cache")
            .join("procpool")
            .join("models");
    }
    std::env::temp_dir().join("procpool-models")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_the_hex_sha256_and_nothing_else_passes_for_one() {
        let d = digest(b"abc");
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_digest(&d));
        assert!(!is_digest("../../etc/passwd"));
        assert!(!is_digest(&d.to_uppercase()));
        assert!(!is_digest(&d[1..]));
    }
}
