//! Buffers for reads and writes around the page cache (`O_DIRECT`).
//!
//! `O_DIRECT` needs buffer addresses, offsets and lengths aligned to the device's logical
//! block ([`ALIGN`]). Past that, the memory behind a buffer decides how fast the transfer is
//! in a virtual machine: the host serves each physically contiguous piece of a guest's
//! request on its own, and a buffer of ordinary pages is up to one 4 KiB piece per page (a
//! 4 MiB read, 1024 of them, which the block layer also splits at the device's segment
//! limit). A buffer on transparent huge pages is one piece per 2 MiB. On the 2-vCPU
//! Firecracker VM of these notes (virtio-blk, 254 segments per request), reading a 2 GiB
//! file cold with `O_DIRECT` went from 1.4 GB/s to 3.0 GB/s and writing one from 1.9 GB/s to
//! 3.1 GB/s (docs/DESIGN.md, "Buffers on huge pages"). So a buffer of [`HUGE_PAGE`] or more
//! starts on a 2 MiB boundary of a mapping of its own, and its whole 2 MiB pieces are
//! advised as huge pages; the rest of it (under 2 MiB) is ordinary pages, so that the
//! memory it takes is its size, not its size rounded up to huge pages. Where transparent
//! huge pages are off, the advice does nothing and the buffer works as before.

use memmap2::{Advice, MmapMut};

/// `O_DIRECT` needs offsets, lengths and buffer addresses aligned to the logical block
/// size; 4096 covers every common device.
pub const ALIGN: usize = 4096;

/// A transparent huge page on x86-64 and on aarch64 with 4 KiB pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// A buffer whose bytes start at an [`ALIGN`] boundary, as `O_DIRECT` reads and writes
/// need; reused from transfer to transfer, so it is mapped (and its pages touched) once.
#[derive(Default)]
pub struct AlignedBuf {
    /// Anonymous memory (zero until written), page-aligned; `None` until first needed.
    mem: Option<MmapMut>,
    /// Where the buffer starts in `mem` (a 2 MiB boundary for a buffer of huge pages).
    start: usize,
    /// The bytes from `start` it was mapped for: its capacity. The mapping goes on past
    /// them (up to a huge page of slack to align `start`), address space that is never
    /// touched, and not counted: a budget of buffers counts the memory they can take.
    span: usize,
    /// The bytes in use: those last filled.
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl AlignedBuf {
    /// `len` zero bytes (filled by the caller through [`AlignedBuf::bytes_mut`]), as the
    /// buffers of `O_DIRECT` writes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::default();
        buf.span(len);
        buf.len = len;
        buf
    }

    /// A buffer of `len` bytes (rounded up to whole [`ALIGN`] blocks) whose memory is mapped
    /// and faulted in now, empty: the transfers into it never wait for new pages.
    pub fn populated(len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::default();
        let span = buf.span(len);
        let len = span.len();
        if let Some(mem) = &buf.mem {
            // One system call where the kernel has it (Linux 5.14), else a write per page.
            if mem
                .advise_range(Advice::PopulateWrite, buf.start, len)
                .is_err()
            {
                buf.span(len).iter_mut().step_by(ALIGN).for_each(|b| *b = 0);
            }
        }
        buf
    }

    /// Bytes the buffer holds without mapping anew.
    pub fn capacity(&self) -> usize {
        self.span
    }

    /// The first `len` bytes rounded up to whole [`ALIGN`] blocks, to fill: the memory
    /// mapped anew (zero) if it is too small, otherwise as last left.
    pub(crate) fn span(&mut self, len: usize) -> &mut [u8] {
        let span = capacity_for(len);
        if self.capacity() < span {
            self.len = 0;
            let (mem, start) = map(span);
            (self.mem, self.start, self.span) = (Some(mem), start, span);
        }
        match &mut self.mem {
            Some(mem) => &mut mem[self.start..self.start + span],
            None => &mut [], // span 0: nothing was ever needed
        }
    }

    /// The bytes last filled.
    pub fn bytes(&self) -> &[u8] {
        self.mem
            .as_ref()
            .map_or(&[], |m| &m[self.start..self.start + self.len])
    }

    /// The same bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.span(len)[..len]
    }

    /// Mark the first `len` bytes of the span as filled.
    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity());
        self.len = len;
    }
}

/// The memory a buffer of `len` bytes takes: whole ALIGN blocks.
pub fn capacity_for(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

/// Anonymous memory for `span` bytes (a multiple of ALIGN), and where in it they start: from
/// [`HUGE_PAGE`] on, a mapping one huge page larger (address space only: the slack is never
/// touched), the bytes starting at its first 2 MiB boundary, their whole 2 MiB pieces advised
/// as huge pages.
fn map(span: usize) -> (MmapMut, usize) {
    let huge = span >= HUGE_PAGE;
    let size = if huge { span + HUGE_PAGE } else { span };
    let mem = MmapMut::map_anon(size).unwrap_or_else(|e| {
        // As a failed allocation of the same size would: there is no memory to go on with.
        panic!("cannot map {size} bytes of memory for an I/O buffer: {e}")
    });
    if !huge {
        return (mem, 0);
    }
    let start = (mem.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - mem.as_ptr() as usize;
    // Only advice: where transparent huge pages are off the buffer is as before.
    let _ = mem.advise_range(Advice::HugePage, start, span / HUGE_PAGE * HUGE_PAGE);
    (mem, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_aligned_whole_blocks_and_grow_only_when_needed() {
        let mut buf = AlignedBuf::default();
        assert!(buf.bytes().is_empty() && buf.capacity() == 0);
        assert!(buf.span(0).is_empty());
        let span = buf.span(100);
        assert_eq!(span.len(), ALIGN);
        assert_eq!(span.as_ptr() as usize % ALIGN, 0);
        span[..3].copy_from_slice(b"abc");
        buf.set_len(3);
        assert_eq!(buf.bytes(), b"abc");
        // A smaller span keeps the memory and its bytes.
        assert_eq!(buf.span(10).len(), ALIGN);
        assert_eq!(&buf.bytes_mut()[..], b"abc");
        // A larger one maps anew, from HUGE_PAGE on starting on a huge page.
        let span = buf.span(HUGE_PAGE + 1);
        assert_eq!(span.len(), HUGE_PAGE + ALIGN);
        assert_eq!(span.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(span.iter().all(|&b| b == 0));
        assert_eq!(
            buf.capacity(),
            HUGE_PAGE + ALIGN,
            "the span mapped, not the alignment's slack"
        );
        assert!(
            buf.bytes().is_empty(),
            "nothing filled in the new memory yet"
        );
        buf.span(HUGE_PAGE + 1)[HUGE_PAGE] = 7;
        buf.set_len(HUGE_PAGE + 1);
        assert_eq!(buf.bytes()[HUGE_PAGE], 7);
        assert_eq!(capacity_for(HUGE_PAGE + 1), HUGE_PAGE + ALIGN);
    }

    #[test]
    fn zeroed_buffers_hold_len_zero_bytes() {
        for len in [0, 1, ALIGN, 3 * ALIGN + 5, 16 << 20] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.bytes().len(), len);
            assert!(buf.bytes_mut().iter().all(|&b| b == 0));
            assert!(buf.capacity() >= len);
        }
    }
}
