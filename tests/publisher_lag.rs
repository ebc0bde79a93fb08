//! Bounded lag: a stalled subscriber does not keep memory unbounded; it is
//! told (`Lagged`) or re-snapshotted (`NewSnapshotToFollow`), never left with
//! a silent gap.

mod publisher_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use snapstream::event::{Event, Message};
use snapstream::publisher::{
    LagPolicy, Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest, SubscriptionError,
};

use publisher_support::{builder, Store, View, TOPIC};

/// Payloads alive right now (each test uses its own counter).
#[derive(Debug)]
struct Counted(&'static AtomicUsize);

impl Counted {
    fn new(c: &'static AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c)
    }
}

impl PartialEq for Counted {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

const LIMIT: u64 = 100;
const PUBLISHES: u64 = 5_000;

fn counted_publisher(limit: Option<u64>) -> Publisher<Counted> {
    let mut b = Publisher::<Counted>::builder();
    b.lag_limit(limit);
    b.register(
        "t",
        |_r: SnapshotRequest, _s: SnapshotSink<Counted>| async { Ok(1) },
    )
    .unwrap();
    b.build()
}

#[tokio::test(flavor = "current_thread")]
async fn a_stalled_subscriber_is_detached_and_memory_stays_bounded() {
    static ALIVE: AtomicUsize = AtomicUsize::new(0);
    let p = counted_publisher(Some(LIMIT));
    let mut reader = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    let mut stalled = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    assert_eq!(
        reader.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    let mut max_alive = 0;
    for i in 2..PUBLISHES + 2 {
        p.publish(vec![Event::new("t", "k", i, Counted::new(&ALIVE))])
            .unwrap();
        // The live reader keeps up.
        assert!(reader.next().await.unwrap().events().is_some());
        max_alive = max_alive.max(ALIVE.load(Ordering::SeqCst));
    }
    assert!(
        max_alive as u64 <= LIMIT + LIMIT / 2 + 1,
        "the stalled subscriber kept {max_alive} payloads alive"
    );
    assert_eq!(
        stalled.next().await,
        Err(SubscriptionError::Lagged { limit: LIMIT })
    );
    assert_eq!(
        stalled.next().await,
        Err(SubscriptionError::Lagged { limit: LIMIT })
    );
    let key = p.stats().key("t", &"k".into()).cloned().unwrap();
    assert_eq!(
        key.subscribers, 1,
        "the lagged subscription released its key"
    );
    assert!(key.retained <= LIMIT);
}

#[tokio::test(flavor = "current_thread")]
async fn without_a_limit_a_stalled_subscriber_keeps_everything() {
    // The control for the test above: the counter does see the growth.
    static ALIVE: AtomicUsize = AtomicUsize::new(0);
    let p = counted_publisher(None);
    let mut stalled = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    for i in 2..PUBLISHES + 2 {
        p.publish(vec![Event::new("t", "k", i, Counted::new(&ALIVE))])
            .unwrap();
    }
    assert_eq!(ALIVE.load(Ordering::SeqCst) as u64, PUBLISHES);
    assert_eq!(p.stats().key("t", &"k".into()).unwrap().max_lag, PUBLISHES);
    assert_eq!(
        stalled.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    drop(stalled);
    assert_eq!(
        ALIVE.load(Ordering::SeqCst),
        0,
        "freed with the last reader"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn resnapshot_policy_sends_a_new_snapshot_and_converges() {
    let store = Store::new(None);
    let mut b = builder();
    b.lag_limit(Some(LIMIT));
    let p = store.publisher(&mut b);
    store.write("k", 0);
    let req = SubscribeRequest::new(TOPIC, "k").on_lag(LagPolicy::Resnapshot);
    let mut sub = p.subscribe(req).unwrap();
    let mut view = View::default();
    // Read the snapshot and a few live events, then stall.
    while !view.snapshot_done {
        view.apply(sub.next().await.unwrap());
    }
    for v in 1..=3 {
        store.write("k", v);
        view.apply(sub.next().await.unwrap());
    }
    for v in 4..(4 + 3 * LIMIT) {
        store.write("k", v);
    }
    assert_eq!(sub.next().await.unwrap(), Message::NewSnapshotToFollow);
    view.new_snapshots += 1;
    view.data.clear();
    view.snapshot_done = false;
    while !view.snapshot_done {
        view.apply(sub.next().await.unwrap());
    }
    store.write("k", 999);
    view.apply(sub.next().await.unwrap());
    assert_eq!(view.data, store.view(Some("k")));
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_cached_chain_longer_than_the_limit_is_evicted() {
    let store = Store::new(None);
    let mut b = builder();
    b.lag_limit(Some(LIMIT))
        .snapshot_cache_ttl(std::time::Duration::from_secs(3600));
    let p = store.publisher(&mut b);
    store.write("k", 0);
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    let mut view = View::default();
    while !view.snapshot_done {
        view.apply(sub.next().await.unwrap());
    }
    assert!(p.stats().key(TOPIC, &"k".into()).unwrap().cached);
    for v in 0..2 * LIMIT {
        store.write("k", v);
        view.apply(sub.next().await.unwrap());
    }
    let key = p.stats().key(TOPIC, &"k".into()).cloned().unwrap();
    assert!(!key.cached, "the chain outgrew the limit");
    assert_eq!(key.subscribers, 1, "a reader that keeps up is not touched");
    assert_eq!(view.data, store.view(Some("k")));
}
