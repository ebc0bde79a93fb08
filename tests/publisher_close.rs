//! Close reasons: force-close by token, refresh_topic, unsubscribe, shutdown;
//! first wins and sticks; a close beats a simultaneous event; the stream is
//! fused.

mod publisher_support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use futures::stream::{FusedStream, StreamExt};
use snapstream::event::Event;
use snapstream::publisher::{
    Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest, SubscriptionError,
};

use publisher_support::{builder, Store, View, TOPIC};

async fn past_snapshot(sub: &mut snapstream::publisher::Subscription<u64>) {
    let mut view = View::default();
    while !view.snapshot_done {
        view.apply(sub.next().await.unwrap());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn force_close_by_token_closes_only_that_token() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    // (An empty store's snapshot reports index 1: start past it.)
    store.write("x", 0);
    let mut a = p
        .subscribe(SubscribeRequest::new(TOPIC, "k").token("t1"))
        .unwrap();
    let mut a2 = p
        .subscribe(SubscribeRequest::new(TOPIC, "j").token("t1"))
        .unwrap();
    let mut b = p
        .subscribe(SubscribeRequest::new(TOPIC, "k").token("t2"))
        .unwrap();
    past_snapshot(&mut b).await;
    assert_eq!(p.force_close_token("t1"), 2);
    assert_eq!(a.next().await, Err(SubscriptionError::ForceClosed));
    assert_eq!(a2.next().await, Err(SubscriptionError::ForceClosed));
    store.write("k", 1);
    assert!(b.next().await.unwrap().events().is_some());
    assert_eq!(p.force_close_token("t1"), 0, "already gone");
    assert_eq!(
        p.stats().subscribers(),
        1,
        "closed subscriptions released their keys"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn refresh_topic_evicts_the_cache_and_force_closes_the_topic() {
    let store = Store::new(None);
    let mut b = builder();
    b.snapshot_cache_ttl(std::time::Duration::from_secs(60));
    b.register(
        "other",
        |_r: SnapshotRequest, _s: SnapshotSink<u64>| async { Ok(1) },
    )
    .unwrap();
    let p = store.publisher(&mut b);
    let mut s1 = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    past_snapshot(&mut s1).await;
    let mut other = p.subscribe(SubscribeRequest::new("other", "k")).unwrap();
    past_snapshot(&mut other).await;
    assert_eq!(p.refresh_topic(TOPIC), Ok(1));
    assert_eq!(s1.next().await, Err(SubscriptionError::ForceClosed));
    let mut s2 = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    past_snapshot(&mut s2).await;
    assert_eq!(store.calls.load(Ordering::SeqCst), 2, "cache evicted");
    p.publish(vec![Event::new("other", "k", 2, 2)]).unwrap();
    assert!(
        other.next().await.unwrap().events().is_some(),
        "other topic untouched"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_ends_every_subscription_even_a_waiting_one() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut s1 = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    past_snapshot(&mut s1).await;
    let s2 = p
        .subscribe(SubscribeRequest::new(TOPIC, Subject::Wildcard))
        .unwrap();
    let waiter = tokio::spawn(async move {
        let r = s1.next().await;
        (r, s1)
    });
    tokio::task::yield_now().await;
    p.shutdown();
    let (r, _s1) = waiter.await.unwrap();
    assert_eq!(r, Err(SubscriptionError::ShuttingDown));
    assert_eq!(s2.close_reason(), Some(SubscriptionError::ShuttingDown));
    assert_eq!(p.stats().subscribers(), 0);
}

use snapstream::event::Subject;

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_last_publisher_handle_shuts_down() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut s = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    past_snapshot(&mut s).await;
    let p2 = p.clone();
    drop(p);
    assert_eq!(s.close_reason(), None, "a clone is still alive");
    // The store holds a clone too.
    drop(p2);
    drop(store.take_publisher());
    assert_eq!(s.next().await, Err(SubscriptionError::ShuttingDown));
}

#[tokio::test(flavor = "current_thread")]
async fn first_reason_wins_and_sticks() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut s = p
        .subscribe(SubscribeRequest::new(TOPIC, "k").token("t"))
        .unwrap();
    p.force_close_token("t");
    s.unsubscribe();
    p.shutdown();
    for _ in 0..3 {
        assert_eq!(s.next().await, Err(SubscriptionError::ForceClosed));
    }
    assert_eq!(s.close_reason(), Some(SubscriptionError::ForceClosed));

    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut s = p
        .subscribe(SubscribeRequest::new(TOPIC, "k").token("t"))
        .unwrap();
    s.unsubscribe();
    assert_eq!(p.force_close_token("t"), 0);
    p.shutdown();
    assert_eq!(s.next().await, Err(SubscriptionError::Unsubscribed));
}

#[tokio::test(flavor = "current_thread")]
async fn close_beats_a_simultaneous_event() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut s = p
        .subscribe(SubscribeRequest::new(TOPIC, "k").token("t"))
        .unwrap();
    past_snapshot(&mut s).await;
    store.write("k", 1);
    p.force_close_token("t");
    assert_eq!(s.next().await, Err(SubscriptionError::ForceClosed));
}

#[tokio::test(flavor = "current_thread")]
async fn stream_yields_the_error_once_then_ends() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut s = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    assert!(!s.is_terminated());
    assert!(StreamExt::next(&mut s).await.unwrap().unwrap().is_framing());
    p.shutdown();
    assert_eq!(
        StreamExt::next(&mut s).await,
        Some(Err(SubscriptionError::ShuttingDown))
    );
    assert!(s.is_terminated());
    assert_eq!(StreamExt::next(&mut s).await, None);
}

#[test]
fn racing_closes_first_wins() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..200 {
        let mut b = Publisher::<u64>::builder();
        b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
            Ok(1)
        })
        .unwrap();
        let p = b.build();
        let _guard = rt.enter();
        let mut s = p
            .subscribe(SubscribeRequest::new("t", "k").token("tok"))
            .unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let (p2, b2) = (p.clone(), barrier.clone());
        let closer = std::thread::spawn(move || {
            b2.wait();
            p2.force_close_token("tok")
        });
        barrier.wait();
        p.shutdown();
        let force_won = closer.join().unwrap() == 1;
        let expected = if force_won {
            SubscriptionError::ForceClosed
        } else {
            SubscriptionError::ShuttingDown
        };
        let got = rt.block_on(s.next()).unwrap_err();
        assert_eq!(got, expected, "round {round}");
        assert_eq!(rt.block_on(s.next()).unwrap_err(), expected, "sticks");
    }
}
