//! One conformance suite for every [`BaseQueue`] backend.
//!
//! Each case is a generic async fn over an [`Env`] (a factory of fresh queues
//! plus what the backend allows); the `suite!` macro instantiates the whole
//! list once per backend: `memory`, `disk` (feature `disk`) and `redis`
//! (feature `redis`; skipped with a notice when `REDIS_URL` is unset and no
//! server answers at 127.0.0.1:6379).
//!
//! Time: on a backend whose timers all live in the process (memory) the
//! time-based cases run on tokio's paused clock and check durations exactly;
//! on the others (the disk committer thread and Redis run on the real clock)
//! they use short real timeouts and check only the outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use snapstream::queue::{BaseQueue, NewItem, PushError, QueueError, QueueLen, QueueOptions};
use tokio::sync::Barrier;
use tokio::time::Instant;

type Factory = Box<
    dyn Fn(QueueOptions) -> BoxFuture<'static, Result<Arc<dyn BaseQueue>, QueueError>>
        + Send
        + Sync,
>;

/// A backend under test.
struct Env {
    make: Factory,
    /// Whether time-based cases may run on tokio's paused clock.
    paused_clock: bool,
    /// Items per producer in the 8 × 8 stress case.
    stress_per_producer: usize,
    /// Keeps a temporary directory alive for the backend's lifetime.
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Env {
    async fn queue(&self, opts: QueueOptions) -> Arc<dyn BaseQueue> {
        (self.make)(opts).await.expect("open a queue")
    }

    /// Opens a queue, handing back the constructor's error.
    async fn try_queue(&self, opts: QueueOptions) -> Result<Arc<dyn BaseQueue>, QueueError> {
        (self.make)(opts).await
    }

    /// Pauses the clock when the backend allows; returns whether it did.
    fn pause(&self) -> bool {
        if self.paused_clock {
            tokio::time::pause();
        }
        self.paused_clock
    }
}

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(100);

fn unique_name(case: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "conformance-{case}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn push(q: &Arc<dyn BaseQueue>, payload: impl Into<Vec<u8>>) {
    q.push(NewItem::new(payload), LONG).await.expect("push");
}

async fn len(q: &Arc<dyn BaseQueue>) -> QueueLen {
    q.len().await.expect("len")
}

/// Lets spawned tasks run until they block.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

mod cases {
    use super::*;

    pub(super) async fn fifo(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        for i in 0..100u32 {
            push(&q, i.to_be_bytes()).await;
        }
        assert_eq!(len(&q).await.ready, 100);
        let mut out = Vec::new();
        while out.len() < 100 {
            let batch = q.pop(7, SHORT).await.unwrap();
            assert!(!batch.is_empty() && batch.len() <= 7);
            let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
            out.extend(batch.into_iter().map(|d| {
                assert_eq!(d.attempts, 0);
                u32::from_be_bytes(d.payload.try_into().unwrap())
            }));
            q.ack(&ids).await.unwrap();
        }
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(len(&q).await, QueueLen::default());
    }

    pub(super) async fn duplicates_simple_vs_unique(env: &Env) {
        let simple = env.queue(QueueOptions::default()).await;
        assert!(!simple.is_unique());
        push(&simple, "x").await;
        push(&simple, "x").await;
        assert_eq!(len(&simple).await.ready, 2);
        assert!(simple.has(b"x").await.unwrap());
        assert!(!simple.has(b"y").await.unwrap());

        let unique = env.queue(QueueOptions::default().unique(true)).await;
        assert!(unique.is_unique());
        push(&unique, "x").await;
        match unique.push(NewItem::with_key("x", "k"), SHORT).await {
            Err(PushError::AlreadyQueued(item)) => {
                assert_eq!(item, NewItem::with_key("x", "k"), "the item is handed back")
            }
            other => panic!("expected AlreadyQueued, got {other:?}"),
        }
        assert!(unique.has(b"x").await.unwrap());
        // Still a duplicate while leased; gone once acked.
        let d = unique.pop(1, SHORT).await.unwrap();
        assert!(matches!(
            unique.push(NewItem::new("x"), SHORT).await,
            Err(PushError::AlreadyQueued(_))
        ));
        assert!(unique.has(b"x").await.unwrap());
        unique.ack(&[d[0].id]).await.unwrap();
        assert!(!unique.has(b"x").await.unwrap());
        push(&unique, "x").await;
        assert_eq!(len(&unique).await.ready, 1);
    }

    pub(super) async fn len_counts_every_state(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        assert_eq!(len(&q).await, QueueLen::default());
        for p in ["a", "b", "c", "d"] {
            push(&q, p).await;
        }
        let got = q.pop(2, SHORT).await.unwrap();
        assert_eq!(got.len(), 2);
        q.nack(&[got[0].id], Duration::from_secs(3600))
            .await
            .unwrap();
        let l = len(&q).await;
        assert_eq!(
            l,
            QueueLen {
                ready: 2,
                delayed: 1,
                leased: 1
            }
        );
        assert_eq!(l.total(), 4);
        q.ack(&[got[1].id]).await.unwrap();
        assert_eq!(len(&q).await.total(), 3);
    }

    pub(super) async fn pop_waits_and_wakes_on_push(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        let popper = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.pop(4, LONG).await })
        };
        settle().await;
        assert!(!popper.is_finished(), "pop returned with nothing ready");
        push(&q, "wake").await;
        // Woken by the push: with a 60 s timeout a polling-free pop that missed
        // the wake-up would return empty (or make this test hang), not the item.
        let got = popper.await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"wake");
    }

    pub(super) async fn pop_deadline(env: &Env) {
        let paused = env.pause();
        let q = env.queue(QueueOptions::default()).await;
        let start = Instant::now();
        let got = q.pop(1, Duration::from_millis(250)).await.unwrap();
        assert!(got.is_empty());
        if paused {
            assert!(start.elapsed() >= Duration::from_millis(250));
        }
        // A zero timeout returns at once, also empty.
        assert!(q.pop(1, Duration::ZERO).await.unwrap().is_empty());
    }

    pub(super) async fn pop_cancelled_leaves_nothing_leased(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        // Cancel a waiting pop, then push: the item must be ready, not leased.
        {
            let pop = q.pop(1, LONG);
            let cancelled = tokio::time::timeout(Duration::from_millis(20), pop).await;
            assert!(cancelled.is_err(), "pop returned with nothing ready");
        }
        push(&q, "a").await;
        assert_eq!(
            len(&q).await,
            QueueLen {
                ready: 1,
                delayed: 0,
                leased: 0
            }
        );
        // Cancel pops racing with pushes: whatever was not returned stays ready.
        let mut returned = 0u64;
        for i in 0..20u32 {
            let pusher = {
                let q = Arc::clone(&q);
                tokio::spawn(async move { push(&q, i.to_be_bytes()).await })
            };
            tokio::select! {
                biased;
                got = q.pop(1, LONG) => returned += got.unwrap().len() as u64,
                _ = tokio::task::yield_now() => {}
            }
            pusher.await.unwrap();
        }
        let l = len(&q).await;
        assert_eq!(l.leased, returned);
        assert_eq!(l.total(), 21);
    }

    pub(super) async fn full_after_timeout(env: &Env) {
        let paused = env.pause();
        let q = env.queue(QueueOptions::default().capacity(2)).await;
        push(&q, "a").await;
        push(&q, "b").await;
        let start = Instant::now();
        let timeout = Duration::from_millis(200);
        match q.push(NewItem::with_key("c", "k"), timeout).await {
            Err(PushError::Full(item)) => assert_eq!(item, NewItem::with_key("c", "k")),
            other => panic!("expected Full, got {other:?}"),
        }
        if paused {
            assert!(start.elapsed() >= timeout);
        }
        // Leased items count too.
        let _leased = q.pop(1, SHORT).await.unwrap();
        assert!(matches!(
            q.push(NewItem::new("c"), Duration::ZERO).await,
            Err(PushError::Full(_))
        ));
        assert_eq!(len(&q).await.total(), 2);
    }

    pub(super) async fn waiting_push_succeeds_when_room_appears(env: &Env) {
        let q = env.queue(QueueOptions::default().capacity(1)).await;
        push(&q, "a").await;
        let pusher = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.push(NewItem::new("b"), LONG).await })
        };
        settle().await;
        assert!(!pusher.is_finished(), "push did not wait for room");
        let a = q.pop(1, SHORT).await.unwrap();
        assert_eq!(a[0].payload, b"a");
        q.ack(&[a[0].id]).await.unwrap();
        pusher
            .await
            .unwrap()
            .expect("the waiting push gets the room");
        let b = q.pop(1, LONG).await.unwrap();
        assert_eq!(b[0].payload, b"b");
    }

    pub(super) async fn remove_all_clears_dedup(env: &Env) {
        let q = env.queue(QueueOptions::default().unique(true)).await;
        for p in ["a", "b", "c"] {
            push(&q, p).await;
        }
        let leased = q.pop(1, SHORT).await.unwrap();
        q.nack(
            &[q.pop(1, SHORT).await.unwrap()[0].id],
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        assert_eq!(
            q.remove_all().await.unwrap(),
            3,
            "ready, delayed and leased"
        );
        assert_eq!(len(&q).await, QueueLen::default());
        for p in ["a", "b", "c"] {
            assert!(!q.has(p.as_bytes()).await.unwrap());
            push(&q, p).await;
        }
        // An ack for an item removed meanwhile is ignored.
        q.ack(&[leased[0].id]).await.unwrap();
        assert_eq!(len(&q).await.ready, 3);
    }

    pub(super) async fn closed(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        push(&q, "kept").await;
        let waiting = {
            let q = env.queue(QueueOptions::default()).await;
            let q2 = Arc::clone(&q);
            (q, tokio::spawn(async move { q2.pop(1, LONG).await }))
        };
        settle().await;
        q.close();
        q.close(); // idempotent
        match q.push(NewItem::new("late"), SHORT).await {
            Err(PushError::Closed(item)) => assert_eq!(item.payload, b"late"),
            other => panic!("expected Closed, got {other:?}"),
        }
        // Stored items stay and are still handed out; then Closed.
        let got = q.pop(1, SHORT).await.unwrap();
        assert_eq!(got[0].payload, b"kept");
        assert!(matches!(q.pop(1, SHORT).await, Err(QueueError::Closed)));
        assert_eq!(len(&q).await.leased, 1);
        // A pop waiting on an empty queue wakes up with Closed.
        waiting.0.close();
        assert!(matches!(waiting.1.await.unwrap(), Err(QueueError::Closed)));
    }

    pub(super) async fn stress_8_producers_8_consumers(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        let per = env.stress_per_producer;
        let total = 8 * per;
        let received = Arc::new(AtomicUsize::new(0));
        let mut producers = Vec::new();
        for p in 0..8u32 {
            let q = Arc::clone(&q);
            producers.push(tokio::spawn(async move {
                for i in 0..per as u32 {
                    let mut payload = p.to_be_bytes().to_vec();
                    payload.extend_from_slice(&i.to_be_bytes());
                    q.push(NewItem::new(payload), LONG).await.unwrap();
                }
            }));
        }
        let mut consumers = Vec::new();
        for _ in 0..8 {
            let q = Arc::clone(&q);
            let received = Arc::clone(&received);
            consumers.push(tokio::spawn(async move {
                let mut seen: Vec<Vec<u8>> = Vec::new();
                while received.load(Ordering::SeqCst) < total {
                    let batch = q.pop(32, SHORT).await.unwrap();
                    let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
                    received.fetch_add(batch.len(), Ordering::SeqCst);
                    seen.extend(batch.into_iter().map(|d| d.payload));
                    q.ack(&ids).await.unwrap();
                }
                seen
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        let mut counts: HashMap<Vec<u8>, u32> = HashMap::new();
        for c in consumers {
            for payload in c.await.unwrap() {
                *counts.entry(payload).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), total, "every item came out");
        assert!(counts.values().all(|&n| n == 1), "no item came out twice");
        assert_eq!(len(&q).await, QueueLen::default());
    }

    pub(super) async fn unique_race_32_pushes_one_wins(env: &Env) {
        let q = env.queue(QueueOptions::default().unique(true)).await;
        let barrier = Arc::new(Barrier::new(32));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let q = Arc::clone(&q);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                q.push(NewItem::new("same"), SHORT).await
            }));
        }
        let (mut ok, mut dup) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(PushError::AlreadyQueued(_)) => dup += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!((ok, dup), (1, 31));
        assert_eq!(len(&q).await.total(), 1);
    }

    /// 64 tasks, each awaiting one push at a time (the durable backends group
    /// them): every item lands exactly once and each task's items stay in order.
    pub(super) async fn concurrent_pushes_64_tasks_land_exactly_once(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        let per = (env.stress_per_producer / 8).max(1);
        let barrier = Arc::new(Barrier::new(64));
        let mut tasks = Vec::new();
        for p in 0..64u32 {
            let (q, barrier) = (Arc::clone(&q), Arc::clone(&barrier));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut ids = Vec::new();
                for i in 0..per as u32 {
                    let mut payload = p.to_be_bytes().to_vec();
                    payload.extend_from_slice(&i.to_be_bytes());
                    ids.push(q.push(NewItem::new(payload), LONG).await.unwrap());
                }
                ids
            }));
        }
        let mut all_ids = std::collections::HashSet::new();
        for t in tasks {
            for id in t.await.unwrap() {
                assert!(all_ids.insert(id), "an id was handed out twice");
            }
        }
        let mut next = [0u32; 64];
        let mut got = 0;
        while got < 64 * per {
            let batch = q.pop(1_000, SHORT).await.unwrap();
            assert!(!batch.is_empty(), "{got} of {} items came back", 64 * per);
            for d in &batch {
                let p = u32::from_be_bytes(d.payload[..4].try_into().unwrap()) as usize;
                let i = u32::from_be_bytes(d.payload[4..].try_into().unwrap());
                assert_eq!(i, next[p], "task {p}: items once each and in push order");
                next[p] += 1;
                assert!(all_ids.contains(&d.id));
            }
            got += batch.len();
            let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
            q.ack(&ids).await.unwrap();
        }
        assert_eq!(len(&q).await.total(), 0);
    }

    /// `push_batch`: one result per item, each item checked on its own
    /// (oversized and duplicate items refused, the others stored, in order).
    pub(super) async fn push_batch_checks_each_item(env: &Env) {
        let q = env
            .queue(QueueOptions::default().unique(true).max_item_bytes(8))
            .await;
        push(&q, "old").await;
        let items = vec![
            NewItem::new("a"),
            NewItem::new([9u8; 9]),
            NewItem::new("old"),
            NewItem::new("b"),
            NewItem::new("a"),
            NewItem::with_key("c", "k"),
        ];
        let out = q.push_batch(items, LONG).await;
        assert_eq!(out.len(), 6, "one result per item");
        match &out[1] {
            Err(PushError::TooLarge { item, size, limit }) => {
                assert_eq!(
                    (item.payload.as_slice(), *size, *limit),
                    (&[9u8; 9][..], 9, 8)
                );
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        for i in [2, 4] {
            assert!(
                matches!(&out[i], Err(PushError::AlreadyQueued(_))),
                "item {i}: {:?}",
                out[i]
            );
        }
        let ids: Vec<_> = [0, 3, 5]
            .iter()
            .map(|&i| *out[i].as_ref().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in batch order");
        assert!(!q.has(&[9u8; 9]).await.unwrap());
        let got = q.pop(10, SHORT).await.unwrap();
        let payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
        assert_eq!(payloads, [&b"old"[..], b"a", b"b", b"c"]);
        assert_eq!(got[3].key.as_deref(), Some("k"));
        assert_eq!(q.push_batch(Vec::new(), LONG).await.len(), 0);
    }

    /// `push_batch` on a bounded queue: what fits is stored, the rest waits
    /// for room (and fails with `Full` after its timeout); order is kept.
    pub(super) async fn push_batch_waits_for_room_in_order(env: &Env) {
        let q = env.queue(QueueOptions::default().capacity(2)).await;
        let out = q
            .push_batch(
                vec![NewItem::new("1"), NewItem::new("2"), NewItem::new("3")],
                SHORT,
            )
            .await;
        assert!(out[0].is_ok() && out[1].is_ok(), "{out:?}");
        assert!(matches!(&out[2], Err(PushError::Full(item)) if item.payload == b"3"));
        let pushing = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                q.push_batch(vec![NewItem::new("4"), NewItem::new("5")], LONG)
                    .await
            })
        };
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let got = q.pop(1, LONG).await.unwrap();
            seen.extend(got.iter().map(|d| d.payload.clone()));
            let ids: Vec<_> = got.iter().map(|d| d.id).collect();
            q.ack(&ids).await.unwrap();
        }
        assert!(pushing.await.unwrap().iter().all(Result::is_ok));
        assert_eq!(seen, [&b"1"[..], b"2", b"4", b"5"]);
    }

    /// After close, every item of a batch is refused with `Closed`.
    pub(super) async fn push_batch_after_close(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        q.close();
        let out = q
            .push_batch(vec![NewItem::new("a"), NewItem::new("b")], SHORT)
            .await;
        assert!(out.iter().all(|r| matches!(r, Err(PushError::Closed(_)))));
    }

    pub(super) async fn empty_payload_round_trips(env: &Env) {
        for unique in [false, true] {
            let q = env.queue(QueueOptions::default().unique(unique)).await;
            push(&q, Vec::new()).await;
            assert!(q.has(b"").await.unwrap());
            let got = q.pop(1, SHORT).await.unwrap();
            assert_eq!(got.len(), 1);
            assert!(got[0].payload.is_empty());
            assert_eq!(got[0].key, None);
            q.ack(&[got[0].id]).await.unwrap();
            assert_eq!(len(&q).await.total(), 0);
        }
    }

    pub(super) async fn nack_returns_after_delay_with_attempts(env: &Env) {
        let paused = env.pause();
        let q = env.queue(QueueOptions::default()).await;
        push(&q, "n").await;
        let first = q.pop(1, SHORT).await.unwrap();
        assert_eq!(first[0].attempts, 0);
        let delay = Duration::from_millis(300);
        let start = Instant::now();
        q.nack(&[first[0].id], delay).await.unwrap();
        assert_eq!(len(&q).await.delayed, 1);
        let again = q.pop(1, LONG).await.unwrap();
        assert_eq!(again[0].payload, b"n");
        assert_eq!(again[0].attempts, 1);
        if paused {
            assert!(start.elapsed() >= delay);
        }
        q.nack(&[again[0].id], Duration::ZERO).await.unwrap();
        let third = q.pop(1, SHORT).await.unwrap();
        assert_eq!(third[0].attempts, 2);
        q.ack(&[third[0].id]).await.unwrap();
        assert_eq!(len(&q).await.total(), 0);
    }

    pub(super) async fn visibility_timeout_redelivers(env: &Env) {
        let paused = env.pause();
        let vt = Duration::from_millis(300);
        let q = env
            .queue(QueueOptions::default().visibility_timeout(vt))
            .await;
        push(&q, "v").await;
        let start = Instant::now();
        let first = q.pop(1, SHORT).await.unwrap();
        assert_eq!(first[0].attempts, 0);
        // Not acked: handed out again once the lease ran out.
        let again = q.pop(1, LONG).await.unwrap();
        assert_eq!(again[0].payload, b"v");
        assert_eq!(again[0].attempts, 1);
        if paused {
            assert!(start.elapsed() >= vt);
        }
        q.ack(&[again[0].id]).await.unwrap();
        assert_eq!(len(&q).await.total(), 0);
    }

    pub(super) async fn per_key_order(env: &Env) {
        let q = env.queue(QueueOptions::default()).await;
        for (p, k) in [
            ("a1", Some("a")),
            ("a2", Some("a")),
            ("b1", Some("b")),
            ("n", None),
        ] {
            let item = match k {
                Some(k) => NewItem::with_key(p, k),
                None => NewItem::new(p),
            };
            q.push(item, LONG).await.unwrap();
        }
        push(&q, "n2").await;
        q.push(NewItem::with_key("a3", "a"), LONG).await.unwrap();
        let got = q.pop(10, SHORT).await.unwrap();
        let payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
        assert_eq!(payloads, [&b"a1"[..], b"b1", b"n", b"n2"]);
        assert_eq!(got[0].key.as_deref(), Some("a"));
        assert!(
            q.pop(10, Duration::ZERO).await.unwrap().is_empty(),
            "a2 waits for a1"
        );
        // A nacked head keeps its place in the key.
        q.nack(&[got[0].id], Duration::ZERO).await.unwrap();
        let again = q.pop(10, SHORT).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].payload, b"a1");
        q.ack(&[again[0].id]).await.unwrap();
        let next = q.pop(10, SHORT).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].payload, b"a2");
        q.ack(&[next[0].id]).await.unwrap();
        let last = q.pop(10, SHORT).await.unwrap();
        assert_eq!(last[0].payload, b"a3");
    }

    /// Options no queue can run with are refused by the constructor, in one
    /// shape on every backend (before the first pop could hand an item out
    /// again and again with a zero lease, or every push could wait out its
    /// timeout against a capacity of 0).
    pub(super) async fn invalid_options_are_refused(env: &Env) {
        let bad = [
            (QueueOptions::default().capacity(0), "capacity"),
            (
                QueueOptions::default().visibility_timeout(Duration::ZERO),
                "visibility_timeout",
            ),
            (
                QueueOptions::default().visibility_timeout(Duration::from_micros(999)),
                "visibility_timeout",
            ),
            (QueueOptions::default().max_item_bytes(0), "max_item_bytes"),
        ];
        for (opts, field) in bad {
            match env.try_queue(opts.clone()).await {
                Err(QueueError::InvalidOption(e)) => assert_eq!(e.field, field, "{opts:?}"),
                Err(other) => panic!("{opts:?}: expected InvalidOption, got {other:?}"),
                Ok(q) => panic!("{opts:?}: accepted as {q:?}"),
            }
        }
        // The smallest values that make sense are accepted.
        let edge = QueueOptions::default()
            .capacity(1)
            .visibility_timeout(Duration::from_millis(1))
            .max_item_bytes(1);
        let q = env.try_queue(edge).await.expect("edge values are valid");
        push(&q, "x").await;
        assert_eq!(len(&q).await.total(), 1);
    }

    /// An item above `max_item_bytes` fails at once with `TooLarge`, before
    /// the backend sees it: not after waiting for room in a full queue, and
    /// nothing is stored.
    pub(super) async fn oversized_push_fails_at_once(env: &Env) {
        let paused = env.pause();
        let q = env
            .queue(QueueOptions::default().capacity(2).max_item_bytes(16))
            .await;
        push(&q, [7u8; 16]).await; // the limit itself is accepted
        push(&q, "x").await; // now full
        let start = Instant::now();
        for (item, size) in [
            (NewItem::new([1u8; 17]), 17),
            (NewItem::with_key([2u8; 15], "k3"), 17),
            (NewItem::new(vec![3u8; 4096]), 4096),
        ] {
            match q.push(item.clone(), LONG).await {
                Err(PushError::TooLarge {
                    item: back,
                    size: s,
                    limit,
                }) => {
                    assert_eq!(back, item, "the item is handed back");
                    assert_eq!((s, limit), (size, 16));
                }
                other => panic!("expected TooLarge, got {other:?}"),
            }
        }
        if paused {
            assert_eq!(start.elapsed(), Duration::ZERO, "no wait for room");
        }
        assert_eq!(len(&q).await.total(), 2);
        assert!(!q.has(&[1u8; 17]).await.unwrap());
        // The error names the limit.
        let err = q.push(NewItem::new([0u8; 20]), LONG).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "item of 20 bytes is over the queue's max_item_bytes of 16"
        );
    }

    /// The default limit is 1 MiB: an item of exactly that size round-trips,
    /// one byte more is refused.
    pub(super) async fn default_item_limit_is_1_mib(env: &Env) {
        const MIB: usize = 1024 * 1024;
        assert_eq!(QueueOptions::DEFAULT_MAX_ITEM_BYTES, MIB);
        assert_eq!(QueueOptions::default().max_item_bytes, MIB);
        let q = env.queue(QueueOptions::default()).await;
        match q.push(NewItem::new(vec![1u8; MIB + 1]), LONG).await {
            Err(PushError::TooLarge { size, limit, .. }) => {
                assert_eq!((size, limit), (MIB + 1, MIB))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        push(&q, vec![2u8; MIB]).await;
        let got = q.pop(1, LONG).await.unwrap();
        assert_eq!(got[0].payload.len(), MIB);
        assert_eq!(len(&q).await.total(), 1);
    }
}

/// Instantiates every case for one backend. `$setup` is an async fn returning
/// `Option<Env>` (`None` = skip, after printing why).
macro_rules! suite {
    ($module:ident, $setup:path) => {
        mod $module {
            use super::*;
            suite!(@cases $setup;
                fifo,
                duplicates_simple_vs_unique,
                len_counts_every_state,
                pop_waits_and_wakes_on_push,
                pop_deadline,
                pop_cancelled_leaves_nothing_leased,
                full_after_timeout,
                waiting_push_succeeds_when_room_appears,
                remove_all_clears_dedup,
                closed,
                stress_8_producers_8_consumers,
                unique_race_32_pushes_one_wins,
                concurrent_pushes_64_tasks_land_exactly_once,
                push_batch_checks_each_item,
                push_batch_waits_for_room_in_order,
                push_batch_after_close,
                empty_payload_round_trips,
                nack_returns_after_delay_with_attempts,
                visibility_timeout_redelivers,
                per_key_order,
                invalid_options_are_refused,
                oversized_push_fails_at_once,
                default_item_limit_is_1_mib
            );
        }
    };
    (@cases $setup:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let multi = matches!(
                    stringify!($case),
                    "stress_8_producers_8_consumers"
                        | "unique_race_32_pushes_one_wins"
                        | "concurrent_pushes_64_tasks_land_exactly_once"
                );
                let rt = if multi {
                    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
                } else {
                    tokio::runtime::Builder::new_current_thread().enable_all().build()
                }
                .unwrap();
                rt.block_on(async {
                    let Some(env) = $setup(stringify!($case)).await else { return };
                    crate::cases::$case(&env).await;
                });
            }
        )*
    };
}

// --- memory ---------------------------------------------------------------
async fn memory_env(_case: &str) -> Option<Env> {
    use snapstream::queue::memory::MemoryQueue;
    Some(Env {
        make: Box::new(|opts| {
            Box::pin(async move {
                let q = MemoryQueue::new(unique_name("memory"), opts)?;
                Ok(Arc::new(q) as Arc<dyn BaseQueue>)
            })
        }),
        paused_clock: true,
        stress_per_producer: 10_000,
        _guard: None,
    })
}
suite!(memory, memory_env);

// --- disk -----------------------------------------------------------------
#[cfg(feature = "disk")]
async fn disk_env(case: &str) -> Option<Env> {
    use snapstream::queue::disk::DiskStore;
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path().join(format!("{case}.redb"))).unwrap();
    Some(Env {
        make: Box::new(move |opts| {
            let q = store.queue(&unique_name("disk"), opts);
            Box::pin(async move { Ok(Arc::new(q?) as Arc<dyn BaseQueue>) })
        }),
        paused_clock: false,
        // Every push waits for a durable commit: 8 × 1 000 keeps this quick.
        stress_per_producer: 1_000,
        _guard: Some(Box::new(dir)),
    })
}
#[cfg(feature = "disk")]
suite!(disk, disk_env);

// --- redis ----------------------------------------------------------------
#[cfg(feature = "redis")]
async fn redis_env(case: &str) -> Option<Env> {
    use snapstream::queue::redis::RedisQueue;
    let url = match std::env::var("REDIS_URL") {
        Ok(url) => url,
        Err(_) => {
            let addr = "127.0.0.1:6379".parse().unwrap();
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                eprintln!("notice: REDIS_URL unset and no Redis at 127.0.0.1:6379; skipping redis::{case}");
                return None;
            }
            "redis://127.0.0.1:6379".to_owned()
        }
    };
    let url: Arc<str> = url.into();
    Some(Env {
        make: Box::new(move |opts| {
            let url = Arc::clone(&url);
            Box::pin(async move {
                let q = RedisQueue::connect(&url, unique_name("redis"), opts).await?;
                Ok(Arc::new(q) as Arc<dyn BaseQueue>)
            })
        }),
        paused_clock: false,
        stress_per_producer: 2_000,
        _guard: None,
    })
}
#[cfg(feature = "redis")]
suite!(redis, redis_env);
