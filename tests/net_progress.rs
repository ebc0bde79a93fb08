//! Progress marks: a quiet key of a busy topic gets its current index
//! periodically, and nothing else, until it changes.

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
    for _ in 0..3 {
        assert_eq!(next().await, Kind::Progress(at));
    }
    busy.abort();
    let _ = busy.await;

    // A change to the key arrives as usual; later marks carry its index.
    let changed = store.write(&publisher, "quiet");
    let kind = loop {
        match next().await {
            Kind::Progress(i) => assert_eq!(i, at),
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
