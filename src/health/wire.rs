//! A probe's connection: the stream, and what the server sent that the
//! conversation has not used yet. Every read is bounded: a server that talks
//! on without end fails the probe rather than fill memory.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{unexpected, ProbeFailure, MAX_REPLY_BYTES};
use crate::net;

pub struct Wire {
    stream: TcpStream,
    /// Read, not yet used.
    pub read: BytesMut,
}

impl Wire {
    pub fn new(socket: net::Socket) -> Result<Wire, ProbeFailure> {
        let stream = TcpStream::from_std(socket.into_inner())
            .map_err(|e| ProbeFailure::Io(e.to_string()))?;
        Ok(Wire {
            stream,
            read: BytesMut::with_capacity(4096),
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ProbeFailure> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| ProbeFailure::Io(format!("sending the probe: {e}")))
    }

    /// Reads what the server sends next onto `read`. A server that closes
    /// the connection, or sends more than a probe reads, fails; the failure
    /// quotes the bytes not yet used.
    pub async fn fill(&mut self) -> Result<(), ProbeFailure> {
        if self.read.len() >= MAX_REPLY_BYTES {
            return Err(unexpected(&self.read));
        }
        let n = self
            .stream
            .read_buf(&mut self.read)
            .await
            .map_err(|e| ProbeFailure::Io(format!("reading the reply: {e}")))?;
        if n == 0 {
            return Err(unexpected(&self.read));
        }
        Ok(())
    }
}
