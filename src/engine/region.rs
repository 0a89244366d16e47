//! The parent's side of the region a pool worker shares with it: the
//! worker's status page and the bulk arena after it (the layout is
//! `procpool_worker::wire::region`'s).

use std::os::fd::{AsFd, BorrowedFd};

/// The parent's view of a worker's status page (see
/// `procpool_worker::status`) and of the bulk arena after it (see
/// `procpool_worker::wire::region`).
pub(crate) struct StatusPage {
    map: memmap2::MmapMut,
    fd: std::os::fd::OwnedFd,
    arena_half: usize,
}

impl StatusPage {
    /// A zeroed region with an arena of two halves of `arena_half` bytes;
    /// its pages cost memory only once written.
    pub(crate) fn new(arena_half: usize) -> std::io::Result<StatusPage> {
        let len = procpool_worker::wire::region::region_bytes(arena_half);
        // SAFETY: the name is a NUL-terminated literal; the flags are constants.
        let raw = unsafe { libc::memfd_create(c"procpool-status".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let file = std::fs::File::from(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw)
        });
        file.set_len(len as u64)?;
        // SAFETY: a private memfd of ours, shared only with the one worker,
        // which writes the status words through atomics only, and the
        // arena only in spans we do not touch (see `procpool_worker::wire::region`).
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }?;
        Ok(StatusPage {
            map,
            fd: file.into(),
            arena_half,
        })
    }

    /// The descriptor the worker maps.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The shared words.
    pub(crate) fn words(&self) -> &procpool_worker::wire::region::StatusWords {
        // SAFETY: the mapping is page-aligned, at least a page long, and
        // outlives the borrow; both processes use it through atomics only.
        unsafe { &*(self.map.as_ptr() as *const procpool_worker::wire::region::StatusWords) }
    }

    /// Bytes in each half of the arena (0: no arena).
    pub(crate) fn arena_half(&self) -> usize {
        self.arena_half
    }

    /// Writes `parts`, back to back, at `offset` in the parent's half.
    ///
    /// The span must be one the worker is not reading: one the parent's
    /// ring handed out and has not released. Returns false, having written
    /// nothing, if the span is not inside the half.
    pub(crate) fn write_batch(&mut self, offset: usize, parts: &[&[u8]]) -> bool {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if offset.saturating_add(total) > self.arena_half {
            return false;
        }
        let mut at = procpool_worker::wire::region::to_worker_offset() + offset;
        for part in parts {
            // SAFETY: checked above to lie inside the parent's half, which
            // the worker only reads, and only in spans whose frame it got.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    part.as_ptr(),
                    self.map.as_mut_ptr().add(at),
                    part.len(),
                );
            }
            at += part.len();
        }
        true
    }

    /// The results body at the span a RESULTS_IN_ARENA frame names, if it
    /// is inside the worker's half.
    pub(crate) fn results_span(&self, frame_body: &[u8]) -> Option<&[u8]> {
        let (offset, len) =
            procpool_worker::wire::region::parse_span_frame_body(frame_body, self.arena_half)?;
        let at = procpool_worker::wire::region::from_worker_offset(self.arena_half) + offset;
        // SAFETY: the span lies inside the worker's half of our mapping. The
        // worker wrote it before it sent the frame we read, and does not
        // write it again until we count it in `results_released`, after the
        // last use of this borrow (see `Engine::collect_frames`).
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at), len) })
    }
}
