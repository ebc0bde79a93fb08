//! A server's `CatchUp`: a resume from an index its source has not reached
//! is not subscribed until the source gets there; when the wait gives up
//! the call ends with `UNAVAILABLE` and the client retries — never a
//! snapshot of older state. A fresh subscription (index 0) never waits.

mod net_common;

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use net_common::{Store, TOPIC};
use snapstream::event::{Message, Subject};
use snapstream::net::{BinaryCodec, CatchUp, Client, NotCaughtUp, RemoteRequest, Server};
use tokio::sync::watch;

const GUARD: Duration = Duration::from_secs(60);

/// A source whose applied index the test moves; gives up after `bound`.
struct Source {
    applied: watch::Receiver<u64>,
    bound: Duration,
}

impl CatchUp for Source {
    fn wait_for(&self, index: u64) -> BoxFuture<'static, Result<(), NotCaughtUp>> {
        let mut rx = self.applied.clone();
        let bound = self.bound;
        async move {
            let reached = tokio::time::timeout(bound, rx.wait_for(|&a| a >= index))
                .await
                .is_ok_and(|r| r.is_ok());
            if reached {
                Ok(())
            } else {
                Err(NotCaughtUp {
                    requested: index,
                    applied: *rx.borrow(),
                })
            }
        }
        .boxed()
    }
}

async fn setup(bound: Duration) -> (Store, watch::Sender<u64>, Server, Client<u64, BinaryCodec>) {
    let store = Store::default();
    let publisher = store.publisher();
    for k in 0..3 {
        store.write(&publisher, &format!("k{k}"));
    }
    let (tx, rx) = watch::channel(3);
    let server = Server::builder(publisher, BinaryCodec)
        .catch_up(Source { applied: rx, bound })
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::builder([format!("http://{}", server.local_addr())])
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .build::<u64>()
        .unwrap();
    (store, tx, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_ahead_of_the_source_waits_until_it_catches_up() {
    let (_store, applied, server, client) = setup(GUARD).await;
    // Index 0 does not wait.
    let mut fresh = client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard));
    loop {
        let m = tokio::time::timeout(GUARD, fresh.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(m, Message::EndOfSnapshot { .. }) {
            break;
        }
    }
    assert_eq!(server.active_streams(), 1);

    // Index 7: the source is at 3; the call waits and nothing is subscribed.
    let mut ahead = client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard).index(7));
    let _waiting = applied.subscribe();
    tokio::time::timeout(GUARD, async {
        // The server's wait holds a receiver of the source's watch.
        while applied.receiver_count() < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the server waits on the source");
    assert_eq!(
        server.active_streams(),
        1,
        "nothing subscribed while waiting"
    );
    assert!(ahead.next().now_or_never().is_none(), "nothing served");
    assert_eq!(ahead.reconnects(), 0);

    // The source reaches 7: the call is subscribed.
    applied.send_replace(7);
    tokio::time::timeout(GUARD, async {
        while server.active_streams() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("subscribed once caught up");
    assert_eq!(ahead.reconnects(), 0, "one call, no retry");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_wait_ends_with_unavailable_and_the_client_retries() {
    let (_store, _applied, server, client) = setup(Duration::from_millis(20)).await;
    let mut ahead = client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard).index(9));
    tokio::time::timeout(GUARD, async {
        while ahead.reconnects() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the client retries after each refusal");
    assert!(
        ahead.next().now_or_never().is_none(),
        "no message: no snapshot of older state"
    );
    assert_eq!(server.active_streams(), 0);
    server.shutdown().await.unwrap();
}
