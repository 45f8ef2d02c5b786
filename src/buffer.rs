//! Fixed-size byte buffers and the per-worker pool they come from.
//!
//! A buffer never grows: the relay parks at most one buffer's worth of bytes per direction, and a direction whose
//! buffer is not empty stops reading its source. That is the whole backpressure story, and it bounds memory per
//! connection by construction.

/// A fixed-capacity byte queue: `data()` is what was filled and not yet consumed, `space()` is where to read next.
pub struct Buffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    /// A zeroed buffer of `capacity` bytes (allocated once, reused through the pool).
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Total capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The bytes filled and not yet consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Free room after the data; shifts the data to the front first when less than half the buffer is free
    /// behind it (so a reader always gets a useful amount of room, and `is_full` means really full).
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 2 {
            self.shift();
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written into `space()`.
    pub fn fill(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Drops `n` bytes from the front of `data()`.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Moves the data to the front of the buffer.
    pub fn shift(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Appends as much of `bytes` as fits; returns how many were taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if self.buf.len() - self.end < bytes.len() {
            self.shift();
        }
        let space = self.space();
        let n = space.len().min(bytes.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.fill(n);
        n
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// True when no more bytes fit, even after shifting.
    pub fn is_full(&self) -> bool {
        self.len() == self.buf.len()
    }

    /// Forgets all bytes.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// A per-worker free list of equally sized buffers. `take` never fails (it allocates when the list is empty), but
/// the pool counts buffers in use so the worker can stop accepting new connections when it reaches its limit.
pub struct BufferPool {
    free: Vec<Buffer>,
    size: usize,
    in_use: usize,
    limit: usize,
    max_free: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers; accepting pauses once `limit` are in use; at most `max_free` are kept idle.
    pub fn new(size: usize, limit: usize, max_free: usize) -> BufferPool {
        BufferPool {
            free: Vec::new(),
            size,
            in_use: 0,
            limit,
            max_free,
        }
    }

    /// A cleared buffer of the pool's size.
    pub fn take(&mut self) -> Buffer {
        self.in_use += 1;
        match self.free.pop() {
            Some(b) => b,
            None => Buffer::new(self.size),
        }
    }

    /// Returns a buffer; buffers of another size (grown for HTTP heads, never counted) are simply dropped.
    pub fn give(&mut self, mut buf: Buffer) {
        if buf.capacity() != self.size {
            return;
        }
        self.in_use = self.in_use.saturating_sub(1);
        if self.free.len() < self.max_free {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Buffers handed out and not yet returned.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// True when no new connection should be accepted until buffers come back.
    pub fn exhausted(&self) -> bool {
        self.in_use >= self.limit
    }

    /// The size of every pooled buffer.
    pub fn buffer_size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_consume_shift() {
        let mut b = Buffer::new(8);
        assert_eq!(b.push(b"abcdef"), 6);
        b.consume(4);
        assert_eq!(b.data(), b"ef");
        assert_eq!(b.push(b"ghijkl"), 6);
        assert_eq!(b.data(), b"efghijkl");
        assert!(b.is_full());
        assert_eq!(b.push(b"x"), 0);
        b.consume(8);
        assert!(b.is_empty());
        assert_eq!(b.space().len(), 8);
    }

    #[test]
    fn pool_counts_and_recycles() {
        let mut p = BufferPool::new(16, 2, 1);
        let a = p.take();
        let b = p.take();
        assert!(p.exhausted());
        p.give(a);
        p.give(b);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.free.len(), 1);
        p.give(Buffer::new(99));
        assert_eq!(p.free.len(), 1);
    }
}
