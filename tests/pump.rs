//! The pump's two forwarding paths on real loopback sockets: the copy path (the tap sees
//! every byte) and the zero-copy path (splice through a pipe, the tap only counts), and a
//! switch between them mid-stream, as when the parser finds a stream opaque.

use std::sync::Arc;
use std::time::Duration;

use migshaper::link::{Direction, Link, Shape};
use migshaper::proxy::pump::{BufferBudget, RouteShare, pump};
use migshaper::tap::Tap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Sees bytes until `seen` reaches `look_for`, then only counts.
struct Recorder {
    look_for: usize,
    seen: Vec<u8>,
    unseen: u64,
}

impl Tap for Recorder {
    fn on_chunk(&mut self, chunk: &[u8]) {
        self.seen.extend_from_slice(chunk);
    }
    fn wants_bytes(&self) -> bool {
        self.seen.len() < self.look_for
    }
    fn on_unseen(&mut self, n: usize) {
        self.unseen += n as u64;
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// Sends `len` seeded bytes from a sender through a pump into a receiver; returns what
/// arrived, the pump's count, and its tap.
async fn through_pump(
    len: usize,
    shape: Shape,
    look_for: usize,
    zero_copy: bool,
) -> (Vec<u8>, Vec<u8>, u64, Recorder) {
    let link = Link::new(shape, Duration::ZERO);
    let (data, got, total, tap, _) = through_link(len, link, look_for, zero_copy).await;
    (data, got, total, tap)
}

/// [`through_pump`] on a given link; also returns the receiving socket the pump wrote to.
async fn through_link(
    len: usize,
    link: Link,
    look_for: usize,
    zero_copy: bool,
) -> (Vec<u8>, Vec<u8>, u64, Recorder, Arc<TcpStream>) {
    let (mut sender, src) = pair().await;
    let (dst, mut receiver) = pair().await;
    let dst = Arc::new(dst);
    let data: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let tap = Recorder {
        look_for,
        seen: Vec::new(),
        unseen: 0,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let share = RouteShare {
        wait: metrics::Gauge::noop(),
        budget: BufferBudget::new(slots, 1),
        zero_copy,
    };
    let pumped = tokio::spawn(pump(
        Arc::new(src),
        dst.clone(),
        link,
        Direction::ToDestination,
        CancellationToken::new(),
        share,
        tap,
    ));
    let send = data.clone();
    let writer = tokio::spawn(async move {
        sender.write_all(&send).await.unwrap();
        sender.shutdown().await.unwrap();
        sender
    });
    let mut got = Vec::with_capacity(len);
    receiver.read_to_end(&mut got).await.unwrap();
    let _sender = writer.await.unwrap();
    let (r, tap) = pumped.await.unwrap();
    (data, got, r.unwrap(), tap, dst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_path_forwards_unchanged_and_counts_every_byte() {
    const LEN: usize = 256 << 20;
    let (data, got, total, tap) = through_pump(LEN, Shape::UNLIMITED, 0, true).await;
    assert!(got == data, "the stream arrived changed");
    assert_eq!(total, LEN as u64);
    // The first read of a direction is copied (a pipe is only made for a busy one); the
    // rest went through the pipe, unseen.
    assert!(
        tap.seen.len() <= 256 * 1024,
        "{} bytes copied",
        tap.seen.len()
    );
    assert_eq!(tap.seen.len() as u64 + tap.unseen, LEN as u64);
    assert!(tap.unseen > (LEN / 2) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_zero_copy_mid_stream_keeps_order_and_counts() {
    const LEN: usize = 64 << 20;
    const LOOK: usize = 5_000_000;
    let rate = "2gbit".parse().unwrap();
    for shape in [
        Shape::UNLIMITED,
        Shape {
            rate,
            ..Shape::UNLIMITED
        },
    ] {
        let (data, got, total, tap) = through_pump(LEN, shape, LOOK, true).await;
        assert!(got == data, "the stream arrived changed ({shape:?})");
        assert_eq!(total, LEN as u64);
        // The tap saw exactly a prefix of the stream, then only counts.
        assert!(tap.seen.len() >= LOOK && tap.seen.len() < LOOK + 512 * 1024);
        assert!(data.starts_with(&tap.seen));
        assert_eq!(tap.seen.len() as u64 + tap.unseen, LEN as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_zero_copy_off_every_byte_is_copied() {
    const LEN: usize = 32 << 20;
    let (data, got, total, tap) = through_pump(LEN, Shape::UNLIMITED, 0, false).await;
    assert!(got == data, "the stream arrived changed");
    assert_eq!(total, LEN as u64);
    assert_eq!(tap.unseen, 0);
    assert!(tap.seen == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_pacing_sets_the_receiving_socket_and_keeps_the_bytes() {
    use migshaper::proxy::pace;
    const LEN: usize = 4_000_000;
    let (fresh, _peer) = pair().await;
    assert_eq!(
        pace::get(&fresh).unwrap(),
        None,
        "a fresh socket is not paced"
    );
    let link = Link::new(
        Shape {
            rate: "1g".parse().unwrap(),
            burst: "1ms".parse().unwrap(),
            framing: "none".parse().unwrap(),
        },
        Duration::ZERO,
    );
    link.pace_in_kernel();
    let (data, got, total, _, dst) = through_link(LEN, link.clone(), 0, true).await;
    assert_eq!(total, LEN as u64);
    assert!(got == data, "bytes changed or reordered");
    // 125 MB/s of payload plus the 0.2 % margin; unsent bytes capped at 4 ms of that.
    assert_eq!(pace::get(&dst).unwrap(), Some(125_250_000));
    assert_eq!(
        socket2::SockRef::from(&*dst).tcp_notsent_lowat().unwrap(),
        501_000
    );
    assert!(link.paced());
}
