//! The `Multiplex` call: many subscriptions of one client over one stream,
//! each with its own credit, framing, end and resume; and the fallback to
//! one `Subscribe` call per subscription against a server without it.

mod net_common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, Ready};
use futures::StreamExt;
use net_common::{until, Store, TOPIC};
use snapstream::event::{Message, Subject};
use snapstream::net::proto::mux_request::Kind;
use snapstream::net::proto::subscribe_request::Subject as WireSubject;
use snapstream::net::proto::subscriber_client::SubscriberClient;
use snapstream::net::proto::{self, MuxCredit, MuxOpen, MuxRequest};
use snapstream::net::{BinaryCodec, Client, RemoteError, RemoteRequest, RemoteSubscriber, Server};
use snapstream::publisher::Publisher;
use tokio::sync::mpsc;
use tonic::codegen::http;
use tonic::Code;

async fn serve(publisher: Publisher<u64>) -> Server {
    Server::builder(publisher, BinaryCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn client(server: &Server, multiplex: bool) -> Client<u64, BinaryCodec> {
    Client::builder([format!("http://{}", server.local_addr())])
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .multiplex(multiplex)
        .build::<u64>()
        .unwrap()
}

/// Reads `sub` until its view holds sequence `last` of its key: every
/// message in order, as (index, sequence) per event, with the framing.
async fn read_until(sub: &mut RemoteSubscriber<u64>, last: u64) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("a message within 20 s")
            .expect("the stream goes on")
            .expect("no error");
        let mut done = false;
        match &m {
            Message::Events(batch) => {
                for e in batch.iter() {
                    seen.push(format!("{}:{}", e.index(), e.payload()));
                    done |= *e.payload() == last;
                }
            }
            Message::EndOfSnapshot { index } => seen.push(format!("end@{index}")),
            Message::NewSnapshotToFollow => seen.push("new".into()),
        }
        if done {
            return seen;
        }
    }
}

/// The sequences of the events in `seen` ("index:sequence" entries).
fn sequences(seen: &[String]) -> Vec<u64> {
    seen.iter()
        .map(|s| s.split(':').nth(1).unwrap().parse().unwrap())
        .collect()
}

/// The live sequences a subscriber saw after its snapshot: 1, 2, ... in order.
fn live_sequences(seen: &[String]) -> Vec<u64> {
    let end = seen.iter().position(|s| s.starts_with("end@")).unwrap();
    sequences(&seen[end + 1..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscriptions_share_one_call_and_see_what_separate_calls_see() {
    const KEYS: usize = 10;
    const SUBS_PER_KEY: usize = 20;
    const WRITES: u64 = 30;
    let store = Store::default();
    let publisher = store.publisher();
    for k in 0..KEYS {
        store.write(&publisher, &format!("k{k}"));
    }
    let server = serve(publisher.clone()).await;
    let stats = server.stats_handle();
    let (muxed, single) = (client(&server, true), client(&server, false));
    let mut subs = Vec::new();
    for k in 0..KEYS {
        for s in 0..SUBS_PER_KEY {
            let c = if s % 2 == 0 { &muxed } else { &single };
            let mut sub = c.subscribe(RemoteRequest::new(TOPIC, Subject::key(format!("k{k}"))));
            // The snapshot first, so that every subscriber sees every write.
            let first = sub.next().await.unwrap().unwrap();
            assert_eq!(first.events().unwrap().len(), 1);
            subs.push((k, s, sub));
        }
    }
    let s = stats.stats();
    assert_eq!(s.open_streams, KEYS * SUBS_PER_KEY);
    assert_eq!(
        s.multiplexed_calls, 1,
        "one call carries every multiplexed subscription"
    );
    for _ in 0..WRITES {
        for k in 0..KEYS {
            store.write(&publisher, &format!("k{k}"));
        }
    }
    let mut per_key: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (k, s, sub) in &mut subs {
        let seen = read_until(sub, WRITES + 1).await;
        assert_eq!(
            live_sequences(&seen),
            (2..=WRITES + 1).collect::<Vec<_>>(),
            "key {k}, subscriber {s}: every write once, in order"
        );
        // Multiplexed or not, every subscriber of a key sees the same messages.
        match per_key.get(k) {
            None => {
                per_key.insert(*k, seen);
            }
            Some(first) => assert_eq!(first, &seen, "key {k}, subscriber {s}"),
        }
        assert_eq!(sub.reconnects(), 0);
    }
    drop(subs);
    until(&stats, |s| s.open_streams == 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_holds_up_nobody_else_on_the_call() {
    const WRITES: u64 = 3_000;
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "slow");
    store.write(&publisher, "fast");
    let server = serve(publisher.clone()).await;
    let c = client(&server, true);
    let mut slow = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("slow")));
    let mut fast = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("fast")));
    for sub in [&mut slow, &mut fast] {
        assert!(sub.next().await.unwrap().unwrap().events().is_some());
        assert!(matches!(
            sub.next().await.unwrap().unwrap(),
            Message::EndOfSnapshot { .. }
        ));
    }
    // `slow` is not read while both keys change, one write per publish: far
    // more responses than its credit and its reader's buffer hold.
    let writer = {
        let (store, publisher) = (store.clone(), publisher.clone());
        tokio::spawn(async move {
            for i in 0..WRITES {
                store.write(&publisher, "slow");
                store.write(&publisher, "fast");
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let seen = read_until(&mut fast, WRITES + 1).await;
    assert_eq!(sequences(&seen), (2..=WRITES + 1).collect::<Vec<_>>());
    writer.await.unwrap();
    // Then `slow` gets everything too, in order: held back, not lost.
    let seen = read_until(&mut slow, WRITES + 1).await;
    assert_eq!(sequences(&seen), (2..=WRITES + 1).collect::<Vec<_>>());
    assert_eq!(slow.reconnects() + fast.reconnects(), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn dropping_one_subscription_ends_only_its_stream() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let server = serve(publisher.clone()).await;
    let stats = server.stats_handle();
    let c = client(&server, true);
    let mut keep = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("a")));
    let mut gone = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("a")));
    for sub in [&mut keep, &mut gone] {
        assert!(sub.next().await.unwrap().unwrap().events().is_some());
    }
    assert_eq!(stats.stats().open_streams, 2);
    drop(gone);
    let s = until(&stats, |s| s.open_streams == 1).await;
    assert_eq!(s.streams_ended.client_gone, 1);
    store.write(&publisher, "a");
    let seen = read_until(&mut keep, 2).await;
    assert_eq!(seen.last().unwrap(), "2:2");
    assert_eq!(stats.stats().multiplexed_calls, 1);
    server.shutdown().await.unwrap();
}

/// A raw `Multiplex` call: its request sender and its responses.
async fn raw_call(
    server: &Server,
) -> (
    mpsc::UnboundedSender<MuxRequest>,
    tonic::Streaming<proto::MuxResponse>,
) {
    raw_call_with(server, false).await
}

/// A raw `Multiplex` call that asks for shared items when `shared`.
async fn raw_call_with(
    server: &Server,
    shared: bool,
) -> (
    mpsc::UnboundedSender<MuxRequest>,
    tonic::Streaming<proto::MuxResponse>,
) {
    let mut c = SubscriberClient::connect(format!("http://{}", server.local_addr()))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut request = tonic::Request::new(requests);
    if shared {
        request
            .metadata_mut()
            .insert("snapstream-mux-shared", "1".parse().unwrap());
    }
    let responses = c.multiplex(request).await.unwrap().into_inner();
    (tx, responses)
}

fn open(id: u64, topic: &str, key: Option<&str>, credit: u32) -> MuxRequest {
    let request = key.map(|k| proto::SubscribeRequest {
        topic: topic.into(),
        subject: Some(WireSubject::Key(k.into())),
        index: 0,
        token: String::new(),
        resnapshot_on_lag: false,
    });
    MuxRequest {
        kind: Some(Kind::Open(MuxOpen {
            id,
            request,
            credit,
        })),
    }
}

/// The next items of a raw call, until `n` arrived.
async fn items(
    responses: &mut tonic::Streaming<proto::MuxResponse>,
    n: usize,
) -> Vec<proto::MuxItem> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("a response within 10 s")
            .unwrap()
            .expect("the call goes on");
        out.extend(r.items);
    }
    out
}

#[tokio::test]
async fn bad_requests_on_the_call_end_only_their_subscription() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let server = serve(publisher.clone()).await;
    let (tx, mut responses) = raw_call(&server).await;
    // A good subscription with room for exactly one response (its snapshot).
    tx.send(open(1, TOPIC, Some("a"), 1)).unwrap();
    let first = items(&mut responses, 1).await;
    assert_eq!((first[0].id, first[0].end.is_none()), (1, true));
    assert!(!first[0].frames.is_empty());

    tx.send(open(1, TOPIC, Some("a"), 1)).unwrap(); // duplicate id
    tx.send(open(2, TOPIC, None, 1)).unwrap(); // no request
    tx.send(open(3, "nope", Some("a"), 1)).unwrap(); // unknown topic
    tx.send(MuxRequest {
        kind: Some(Kind::Credit(MuxCredit {
            id: 99,
            responses: 5,
        })),
    })
    .unwrap(); // credit for nobody: ignored
    tx.send(MuxRequest {
        kind: Some(Kind::Close(98)),
    })
    .unwrap(); // ignored
    tx.send(MuxRequest { kind: None }).unwrap(); // ignored
    let ends: BTreeMap<u64, Code> = items(&mut responses, 3)
        .await
        .into_iter()
        .map(|i| (i.id, Code::from_i32(i.end.expect("an end item").code)))
        .collect();
    assert_eq!(
        ends,
        BTreeMap::from([
            (1, Code::InvalidArgument),
            (2, Code::InvalidArgument),
            (3, Code::NotFound),
        ])
    );
    assert_eq!(
        server.stats().open_streams,
        1,
        "the first subscription lives on"
    );

    // Out of credit, subscription 1 holds its next response back until given
    // more: a subscription opened after the write gets its snapshot first.
    store.write(&publisher, "a");
    tx.send(open(4, TOPIC, Some("a"), 1)).unwrap();
    let mut before = Vec::new();
    while !before.iter().any(|i: &proto::MuxItem| i.id == 4) {
        before.extend(items(&mut responses, 1).await);
    }
    assert!(before.iter().all(|i| i.id == 4), "{before:?}");
    tx.send(MuxRequest {
        kind: Some(Kind::Credit(MuxCredit {
            id: 1,
            responses: 1,
        })),
    })
    .unwrap();
    let next = items(&mut responses, 1).await;
    assert_eq!(next[0].id, 1);
    assert!(next[0].end.is_none());

    // Closing it ends its stream on the server; half-closing the call with
    // nothing open ends the call cleanly.
    tx.send(MuxRequest {
        kind: Some(Kind::Close(1)),
    })
    .unwrap();
    tx.send(MuxRequest {
        kind: Some(Kind::Close(4)),
    })
    .unwrap();
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert_eq!(server.stats().open_streams, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_open_too_large_for_the_server_ends_only_its_subscription() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .max_request_size(1024)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let c = client(&server, true);
    let mut keep = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("a")));
    let seen = read_until(&mut keep, 1).await;
    assert_eq!(seen.last().unwrap(), "1:1");
    // The client knows the server's limit from the call's headers and ends
    // the oversized open itself, as the server would end such a `Subscribe`.
    let mut big = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("x".repeat(4096))));
    let end = tokio::time::timeout(Duration::from_secs(10), big.next())
        .await
        .expect("an answer within 10 s");
    assert!(
        matches!(
            end,
            Some(Err(RemoteError::Rejected {
                code: Code::OutOfRange,
                ..
            }))
        ),
        "{end:?}"
    );
    assert!(
        big.next().await.is_none(),
        "the stream ends after its error"
    );
    assert_eq!(big.reconnects(), 0, "a terminal answer is not retried");
    // The call it shared goes on: the other subscription still gets events.
    store.write(&publisher, "a");
    let seen = read_until(&mut keep, 2).await;
    assert_eq!(seen.last().unwrap(), "2:2");
    assert_eq!(keep.reconnects(), 0);
    assert_eq!(server.stats().multiplexed_calls, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_the_server_cannot_read_ends_the_call_with_why() {
    let publisher = Store::default().publisher();
    let server = Server::builder(publisher, BinaryCodec)
        .max_request_size(1024)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (tx, mut responses) = raw_call(&server).await;
    tx.send(open(1, TOPIC, Some(&"x".repeat(4096)), 1)).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("an answer within 10 s");
    assert_eq!(end.unwrap_err().code(), Code::OutOfRange);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_each_subscription_then_the_call_with_unavailable() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let server = serve(publisher.clone()).await;
    let (tx, mut responses) = raw_call(&server).await;
    tx.send(open(7, TOPIC, Some("a"), 8)).unwrap();
    tx.send(open(8, TOPIC, Some("a"), 8)).unwrap();
    items(&mut responses, 2).await;
    let stats = server.stats_handle();
    let shutdown = tokio::spawn(server.shutdown());
    let mut ended = BTreeMap::new();
    let last = loop {
        match responses.message().await {
            Ok(Some(r)) => {
                for i in r.items {
                    if let Some(end) = i.end {
                        ended.insert(i.id, Code::from_i32(end.code));
                    }
                }
            }
            other => break other,
        }
    };
    assert_eq!(
        ended,
        BTreeMap::from([(7, Code::Unavailable), (8, Code::Unavailable)])
    );
    assert_eq!(last.unwrap_err().code(), Code::Unavailable);
    // The client never half-closed: the shutdown does not wait for it.
    shutdown.await.unwrap().unwrap();
    drop(tx);
    assert_eq!(stats.stats().streams_ended.shutdown, 2);
}

/// The subscribe service with `Multiplex` answered `UNIMPLEMENTED`, as a
/// server from before it would.
#[derive(Clone)]
struct WithoutMux<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for WithoutMux<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for WithoutMux<S>
where
    S: tonic::codegen::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
    >,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<S::Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path().ends_with("/Multiplex") {
            let status = tonic::Status::unimplemented("no Multiplex here");
            return Either::Right(futures::future::ready(Ok(status.into_http())));
        }
        Either::Left(self.0.call(req))
    }
}

#[tokio::test]
async fn against_a_server_without_multiplex_the_client_subscribes_one_call_each() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let service = Server::builder(publisher.clone(), BinaryCodec).service();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = tonic::transport::Server::builder().add_service(WithoutMux(service.grpc()));
    let task = tokio::spawn(
        router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let c = Client::builder([format!("http://{addr}")])
        .multiplex(true)
        .build::<u64>()
        .unwrap();
    let mut subs: Vec<_> = (0..3)
        .map(|_| c.subscribe(RemoteRequest::new(TOPIC, Subject::key("a"))))
        .collect();
    for sub in &mut subs {
        let seen = read_until(sub, 1).await;
        assert_eq!(seen, ["1:1"]);
    }
    store.write(&publisher, "a");
    for sub in &mut subs {
        let seen = read_until(sub, 2).await;
        assert_eq!(seen, ["end@1", "2:2"]);
        assert_eq!(sub.reconnects(), 0, "falling back is not a reconnect");
    }
    let s = service.stats();
    assert_eq!((s.open_streams, s.multiplexed_calls), (3, 0));
    service.shutdown();
    drop(subs);
    task.abort();
}

/// A reader that goes away while its key is quiet ends its subscription on
/// the server then, not at the next message for the key (which may never
/// come): with and without `Multiplex`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_quiet_subscriber_ends_its_stream_on_the_server() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "quiet");
    let server = Server::builder(publisher, BinaryCodec)
        // No progress marks: nothing at all comes for the key.
        .progress_interval(None)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let stats = server.stats_handle();
    for multiplex in [true, false] {
        let c = client(&server, multiplex);
        let mut subs: Vec<_> = (0..3)
            .map(|_| c.subscribe(RemoteRequest::new(TOPIC, Subject::key("quiet"))))
            .collect();
        for sub in &mut subs {
            loop {
                let m = sub.next().await.unwrap().unwrap();
                if matches!(m, Message::EndOfSnapshot { .. }) {
                    break;
                }
            }
        }
        assert_eq!(stats.stats().open_streams, 3, "multiplex {multiplex}");
        drop(subs.pop());
        let s = until(&stats, |s| s.open_streams == 2).await;
        assert_eq!(s.open_streams, 2, "multiplex {multiplex}");
        // The client itself gone too: every stream ends.
        drop(subs);
        drop(c);
        until(&stats, |s| s.open_streams == 0).await;
    }
}

/// The (id, sequence) of every event the items carry, for each
/// subscription an item is for (its `id` and `also`).
fn per_subscription(items: &[proto::MuxItem], into: &mut BTreeMap<u64, Vec<u64>>) {
    for item in items {
        assert!(item.end.is_none(), "no subscription ended: {item:?}");
        for id in std::iter::once(item.id).chain(item.also.iter().copied()) {
            let seen = into.entry(id).or_default();
            for frame in &item.frames {
                if let Some(proto::frame::Kind::Events(batch)) = &frame.kind {
                    for e in &batch.events {
                        // The binary codec's u64: 8 bytes, little-endian.
                        let bytes: [u8; 8] = e.payload[..].try_into().expect("a u64 payload");
                        seen.push(u64::from_le_bytes(bytes));
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_change_for_many_subscriptions_is_one_item_to_a_client_that_asks() {
    const SUBS: u64 = 50;
    for shared in [false, true] {
        let store = Store::default();
        let publisher = store.publisher();
        store.write(&publisher, "a");
        let server = serve(publisher.clone()).await;
        let (tx, mut responses) = raw_call_with(&server, shared).await;
        for id in 0..SUBS {
            tx.send(open(id, TOPIC, Some("a"), 16)).unwrap();
        }
        // Every subscription's snapshot (sequence 1), however it comes.
        let mut seen = BTreeMap::new();
        while seen.len() < SUBS as usize || seen.values().any(|s: &Vec<u64>| s.is_empty()) {
            per_subscription(&items(&mut responses, 1).await, &mut seen);
        }
        assert!(seen.values().all(|s| s == &[1]), "{seen:?}");
        // One change, for all of them: the test's thread runs the server
        // only once the publish woke every subscription.
        store.write(&publisher, "a");
        let live = items(&mut responses, 1).await;
        let mut after = BTreeMap::new();
        per_subscription(&live, &mut after);
        if shared {
            assert_eq!(live.len(), 1, "one item for every subscription");
            let mut ids: Vec<u64> = std::iter::once(live[0].id)
                .chain(live[0].also.iter().copied())
                .collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..SUBS).collect::<Vec<_>>(), "each once");
        } else {
            let more = items(&mut responses, SUBS as usize - live.len()).await;
            per_subscription(&more, &mut after);
            assert!(live.iter().chain(&more).all(|i| i.also.is_empty()));
            assert_eq!(live.len() + more.len(), SUBS as usize, "one item each");
        }
        assert_eq!(after.len(), SUBS as usize);
        assert!(after.values().all(|s| s == &[2]), "{after:?}");
        drop(tx);
        server.shutdown().await.unwrap();
    }
}

/// Subscriptions of one key on a call with shared items, whose readers read
/// at different paces (each subscription is held to its own credit, so
/// they can fall apart on the server): each still gets every change once,
/// in order. A stress test of the whole path; the rule that keeps each
/// subscription's order when they do fall apart within one message is
/// proven by the server's `Pack` tests (`src/net/server/mux.rs`), which
/// fail without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_items_keep_each_subscriptions_order_as_subscriptions_drift_apart() {
    const SUBS: usize = 24;
    const WRITES: u64 = 600;
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "a");
    let server = serve(publisher.clone()).await;
    let c = Client::builder([format!("http://{}", server.local_addr())])
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .buffer(1)
        .build::<u64>()
        .unwrap();
    let mut readers = Vec::new();
    for i in 0..SUBS {
        let mut sub = c.subscribe(RemoteRequest::new(TOPIC, Subject::key("a")));
        // The snapshot first, so that every subscriber sees every write.
        assert!(sub.next().await.unwrap().unwrap().events().is_some());
        readers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0;
            while seen.last() != Some(&(WRITES + 1)) {
                let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                    .await
                    .expect("a message within 30 s")
                    .expect("the stream goes on")
                    .expect("no error");
                if let Message::Events(batch) = m {
                    seen.extend(batch.iter().map(|e| *e.payload()));
                }
                // Reader i yields i % 4 times per message: some keep up,
                // some fall behind.
                n += 1;
                for _ in 0..(i + n) % 4 {
                    tokio::task::yield_now().await;
                }
            }
            (seen, sub.reconnects())
        }));
    }
    for i in 0..WRITES {
        store.write(&publisher, "a");
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for (i, r) in readers.into_iter().enumerate() {
        let (seen, reconnects) = r.await.unwrap();
        assert_eq!(
            seen,
            (2..=WRITES + 1).collect::<Vec<_>>(),
            "subscriber {i}: every change once, in order"
        );
        assert_eq!(reconnects, 0);
    }
    server.shutdown().await.unwrap();
}
