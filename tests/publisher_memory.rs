//! Retained events share the publisher's names: an event published with a
//! topic and key of its own (`Event::new("t", "k", ..)` allocates both) is
//! retained pointing at the publisher's copies, so a stalled subscriber does
//! not keep a topic and a key allocation per event alive.

use snapstream::event::{Event, Message};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

#[tokio::test(flavor = "current_thread")]
async fn retained_events_share_the_publishers_topic_and_key() {
    let mut b = Publisher::<u64>::builder();
    b.lag_limit(None);
    b.register_with_wildcard("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    let mut key = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    let mut all = p
        .subscribe(SubscribeRequest::new(
            "t",
            snapstream::event::Subject::Wildcard,
        ))
        .unwrap();
    for sub in [&mut key, &mut all] {
        assert!(sub.next().await.unwrap().is_framing());
    }
    for i in 2..6 {
        p.publish(vec![Event::new("t", "k", i, i)]).unwrap();
    }
    p.publish(vec![Event::new("t", "k", 6, 6), Event::new("t", "k", 6, 7)])
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let Message::Events(batch) = key.next().await.unwrap() else {
            panic!("expected events");
        };
        seen.extend(batch.iter().cloned());
    }
    assert_eq!(
        seen.iter().map(|e| *e.payload()).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6, 7]
    );
    let topic = seen[0].topic().as_str().as_ptr();
    let subject = seen[0].subject().as_key().unwrap().as_ptr();
    for e in &seen {
        assert_eq!(e.topic().as_str(), "t");
        assert_eq!(e.subject().as_key(), Some("k"));
        assert_eq!(e.topic().as_str().as_ptr(), topic, "one shared topic");
        assert_eq!(
            e.subject().as_key().unwrap().as_ptr(),
            subject,
            "one shared key"
        );
    }
    // The wildcard subscriber gets the same events, with the same topic.
    let mut wild = Vec::new();
    while wild.len() < 6 {
        let Message::Events(batch) = all.next().await.unwrap() else {
            panic!("expected events");
        };
        wild.extend(batch.iter().cloned());
    }
    assert_eq!(wild, seen);
    for (w, e) in wild.iter().zip(&seen) {
        assert_eq!(w.topic().as_str().as_ptr(), topic);
        // One event, not a copy per buffer: the same shared allocation.
        assert!(
            w.shares_payload(e),
            "the key and wildcard buffers share {e:?}"
        );
    }
    // A key nobody watches on its own: the wildcard's event still points at
    // the publisher's topic, and keeps its own key.
    p.publish(vec![Event::new("t", "other", 7, 8)]).unwrap();
    let Message::Events(batch) = all.next().await.unwrap() else {
        panic!("expected events");
    };
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].subject().as_key(), Some("other"));
    assert_eq!(batch[0].topic().as_str().as_ptr(), topic);
}
