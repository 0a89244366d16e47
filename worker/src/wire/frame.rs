//! Frames: how messages are cut out of a byte stream (a worker's pipes).
//! Each frame is a `u32` little-endian length (of tag and body), one tag
//! byte, and the body.

use std::io;
use std::os::fd::RawFd;

use crate::stamps::{Step, stamp};
use crate::sys;

/// Largest frame either side sends or accepts: a bigger length prefix
/// means a corrupted stream. Arguments and results that would not fit are
/// refused with a task error before they are sent.
pub const MAX_FRAME: usize = 1 << 31;
/// Largest buffer kept for reuse once empty: one rare huge frame should not
/// hold its memory for the life of the process.
pub const RETAINED_BUFFER_BYTES: usize = 64 << 20;

/// Appends a frame (`u32` little-endian length, tag byte, body) to `out`.
#[inline]
pub fn push_frame(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(tag);
    out.extend_from_slice(body);
}

/// Bytes before a frame's body: the `u32` length, then the tag.
pub const FRAME_HEADER: usize = 5;

/// Starts a frame whose body the caller appends; finish it with [`end_frame`].
#[inline]
pub fn begin_frame(out: &mut Vec<u8>, tag: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, tag]);
    start
}

/// Writes the length prefix of a frame begun at `start`.
#[inline]
pub fn end_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
}

/// What one read from the link produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// Some bytes arrived (frames may now be available).
    Data,
    /// The descriptor has nothing now (non-blocking descriptors only).
    Empty,
    /// The peer closed its end.
    Closed,
}

impl FrameReader {
    /// Reads what `fd` has into the buffer; blocks only if `fd` does.
    #[inline]
    pub fn fill(&mut self, fd: RawFd) -> io::Result<ReadStatus> {
        if self.start > 0 && self.start == self.buf.len() {
            if self.buf.capacity() > RETAINED_BUFFER_BYTES {
                self.buf = Vec::new();
            }
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 20) && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let want = self.needed().max(64 * 1024);
        stamp(Step::Read);
        let read = sys::read_append(fd, &mut self.buf, want);
        stamp(Step::ReadDone);
        match read {
            Ok(0) => Ok(ReadStatus::Closed),
            Ok(_) => Ok(ReadStatus::Data),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadStatus::Empty),
            Err(e) => Err(e),
        }
    }

    /// Bytes still missing for the frame at the head of the buffer.
    #[inline]
    fn needed(&self) -> usize {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return 4 - avail.len();
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            // Nothing more to wait for: `next_frame` reports the bad length.
            return 0;
        }
        (len + 4).saturating_sub(avail.len())
    }

    /// Whether the buffer already holds a complete frame.
    #[inline]
    pub fn has_frame(&self) -> bool {
        let avail = self.buf.len() - self.start;
        avail >= 5 && self.needed() == 0
    }

    /// The next complete frame as `(tag, body)`, if the buffer holds one.
    #[inline]
    pub fn next_frame(&mut self) -> io::Result<Option<(u8, &[u8])>> {
        let avail = &self.buf[self.start..];
        if avail.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad frame length {len}"),
            ));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let begin = self.start + 4;
        self.start = begin + len;
        Ok(Some((self.buf[begin], &self.buf[begin + 1..begin + len])))
    }

    /// Blocks until a whole frame is there and returns it, borrowed from the
    /// buffer; `None` when the peer closed first.
    pub fn read_frame(&mut self, fd: RawFd) -> io::Result<Option<(u8, &[u8])>> {
        while !self.has_frame() {
            if self.fill(fd)? == ReadStatus::Closed {
                return Ok(None);
            }
        }
        self.next_frame()
    }
}

/// Writes what the non-blocking `fd` takes now of `bytes`; `Ok(0)` when
/// full.
#[inline]
pub fn send_some(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    stamp(Step::Write);
    let sent = sys::write_some(fd, bytes);
    stamp(Step::WriteDone);
    sent
}

/// Writes all of `bytes` to `fd`, waiting for room as needed.
#[inline]
pub fn send_all(fd: RawFd, bytes: &[u8]) -> io::Result<()> {
    stamp(Step::Write);
    let sent = sys::write_all(fd, bytes);
    stamp(Step::WriteDone);
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn frames_come_whole_however_the_bytes_arrive() {
        let mut stream = Vec::new();
        push_frame(&mut stream, 7, b"first");
        push_frame(&mut stream, 8, &[5u8; 70_000]);
        push_frame(&mut stream, 9, b"");
        // Each piece fits in a pipe: it is drained before the next is written.
        for piece in [1, 2, 3, 5, 4096, 60_000] {
            let (read, write) = sys::pipe().unwrap();
            sys::set_nonblocking(read.as_raw_fd(), true).unwrap();
            let mut reader = FrameReader::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                sys::write_all(write.as_raw_fd(), chunk).unwrap();
                // Drain what is there; a frame is given only once whole.
                while reader.fill(read.as_raw_fd()).unwrap() == ReadStatus::Data {}
                while let Some((tag, body)) = reader.next_frame().unwrap() {
                    got.push((tag, body.len()));
                }
            }
            assert_eq!(got, [(7, 5), (8, 70_000), (9, 0)], "pieces of {piece}");
            drop(write);
            assert_eq!(reader.fill(read.as_raw_fd()).unwrap(), ReadStatus::Closed);
        }
    }

    #[test]
    fn a_bad_length_is_an_error_not_a_wait() {
        let mut reader = FrameReader::default();
        let (read, write) = sys::pipe().unwrap();
        sys::write_all(write.as_raw_fd(), &[0, 0, 0, 0, 1]).unwrap();
        reader.fill(read.as_raw_fd()).unwrap();
        assert!(reader.has_frame(), "nothing more to wait for");
        assert!(reader.next_frame().is_err());
    }
}
