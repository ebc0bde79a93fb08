//! Progress marks: a quiet key of a busy topic gets the topic's current
//! index periodically, and nothing else, until it changes; a client that
//! resumes at a mark after its key's buffer was freed continues live, with
//! no new snapshot.

mod net_common;

use std::time::Duration;

use net_common::{Store, TOPIC};
use snapstream::net::proto::frame::Kind;
use snapstream::net::proto::subscribe_request::Subject as WireSubject;
use snapstream::net::proto::subscriber_client::SubscriberClient;
use snapstream::net::proto::SubscribeRequest as WireRequest;
use snapstream::net::{BinaryCodec, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_key_gets_progress_marks() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "quiet");
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .progress_interval(Some(Duration::from_millis(20)))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut raw = SubscriberClient::connect(format!("http://{}", server.local_addr()))
        .await
        .unwrap();
    let request = |key: &str| WireRequest {
        topic: TOPIC.into(),
        subject: Some(WireSubject::Key(key.into())),
        index: 0,
        token: String::new(),
        resnapshot_on_lag: false,
    };
    let mut quiet = raw.subscribe(request("quiet")).await.unwrap().into_inner();
    let mut frames = Vec::new();
    let mut next = async || {
        while frames.is_empty() {
            frames = quiet.message().await.unwrap().unwrap().frames;
            frames.reverse();
        }
        frames.pop().unwrap().kind.unwrap()
    };
    assert!(matches!(next().await, Kind::Events(_)));
    let Kind::EndOfSnapshot(at) = next().await else {
        panic!("no EndOfSnapshot")
    };

    // The rest of the topic is busy (and a busy key has no quiet spell).
    let busy = {
        let (store, publisher) = (store.clone(), publisher.clone());
        tokio::spawn(async move {
            loop {
                store.write(&publisher, "busy");
                tokio::task::yield_now().await;
            }
        })
    };
    // The marks follow the topic: they never go back, never pass the
    // store, and move past the key's own index once the topic moved.
    let mut mark = at;
    while mark == at {
        let Kind::Progress(i) = next().await else {
            panic!("a quiet key got something other than a progress mark")
        };
        assert!(i >= mark, "mark {i} after {mark}");
        assert!(i <= store.0.lock().unwrap().index);
        mark = i;
    }
    for _ in 0..2 {
        let Kind::Progress(i) = next().await else {
            panic!("a quiet key got something other than a progress mark")
        };
        assert!(i >= mark, "mark {i} after {mark}");
        mark = i;
    }
    busy.abort();
    let _ = busy.await;

    // A change to the key arrives as usual; later marks carry its index.
    let changed = store.write(&publisher, "quiet");
    let kind = loop {
        match next().await {
            Kind::Progress(i) => assert!(i >= mark && i < changed, "mark {i}"),
            other => break other,
        }
    };
    let Kind::Events(batch) = kind else {
        panic!("expected the change")
    };
    assert_eq!(batch.events[0].index, changed);
    assert_eq!(next().await, Kind::Progress(changed));
    server.shutdown().await.unwrap();
}

/// A client that resumes at a progress mark after the server freed its
/// key's buffer (nobody watched the key meanwhile, the topic moved on)
/// continues live: no `NewSnapshotToFollow`, no snapshot built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_a_progress_mark_needs_no_snapshot() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "quiet");
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .progress_interval(Some(Duration::from_millis(20)))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut raw = SubscriberClient::connect(format!("http://{}", server.local_addr()))
        .await
        .unwrap();
    let request = |index: u64| WireRequest {
        topic: TOPIC.into(),
        subject: Some(WireSubject::Key("quiet".into())),
        index,
        token: String::new(),
        resnapshot_on_lag: false,
    };
    let mut stream = raw.subscribe(request(0)).await.unwrap().into_inner();
    let mut frames = Vec::new();
    let mut kinds = Vec::new();
    // Until a mark beyond the key's own index: the topic moved on.
    let mut at = None;
    let mark = loop {
        while frames.is_empty() {
            frames = stream.message().await.unwrap().unwrap().frames;
            frames.reverse();
        }
        let kind = frames.pop().unwrap().kind.unwrap();
        match kind {
            Kind::EndOfSnapshot(i) => at = Some(i),
            Kind::Progress(i) if at.is_some_and(|a| i > a) => break i,
            _ => {}
        }
        kinds.push(kind);
        store.write(&publisher, "busy");
    };
    drop(stream);
    // The server drops its subscription: the key's buffer goes.
    while publisher.stats().topics[0]
        .keys
        .iter()
        .any(|k| k.subject.as_key() == Some("quiet"))
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for _ in 0..100 {
        store.write(&publisher, "busy");
    }
    let builds = publisher.stats().cache_misses;
    let mut resumed = raw.subscribe(request(mark)).await.unwrap().into_inner();
    let changed = store.write(&publisher, "quiet");
    let first = loop {
        let frames = resumed.message().await.unwrap().unwrap().frames;
        if let Some(f) = frames
            .into_iter()
            .find(|f| !matches!(f.kind, Some(Kind::Progress(_))))
        {
            break f.kind.unwrap();
        }
    };
    let Kind::Events(batch) = first else {
        panic!("the resume began with {first:?}, not the next change")
    };
    assert_eq!(batch.events[0].index, changed);
    assert_eq!(publisher.stats().cache_misses, builds, "no snapshot built");
    server.shutdown().await.unwrap();
}
