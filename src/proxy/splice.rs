//! Zero-copy forwarding (Linux `splice(2)`): socket → pipe → socket, the bytes never enter
//! user space. The pump uses it while nothing needs to look at the bytes (routes that do
//! not parse, TLS or otherwise opaque streams); it removes both copies of the copy path,
//! which were the largest share of migshaper's CPU at 10 Gb/s.
//!
//! Each call moves what the pipe can take; the pump always empties the pipe before it
//! fills it again, so a `WouldBlock` can only come from the socket, and tokio's readiness
//! for that socket is what is waited on.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};
use nix::libc;
use nix::unistd::pipe2;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// A pipe that carries one direction's chunks between the two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A non-blocking pipe of about `size` bytes (the kernel rounds to pages; it may refuse
    /// to grow a pipe past the per-user limit, and the default 64 KiB is kept then).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size));
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ)?;
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(0).max(1),
        })
    }

    /// Moves up to `len` bytes (at most the capacity) from `src` into the pipe, which must
    /// be empty. Returns 0 at end of stream.
    pub async fn fill(&self, src: &TcpStream, len: usize) -> io::Result<usize> {
        let len = len.min(self.capacity).max(1);
        loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), self.write.as_fd(), len)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// [`Pipe::fill`] without waiting: `WouldBlock` when `src` has nothing ready.
    pub fn try_fill(&self, src: &TcpStream, len: usize) -> io::Result<usize> {
        let len = len.min(self.capacity).max(1);
        src.try_io(Interest::READABLE, || {
            splice(src.as_fd(), self.write.as_fd(), len)
        })
    }

    /// Moves the `n` bytes the pipe holds into `dst`.
    pub async fn drain(&self, dst: &TcpStream, mut n: usize) -> io::Result<()> {
        while n > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(self.read.as_fd(), dst.as_fd(), n)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => n -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    Ok(nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )?)
}
