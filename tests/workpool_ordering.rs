//! Ordering, exactly-once, no head-of-line blocking, one in flight per key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use snapstream::workpool::{KeyedPool, StopMode};

/// Per (key, producer): the sequence numbers handled, in handling order.
type Seen = HashMap<(u64, u64), Vec<u64>>;
type Log = Arc<Mutex<Vec<(&'static str, u32)>>>;

#[tokio::test]
async fn qa_qb_example_keeps_order_per_key() {
    for workers in [1, 2, 4] {
        let log: Log = Arc::default();
        let l = log.clone();
        let pool = KeyedPool::builder()
            .workers(workers)
            .build(move |k: &'static str, e: u32| {
                let l = l.clone();
                async move {
                    tokio::task::yield_now().await;
                    l.lock().unwrap().push((k, e));
                }
            })
            .unwrap();
        let events = [("qa", 1), ("qb", 1), ("qa", 2), ("qa", 3), ("qb", 2)];
        pool.run(futures::stream::iter(events)).await.unwrap();
        assert!(pool.stop(StopMode::Drain).await.is_empty());
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 5);
        let of = |key| {
            log.iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, e)| *e)
                .collect::<Vec<_>>()
        };
        assert_eq!(of("qa"), [1, 2, 3]);
        assert_eq!(of("qb"), [1, 2]);
    }
}

/// Four producers with random pauses; each item is handled exactly once and
/// each key's items in order; never two items of one key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_in_order_under_four_producers() {
    const PRODUCERS: u64 = 4;
    const PER_PRODUCER: u64 = 500;
    const KEYS: u64 = 8;
    for round in 0..5u64 {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let busy: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let overlaps = Arc::new(AtomicUsize::new(0));
        let (s, b, o) = (seen.clone(), busy.clone(), overlaps.clone());
        let pool = KeyedPool::builder()
            .workers(4)
            .capacity(16)
            .build(move |key: u64, (producer, seq): (u64, u64)| {
                let (s, b, o) = (s.clone(), b.clone(), o.clone());
                async move {
                    if b[key as usize].fetch_add(1, Ordering::SeqCst) != 0 {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    for _ in 0..(seq % 3) {
                        tokio::task::yield_now().await;
                    }
                    s.lock()
                        .unwrap()
                        .entry((key, producer))
                        .or_default()
                        .push(seq);
                    b[key as usize].fetch_sub(1, Ordering::SeqCst);
                }
            })
            .unwrap();
        let mut producers = Vec::new();
        for p in 0..PRODUCERS {
            let pool = pool.clone();
            producers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(round * 10 + p);
                for seq in 0..PER_PRODUCER {
                    for _ in 0..rng.gen_range(0..3) {
                        tokio::task::yield_now().await;
                    }
                    // Each producer writes its own subsequence into each key.
                    let key = rng.gen_range(0..KEYS);
                    pool.add(key, (p, seq)).await.unwrap();
                }
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        pool.stop(StopMode::Drain).await;
        assert_eq!(
            overlaps.load(Ordering::SeqCst),
            0,
            "two in flight for one key"
        );
        let seen = seen.lock().unwrap();
        let mut total = 0;
        for seqs in seen.values() {
            total += seqs.len() as u64;
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "out of order: {seqs:?}"
            );
        }
        assert_eq!(total, PRODUCERS * PER_PRODUCER);
        let stats = pool.stats();
        assert_eq!(stats.handled, PRODUCERS * PER_PRODUCER);
        assert_eq!((stats.pending, stats.in_flight, stats.keys), (0, 0, 0));
    }
}

/// A's handler waits for B's; with 2 workers both finish. If B were stuck
/// behind A (or A's backlog), nothing could run and the paused clock would
/// run the timeout out at once.
#[tokio::test(start_paused = true)]
async fn busy_key_does_not_block_another() {
    let b_done = Arc::new(tokio::sync::Notify::new());
    let (tx, mut a_done) = tokio::sync::mpsc::unbounded_channel();
    let n = b_done.clone();
    let pool = KeyedPool::builder()
        .workers(2)
        .build(move |key: char, i: u32| {
            let (n, tx) = (n.clone(), tx.clone());
            async move {
                match (key, i) {
                    ('a', 0) => {
                        n.notified().await;
                        let _ = tx.send(());
                    }
                    ('a', _) => {}
                    _ => n.notify_one(),
                }
            }
        })
        .unwrap();
    // A hot backlog on A first, then B.
    for i in 0..100 {
        pool.add('a', i).await.unwrap();
    }
    pool.add('b', 0).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(3600), a_done.recv()).await;
    assert!(waited.is_ok(), "b never ran while a was busy");
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_concurrency_is_respected() {
    let limit = 3;
    let max_seen = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let (m, c) = (max_seen.clone(), now.clone());
    let pool = KeyedPool::builder()
        .workers(8)
        .per_key_concurrency(limit)
        .build(move |_k: u8, _i: u32| {
            let (m, c) = (m.clone(), c.clone());
            async move {
                let v = c.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(v, Ordering::SeqCst);
                tokio::task::yield_now().await;
                c.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .unwrap();
    for i in 0..2000 {
        pool.add(0, i).await.unwrap();
    }
    pool.stop(StopMode::Drain).await;
    assert!(max_seen.load(Ordering::SeqCst) <= limit);
    assert_eq!(pool.stats().handled, 2000);
}
