//! A worker's provided-buffer ring: buffers the kernel picks from as
//! multishot receives complete, so that a connection waiting for bytes
//! holds no buffer of its own.
//!
//! The ring is a page-aligned array of entries (address, length, buffer
//! id) shared with the kernel: the kernel takes entries from the head, the
//! worker gives buffers back at the tail and publishes the new tail with a
//! release store. The buffers themselves are one anonymous mapping; pages
//! are only made resident once the kernel first writes to them.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// The buffer group id of the ring: one ring per worker.
pub const GROUP: u16 = 0;

pub struct Buffers {
    /// The ring's entries, `count` of them.
    ring: Mapping,
    /// The buffers, `count` × `size` bytes.
    memory: Mapping,
    count: u16,
    size: u32,
    /// The tail as published to the kernel.
    tail: u16,
    /// Buffers the kernel has handed out and the worker not given back.
    lent: u16,
}

impl Buffers {
    /// A ring of `count` buffers of `size` bytes, registered with the ring
    /// of `submitter`. `count` must be a power of two, at most 32768.
    pub fn new(submitter: &Submitter, count: u16, size: u32) -> io::Result<Buffers> {
        assert!(count.is_power_of_two() && count <= 1 << 15);
        let ring = Mapping::new(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let memory = Mapping::new(usize::from(count) * size as usize)?;
        // SAFETY: the ring memory is page-aligned, as large as `count`
        // entries, and lives as long as the registration (it is dropped
        // with the ring that holds the registration, after it).
        unsafe {
            submitter.register_buf_ring_with_flags(ring.addr() as u64, count, GROUP, 0)?;
        }
        let mut buffers = Buffers {
            ring,
            memory,
            count,
            size,
            tail: 0,
            lent: count,
        };
        for id in 0..count {
            buffers.give_back(id);
        }
        Ok(buffers)
    }

    /// The bytes buffer `id` holds, of which the first `len` were received.
    pub fn bytes(&self, id: u16, len: usize) -> &[u8] {
        debug_assert!(len <= self.size as usize);
        // SAFETY: the buffer lies within the mapping, and the kernel wrote
        // `len` bytes to it before posting the completion that lent it.
        unsafe { std::slice::from_raw_parts(self.start_of(id), len) }
    }

    /// Returns buffer `id` to the kernel.
    pub fn give_back(&mut self, id: u16) {
        debug_assert!(self.lent > 0 && id < self.count);
        let mask = self.count - 1;
        // SAFETY: the index is masked into the ring, and the kernel only
        // reads entries between its head and the published tail.
        let entry = unsafe {
            &mut *self
                .ring
                .addr()
                .cast::<BufRingEntry>()
                .add(usize::from(self.tail & mask))
        };
        entry.set_addr(self.start_of(id) as u64);
        entry.set_len(self.size);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.lent -= 1;
        // SAFETY: the tail field overlays the first entry's reserved
        // field, inside the mapping; the kernel reads it atomically.
        let tail = unsafe { &*BufRingEntry::tail(self.ring.addr().cast()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// Counts a buffer the kernel handed out with a completion.
    pub fn lend(&mut self) {
        self.lent += 1;
    }

    /// Buffers the kernel may still hand out.
    pub fn available(&self) -> u16 {
        self.count - self.lent
    }

    fn start_of(&self, id: u16) -> *mut u8 {
        // SAFETY: `id` < `count`, so the offset is within the mapping.
        unsafe { self.memory.addr().add(usize::from(id) * self.size as usize) }
    }
}

/// Anonymous, page-aligned memory, unmapped when dropped.
struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to
        // it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: NonNull::new(addr.cast()).expect("mmap never maps page 0"),
            len,
        })
    }

    fn addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}
