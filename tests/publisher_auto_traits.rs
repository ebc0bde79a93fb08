//! `Send`/`Sync`/`Unpin` of the publisher's public handles and futures.

use snapstream::event::{Event, EventBatch, Message, SharedPayload, Subject, Topic};
use snapstream::publisher::{
    PublishError, Publisher, PublisherStats, SnapshotError, SnapshotRequest, SnapshotSink,
    SubscribeError, SubscribeRequest, Subscription, SubscriptionError,
};

fn send_sync<T: Send + Sync>() {}
fn send_unpin<T: Send + Unpin>() {}
fn send<T: Send>(_: &T) {}

#[test]
fn handles_are_send_and_sync() {
    send_sync::<Publisher<u8>>();
    send_sync::<Subscription<u8>>();
    send_unpin::<Subscription<u8>>();
    send_sync::<SnapshotSink<u8>>();
    send_sync::<SnapshotRequest>();
    send_sync::<SubscribeRequest>();
    send_sync::<Event<u8>>();
    send_sync::<EventBatch<u8>>();
    send_sync::<SharedPayload<u8>>();
    send_sync::<Message<u8>>();
    send_sync::<Topic>();
    send_sync::<Subject>();
    send_sync::<PublishError<u8>>();
    send_sync::<SubscribeError>();
    send_sync::<SubscriptionError>();
    send_sync::<SnapshotError>();
    send_sync::<PublisherStats>();
}

/// Events, batches, payload handles and subscriptions are `Unpin` whatever
/// the payload is: they are handles, moving one never moves the payload.
#[test]
fn handles_are_unpin_for_any_payload() {
    fn unpin<T: Unpin>() {}
    type Pinned = std::marker::PhantomPinned;
    unpin::<Event<Pinned>>();
    unpin::<EventBatch<Pinned>>();
    unpin::<SharedPayload<Pinned>>();
    unpin::<Message<Pinned>>();
    unpin::<Subscription<Pinned>>();
}

#[tokio::test(flavor = "current_thread")]
async fn next_future_is_send() {
    let mut b = Publisher::<u8>::builder();
    b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async {
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    let mut sub = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    let fut = sub.next();
    send(&fut);
    assert!(fut.await.unwrap().is_framing());
}
