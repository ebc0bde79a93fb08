//! WorkQueue behaviour over the memory base queue (paused clock throughout).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapstream::queue::{
    BaseQueue, DeadReason, Item, MemoryQueue, NewItem, QueueOptions, WorkError, WorkPushError,
    WorkQueue, WorkQueueOptions,
};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(3600);

fn queues(name: &str) -> (Arc<dyn BaseQueue>, Arc<dyn BaseQueue>) {
    (
        Arc::new(MemoryQueue::new(name, QueueOptions::default()).unwrap()),
        Arc::new(MemoryQueue::new(format!("{name}.dead"), QueueOptions::default()).unwrap()),
    )
}

fn opts(batch: usize, workers: usize) -> WorkQueueOptions {
    WorkQueueOptions::default()
        .batch_len(batch)
        .max_workers(workers)
        .backoff(Duration::from_millis(100), Duration::from_secs(10))
}

#[tokio::test(start_paused = true)]
async fn batch_size_bound() {
    let (base, dead) = queues("batch");
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let s = sizes.clone();
    let q = WorkQueue::new(base, dead, opts(4, 0), move |b: Vec<Item<u32>>| {
        s.lock().unwrap().push(b.len());
        async { Vec::new() }
    })
    .unwrap();
    for i in 0..10u32 {
        q.push(i).await.unwrap();
    }
    q.set_max_workers(1);
    q.flush(LONG).await.unwrap();
    assert_eq!(*sizes.lock().unwrap(), [4, 4, 2]);
    q.shutdown(LONG).await;
}

async fn odd_even(batch: usize, workers: usize) {
    const N: u32 = 40;
    let (base, dead) = queues("oddeven");
    let calls: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let c = calls.clone();
    let peak = Arc::new(AtomicUsize::new(0));
    let q = WorkQueue::new(
        base,
        dead,
        opts(batch, workers),
        move |b: Vec<Item<u32>>| {
            let c = c.clone();
            async move {
                assert!(b.len() <= batch);
                let mut unhandled = Vec::new();
                for item in b {
                    *c.lock().unwrap().entry(*item.value()).or_default() += 1;
                    if item.value() % 2 == 0 && item.attempts() == 0 {
                        unhandled.push(item);
                    }
                }
                tokio::task::yield_now().await;
                unhandled
            }
        },
    )
    .unwrap();
    for i in 0..N {
        q.push(i).await.unwrap();
        peak.fetch_max(q.workers(), Ordering::Relaxed);
    }
    q.flush(LONG).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), N as usize);
    for (v, n) in calls {
        assert_eq!(
            n,
            if v % 2 == 0 { 2 } else { 1 },
            "item {v} (batch {batch}, workers {workers})"
        );
    }
    assert_eq!(q.retries(), u64::from(N / 2));
    assert!(peak.load(Ordering::Relaxed) <= workers);
    assert_eq!(q.len().await.unwrap().total(), 0);
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn odd_even_batch1_workers1() {
    odd_even(1, 1).await;
}

#[tokio::test(start_paused = true)]
async fn odd_even_batch3_workers1() {
    odd_even(3, 1).await;
}

#[tokio::test(start_paused = true)]
async fn odd_even_batch4_workers5() {
    odd_even(4, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_even_batch4_workers5_multithread() {
    odd_even(4, 5).await;
}

#[tokio::test(start_paused = true)]
async fn max_workers_honoured_and_resizable() {
    let (base, dead) = queues("max");
    let gate = Arc::new(Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (g, r, p) = (gate.clone(), running.clone(), peak.clone());
    let q = WorkQueue::new(base, dead, opts(1, 3), move |b: Vec<Item<u32>>| {
        let (g, r, p, tx) = (g.clone(), r.clone(), p.clone(), started_tx.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tx.send(*b[0].value()).unwrap();
            g.acquire().await.unwrap().forget();
            r.fetch_sub(1, Ordering::SeqCst);
            Vec::new()
        }
    })
    .unwrap();
    for i in 0..20u32 {
        q.push(i).await.unwrap();
    }
    for _ in 0..3 {
        started.recv().await.unwrap();
    }
    // No fourth handler starts while three are blocked (the paused clock
    // advances only when every task is idle).
    assert!(tokio::time::timeout(Duration::from_secs(5), started.recv())
        .await
        .is_err());
    assert_eq!(
        (q.workers(), q.active_workers(), q.max_workers()),
        (3, 3, 3)
    );

    q.set_max_workers(5);
    for _ in 0..2 {
        started.recv().await.unwrap();
    }
    assert!(tokio::time::timeout(Duration::from_secs(5), started.recv())
        .await
        .is_err());
    assert_eq!(q.active_workers(), 5);
    assert_eq!(peak.load(Ordering::SeqCst), 5);

    // Shrink to 1 while 5 handlers block: when they finish, four workers
    // retire and exactly one goes on to the next batch.
    q.set_max_workers(1);
    gate.add_permits(5);
    started.recv().await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), started.recv())
        .await
        .is_err());
    assert_eq!((q.workers(), q.active_workers()), (1, 1));
    assert_eq!(running.load(Ordering::SeqCst), 1);
    // From here on never more than one handler at a time.
    peak.store(1, Ordering::SeqCst);
    gate.add_permits(1000);
    q.flush(LONG).await.unwrap();
    assert_eq!(peak.load(Ordering::SeqCst), 1);
    assert!(q.workers() <= 1);
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn idle_workers_retire() {
    let (base, dead) = queues("idle");
    let q = WorkQueue::new(
        base,
        dead,
        opts(1, 4).idle_timeout(Duration::from_secs(1)),
        |_b: Vec<Item<u32>>| async { Vec::new() },
    )
    .unwrap();
    for i in 0..8u32 {
        q.push(i).await.unwrap();
    }
    q.flush(LONG).await.unwrap();
    assert!(q.workers() >= 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(q.workers(), 0);
    // And new work starts a worker again.
    q.push(99).await.unwrap();
    q.flush(LONG).await.unwrap();
    assert_eq!(q.workers(), 1);
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn dead_letter_after_max_attempts_then_requeue() {
    let (base, dead) = queues("dl");
    let accept = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(u32, u32, Instant)>>> = Arc::default();
    let (a, s) = (accept.clone(), seen.clone());
    let q = WorkQueue::new(
        base,
        dead,
        opts(1, 1)
            .max_attempts(3)
            .batch_delay(Duration::ZERO)
            .backoff(Duration::from_secs(2), Duration::from_secs(3)),
        move |b: Vec<Item<u32>>| {
            for it in &b {
                s.lock()
                    .unwrap()
                    .push((*it.value(), it.attempts(), Instant::now()));
            }
            let ok = a.load(Ordering::SeqCst);
            async move {
                if ok {
                    Vec::new()
                } else {
                    b
                }
            }
        },
    )
    .unwrap();
    q.push(7).await.unwrap();
    q.flush(LONG).await.unwrap();
    let calls = seen.lock().unwrap().clone();
    let attempts: Vec<u32> = calls.iter().map(|c| c.1).collect();
    assert_eq!(attempts, [0, 1, 2]);
    // Back-off: 2 s, then 4 s capped at 3 s.
    let gap1 = calls[1].2 - calls[0].2;
    let gap2 = calls[2].2 - calls[1].2;
    assert!(
        gap1 >= Duration::from_secs(2) && gap1 < Duration::from_millis(2010),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_secs(3) && gap2 < Duration::from_millis(3010),
        "{gap2:?}"
    );
    assert_eq!(q.retries(), 2);
    assert_eq!(q.dead_lettered(), 1);
    assert_eq!(q.len().await.unwrap().total(), 0);

    let dl = q.dead_letters().await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, DeadReason::Failed);
    assert_eq!(dl[0].attempts, 3);
    assert_eq!(dl[0].payload, b"7");
    // Listing leaves them in place.
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);

    accept.store(true, Ordering::SeqCst);
    assert_eq!(q.requeue_dead_letters(|_| true).await.unwrap(), 1);
    q.flush(LONG).await.unwrap();
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!(
        (last.0, last.1),
        (7, 0),
        "requeued with a fresh attempt count"
    );
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn handler_panic_means_unhandled() {
    let (base, dead) = queues("panic");
    let calls: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
    let c = calls.clone();
    let q = WorkQueue::new(base, dead, opts(2, 1), move |b: Vec<Item<u32>>| {
        let c = c.clone();
        async move {
            for it in &b {
                c.lock().unwrap().push((*it.value(), it.attempts()));
            }
            if b.iter().any(|i| i.attempts() == 0) {
                panic!("handler bug");
            }
            Vec::new()
        }
    })
    .unwrap();
    q.push(1).await.unwrap();
    q.push(2).await.unwrap();
    q.flush(LONG).await.unwrap();
    let mut per: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (v, a) in calls.lock().unwrap().iter() {
        per.entry(*v).or_default().push(*a);
    }
    assert_eq!(per[&1], [0, 1]);
    assert_eq!(per[&2], [0, 1]);
    assert_eq!(q.dead_lettered(), 0);
    assert_eq!(q.len().await.unwrap().total(), 0);
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn flush_times_out_with_pending_count() {
    let (base, dead) = queues("flush");
    let q = WorkQueue::new(base, dead, opts(1, 0), |_b: Vec<Item<u32>>| async {
        Vec::new()
    })
    .unwrap();
    q.push(1).await.unwrap();
    q.push(2).await.unwrap();
    match q.flush(Duration::from_secs(1)).await {
        Err(WorkError::Timeout { pending }) => assert_eq!(pending, 2),
        other => panic!("{other:?}"),
    }
    q.set_max_workers(1);
    q.flush(LONG).await.unwrap();
    assert_eq!(q.len().await.unwrap().total(), 0);
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_unhandled_for_a_new_queue() {
    let (base, dead) = queues("shut");
    let (odd_tx, mut odd_rx) = mpsc::unbounded_channel();
    let (stuck_tx, mut stuck_rx) = mpsc::unbounded_channel();
    let q = WorkQueue::new(
        base.clone(),
        dead.clone(),
        opts(1, 2).backoff(LONG, LONG),
        move |b: Vec<Item<u32>>| {
            let (odd_tx, stuck_tx) = (odd_tx.clone(), stuck_tx.clone());
            async move {
                let v = *b[0].value();
                if v == 100 {
                    stuck_tx.send(()).unwrap();
                    std::future::pending::<()>().await;
                }
                if v % 2 == 1 {
                    odd_tx.send(v).unwrap();
                    Vec::new()
                } else {
                    b // even: back off for an hour
                }
            }
        },
    )
    .unwrap();
    q.push(100).await.unwrap();
    stuck_rx.recv().await.unwrap();
    for i in 0..10u32 {
        q.push(i).await.unwrap();
    }
    for _ in 0..5 {
        odd_rx.recv().await.unwrap();
    }
    q.shutdown(Duration::from_secs(1)).await;
    assert_eq!(q.workers(), 0);
    assert!(matches!(q.push(5).await, Err(WorkPushError::Closed(5))));
    // 100 went back at once; the evens wait out their back-off.
    let len = base.len().await.unwrap();
    assert_eq!(len.leased, 0);
    assert_eq!(len.total(), 6);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let q2 = WorkQueue::new(base.clone(), dead, opts(4, 2), move |b: Vec<Item<u32>>| {
        for it in &b {
            tx.send(*it.value()).unwrap();
        }
        async { Vec::new() }
    })
    .unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 6 {
        got.insert(rx.recv().await.unwrap());
    }
    assert_eq!(got, BTreeSet::from([0, 2, 4, 6, 8, 100]));
    q2.shutdown(LONG).await;
    assert_eq!(base.len().await.unwrap().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn undecodable_items_are_quarantined() {
    let (base, dead) = queues("decode");
    base.push(NewItem::new(b"not json".to_vec()), LONG)
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let q = WorkQueue::new(base.clone(), dead, opts(8, 1), move |b: Vec<Item<u32>>| {
        for it in &b {
            tx.send(*it.value()).unwrap();
        }
        async { Vec::new() }
    })
    .unwrap();
    q.push(5).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), 5);
    q.flush(LONG).await.unwrap();
    let dl = q.dead_letters().await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, DeadReason::Undecodable);
    assert_eq!(dl[0].payload, b"not json");
    assert!(dl[0].error.contains("expected"), "{}", dl[0].error);
    assert_eq!(base.len().await.unwrap().total(), 0);
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn per_key_order_across_retries() {
    let (base, dead) = queues("keys");
    let order: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let o = order.clone();
    let q = WorkQueue::new(base, dead, opts(2, 4), move |b: Vec<Item<u32>>| {
        let o = o.clone();
        async move {
            let mut back = Vec::new();
            for it in b {
                // The first item of each key fails once.
                if *it.value() % 10 == 0 && it.attempts() == 0 {
                    back.push(it);
                    continue;
                }
                o.lock()
                    .unwrap()
                    .entry(it.key().unwrap().to_owned())
                    .or_default()
                    .push(*it.value());
            }
            tokio::task::yield_now().await;
            back
        }
    })
    .unwrap();
    for i in 0..10u32 {
        for k in 0..3u32 {
            q.push_with(k * 10 + i, Some(format!("k{k}")), LONG)
                .await
                .unwrap();
        }
    }
    q.flush(LONG).await.unwrap();
    let order = order.lock().unwrap().clone();
    for k in 0..3u32 {
        let expect: Vec<u32> = (0..10).map(|i| k * 10 + i).collect();
        assert_eq!(order[&format!("k{k}")], expect);
    }
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn push_errors_hand_the_item_back() {
    let base: Arc<dyn BaseQueue> =
        Arc::new(MemoryQueue::new("full", QueueOptions::default().capacity(1)).unwrap());
    let dead: Arc<dyn BaseQueue> =
        Arc::new(MemoryQueue::new("full.dead", QueueOptions::default()).unwrap());
    let q = WorkQueue::new(
        base,
        dead,
        opts(1, 0).push_timeout(Duration::from_secs(1)),
        |_b: Vec<Item<String>>| async { Vec::new() },
    )
    .unwrap();
    q.push("a".to_owned()).await.unwrap();
    match q.push("b".to_owned()).await {
        Err(WorkPushError::Full(v)) => assert_eq!(v, "b"),
        other => panic!("{other:?}"),
    }
    q.shutdown(LONG).await;
    let err = q.push("c".to_owned()).await.unwrap_err();
    assert_eq!(err.to_string(), "queue is closed");
    assert_eq!(err.into_item(), "c");
    assert!(matches!(q.flush(LONG).await, Err(WorkError::Shutdown)));
}

#[derive(Debug, serde::Deserialize)]
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no"))
    }
}

#[tokio::test(start_paused = true)]
async fn encode_error_hands_the_item_back() {
    let (base, dead) = queues("enc");
    let q = WorkQueue::new(base, dead, opts(1, 1), |_b: Vec<Item<Unencodable>>| async {
        Vec::new()
    })
    .unwrap();
    match q.push(Unencodable).await {
        Err(WorkPushError::Encode {
            item: Unencodable, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    q.shutdown(LONG).await;
}

#[tokio::test(start_paused = true)]
async fn remove_all_empties_the_base_and_ends_flushes() {
    let (base, dead) = queues("rm");
    let q = WorkQueue::new(base, dead, opts(1, 0), |_b: Vec<Item<u32>>| async {
        Vec::new()
    })
    .unwrap();
    for i in 0..5u32 {
        q.push(i).await.unwrap();
    }
    assert_eq!(q.remove_all().await.unwrap(), 5);
    q.flush(Duration::ZERO).await.unwrap();
    assert!(q.is_empty().await.unwrap());
    q.shutdown(LONG).await;
}

#[test]
fn invalid_options_name_the_field() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (base, dead) = queues("bad");
        let err = WorkQueue::new(
            base,
            dead,
            WorkQueueOptions::default().max_attempts(0),
            |_b: Vec<Item<u32>>| async { Vec::new() },
        )
        .unwrap_err();
        assert_eq!(err.field, "max_attempts");
        assert_eq!(err.to_string(), "invalid max_attempts: must be at least 1");
    });
}

#[test]
fn handles_and_futures_are_send_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (base, dead) = queues("auto");
        let q = WorkQueue::new(base, dead, opts(1, 1), |_b: Vec<Item<u32>>| async {
            Vec::new()
        })
        .unwrap();
        send_sync(&q);
        send(&q.push(1));
        send(&q.flush(LONG));
        send(&q.shutdown(LONG));
        send(&q.dead_letters());
        q.shutdown(LONG).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_many_producers_every_item_handled() {
    const P: u32 = 8;
    const N: u32 = 2_000;
    let (base, dead) = queues("stress");
    let counts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let c = counts.clone();
    let q = WorkQueue::new(
        base,
        dead,
        opts(8, 4).backoff(Duration::from_millis(1), Duration::from_millis(5)),
        move |b: Vec<Item<u32>>| {
            let mut back = Vec::new();
            {
                let mut c = c.lock().unwrap();
                for it in b {
                    *c.entry(*it.value()).or_default() += 1;
                    if it.value() % 7 == 0 && it.attempts() == 0 {
                        back.push(it);
                    }
                }
            }
            async move { back }
        },
    )
    .unwrap();
    let producers: Vec<_> = (0..P)
        .map(|p| {
            let q = q.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    q.push(p * N + i).await.unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    q.flush(LONG).await.unwrap();
    let counts = counts.lock().unwrap().clone();
    assert_eq!(counts.len(), (P * N) as usize);
    for (v, n) in counts {
        assert_eq!(n, if v % 7 == 0 { 2 } else { 1 }, "item {v}");
    }
    assert!(q.workers() <= 4);
    assert_eq!(q.len().await.unwrap().total(), 0);
    q.shutdown(LONG).await;
}

#[test]
fn manager_is_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<snapstream::queue::Manager>();
    send_sync::<snapstream::queue::MemoryQueue>();
    let m = snapstream::queue::Manager::new();
    let cfg = snapstream::queue::config::QueuesConfig::default();
    send(&m.queues());
    send(&m.flush_all(LONG));
    send(&m.remove_all("x"));
    send(&m.shutdown_all(LONG));
    send(&m.create("x", &cfg, |_b: Vec<Item<u32>>| async { Vec::new() }));
}

/// An item whose encoding is above the base queue's `max_item_bytes` is
/// handed back as `TooLarge`, naming the limit; nothing is stored.
#[tokio::test(start_paused = true)]
async fn oversized_item_is_handed_back_as_too_large() {
    let base =
        Arc::new(MemoryQueue::new("big", QueueOptions::default().max_item_bytes(64)).unwrap());
    let dead = Arc::new(MemoryQueue::new("big.dead", QueueOptions::default()).unwrap());
    let q = WorkQueue::new(base, dead, opts(1, 0), |_b: Vec<Item<String>>| async {
        Vec::new()
    })
    .unwrap();
    let value = "x".repeat(100);
    match q.push(value.clone()).await {
        Err(WorkPushError::TooLarge { item, size, limit }) => {
            assert_eq!(item, value, "the value is handed back");
            assert_eq!((size, limit), (102, 64), "JSON adds the quotes");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // 62 characters encode to exactly 64 bytes: accepted.
    q.push("y".repeat(62)).await.unwrap();
    assert_eq!(q.len().await.unwrap().total(), 1);
    q.shutdown(LONG).await;
}

/// `flush` waits only for this handle's pushes; `drain` waits until the base
/// queue holds nothing ready or leased, whoever pushed it (here: straight
/// into the base queue, as another process would).
#[tokio::test(start_paused = true)]
async fn drain_waits_for_items_pushed_elsewhere_flush_does_not() {
    let (base, dead) = queues("drain");
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let q = WorkQueue::new(base.clone(), dead, opts(4, 0), move |b: Vec<Item<u32>>| {
        h.fetch_add(b.len(), Ordering::SeqCst);
        async { Vec::new() }
    })
    .unwrap();
    for i in 0..10u32 {
        base.push(NewItem::new(serde_json::to_vec(&i).unwrap()), LONG)
            .await
            .unwrap();
    }
    q.flush(LONG).await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 0, "flush did not wait");
    match q.drain(Duration::from_secs(1)).await {
        Err(WorkError::Timeout { pending }) => assert_eq!(pending, 10),
        other => panic!("expected Timeout, got {other:?}"),
    }
    q.set_max_workers(2);
    q.drain(LONG).await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 10);
    let len = q.len().await.unwrap();
    assert_eq!(len.ready + len.leased, 0);
    q.shutdown(LONG).await;
    assert!(matches!(q.drain(LONG).await, Err(WorkError::Shutdown)));
}

/// A drain on a handle that handles nothing itself (no workers) ends when
/// another consumer of the same base queue has emptied it.
#[tokio::test(start_paused = true)]
async fn drain_sees_another_consumer_empty_the_queue() {
    let (base, dead) = queues("drain2");
    let producer = WorkQueue::new(
        base.clone(),
        dead.clone(),
        opts(4, 0),
        |_b: Vec<Item<u32>>| async { Vec::new() },
    )
    .unwrap();
    for i in 0..20u32 {
        producer.push(i).await.unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let consumer = WorkQueue::new(base, dead, opts(4, 2), move |b: Vec<Item<u32>>| {
        h.fetch_add(b.len(), Ordering::SeqCst);
        async { Vec::new() }
    })
    .unwrap();
    producer.drain(LONG).await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 20);
    producer.shutdown(LONG).await;
    consumer.shutdown(LONG).await;
}

/// Items waiting out a retry back-off are neither ready nor leased: `drain`
/// does not wait for them (`len().delayed` shows them).
#[tokio::test(start_paused = true)]
async fn drain_does_not_wait_for_a_retry_back_off() {
    let (base, dead) = queues("drain3");
    let q = WorkQueue::new(
        base,
        dead,
        opts(1, 1).backoff(LONG, LONG),
        |b: Vec<Item<u32>>| async move { b }, // never handled
    )
    .unwrap();
    q.push(1).await.unwrap();
    // Waiting for the back-off (LONG) would time out.
    q.drain(LONG).await.unwrap();
    let len = q.len().await.unwrap();
    assert_eq!((len.ready, len.delayed, len.leased), (0, 1, 0));
    q.shutdown(LONG).await;
}
