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

/// An entry of the ring as the kernel lays it out (`struct io_uring_buf`).
/// The last field of entry 0 is the ring's tail, which the kernel reads at
/// any time: entries are written field by field, never through a
/// reference to a whole entry.
#[repr(C)]
struct Entry {
    addr: u64,
    len: u32,
    bid: u16,
    /// Entry 0's is the tail.
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<Entry>() == std::mem::size_of::<BufRingEntry>());

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
        let ring = Mapping::new(usize::from(count) * std::mem::size_of::<Entry>())?;
        let memory = Mapping::new(usize::from(count) * size as usize)?;
        // SAFETY: the ring memory is page-aligned and as large as `count`
        // entries. It must live as long as the registration: the worker
        // declares its io_uring before its `Buffers`, so the ring (and the
        // registration with it) goes first. Where a `Buffers` goes first
        // (the probe), the kernel still holds its pages: no harm.
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
    /// Both come from the kernel's completion, and are checked all the
    /// same: a slice beyond the mapping would be undefined behaviour.
    pub fn bytes(&self, id: u16, len: usize) -> &[u8] {
        assert!(
            len <= self.size as usize,
            "a receive longer than its buffer"
        );
        // SAFETY: `start_of` checks the id, and `len` fits the buffer, so
        // the slice lies within the mapping; the kernel wrote `len` bytes
        // to it before posting the completion that lent it, and takes the
        // buffer back only once it is given back.
        unsafe { std::slice::from_raw_parts(self.start_of(id), len) }
    }

    /// Returns buffer `id` to the kernel.
    pub fn give_back(&mut self, id: u16) {
        debug_assert!(self.lent > 0);
        let start = self.start_of(id);
        let mask = self.count - 1;
        let entry = self.ring.addr().cast::<Entry>();
        // SAFETY: the index is masked into the ring's `count` entries. The
        // kernel reads only the entries between its head and the published
        // tail, so this one (at the tail) is ours until the tail moves past
        // it; its fields are written one by one, so no reference covers
        // entry 0's last field, the tail the kernel reads.
        unsafe {
            let entry = entry.add(usize::from(self.tail & mask));
            std::ptr::addr_of_mut!((*entry).addr).write(start as u64);
            std::ptr::addr_of_mut!((*entry).len).write(self.size);
            std::ptr::addr_of_mut!((*entry).bid).write(id);
        }
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

    /// Where buffer `id` starts; a kernel's id beyond the ring is a bug
    /// that must not become memory out of bounds.
    fn start_of(&self, id: u16) -> *mut u8 {
        assert!(id < self.count, "buffer id {id} beyond the ring");
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
