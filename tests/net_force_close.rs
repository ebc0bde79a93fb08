//! A token revoked while 100 remote streams are open: all of them end with
//! the force-close status; other tokens' streams are untouched.

mod net_common;

use futures::StreamExt;
use net_common::{Store, TOPIC};
use snapstream::event::{Message, Subject};
use snapstream::net::{BinaryCodec, Client, RemoteError, RemoteRequest, RemoteSubscriber, Server};

async fn until_end_of_snapshot(sub: &mut RemoteSubscriber<u64>) {
    loop {
        match sub.next().await.unwrap().unwrap() {
            Message::EndOfSnapshot { .. } => return,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_ends_exactly_its_remote_streams() {
    let store = Store::default();
    let publisher = store.publisher();
    store.write(&publisher, "k");
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::builder([format!("http://{}", server.local_addr())])
        .build::<u64>()
        .unwrap();

    let mut revoked = Vec::new();
    let mut kept = Vec::new();
    for n in 0..100 {
        let key = format!("k{}", n % 10);
        revoked
            .push(client.subscribe(RemoteRequest::new(TOPIC, Subject::key(key)).token("revoked")));
    }
    for n in 0..20 {
        let key = format!("k{}", n % 10);
        kept.push(client.subscribe(RemoteRequest::new(TOPIC, Subject::key(key)).token("kept")));
    }
    for s in revoked.iter_mut().chain(kept.iter_mut()) {
        until_end_of_snapshot(s).await;
    }
    assert_eq!(server.active_streams(), 120);

    assert_eq!(publisher.force_close_token("revoked"), 100);
    for s in &mut revoked {
        assert_eq!(s.next().await, Some(Err(RemoteError::ForceClosed)));
        assert!(s.next().await.is_none());
        assert_eq!(s.reconnects(), 0, "a force-close is not retried");
    }

    // The other token's streams carry on, on the same connection.
    let mut written = Vec::new();
    for k in 0..10 {
        written.push(store.write(&publisher, &format!("k{k}")));
    }
    for (n, s) in kept.iter_mut().enumerate() {
        let m = s.next().await.unwrap().unwrap();
        let batch = m.events().expect("a live batch");
        assert_eq!(batch.index(), written[n % 10]);
        assert_eq!(s.reconnects(), 0);
    }
    assert_eq!(publisher.stats().subscribers(), 20);
    server.shutdown().await.unwrap();
    // A graceful shutdown ends the kept streams with UNAVAILABLE, which
    // the subscribers retry (here in vain: nothing listens any more).
    assert_eq!(publisher.stats().subscribers(), 0);
}
