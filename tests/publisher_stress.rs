//! Many tasks subscribing, reading, dropping, force-closing and publishing at
//! once: afterwards every key's buffer and cache are gone, and every payload
//! was freed (drops counted with a static atomic).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use snapstream::event::Event;
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

static ALIVE: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
struct Counted;

impl Counted {
    fn new() -> Self {
        ALIVE.fetch_add(1, Ordering::SeqCst);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        ALIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

const TASKS: usize = 64;
const ITERS: usize = 50;
const KEYS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    let mut b = Publisher::<Counted>::builder();
    b.snapshot_cache_ttl(Duration::from_secs(3600))
        .lag_limit(Some(64));
    b.register(
        "t",
        |req: SnapshotRequest, mut sink: SnapshotSink<Counted>| async move {
            sink.append_one(Event::new("t", req.subject().clone(), 1, Counted::new()))?;
            tokio::task::yield_now().await;
            Ok(1)
        },
    )
    .unwrap();
    let p = b.build();
    let publisher = {
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..(TASKS * ITERS) as u64 {
                let key = format!("k{}", i as usize % KEYS);
                p.publish(vec![Event::new("t", key, i + 2, Counted::new())])
                    .unwrap();
                if i.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..ITERS {
                let key = format!("k{}", (t + i) % KEYS);
                let token = format!("tok{}", t % 4);
                let mut sub = p
                    .subscribe(SubscribeRequest::new("t", key).token(token.clone()))
                    .unwrap();
                // Read a little (whatever is ready), then drop or close.
                for _ in 0..(i % 5) {
                    if futures::FutureExt::now_or_never(sub.next()).is_none() {
                        break;
                    }
                }
                match i % 7 {
                    0 => {
                        p.force_close_token(&token);
                    }
                    1 => sub.unsubscribe(),
                    _ => {}
                }
                if i.is_multiple_of(3) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    publisher.await.unwrap();
    let stats = p.stats();
    assert_eq!(stats.subscribers(), 0);
    assert!(
        stats.topics[0].keys.is_empty(),
        "every buffer freed: {:?}",
        stats.topics[0].keys
    );
    drop(p);
    // Snapshot builds that were cancelled or finished release their payloads
    // once their tasks are gone; wait for that with a bounded number of yields.
    for _ in 0..1000 {
        if ALIVE.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(ALIVE.load(Ordering::SeqCst), 0, "every payload freed");
}
