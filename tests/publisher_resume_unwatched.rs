//! Resuming a key nobody watched: the topic's resume window lets a
//! subscriber continue live, with no snapshot, when its key provably did
//! not change after its index; otherwise (the key changed, the index is
//! below the window's horizon or above the topic's newest index) it gets
//! `NewSnapshotToFollow` and a snapshot. Checked by message framing, and
//! against a model that remembers every change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use snapstream::event::{Event, Message, Subject, Topic};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

const TOPIC: &str = "t";

/// A publisher whose handler answers an empty snapshot at the newest index
/// it was told of, counting its calls.
fn publisher(window: Option<usize>) -> (Publisher<u64>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut b = Publisher::<u64>::builder();
    if let Some(w) = window {
        b.resume_window(w);
    }
    let c = calls.clone();
    b.register_with_wildcard(TOPIC, move |_r: SnapshotRequest, _s: SnapshotSink<u64>| {
        c.fetch_add(1, Ordering::Relaxed);
        async { Ok(1) }
    })
    .unwrap();
    (b.build(), calls)
}

fn put(p: &Publisher<u64>, key: &str, index: u64) {
    p.publish(vec![Event::new(TOPIC, key, index, index)])
        .unwrap();
}

/// How a resume at `index` starts: `true` when it continued live (its first
/// message is the next change, at `next`), `false` when it began with
/// `NewSnapshotToFollow`.
async fn resumes_live(p: &Publisher<u64>, subject: Subject, index: u64, next: u64) -> bool {
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, subject.clone()).index(index))
        .unwrap();
    let key = subject.as_key().unwrap_or("sentinel").to_string();
    put(p, &key, next);
    match sub.next().await.unwrap() {
        Message::NewSnapshotToFollow => false,
        Message::Events(batch) => {
            assert_eq!(batch.index(), next, "a live resume yields the next change");
            true
        }
        other => panic!("unexpected first message {other:?}"),
    }
}

#[tokio::test]
async fn an_unwatched_key_that_did_not_change_resumes_live() {
    let (p, calls) = publisher(None);
    put(&p, "a", 1);
    // A subscriber reads "a" up to 1, then goes: its buffer is freed.
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, Subject::key("a")))
        .unwrap();
    while !matches!(sub.next().await, Ok(Message::EndOfSnapshot { .. })) {}
    drop(sub);
    assert!(
        p.stats().topics[0].keys.is_empty(),
        "nobody watches any key now"
    );
    let before = calls.load(Ordering::Relaxed);
    for i in 2..100 {
        put(&p, "b", i);
    }
    assert!(resumes_live(&p, Subject::key("a"), 1, 100).await);
    assert_eq!(calls.load(Ordering::Relaxed), before, "no snapshot built");
}

#[tokio::test]
async fn an_unwatched_key_that_changed_gets_a_new_snapshot() {
    let (p, _) = publisher(None);
    put(&p, "a", 1);
    put(&p, "b", 2);
    put(&p, "a", 3);
    assert!(!resumes_live(&p, Subject::key("a"), 1, 4).await);
    // Resuming at its newest change is live again.
    assert!(resumes_live(&p, Subject::key("a"), 4, 5).await);
}

#[tokio::test]
async fn an_index_below_the_horizon_gets_a_new_snapshot() {
    let (p, _) = publisher(Some(4));
    put(&p, "a", 1);
    for i in 2..=10 {
        put(&p, "b", i);
    }
    // "a" did not change, but the window forgot what happened after 1.
    assert!(!resumes_live(&p, Subject::key("a"), 1, 11).await);
    // Within the window it is known: nothing of "c" after 8.
    assert!(resumes_live(&p, Subject::key("c"), 8, 12).await);
}

#[tokio::test]
async fn nothing_is_known_before_the_publisher_saw_a_change_nor_after_its_newest() {
    let (p, _) = publisher(None);
    // The store may have changed before this publisher existed.
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, Subject::key("a")).index(5))
        .unwrap();
    assert_eq!(sub.next().await.unwrap(), Message::NewSnapshotToFollow);
    drop(sub);
    put(&p, "b", 10);
    // From 9 on the publisher saw every change.
    assert!(resumes_live(&p, Subject::key("a"), 9, 11).await);
    assert!(!resumes_live(&p, Subject::key("a"), 8, 12).await);
    // An index the topic has not reached is not a resume point.
    assert!(!resumes_live(&p, Subject::key("a"), 50, 13).await);
}

#[tokio::test]
async fn with_no_window_only_the_topics_newest_index_resumes_an_unwatched_key() {
    let (p, _) = publisher(Some(0));
    put(&p, "a", 1);
    put(&p, "b", 2);
    assert!(!resumes_live(&p, Subject::key("a"), 1, 3).await);
    assert!(resumes_live(&p, Subject::key("a"), 3, 4).await);
}

#[tokio::test]
async fn a_wildcard_resumes_live_only_at_the_topics_newest_index() {
    let (p, _) = publisher(None);
    put(&p, "a", 1);
    put(&p, "b", 2);
    assert!(!resumes_live(&p, Subject::Wildcard, 1, 3).await);
    assert!(resumes_live(&p, Subject::Wildcard, 3, 4).await);
}

#[tokio::test]
async fn quiet_index_follows_the_topic_for_a_key_that_did_not_change() {
    let (p, _) = publisher(Some(2));
    let t = Topic::from(TOPIC);
    let a = Subject::key("a");
    assert_eq!(p.quiet_index(&t, &a, 1), None, "nothing published yet");
    put(&p, "a", 1);
    put(&p, "b", 2);
    assert_eq!(p.quiet_index(&t, &a, 1), Some(2));
    assert_eq!(p.quiet_index(&t, &a, 0), None);
    assert_eq!(p.quiet_index(&t, &a, 3), None, "above the newest index");
    assert_eq!(p.quiet_index(&t, &Subject::key("b"), 1), None);
    assert_eq!(p.quiet_index(&Topic::from("nope"), &a, 1), None);
    // Past the window, a watched key is still known through its buffer.
    let mut sub = p
        .subscribe(SubscribeRequest::new(TOPIC, a.clone()).index(2))
        .unwrap();
    for i in 3..=9 {
        put(&p, "b", i);
    }
    assert_eq!(p.quiet_index(&t, &a, 2), Some(9));
    put(&p, "a", 10);
    assert_eq!(
        p.quiet_index(&t, &a, 2),
        None,
        "the buffer holds a change above 2"
    );
    let batch = sub.next().await.unwrap();
    assert_eq!(batch.events().unwrap()[0].index(), 10);
    assert_eq!(p.quiet_index(&t, &a, 10), Some(10));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random changes, then a resume of an unwatched key at a random index:
    /// it is live only if the key did not change after that index (never a
    /// skipped change), and it is live whenever the changes after the index
    /// fit in the window.
    #[test]
    fn resume_matches_a_full_history(
        window in 0usize..8,
        changes in prop::collection::vec(0u8..3, 1..30),
        key in 0u8..3,
        back in 0usize..30,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (p, _) = publisher(Some(window));
            for (i, k) in changes.iter().enumerate() {
                put(&p, &format!("k{k}"), i as u64 + 1);
            }
            let newest = changes.len() as u64;
            let at = newest.saturating_sub(back as u64).max(1);
            let changed = changes
                .iter()
                .enumerate()
                .any(|(i, k)| *k == key && i as u64 + 1 > at);
            let after = newest - at;
            let live = resumes_live(&p, Subject::key(format!("k{key}").as_str()), at, newest + 1).await;
            if changed {
                prop_assert!(!live, "k{} changed after {} but resumed live", key, at);
            } else if after as usize <= window || at == newest {
                prop_assert!(live, "k{} unchanged since {} ({} changes after, window {})", key, at, after, window);
            }
            Ok(())
        })?;
    }
}
