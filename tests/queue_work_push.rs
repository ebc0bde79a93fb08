//! `WorkQueue` pushes at concurrency and in batches, over the memory and the
//! disk base queue: many producer tasks land every item exactly once,
//! `push_batch` checks each value on its own, and a shutdown while pushes are
//! in flight loses no acknowledged push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapstream::queue::{
    BaseQueue, Item, MemoryQueue, QueueOptions, WorkPushError, WorkQueue, WorkQueueOptions,
};
use tokio::sync::Barrier;

const LONG: Duration = Duration::from_secs(60);

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

/// A work queue over `base` whose handler counts every value it sees.
fn counting(base: Arc<dyn BaseQueue>, dead: Arc<dyn BaseQueue>) -> (WorkQueue<u64>, Seen) {
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let opts = WorkQueueOptions::default()
        .batch_len(64)
        .batch_delay(Duration::from_millis(1));
    let q = WorkQueue::new(base, dead, opts, move |b: Vec<Item<u64>>| {
        let mut s = s.lock().unwrap();
        for item in &b {
            *s.entry(*item.value()).or_default() += 1;
        }
        async { Vec::new() }
    })
    .unwrap();
    (q, seen)
}

fn memory(name: &str, opts: QueueOptions) -> (Arc<dyn BaseQueue>, Arc<dyn BaseQueue>) {
    let dead = opts.for_dead_letters();
    (
        Arc::new(MemoryQueue::new(name, opts).unwrap()),
        Arc::new(MemoryQueue::new(format!("{name}.dead"), dead).unwrap()),
    )
}

/// 64 producer tasks (half `push`, half `push_batch`) through one work queue:
/// every value is acknowledged once, handled once, and `flush` covers all.
async fn many_producers_exactly_once(base: Arc<dyn BaseQueue>, dead: Arc<dyn BaseQueue>) {
    const TASKS: u64 = 64;
    const PER: u64 = 50;
    let (q, seen) = counting(base, dead);
    let barrier = Arc::new(Barrier::new(TASKS as usize));
    let tasks: Vec<_> = (0..TASKS)
        .map(|p| {
            let (q, barrier) = (q.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                let values: Vec<u64> = (0..PER).map(|i| p * PER + i).collect();
                if p % 2 == 0 {
                    for v in values {
                        q.push(v).await.unwrap();
                    }
                } else {
                    for chunk in values.chunks(16) {
                        for r in q.push_batch(chunk.to_vec()).await {
                            r.unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(q.pushed(), TASKS * PER);
    q.flush(LONG).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len() as u64, TASKS * PER, "every value handled");
    assert!(seen.values().all(|&n| n == 1), "no value handled twice");
    q.shutdown(LONG).await;
    assert_eq!(q.len().await.unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_exactly_once_memory() {
    let (base, dead) = memory("many", QueueOptions::default());
    many_producers_exactly_once(base, dead).await;
}

#[cfg(feature = "disk")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_exactly_once_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = snapstream::queue::disk::DiskStore::open(dir.path().join("q.redb")).unwrap();
    let base = store.queue("many", QueueOptions::default()).unwrap();
    let dead = store.queue("many.dead", QueueOptions::default()).unwrap();
    many_producers_exactly_once(Arc::new(base), Arc::new(dead)).await;
}

#[tokio::test(start_paused = true)]
async fn push_batch_refuses_oversized_and_duplicate_values_and_stores_the_rest() {
    // `7` encodes as 1 byte, `1234567890` as 10: over the limit of 4.
    let (base, dead) = memory(
        "batch",
        QueueOptions::default().unique(true).max_item_bytes(4),
    );
    let (q, seen) = counting(base, dead);
    q.set_max_workers(0);
    q.push(5).await.unwrap();
    let out = q.push_batch(vec![7, 1_234_567_890, 5, 8, 7]).await;
    assert_eq!(out.len(), 5);
    assert!(out[0].is_ok() && out[3].is_ok(), "{out:?}");
    match &out[1] {
        Err(WorkPushError::TooLarge { item, size, limit }) => {
            assert_eq!((*item, *size, *limit), (1_234_567_890, 10, 4));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        matches!(out[2], Err(WorkPushError::AlreadyQueued(5))),
        "against the queue"
    );
    assert!(
        matches!(out[4], Err(WorkPushError::AlreadyQueued(7))),
        "within the batch"
    );
    assert_eq!(q.pushed(), 3);
    assert_eq!(q.len().await.unwrap().total(), 3);
    q.set_max_workers(1);
    q.flush(LONG).await.unwrap();
    let mut handled: Vec<u64> = seen.lock().unwrap().keys().copied().collect();
    handled.sort_unstable();
    assert_eq!(handled, [5, 7, 8]);
    q.shutdown(LONG).await;
    let out = q.push_batch(vec![1, 2]).await;
    assert!(out
        .iter()
        .all(|r| matches!(r, Err(WorkPushError::Closed(_)))));
}

/// Shutdown while 64 producers push into a disk-backed work queue: every
/// push either returned `Ok` (and its value was handled or is still in the
/// base queue, for a new work queue to get) or returned an error.
#[cfg(feature = "disk")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_pushes_loses_no_acknowledged_push() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = snapstream::queue::disk::DiskStore::open(dir.path().join("q.redb")).unwrap();
    let base: Arc<dyn BaseQueue> = Arc::new(store.queue("sd", QueueOptions::default()).unwrap());
    let dead: Arc<dyn BaseQueue> =
        Arc::new(store.queue("sd.dead", QueueOptions::default()).unwrap());
    let (q, seen) = counting(Arc::clone(&base), dead);
    let acked = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64u64)
        .map(|p| {
            let (q, acked) = (q.clone(), Arc::clone(&acked));
            tokio::spawn(async move {
                let mut ok = Vec::new();
                for i in 0.. {
                    let v = p * 1_000_000 + i;
                    let result = if i % 2 == 0 {
                        q.push(v).await.map(|_| vec![v])
                    } else {
                        let out = q.push_batch(vec![v, v + 500_000]).await;
                        let mut stored = Vec::new();
                        for (v, r) in [v, v + 500_000].into_iter().zip(out) {
                            match r {
                                Ok(_) => stored.push(v),
                                Err(WorkPushError::Closed(back)) => assert_eq!(back, v),
                                Err(e) => panic!("unexpected {e:?}"),
                            }
                        }
                        if stored.is_empty() {
                            Err(WorkPushError::Closed(v))
                        } else {
                            Ok(stored)
                        }
                    };
                    match result {
                        Ok(vs) => {
                            acked.fetch_add(vs.len() as u64, Ordering::Relaxed);
                            ok.extend(vs);
                        }
                        Err(WorkPushError::Closed(_)) => return ok,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                ok
            })
        })
        .collect();
    // Let a few hundred pushes land, then shut down under load.
    while acked.load(Ordering::Relaxed) < 500 {
        tokio::task::yield_now().await;
    }
    q.shutdown(LONG).await;
    let mut ok = Vec::new();
    for t in tasks {
        ok.extend(t.await.unwrap());
    }
    let seen = seen.lock().unwrap().clone();
    let mut left = std::collections::HashSet::new();
    loop {
        let got = base.pop(1_000, Duration::ZERO).await.unwrap();
        if got.is_empty() {
            break;
        }
        for d in &got {
            let v: u64 = serde_json::from_slice(&d.payload).unwrap();
            assert!(left.insert(v), "stored twice");
        }
        let ids: Vec<_> = got.iter().map(|d| d.id).collect();
        base.ack(&ids).await.unwrap();
    }
    for v in &ok {
        assert!(
            seen.contains_key(v) || left.contains(v),
            "acknowledged push {v} lost"
        );
    }
    // A batch cut short by the shutdown is back in the base queue: it may
    // have been seen by the handler too. Nothing else was stored.
    let ok: std::collections::HashSet<u64> = ok.into_iter().collect();
    assert!(
        seen.keys().chain(&left).all(|v| ok.contains(v)),
        "nothing but acknowledged pushes stored"
    );
}
