//! The snapshot cache: hits without handler calls, shared builds, TTL expiry
//! on the paused clock, identity-checked expiry, framing never cached,
//! refcount (buffer and entry freed with the last subscriber, not before).

mod publisher_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use snapstream::event::Message;
use snapstream::publisher::{Publisher, SubscribeRequest, Subscription};
use tokio::sync::Semaphore;

use publisher_support::{builder, settle, Store, View, TOPIC};

const TTL: Duration = Duration::from_secs(10);

async fn read_snapshot(sub: &mut Subscription<u64>) -> View {
    let mut view = View::default();
    while !view.snapshot_done {
        view.apply(sub.next().await.unwrap());
    }
    view
}

/// A publisher over `store` whose snapshot cache keeps entries for [`TTL`].
fn cached(store: &Arc<Store>) -> Publisher<u64> {
    let mut b = builder();
    b.snapshot_cache_ttl(TTL);
    store.publisher(&mut b)
}

/// Subscribes to key "a" and reads its snapshot up to `EndOfSnapshot`.
async fn subscribed(p: &Publisher<u64>) -> (Subscription<u64>, View) {
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    let view = read_snapshot(&mut sub).await;
    (sub, view)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn hit_within_ttl_does_not_call_the_handler() {
    let store = Store::new(None);
    let p = cached(&store);
    store.write("a", 1);
    let (_first, _) = subscribed(&p).await;
    store.write("a", 2);
    store.write("b", 9);
    store.write("a", 3);
    tokio::time::advance(TTL - Duration::from_secs(1)).await;
    let (mut second, mut view) = subscribed(&p).await;
    view.drain(&mut second).unwrap();
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        1,
        "served from the cache"
    );
    assert_eq!(
        view.data,
        store.view(Some("a")),
        "cached snapshot + everything since"
    );
    let stats = p.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (1, 1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn expires_after_ttl() {
    let store = Store::new(None);
    let p = cached(&store);
    let (_first, _) = subscribed(&p).await;
    tokio::time::advance(TTL + Duration::from_millis(1)).await;
    settle().await;
    assert!(
        !p.stats().key(TOPIC, &"a".into()).unwrap().cached,
        "timer evicted it"
    );
    let (_second, _) = subscribed(&p).await;
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_old_timer_never_evicts_a_newer_snapshot() {
    let store = Store::new(None);
    let p = cached(&store);
    let (_s1, _) = subscribed(&p).await;
    // Snapshot A is past its TTL, its timer not yet run: the next subscriber
    // builds B.
    tokio::time::advance(TTL + Duration::from_millis(1)).await;
    let (_s2, _) = subscribed(&p).await;
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);
    tokio::time::advance(TTL / 2).await;
    settle().await;
    let (_s3, _) = subscribed(&p).await;
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        2,
        "B survived A's timer"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_subscribers_share_one_build() {
    let gate = Arc::new(Semaphore::new(0));
    let store = Store::new(Some(gate.clone()));
    let p = store.publisher(&mut builder()); // TTL 0: only running builds are shared
    store.write("a", 1);
    let mut subs: Vec<_> = (0..5)
        .map(|_| p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap())
        .collect();
    settle().await;
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    assert!(p.stats().key(TOPIC, &"a".into()).unwrap().building);
    gate.add_permits(1);
    for sub in &mut subs {
        let view = read_snapshot(sub).await;
        assert_eq!(view.data, store.view(Some("a")));
    }
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    // TTL 0: the finished build is not reused.
    let stats = p.stats();
    assert!(!stats.key(TOPIC, &"a".into()).unwrap().cached);
    assert_eq!((stats.cache_hits, stats.cache_misses), (4, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn framing_is_never_cached() {
    let store = Store::new(None);
    let p = cached(&store);
    store.write("a", 1);
    store.write("a", 2);
    let mut stale = p
        .subscribe(SubscribeRequest::new(TOPIC, "a").index(1))
        .unwrap();
    assert_eq!(stale.next().await.unwrap(), Message::NewSnapshotToFollow);
    read_snapshot(&mut stale).await;
    let mut fresh = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    let first = fresh.next().await.unwrap();
    assert!(
        first.events().is_some(),
        "a cache hit starts with the snapshot: {first:?}"
    );
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn buffer_and_cache_go_with_the_last_subscriber_and_not_before() {
    let store = Store::new(None);
    let p = cached(&store);
    let (s1, _) = subscribed(&p).await;
    let (s2, _) = subscribed(&p).await;
    let key = p.stats().key(TOPIC, &"a".into()).cloned().unwrap();
    assert_eq!(key.subscribers, 2);
    assert!(key.cached);
    drop(s1);
    let key = p.stats().key(TOPIC, &"a".into()).cloned().unwrap();
    assert_eq!(key.subscribers, 1);
    assert!(key.cached, "not before the last one");
    // Explicit unsubscribe then drop releases once, not twice.
    let mut s3 = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    s3.unsubscribe();
    drop(s3);
    assert_eq!(p.stats().key(TOPIC, &"a".into()).unwrap().subscribers, 1);
    drop(s2);
    assert!(p.stats().key(TOPIC, &"a".into()).is_none(), "buffer freed");
    assert_eq!(p.stats().subscribers(), 0);
    // Events for an unwatched key are dropped; the cache is gone too.
    store.write("a", 5);
    let (_s4, view) = subscribed(&p).await;
    assert_eq!(view.data, store.view(Some("a")));
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn last_subscriber_leaving_cancels_a_running_build() {
    use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    let alive = Arc::new(());
    let gate = Arc::new(Semaphore::new(0));
    let (a, g) = (alive.clone(), gate.clone());
    let mut b = Publisher::<u64>::builder();
    b.register("t", move |_r: SnapshotRequest, _s: SnapshotSink<u64>| {
        let (held, gate) = (a.clone(), g.clone());
        async move {
            let _permit = gate.acquire().await;
            drop(held);
            Ok(1)
        }
    })
    .unwrap();
    let p = b.build();
    let sub = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    settle().await;
    assert_eq!(
        Arc::strong_count(&alive),
        3,
        "the handler future is running"
    );
    drop(sub);
    settle().await;
    assert_eq!(
        Arc::strong_count(&alive),
        2,
        "the handler future was dropped"
    );
    assert!(p.stats().key("t", &"k".into()).is_none());
}
