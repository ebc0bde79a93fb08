//! A topic's indexes increase: a backwards or repeated index is refused with
//! `PublishErrorKind::IndexNotIncreasing`, the batch is handed back, and
//! nothing changes — no subscriber sees any of it, and the topic's last index
//! stays where it was.

use std::collections::BTreeMap;

use futures::FutureExt;
use proptest::prelude::*;
use snapstream::event::{Event, Message, Subject};
use snapstream::publisher::{
    PublishErrorKind, Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest, Subscription,
};

/// A publisher with topics "a" and "b" whose snapshots are empty at index 1.
fn publisher() -> Publisher<u64> {
    let mut b = Publisher::<u64>::builder();
    for topic in ["a", "b"] {
        b.register_with_wildcard(topic, |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
            Ok(1)
        })
        .unwrap();
    }
    b.build()
}

/// Subscribes and reads past the (empty) snapshot.
async fn live(publisher: &Publisher<u64>, topic: &str, subject: Subject) -> Subscription<u64> {
    let mut sub = publisher
        .subscribe(SubscribeRequest::new(topic, subject))
        .unwrap();
    assert_eq!(sub.next().await, Ok(Message::EndOfSnapshot { index: 1 }));
    sub
}

/// (index, payload) of every event ready now.
fn ready(sub: &mut Subscription<u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while let Some(m) = sub.next().now_or_never() {
        for e in m.unwrap().events().unwrap().events() {
            out.push((e.index(), *e.payload()));
        }
    }
    out
}

fn not_increasing(kind: &PublishErrorKind) -> Option<(u64, u64)> {
    match kind {
        PublishErrorKind::IndexNotIncreasing { index, last, .. } => Some((*index, *last)),
        _ => None,
    }
}

#[tokio::test]
async fn backwards_and_repeated_indexes_are_refused_and_change_nothing() {
    let publisher = publisher();
    let mut sub = live(&publisher, "a", Subject::key("k")).await;

    publisher
        .publish(vec![Event::new("a", "k", 7, 70)])
        .unwrap();
    let err = publisher
        .publish(vec![Event::new("a", "k", 6, 60)])
        .unwrap_err();
    assert_eq!(not_increasing(err.kind()), Some((6, 7)));
    assert!(err.to_string().contains("index 6 of topic a"), "{err}");
    assert_eq!(*err.into_events()[0].payload(), 60);
    let err = publisher
        .publish(vec![Event::new("a", "k", 7, 71)])
        .unwrap_err();
    assert_eq!(not_increasing(err.kind()), Some((7, 7)));
    publisher
        .publish(vec![Event::new("a", "k", 8, 80)])
        .unwrap();

    assert_eq!(ready(&mut sub), vec![(7, 70), (8, 80)]);
}

#[tokio::test]
async fn an_index_that_decreases_within_one_call_refuses_the_whole_call() {
    let publisher = publisher();
    let mut sub = live(&publisher, "a", Subject::key("k")).await;

    let batch = vec![
        Event::new("a", "k", 3, 1),
        Event::new("a", "k", 4, 2),
        Event::new("a", "k", 2, 3),
    ];
    let err = publisher.publish(batch).unwrap_err();
    assert_eq!(not_increasing(err.kind()), Some((2, 4)));
    assert_eq!(err.into_events().len(), 3);
    assert!(
        ready(&mut sub).is_empty(),
        "nothing of a refused call is routed"
    );
    // The refused call recorded no index: 3 is still free.
    publisher.publish(vec![Event::new("a", "k", 3, 4)]).unwrap();
    assert_eq!(ready(&mut sub), vec![(3, 4)]);
}

#[tokio::test]
async fn events_of_one_change_share_an_index_across_keys() {
    let publisher = publisher();
    let mut all = live(&publisher, "a", Subject::Wildcard).await;
    publisher
        .publish(vec![
            Event::new("a", "x", 5, 1),
            Event::new("a", "y", 5, 2),
            Event::new("a", "x", 6, 3),
        ])
        .unwrap();
    assert_eq!(ready(&mut all), vec![(5, 1), (5, 2), (6, 3)]);
}

#[tokio::test]
async fn unwatched_keys_count_toward_the_topic_index() {
    let publisher = publisher();
    let mut sub = live(&publisher, "a", Subject::key("watched")).await;
    publisher
        .publish(vec![Event::new("a", "nobody-watches", 9, 0)])
        .unwrap();
    let err = publisher
        .publish(vec![Event::new("a", "watched", 9, 1)])
        .unwrap_err();
    assert_eq!(not_increasing(err.kind()), Some((9, 9)));
    assert!(ready(&mut sub).is_empty());
}

#[tokio::test]
async fn a_refused_topic_refuses_every_topic_of_the_call() {
    let publisher = publisher();
    let mut a = live(&publisher, "a", Subject::key("k")).await;
    let mut b = live(&publisher, "b", Subject::key("k")).await;
    publisher
        .publish(vec![Event::new("b", "k", 10, 0)])
        .unwrap();
    assert_eq!(ready(&mut b), vec![(10, 0)]);

    let err = publisher
        .publish(vec![
            Event::new("a", "k", 2, 1),
            Event::new("b", "k", 10, 2),
        ])
        .unwrap_err();
    assert_eq!(not_increasing(err.kind()), Some((10, 10)));
    assert!(ready(&mut a).is_empty(), "topic a was not touched");
    assert!(ready(&mut b).is_empty());
    // Topics have their own index spaces: a's 2 is still free.
    publisher.publish(vec![Event::new("a", "k", 2, 3)]).unwrap();
    assert_eq!(ready(&mut a), vec![(2, 3)]);
}

/// A subscriber of the model test: (topic, key or `None` for the wildcard).
type SubId = (usize, Option<usize>);

/// One `publish` call: (topic, key, index) per event.
fn calls() -> impl Strategy<Value = Vec<Vec<(usize, usize, u64)>>> {
    let event = (0..2usize, 0..3usize, 2..14u64);
    prop::collection::vec(prop::collection::vec(event, 1..4), 1..20)
}

proptest! {
    /// Against a model: a call is accepted exactly when, per topic, its
    /// indexes never decrease and its first index is above the topic's last;
    /// every subscriber (per key and wildcard) sees exactly the accepted
    /// events, in order.
    #[test]
    fn accepted_calls_match_the_model(calls in calls()) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let topics = ["a", "b"];
            let keys = ["k0", "k1", "k2"];
            let publisher = publisher();
            let mut subs = BTreeMap::new();
            for (t, topic) in topics.iter().enumerate() {
                subs.insert((t, None), live(&publisher, topic, Subject::Wildcard).await);
                for (k, key) in keys.iter().enumerate() {
                    subs.insert((t, Some(k)), live(&publisher, topic, Subject::key(*key)).await);
                }
            }
            let mut last: [Option<u64>; 2] = [None, None];
            let mut expected: BTreeMap<SubId, Vec<(u64, u64)>> = BTreeMap::new();
            let mut payload = 0u64;
            for call in calls {
                // The model's verdict.
                let mut seen: [Option<u64>; 2] = [None, None];
                let mut ok = true;
                for &(t, _, i) in &call {
                    let floor_ok = match seen[t] {
                        Some(prev) => i >= prev,
                        None => last[t].is_none_or(|l| i > l),
                    };
                    ok &= floor_ok;
                    seen[t] = Some(i);
                }
                let events: Vec<_> = call
                    .iter()
                    .map(|&(t, k, i)| {
                        payload += 1;
                        Event::new(topics[t], keys[k], i, payload)
                    })
                    .collect();
                let first_payload = payload + 1 - call.len() as u64;
                let result = publisher.publish(events);
                prop_assert_eq!(result.is_ok(), ok, "call {:?}", call);
                if ok {
                    for (n, &(t, k, i)) in call.iter().enumerate() {
                        let p = first_payload + n as u64;
                        expected.entry((t, None)).or_default().push((i, p));
                        expected.entry((t, Some(k))).or_default().push((i, p));
                    }
                    for t in 0..2 {
                        if seen[t].is_some() {
                            last[t] = seen[t];
                        }
                    }
                } else {
                    let err = result.unwrap_err();
                    prop_assert!(not_increasing(err.kind()).is_some());
                    prop_assert_eq!(err.into_events().len(), call.len());
                }
            }
            for (id, sub) in subs.iter_mut() {
                let got = ready(sub);
                let want = expected.remove(id).unwrap_or_default();
                prop_assert_eq!(got, want, "subscriber {:?}", id);
            }
            Ok(())
        })?;
    }
}
