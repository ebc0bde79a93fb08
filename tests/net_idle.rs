//! The server's idle timeout: a connection that carries no subscribe stream
//! for the timeout is closed, one with an open stream is not (keepalive
//! pings do not count as activity), and snapstream's client subscribes
//! again over a new connection.

mod net_common;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use net_common::{Store, TOPIC};
use snapstream::event::{Message, Subject};
use snapstream::net::proto::frame::Kind;
use snapstream::net::proto::subscribe_request::Subject as WireSubject;
use snapstream::net::proto::subscriber_client::SubscriberClient;
use snapstream::net::proto::SubscribeRequest as WireRequest;
use snapstream::net::{BinaryCodec, Client, RemoteRequest, RemoteSubscriber, Server};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint, Uri};

const IDLE: Duration = Duration::from_millis(200);
/// Bounds a wait that must end; never reached when the code is right.
const BOUND: Duration = Duration::from_secs(30);

/// What the client's sockets saw: how many were opened, and how many the
/// server closed (a read that returned end of file or an error).
#[derive(Default)]
struct Sockets {
    opened: AtomicUsize,
    closed: AtomicUsize,
    closed_signal: Notify,
}

/// A client socket that reports the server closing it.
struct Watched {
    io: TcpStream,
    sockets: Arc<Sockets>,
    reported: bool,
}

impl Watched {
    fn report_closed(&mut self) {
        if !self.reported {
            self.reported = true;
            self.sockets.closed.fetch_add(1, Ordering::SeqCst);
            self.sockets.closed_signal.notify_waiters();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.report_closed()
            }
            Poll::Ready(Err(_)) => this.report_closed(),
            _ => {}
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A channel to `addr` whose sockets are watched.
async fn watched_channel(addr: std::net::SocketAddr, sockets: Arc<Sockets>) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sockets = sockets.clone();
            async move {
                let io = TcpStream::connect(addr).await?;
                sockets.opened.fetch_add(1, Ordering::SeqCst);
                Ok::<_, io::Error>(TokioIo::new(Watched {
                    io,
                    sockets,
                    reported: false,
                }))
            }
        }))
        .await
        .unwrap()
}

/// Waits until `n` sockets were closed by the server.
async fn closed(sockets: &Sockets, n: usize) {
    tokio::time::timeout(BOUND, async {
        loop {
            let signal = sockets.closed_signal.notified();
            if sockets.closed.load(Ordering::SeqCst) >= n {
                return;
            }
            signal.await;
        }
    })
    .await
    .expect("the server never closed the idle connection");
}

fn request(key: &str) -> WireRequest {
    WireRequest {
        topic: TOPIC.into(),
        subject: Some(WireSubject::Key(key.into())),
        index: 0,
        token: String::new(),
        resnapshot_on_lag: false,
    }
}

/// Reads frames until the end of the snapshot.
async fn read_snapshot(stream: &mut tonic::Streaming<snapstream::net::proto::SubscribeResponse>) {
    loop {
        let msg = stream.message().await.unwrap().expect("stream ended");
        if msg
            .frames
            .iter()
            .any(|f| matches!(f.kind, Some(Kind::EndOfSnapshot(_))))
        {
            return;
        }
    }
}

/// A store with key `a` written once, and a server over it with the short
/// idle timeout.
async fn idle_server() -> (Store, snapstream::publisher::Publisher<u64>, Server) {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .idle_timeout(Some(IDLE))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (store, publisher, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_once_its_last_stream_ended_not_before() {
    let (store, publisher, server) = idle_server().await;
    let sockets = Arc::new(Sockets::default());
    let mut client =
        SubscriberClient::new(watched_channel(server.local_addr(), sockets.clone()).await);

    let mut stream = client.subscribe(request("a")).await.unwrap().into_inner();
    read_snapshot(&mut stream).await;
    // While the stream is open the connection outlives the idle timeout
    // many times over, and keeps delivering.
    for _ in 0..5 {
        tokio::time::sleep(IDLE).await;
        let index = store.write(&publisher, "a");
        let msg = stream.message().await.unwrap().expect("stream ended");
        let got: Vec<u64> = msg
            .frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::Events(b)) => Some(b.events.iter().map(|e| e.index)),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(got, vec![index]);
    }
    assert_eq!(
        sockets.closed.load(Ordering::SeqCst),
        0,
        "closed with a stream open"
    );
    assert_eq!(sockets.opened.load(Ordering::SeqCst), 1);

    // The client ends its stream: the connection now carries none and is closed.
    drop(stream);
    closed(&sockets, 1).await;
    assert_eq!(server.stats().open_streams, 0);

    assert_eq!(server.stats().connections_closed_idle, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_opens_a_stream_is_closed() {
    let store = Store::default();
    let publisher = store.publisher();
    let server = Server::builder(publisher, BinaryCodec)
        .idle_timeout(Some(IDLE))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let sockets = Arc::new(Sockets::default());
    // Connected (HTTP/2 handshake done), but no request is ever made.
    let _channel = watched_channel(server.local_addr(), sockets.clone()).await;
    closed(&sockets, 1).await;
    assert_eq!(sockets.opened.load(Ordering::SeqCst), 1);
    assert_eq!(server.stats().connections_closed_idle, 1);
    server.shutdown().await.unwrap();
}

/// snapstream's `Client` subscribes again over a new connection after the
/// server closed its idle one: the new subscription gets its snapshot and
/// then live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_subscribes_again_after_an_idle_close() {
    let (store, publisher, server) = idle_server().await;
    let client = Client::builder([format!("http://{}", server.local_addr())])
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .build::<u64>()
        .unwrap();
    let first_snapshot = |mut sub: RemoteSubscriber<u64>| async move {
        loop {
            if let Message::EndOfSnapshot { index } = sub.recv().await.unwrap() {
                return (sub, index);
            }
        }
    };
    let (sub, _) =
        first_snapshot(client.subscribe(RemoteRequest::new(TOPIC, Subject::key("a")))).await;
    drop(sub);
    // The server closes the connection once it carries no stream; its
    // counter is the only witness the test has of the client's socket.
    tokio::time::timeout(BOUND, async {
        while server.stats().connections_closed_idle == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the idle connection was never closed");

    let (mut sub, at) =
        first_snapshot(client.subscribe(RemoteRequest::new(TOPIC, Subject::key("a")))).await;
    let index = store.write(&publisher, "a");
    assert!(index > at);
    let got = loop {
        match sub.recv().await.unwrap() {
            Message::Events(batch) if !batch.is_empty() => break batch[0].index(),
            _ => {}
        }
    };
    assert_eq!(got, index);
    server.shutdown().await.unwrap();
}
