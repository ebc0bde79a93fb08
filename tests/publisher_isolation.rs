//! A slow snapshot on one topic does not delay publishing or subscribing on
//! another (nor publishing on its own topic). The slow handler is blocked on
//! a signal that is only released at the end: no timing involved.

use std::sync::Arc;

use snapstream::event::{Event, Message};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_snapshot_stalls_nothing_else() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let mut b = Publisher::<u64>::builder();
    b.register("slow", move |_r: SnapshotRequest, _s: SnapshotSink<u64>| {
        let g = g.clone();
        async move {
            let _p = g.acquire().await;
            Ok(1)
        }
    })
    .unwrap();
    b.register("fast", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    let mut slow = p.subscribe(SubscribeRequest::new("slow", "k")).unwrap();
    // Publishing on the slow topic itself does not wait for its snapshot.
    for i in 2..10 {
        p.publish(vec![Event::new("slow", "k", i, i)]).unwrap();
    }
    // The other topic: subscribe, snapshot, publish, deliver — all while the
    // slow handler is still blocked.
    let mut fast = p.subscribe(SubscribeRequest::new("fast", "k")).unwrap();
    assert_eq!(
        fast.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    p.publish(vec![Event::new("fast", "k", 2, 42)]).unwrap();
    assert_eq!(
        *fast.next().await.unwrap().events().unwrap()[0].payload(),
        42
    );
    assert!(p.stats().key("slow", &"k".into()).unwrap().building);
    // Release the slow one: it gets its snapshot, then everything published meanwhile.
    gate.add_permits(1);
    assert_eq!(
        slow.next().await.unwrap(),
        Message::EndOfSnapshot { index: 1 }
    );
    for i in 2..10 {
        assert_eq!(slow.next().await.unwrap().events().unwrap().index(), i);
    }
}
