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

/// A fingerprint of the running executable's build: where a known function
/// sits relative to the anchor, the package version, and the
/// executable's ELF build-id (or, for an executable linked without one, a
/// hash of its contents). The same binary gives the same fingerprint on any
/// machine and at any path; another build gives another. Computed once per
/// process (a forked worker inherits its fork server's).
///
/// ```
/// let fp = procpool_worker::fnref::fingerprint();
/// assert_eq!(fp, procpool_worker::fnref::fingerprint());
/// ```
pub fn fingerprint() -> u64 {
    static FINGERPRINT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *FINGERPRINT.get_or_init(compute_fingerprint)
}

fn compute_fingerprint() -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    // Where a known function sits relative to the anchor: another layout
    // would make every offset point elsewhere.
    h.write_i64(offset_of(compute_fingerprint as fn() -> u64 as usize));
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    match build_id() {
        Some(id) => {
            h.write_u8(1);
            h.write(&id);
        }
        None => {
            h.write_u8(2);
            h.write_u64(executable_hash().unwrap_or(0));
        }
    }
    h.finish()
}

/// The GNU build-id of the running executable, from the `PT_NOTE` segments
/// the dynamic loader mapped; `None` if it was linked without one.
///
/// ```
/// // Debian's and most distributions' linkers add one by default.
/// if let Some(id) = procpool_worker::fnref::build_id() {
///     assert!(!id.is_empty());
/// }
/// ```
pub fn build_id() -> Option<Vec<u8>> {
    let mut found: Option<Vec<u8>> = None;
    // SAFETY: dl_iterate_phdr calls `find_in_main_program` with a valid
    // `dl_phdr_info` for each loaded object and passes `found` through as
    // the data pointer, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(find_in_main_program),
            (&mut found as *mut Option<Vec<u8>>).cast(),
        )
    };
    found
}

/// `dl_iterate_phdr` callback: looks for the build-id note of the first
/// object, the main program, and stops.
///
/// # Safety
///
/// `info` must be valid as `dl_iterate_phdr` passes it, and `data` must
/// point to an `Option<Vec<u8>>`.
unsafe extern "C" fn find_in_main_program(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: the caller passes a valid info and our `Option<Vec<u8>>`.
    let (info, found) = unsafe { (&*info, &mut *data.cast::<Option<Vec<u8>>>()) };
    if info.dlpi_phdr.is_null() {
        return 1;
    }
    // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    for header in headers.iter().filter(|h| h.p_type == libc::PT_NOTE) {
        let start = info.dlpi_addr as usize + header.p_vaddr as usize;
        // SAFETY: a PT_NOTE segment is loaded, readable, and `p_memsz`
        // bytes long at the object's base plus its address.
        let notes =
            unsafe { std::slice::from_raw_parts(start as *const u8, header.p_memsz as usize) };
        if let Some(id) = gnu_build_id(notes) {
            *found = Some(id.to_vec());
            break;
        }
    }
    // The main program comes first: nothing after it is ours to read.
    1
}

/// The descriptor of the `NT_GNU_BUILD_ID` note among `notes` (a PT_NOTE
/// segment: notes of a 4-byte-aligned header, name and descriptor).
fn gnu_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let align = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let name_len = word(notes, 0)? as usize;
        let desc_len = word(notes, 4)? as usize;
        let kind = word(notes, 8)?;
        let name_end = 12usize.checked_add(align(name_len)?)?;
        let desc_end = name_end.checked_add(align(desc_len)?)?;
        let name = notes.get(12..12 + name_len)?;
        let desc = notes.get(name_end..name_end.checked_add(desc_len)?)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(desc);
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// A hash of the running executable's contents, for one linked without a
/// build-id.
fn executable_hash() -> Option<u64> {
    let bytes = std::fs::read("/proc/self/exe").ok()?;
    Some(xxhash_rust::xxh3::xxh3_64(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
        n.extend_from_slice(&kind.to_ne_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn the_build_id_note_is_found_among_others() {
        let mut notes = note(b"GNU\0", 1, &[0; 16]);
        notes.extend(note(b"stapsdt\0", 3, &[9; 7]));
        notes.extend(note(b"GNU\0", 3, &[1, 2, 3, 4, 5]));
        assert_eq!(gnu_build_id(&notes), Some(&[1u8, 2, 3, 4, 5][..]));
        assert_eq!(gnu_build_id(&notes[..notes.len() - 8]), None);
        assert_eq!(gnu_build_id(&note(b"GNU\0", 1, &[7; 20])), None);
        assert_eq!(gnu_build_id(&[]), None);
    }

    #[test]
    fn this_executable_has_a_build_id() {
        // The linkers of the systems we run on add one; without it the
        // fingerprint falls back to hashing the executable.
        assert!(build_id().is_some_and(|id| id.len() >= 8));
    }
}
