//! 1,000 remote subscribers on one server, over one client connection;
//! 100 of them stop reading: the server's memory for them stays bounded
//! by the publisher's lag limit, and they are told they lagged.

mod net_common;

use futures::StreamExt;
use net_common::{Store, TOPIC};
use snapstream::event::{Message, Subject};
use snapstream::net::{BinaryCodec, Client, RemoteError, RemoteRequest, RemoteSubscriber, Server};

const LAG_LIMIT: u64 = 256;

async fn until_end_of_snapshot(sub: &mut RemoteSubscriber<u64>) -> u64 {
    loop {
        if let Message::EndOfSnapshot { index } = sub.next().await.unwrap().unwrap() {
            return index;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_remote_subscribers_and_a_hundred_stalled_ones() {
    let store = Store::default();
    let publisher = store.publisher_with_lag_limit(LAG_LIMIT);
    for k in 0..100 {
        store.write(&publisher, &format!("k{k}"));
    }
    store.write(&publisher, "hot");
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::builder([format!("http://{}", server.local_addr())])
        .build::<u64>()
        .unwrap();

    let mut readers: Vec<_> = (0..900)
        .map(|n| {
            client.subscribe(RemoteRequest::new(
                TOPIC,
                Subject::key(format!("k{}", n % 100)),
            ))
        })
        .collect();
    let mut stalled: Vec<_> = (0..100)
        .map(|_| client.subscribe(RemoteRequest::new(TOPIC, Subject::key("hot"))))
        .collect();
    for s in readers.iter_mut().chain(stalled.iter_mut()) {
        assert!(until_end_of_snapshot(s).await >= 1);
    }
    assert_eq!(server.active_streams(), 1_000);
    assert_eq!(publisher.stats().subscribers(), 1_000);

    // Every reader gets its key's change.
    let mut written = Vec::new();
    for k in 0..100 {
        written.push(store.write(&publisher, &format!("k{k}")));
    }
    for (n, s) in readers.iter_mut().enumerate() {
        let m = s.next().await.unwrap().unwrap();
        assert_eq!(m.events().unwrap().index(), written[n % 100]);
    }

    // The stalled ones read nothing while "hot" changes 50,000 times.
    for _ in 0..50_000 {
        store.write(&publisher, "hot");
    }
    let stats = publisher.stats();
    let hot = stats.topics[0]
        .keys
        .iter()
        .find(|k| k.subject == Subject::key("hot"))
        .map(|k| k.retained)
        .unwrap_or(0);
    assert!(
        hot <= LAG_LIMIT * 3 / 2,
        "the hot key retains {hot} batches, above 1.5 x the lag limit {LAG_LIMIT}"
    );
    // Each stalled subscriber drains what was in flight, then learns it lagged.
    for s in &mut stalled {
        let end = loop {
            match s.next().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(end, RemoteError::Lagged { limit: LAG_LIMIT });
    }
    // The readers were not disturbed.
    assert_eq!(publisher.stats().subscribers(), 900);
    server.shutdown().await.unwrap();
}
