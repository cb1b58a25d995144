//! What one direction holds for a destination that is behind: bytes copied
//! out of the worker's shared buffer ring, so that a slow or stalled peer
//! never keeps ring buffers from every other connection.
//!
//! The bytes sit in chunks on the heap. A send in flight reads the front
//! chunk, so the front never moves while it is being sent: new bytes join
//! the back chunk, or a new one.

use std::collections::VecDeque;

/// Bytes gathered into one chunk before a new one is started: small
/// pieces (pipelined replies) go out in one send.
const CHUNK: usize = 16 * 1024;

#[derive(Default)]
pub struct Backlog {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already sent.
    sent: usize,
    /// Bytes not sent yet.
    len: usize,
    /// The first `own` bytes not sent yet are sluice's (a PROXY header),
    /// not the peer's: they are not counted as bytes relayed.
    own: usize,
}

impl Backlog {
    /// Bytes not sent yet.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `bytes` at the back. `front_busy`: a send from the front chunk
    /// is in flight, so the front chunk must not grow (it could move).
    pub fn push(&mut self, bytes: &[u8], front_busy: bool) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        let busy = front_busy && self.chunks.len() == 1;
        match self.chunks.back_mut() {
            Some(back) if !busy && back.len() + bytes.len() <= CHUNK => {
                back.extend_from_slice(bytes);
            }
            _ => self.chunks.push_back(bytes.to_vec()),
        }
    }

    /// Puts `bytes` before everything held; `own`: they are sluice's own
    /// (a PROXY header). Only before any of the front chunk was sent.
    pub fn push_front(&mut self, bytes: Vec<u8>, own: bool) {
        if bytes.is_empty() {
            return;
        }
        debug_assert_eq!(self.sent, 0, "the front chunk is partly sent");
        debug_assert!(own || self.own == 0, "the peer's bytes before sluice's");
        self.len += bytes.len();
        if own {
            self.own += bytes.len();
        }
        self.chunks.push_front(bytes);
    }

    /// The bytes to send next: the rest of the front chunk.
    pub fn next(&self) -> Option<&[u8]> {
        self.chunks.front().map(|chunk| &chunk[self.sent..])
    }

    /// `n` bytes of [`next`](Self::next) were sent; returns how many of
    /// them were the peer's.
    pub fn sent(&mut self, n: usize) -> usize {
        let front = self.chunks.front().map_or(0, Vec::len);
        debug_assert!(
            self.sent + n <= front,
            "more sent than the front chunk holds"
        );
        self.sent += n;
        self.len -= n;
        if self.sent == front {
            self.chunks.pop_front();
            self.sent = 0;
        }
        let own = n.min(self.own);
        self.own -= own;
        n - own
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends everything in pieces of at most `piece`; what was sent, and
    /// how much of it counted as the peer's.
    fn send_all(backlog: &mut Backlog, piece: usize) -> (Vec<u8>, usize) {
        let (mut out, mut counted) = (Vec::new(), 0);
        while let Some(next) = backlog.next() {
            let n = next.len().min(piece);
            out.extend_from_slice(&next[..n]);
            counted += backlog.sent(n);
        }
        assert!(backlog.is_empty());
        (out, counted)
    }

    #[test]
    fn bytes_leave_in_order_and_sluices_own_are_not_counted() {
        let mut backlog = Backlog::default();
        backlog.push(b"world", false);
        backlog.push_front(b"hello ".to_vec(), false);
        backlog.push_front(b"PROXY ...\r\n".to_vec(), true);
        backlog.push(b"!", false);
        assert_eq!(backlog.len(), 23);
        let (out, counted) = send_all(&mut backlog, 4);
        assert_eq!(out, b"PROXY ...\r\nhello world!");
        assert_eq!(counted, 12);
    }

    #[test]
    fn small_pieces_gather_into_one_chunk_unless_it_is_being_sent() {
        let mut backlog = Backlog::default();
        backlog.push(b"a", false);
        backlog.push(b"b", false);
        assert_eq!(backlog.next(), Some(&b"ab"[..]));
        // A send of "ab" is in flight: its chunk must stay as it is.
        backlog.push(b"c", true);
        backlog.push(b"d", true);
        assert_eq!(backlog.next(), Some(&b"ab"[..]));
        assert_eq!(backlog.sent(2), 2);
        assert_eq!(backlog.next(), Some(&b"cd"[..]));
    }

    #[test]
    fn a_chunk_grows_no_larger_than_a_chunk() {
        let mut backlog = Backlog::default();
        let big = vec![7u8; CHUNK - 1];
        backlog.push(&big, false);
        backlog.push(b"xy", false);
        assert_eq!(backlog.next().map(<[u8]>::len), Some(CHUNK - 1));
        assert_eq!(backlog.len(), CHUNK + 1);
        let (out, counted) = send_all(&mut backlog, 1000);
        assert_eq!(counted, CHUNK + 1);
        assert_eq!(&out[CHUNK - 1..], b"xy");
    }
}
