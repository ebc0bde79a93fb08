//! Snapshot then live, the three index cases, routing, wildcard batching,
//! handler failure, registration and publish errors.

mod publisher_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use snapstream::event::{Event, Message, Subject};
use snapstream::publisher::{
    PublishErrorKind, Publisher, RegisterError, SnapshotRequest, SnapshotSink, SubscribeError,
    SubscribeRequest, SubscriptionError,
};
use tokio::sync::Semaphore;

use publisher_support::{builder, nothing_ready, ready, Store, View, TOPIC};

fn events(m: &Message<u64>) -> Vec<(String, u64, u64)> {
    m.events()
        .expect("events")
        .iter()
        .map(|e| (e.subject().to_string(), e.index(), *e.payload()))
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn fresh_subscriber_gets_snapshot_end_of_snapshot_then_live() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    store.write("a", 10);
    store.write("b", 20);
    store.write("a", 11);
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    let m = sub.next().await.unwrap();
    assert_eq!(events(&m), vec![("a".into(), 3, 11)]);
    assert_eq!(
        sub.next().await.unwrap(),
        Message::EndOfSnapshot { index: 3 }
    );
    assert!(nothing_ready(&mut sub));
    store.write("b", 21);
    store.write("a", 12);
    assert_eq!(
        events(&sub.next().await.unwrap()),
        vec![("a".into(), 5, 12)]
    );
    assert!(
        nothing_ready(&mut sub),
        "key b must never reach a subscriber of a"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn handler_index_zero_is_reported_as_one() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    assert_eq!(
        sub.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
}

#[tokio::test(flavor = "current_thread")]
async fn resume_at_newest_index_has_no_framing() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    // Someone keeps the key's buffer alive.
    let mut keeper = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    let mut view = View::default();
    view.apply(keeper.next().await.unwrap());
    let i = store.write("a", 1);
    let calls = store.calls.load(Ordering::SeqCst);
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, "a").index(i))
        .unwrap();
    assert!(nothing_ready(&mut sub), "resume must not replay or frame");
    store.write("a", 2);
    assert_eq!(
        events(&ready(&mut sub).unwrap()),
        vec![("a".into(), i + 1, 2)]
    );
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        calls,
        "no snapshot for a resume"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn stale_index_gets_new_snapshot_to_follow() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    store.write("a", 1);
    store.write("a", 2);
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, "a").index(1))
        .unwrap();
    assert_eq!(sub.next().await.unwrap(), Message::NewSnapshotToFollow);
    assert_eq!(events(&sub.next().await.unwrap()), vec![("a".into(), 2, 2)]);
    assert_eq!(
        sub.next().await.unwrap(),
        Message::EndOfSnapshot { index: 2 }
    );
    // An index from the future is stale too.
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, "a").index(99))
        .unwrap();
    assert_eq!(sub.next().await.unwrap(), Message::NewSnapshotToFollow);
}

#[tokio::test(flavor = "current_thread")]
async fn resume_from_any_index_in_the_cached_chain() {
    let store = Store::new(None);
    let mut b = builder();
    b.snapshot_cache_ttl(std::time::Duration::from_secs(60));
    let p = store.publisher(&mut b);
    store.write("a", 1); // 1
    let mut keeper = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    let mut view = View::default();
    view.apply(keeper.next().await.unwrap());
    view.apply(keeper.next().await.unwrap());
    assert!(view.snapshot_done);
    let i2 = store.write("a", 2);
    let i3 = store.write("a", 3);
    store.write("a", 4);
    let calls = store.calls.load(Ordering::SeqCst);
    // i2 is not the newest index, but it is held in the cached chain.
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, "a").index(i2))
        .unwrap();
    assert_eq!(events(&ready(&mut sub).unwrap()), vec![("a".into(), i3, 3)]);
    assert_eq!(ready(&mut sub).unwrap().events().unwrap().index(), i3 + 1);
    assert!(nothing_ready(&mut sub));
    // The snapshot's own index is in the chain too.
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, "a").index(1))
        .unwrap();
    assert_eq!(ready(&mut sub).unwrap().events().unwrap().index(), i2);
    assert_eq!(store.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test(flavor = "current_thread")]
async fn wildcard_gets_every_key_and_one_batch_per_index() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    store.write("a", 1);
    let mut all = p
        .subscribe(SubscribeRequest::new(TOPIC, Subject::Wildcard))
        .unwrap();
    let mut a = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    let mut view = View::default();
    view.apply(all.next().await.unwrap());
    assert_eq!(
        all.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    a.next().await.unwrap();
    a.next().await.unwrap();
    let i = store.write_many(&[("a", 5), ("b", 6), ("c", 7)]);
    let m = ready(&mut all).unwrap();
    assert_eq!(
        events(&m),
        vec![("a".into(), i, 5), ("b".into(), i, 6), ("c".into(), i, 7)],
        "one batch for one index"
    );
    assert_eq!(events(&ready(&mut a).unwrap()), vec![("a".into(), i, 5)]);
    assert!(nothing_ready(&mut a));
}

#[tokio::test(flavor = "current_thread")]
async fn several_events_of_one_key_at_one_index_are_one_batch() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "k")).unwrap();
    sub.next().await.unwrap();
    p.publish(vec![
        Event::new(TOPIC, "k", 5, 1),
        Event::new(TOPIC, "other", 5, 9),
        Event::new(TOPIC, "k", 5, 2),
        Event::new(TOPIC, "k", 6, 3),
    ])
    .unwrap();
    let m = ready(&mut sub).unwrap();
    assert_eq!(events(&m), vec![("k".into(), 5, 1), ("k".into(), 5, 2)]);
    assert_eq!(events(&ready(&mut sub).unwrap()), vec![("k".into(), 6, 3)]);
}

#[tokio::test(flavor = "current_thread")]
async fn events_at_or_below_end_of_snapshot_are_dropped() {
    // The handler waits on a gate: writes published after the live position
    // was captured but before the handler reads the state are in both.
    let gate = Arc::new(Semaphore::new(0));
    let store = Store::new(Some(gate.clone()));
    let p = store.publisher(&mut builder());
    store.write("a", 1);
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    store.write("a", 2); // index 2: raced, reflected in the snapshot
    gate.add_permits(1);
    let mut view = View::default();
    view.apply(sub.next().await.unwrap());
    assert_eq!(
        sub.next().await.unwrap(),
        Message::EndOfSnapshot { index: 2 }
    );
    assert!(nothing_ready(&mut sub), "index 2 must not come twice");
    store.write("a", 3);
    assert_eq!(ready(&mut sub).unwrap().events().unwrap().index(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn failing_handler_delivers_what_it_streamed_then_the_error() {
    let mut b = builder();
    b.snapshot_cache_ttl(std::time::Duration::from_secs(60));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    b.register(
        "t",
        move |_r: SnapshotRequest, mut sink: SnapshotSink<u64>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                sink.append_one(Event::new("t", "k", 1, 7))?;
                if n == 0 {
                    Err("store unavailable".into())
                } else {
                    Ok(1)
                }
            }
        },
    )
    .unwrap();
    let p = b.build();
    let mut sub = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    assert_eq!(*sub.next().await.unwrap().events().unwrap()[0].payload(), 7);
    let err = sub.next().await.unwrap_err();
    let SubscriptionError::Snapshot(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.inner().to_string(), "store unavailable");
    assert_eq!(sub.next().await.unwrap_err(), err, "the error sticks");
    // Not cached: the next subscriber calls the handler again and succeeds.
    let mut sub2 = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    sub2.next().await.unwrap();
    assert_eq!(
        sub2.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn panicking_handler_is_a_snapshot_error() {
    let mut b = builder();
    b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        if true {
            panic!("boom");
        }
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    let mut sub = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    let err = sub.next().await.unwrap_err();
    let SubscriptionError::Snapshot(e) = err else {
        panic!()
    };
    assert!(e.inner().is::<snapstream::publisher::HandlerPanicked>());
}

#[tokio::test(flavor = "current_thread")]
async fn sink_kept_past_the_handler_hands_events_back() {
    let kept = Arc::new(std::sync::Mutex::new(None));
    let k = kept.clone();
    let mut b = builder();
    b.register("t", move |_r: SnapshotRequest, sink: SnapshotSink<u64>| {
        *k.lock().unwrap() = Some(sink);
        async { Ok(1) }
    })
    .unwrap();
    let p = b.build();
    let mut sub = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    assert_eq!(
        sub.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    let mut sink = kept.lock().unwrap().take().unwrap();
    let err = sink.append_one(Event::new("t", "k", 2, 5)).unwrap_err();
    assert_eq!(*err.into_events()[0].payload(), 5);
}

#[tokio::test(flavor = "current_thread")]
async fn registration_and_subscription_errors() {
    let h = |_r: SnapshotRequest, _s: SnapshotSink<u64>| async { Ok(1) };
    let mut b = Publisher::<u64>::builder();
    assert_eq!(b.register("", h).err(), Some(RegisterError::EmptyTopic));
    b.register("plain", h).unwrap();
    assert!(
        matches!(b.register("plain", h), Err(RegisterError::DuplicateTopic(t)) if t.as_str() == "plain")
    );
    let p = b.build();
    assert!(matches!(
        p.subscribe(SubscribeRequest::new("nope", "k")),
        Err(SubscribeError::UnknownTopic(_))
    ));
    assert!(matches!(
        p.subscribe(SubscribeRequest::new("plain", Subject::Wildcard)),
        Err(SubscribeError::WildcardUnsupported(_))
    ));
}

#[test]
fn subscribe_outside_a_runtime_is_an_error() {
    let mut b = Publisher::<u64>::builder();
    b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    assert!(matches!(
        p.subscribe(SubscribeRequest::new("t", "k")),
        Err(SubscribeError::NoRuntime)
    ));
}

#[tokio::test(flavor = "current_thread")]
async fn bad_publishes_route_nothing_and_hand_the_batch_back() {
    let store = Store::new(None);
    let p = store.publisher(&mut builder());
    let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
    sub.next().await.unwrap();
    let batch = vec![
        Event::new(TOPIC, "a", 1, 1),
        Event::new(TOPIC, Subject::Wildcard, 1, 2),
    ];
    let err = p.publish(batch).unwrap_err();
    assert_eq!(err.kind(), &PublishErrorKind::WildcardSubject);
    assert_eq!(err.into_events().len(), 2);
    let err = p
        .publish(vec![
            Event::new(TOPIC, "a", 1, 1),
            Event::new("nope", "a", 1, 2),
        ])
        .unwrap_err();
    assert!(matches!(err.kind(), PublishErrorKind::UnknownTopic(t) if t.as_str() == "nope"));
    assert!(nothing_ready(&mut sub), "a refused batch routes nothing");
    p.shutdown();
    let err = p.publish(vec![Event::new(TOPIC, "a", 1, 1)]).unwrap_err();
    assert_eq!(err.kind(), &PublishErrorKind::ShutDown);
    assert!(matches!(
        p.subscribe(SubscribeRequest::new(TOPIC, "a")),
        Err(SubscribeError::ShutDown)
    ));
}

/// `last_index` is the resume point: unset through a snapshot (snapshot events
/// never move it), set by `EndOfSnapshot`, moved by live batches, reset by
/// `NewSnapshotToFollow` when a stale index forces a fresh snapshot.
#[tokio::test]
async fn last_index_tracks_the_resume_point_through_every_case() {
    use snapstream::event::{Event, Message, Subject};
    use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

    let mut b = Publisher::<u32>::builder();
    b.snapshot_cache_ttl(std::time::Duration::ZERO);
    b.register(
        "t",
        |r: SnapshotRequest, mut s: SnapshotSink<u32>| async move {
            s.append(vec![Event::new("t", r.subject().clone(), 10, 0)])?;
            Ok(10)
        },
    )
    .unwrap();
    let publisher = b.build();

    // A stale index: NewSnapshotToFollow resets it, the snapshot keeps it
    // unset, EndOfSnapshot sets it.
    let mut sub = publisher
        .subscribe(SubscribeRequest::new("t", Subject::key("k")).index(3))
        .unwrap();
    assert_eq!(sub.last_index(), Some(3), "a resume starts from its index");
    assert_eq!(sub.next().await.unwrap(), Message::NewSnapshotToFollow);
    assert_eq!(sub.last_index(), None);
    assert!(sub.next().await.unwrap().events().is_some());
    assert_eq!(sub.last_index(), None, "snapshot events never move it");
    assert_eq!(
        sub.next().await.unwrap(),
        Message::EndOfSnapshot { index: 10 }
    );
    assert_eq!(sub.last_index(), Some(10));
    publisher
        .publish(vec![Event::new("t", "k", 11, 1)])
        .unwrap();
    assert!(sub.next().await.unwrap().events().is_some());
    assert_eq!(sub.last_index(), Some(11));

    // Resuming from it gets only what follows, with no framing.
    let mut resumed = publisher
        .subscribe(SubscribeRequest::new("t", Subject::key("k")).index(11))
        .unwrap();
    publisher
        .publish(vec![Event::new("t", "k", 12, 2)])
        .unwrap();
    let msg = resumed.next().await.unwrap();
    assert_eq!(msg.events().unwrap()[0].index(), 12);
    assert_eq!(resumed.last_index(), Some(12));
}
