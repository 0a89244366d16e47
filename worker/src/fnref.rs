//! Relocatable function identity.
//!
//! A worker runs the same executable as its parent but, with address-space
//! layout randomisation, at a different base address. A function is therefore
//! named by its offset from one static anchor in the same image, which is the
//! same in every process running that image. The fingerprint lets both sides
//! confirm they run the same image before any offset is trusted.

use std::hash::Hasher;

/// The one base every offset is taken from. A `static` has exactly one
/// address per image, unlike a function, which codegen may duplicate.
static ANCHOR: u8 = 0;

fn anchor() -> usize {
    std::ptr::addr_of!(ANCHOR) as usize
}

/// The offset of `addr` from the anchor.
pub fn offset_of(addr: usize) -> i64 {
    addr.wrapping_sub(anchor()) as i64
}

/// The address in this process of something at `offset` from the anchor.
pub fn address_of(offset: i64) -> usize {
    anchor().wrapping_add(offset as usize)
}

/// A fingerprint of the running executable: where two known functions sit
/// relative to the anchor, plus the identity of the executable file.
/// Computed once per process (a forked worker inherits its fork server's).
pub fn fingerprint() -> u64 {
    static FINGERPRINT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *FINGERPRINT.get_or_init(compute_fingerprint)
}

fn compute_fingerprint() -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.write_i64(offset_of(compute_fingerprint as fn() -> u64 as usize));
    h.write_i64(offset_of(
        crate::task_loop::run as fn(crate::sys::WorkerFds) -> ! as usize,
    ));
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    if let Ok(meta) = std::fs::metadata("/proc/self/exe") {
        use std::os::unix::fs::MetadataExt;
        h.write_u64(meta.dev());
        h.write_u64(meta.ino());
        h.write_u64(meta.size());
        h.write_i64(meta.mtime());
        h.write_i64(meta.mtime_nsec());
    }
    h.finish()
}
