//! Helpers shared by the fuzz targets of this package.

use std::io::Read;

/// A reader over a byte slice that hands out at most `chunk` bytes per `read` call (1 to 256),
/// so the stream decoders' partial-read loops run on every input, not just whole-buffer reads.
#[derive(Debug)]
pub struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl<'a> Chunked<'a> {
    /// A reader over `data` returning `1 + chunk_hint % 256` bytes at most per call.
    pub fn new(data: &'a [u8], chunk_hint: u8) -> Self {
        Self {
            data,
            chunk: 1 + usize::from(chunk_hint),
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> &'a [u8] {
        self.data
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Splits `n` bytes off the front of `data` as a little-endian integer (missing bytes are zero).
pub fn take_u64(data: &mut &[u8], n: usize) -> u64 {
    let n = n.min(8).min(data.len());
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    u64::from_le_bytes(b)
}
