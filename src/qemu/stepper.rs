//! The one input loop the three parsers share: gather a header of N bytes into a fixed
//! buffer across any chunk splits, then skip a body of M bytes by count.
//!
//! [`Stepper`] is sans-IO and knows nothing of the grammar: the parser tells it what to
//! want next ([`Stepper::gather`], [`Stepper::skip`], ...), and each [`Stepper::step`]
//! consumes a prefix of the input and says how many bytes it used and whether a unit is
//! complete. Headers are copied into the buffer (at most [`MAX_HEADER_BYTES`]); bodies are
//! never copied or looked at, skipping one is a subtraction from the bytes left.

use super::MAX_HEADER_BYTES;

/// What the stepper is doing with the next input bytes. `H` tags a header (what it is for
/// the parser), `B` the body being skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want<H, B> {
    /// Gather bytes until the buffer holds this many, then report `Step::Header`.
    Header(usize, H),
    /// Consume this many bytes unseen, then report `Step::Body`.
    Body(u64, B),
    /// Consume bytes unseen up to and including the first one equal to this byte, which
    /// becomes a 1-byte header reported as `Step::Header`.
    Find(u8, H),
    /// Consume everything: the parser no longer understands this stream.
    Opaque,
}

/// What one [`Stepper::step`] completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step<H, B> {
    /// The bytes went towards the current unit, which is not complete yet.
    Pending,
    /// The header is complete: [`Stepper::header`] holds it.
    Header(H),
    /// The body has been skipped.
    Body(B),
    /// The bytes were consumed in opaque mode.
    Opaque,
}

/// Header gathering and body skipping over a fixed buffer.
#[derive(Debug)]
pub(super) struct Stepper<H, B> {
    want: Want<H, B>,
    buf: [u8; MAX_HEADER_BYTES],
    /// Bytes gathered towards the current header.
    len: usize,
    /// Length of the last complete header in `buf`.
    done: usize,
}

impl<H: Copy, B: Copy> Stepper<H, B> {
    /// A stepper that starts by wanting `want`.
    pub(super) fn new(want: Want<H, B>) -> Self {
        Stepper {
            want,
            buf: [0; MAX_HEADER_BYTES],
            len: 0,
            done: 0,
        }
    }

    /// The current want.
    pub(super) fn want(&self) -> Want<H, B> {
        self.want
    }

    /// Bytes of the header in progress gathered so far (0 at a unit boundary).
    pub(super) fn gathered(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The last complete header (or, after [`Stepper::gather`] of 0 bytes, nothing).
    pub(super) fn header(&self) -> &[u8] {
        &self.buf[..self.done]
    }

    /// Wants a fresh header of `n` bytes (`n <= MAX_HEADER_BYTES`; the caller acts at once
    /// on a header of 0 bytes, which [`Stepper::step`] never reports).
    pub(super) fn gather(&mut self, n: usize, h: H) {
        debug_assert!(n <= MAX_HEADER_BYTES);
        self.len = 0;
        self.done = 0;
        self.want = Want::Header(n.min(MAX_HEADER_BYTES), h);
    }

    /// Wants the last complete header extended to `n` bytes in all: its bytes stay the
    /// first ones of the new header.
    pub(super) fn gather_more(&mut self, n: usize, h: H) {
        debug_assert!(self.done <= n && n <= MAX_HEADER_BYTES);
        self.len = self.done;
        self.want = Want::Header(n.min(MAX_HEADER_BYTES), h);
    }

    /// Wants a body of `n` bytes skipped.
    pub(super) fn skip(&mut self, n: u64, b: B) {
        self.len = 0;
        self.want = Want::Body(n, b);
    }

    /// Wants the input skipped up to the next `byte`.
    pub(super) fn find(&mut self, byte: u8, h: H) {
        self.len = 0;
        self.want = Want::Find(byte, h);
    }

    /// Consumes the rest of the stream unseen.
    pub(super) fn opaque(&mut self) {
        self.len = 0;
        self.want = Want::Opaque;
    }

    /// Consumes a prefix of `d` towards the current want; returns the bytes used and what
    /// completed. A completed unit keeps the want until the caller sets the next one.
    #[inline]
    pub(super) fn step(&mut self, d: &[u8]) -> (usize, Step<H, B>) {
        match self.want {
            Want::Body(left, b) => {
                let take = left.min(d.len() as u64);
                let left = left - take;
                if left == 0 {
                    (take as usize, Step::Body(b))
                } else {
                    self.want = Want::Body(left, b);
                    (take as usize, Step::Pending)
                }
            }
            Want::Header(n, h) => {
                let take = (n - self.len).min(d.len());
                self.buf[self.len..self.len + take].copy_from_slice(&d[..take]);
                self.len += take;
                if self.len == n {
                    self.done = n;
                    self.len = 0;
                    (take, Step::Header(h))
                } else {
                    (take, Step::Pending)
                }
            }
            Want::Find(byte, h) => match d.iter().position(|&c| c == byte) {
                None => (d.len(), Step::Pending),
                Some(k) => {
                    self.buf[0] = byte;
                    self.done = 1;
                    self.len = 0;
                    (k + 1, Step::Header(h))
                }
            },
            Want::Opaque => (d.len(), Step::Opaque),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = Stepper<u8, u8>;

    /// Feeds `chunks` until each is used up, collecting what completed.
    fn drive(s: &mut S, chunks: &[&[u8]], mut on: impl FnMut(&mut S, Step<u8, u8>)) -> usize {
        let mut used = 0;
        for c in chunks {
            let mut i = 0;
            while i < c.len() {
                let (n, step) = s.step(&c[i..]);
                i += n;
                used += n;
                on(s, step);
            }
        }
        used
    }

    #[test]
    fn header_across_splits_then_body_by_count() {
        let data: Vec<u8> = (0..20).collect();
        for cut in 1..data.len() {
            let mut s = S::new(Want::Header(4, 1));
            let mut seen = Vec::new();
            let used = drive(
                &mut s,
                &[&data[..cut], &data[cut..]],
                |s, step| match step {
                    Step::Header(1) => {
                        seen.push(s.header().to_vec());
                        s.skip(10, 2);
                    }
                    Step::Body(2) => s.gather(6, 3),
                    Step::Header(3) => {
                        seen.push(s.header().to_vec());
                        s.opaque();
                    }
                    Step::Pending | Step::Opaque => {}
                    other => panic!("{other:?}"),
                },
            );
            assert_eq!(used, data.len());
            assert_eq!(seen, vec![vec![0, 1, 2, 3], vec![14, 15, 16, 17, 18, 19]]);
        }
    }

    #[test]
    fn gather_more_keeps_the_header_and_find_stops_on_the_byte() {
        let mut s = S::new(Want::Find(0x7e, 1));
        let (n, step) = s.step(&[1, 2, 0x7e, 9, 8, 7]);
        assert_eq!((n, step), (3, Step::Header(1)));
        assert_eq!(s.header(), &[0x7e]);
        s.gather_more(3, 2);
        let (n, step) = s.step(&[9]);
        assert_eq!((n, step), (1, Step::Pending));
        assert_eq!(s.gathered(), &[0x7e, 9]);
        let (n, step) = s.step(&[8, 7]);
        assert_eq!((n, step), (1, Step::Header(2)));
        assert_eq!(s.header(), &[0x7e, 9, 8]);
        assert!(s.gathered().is_empty());
    }
}
