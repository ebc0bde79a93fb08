//! Memory, back-pressure, re-entrancy, panics, stopping, resizing, streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use snapstream::workpool::{
    BuildError, Builder, KeyedPool, StopMode, StopTimeoutError, TryAddError,
};
use tokio::sync::{mpsc, Semaphore};

type Started = mpsc::UnboundedReceiver<(u32, u32)>;

/// A handler that reports each start and then waits for a permit.
fn gated() -> (
    Arc<Semaphore>,
    Started,
    impl Fn(u32, u32) -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static,
) {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let g = gate.clone();
    let handler = move |k: u32, i: u32| {
        let (g, tx) = (g.clone(), tx.clone());
        async move {
            let _ = tx.send((k, i));
            g.acquire().await.unwrap().forget();
        }
        .boxed()
    };
    (gate, rx, handler)
}

#[tokio::test]
async fn per_key_entries_are_freed() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder()
        .workers(1)
        .capacity(10_000)
        .build(handler)
        .unwrap();
    for k in 0..1000 {
        pool.add(k, 0).await.unwrap();
        pool.add(k, 1).await.unwrap();
    }
    started.recv().await.unwrap();
    assert_eq!(pool.stats().keys, 1000, "one entry per key with work");
    gate.add_permits(2000);
    pool.stop(StopMode::Drain).await;
    let stats = pool.stats();
    assert_eq!(stats.handled, 2000);
    assert_eq!(stats.keys, 0, "no entry kept for idle keys");
}

#[tokio::test]
async fn intake_is_bounded() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder()
        .workers(1)
        .capacity(4)
        .build(handler)
        .unwrap();
    pool.add(0, 0).await.unwrap();
    started.recv().await.unwrap(); // in flight, not pending
    for i in 1..=4 {
        pool.try_add(i, i).unwrap();
    }
    assert_eq!(pool.stats().pending, 4);
    match pool.try_add(9, 9) {
        Err(TryAddError::Full(k, i)) => assert_eq!((k, i), (9, 9)),
        other => panic!("expected Full, got {other:?}"),
    }
    let mut blocked = Box::pin(pool.add(10, 10));
    assert!(futures::poll!(blocked.as_mut()).is_pending());
    assert_eq!(pool.stats().pending, 4);
    gate.add_permits(1); // item 0 done, the worker takes item 1: room for one
    blocked.await.unwrap();
    assert!(pool.stats().pending <= 4);
    gate.add_permits(100);
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 6);
}

#[tokio::test]
async fn cancelled_add_passes_its_wakeup_on() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder()
        .workers(1)
        .capacity(1)
        .build(handler)
        .unwrap();
    pool.add(0, 0).await.unwrap();
    started.recv().await.unwrap();
    pool.add(1, 1).await.unwrap();
    let mut first = Box::pin(pool.add(2, 2));
    let mut second = Box::pin(pool.add(3, 3));
    assert!(futures::poll!(first.as_mut()).is_pending());
    assert!(futures::poll!(second.as_mut()).is_pending());
    gate.add_permits(1); // room appears; `first` is woken
    started.recv().await.unwrap();
    drop(first); // ...but cancelled: `second` must get the room
    tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap();
    gate.add_permits(10);
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 3);
}

#[tokio::test(start_paused = true)]
async fn handler_can_add_to_its_own_full_pool() {
    let pool = KeyedPool::<u32, u32>::builder()
        .workers(1)
        .capacity(1)
        .build_with(|adder| {
            move |key, depth| {
                let adder = adder.clone();
                async move {
                    if depth < 3 {
                        for child in 0..3 {
                            adder.add(key * 10 + child, depth + 1).await.unwrap();
                        }
                    }
                }
            }
        })
        .unwrap();
    pool.add(1, 0).await.unwrap();
    // With a paused clock the timeout only fires if everything is stuck.
    tokio::time::timeout(Duration::from_secs(3600), pool.stop(StopMode::Drain))
        .await
        .expect("re-entrant add deadlocked");
    assert_eq!(pool.stats().handled, 1 + 3 + 9 + 27);
}

#[tokio::test]
async fn panics_are_contained_and_reported() {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (r, h) = (reports.clone(), handled.clone());
    let pool = KeyedPool::builder()
        .workers(1)
        .on_panic(move |p| r.lock().unwrap().push((p.key, p.message)))
        .build(move |k: u32, i: u32| {
            let h = h.clone();
            async move {
                tokio::task::yield_now().await;
                if i == 2 {
                    panic!("boom {k}/{i}");
                }
                h.lock().unwrap().push((k, i));
            }
        })
        .unwrap();
    for i in 1..=4 {
        pool.add(7, i).await.unwrap();
    }
    pool.stop(StopMode::Drain).await;
    assert_eq!(*handled.lock().unwrap(), [(7, 1), (7, 3), (7, 4)]);
    assert_eq!(*reports.lock().unwrap(), [(7, "boom 7/2".to_owned())]);
    let stats = pool.stats();
    assert_eq!((stats.handled, stats.panicked, stats.keys), (3, 1, 0));
}

#[tokio::test]
async fn panic_while_creating_the_future_is_contained() {
    let pool = KeyedPool::builder()
        .workers(1)
        .build(|_k: u8, i: u8| {
            assert!(i != 0, "sync panic");
            async {}
        })
        .unwrap();
    pool.add(1, 0).await.unwrap();
    pool.add(1, 1).await.unwrap();
    pool.stop(StopMode::Drain).await;
    let stats = pool.stats();
    assert_eq!((stats.handled, stats.panicked), (1, 1));
}

#[tokio::test]
async fn drain_stop_handles_everything() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder().workers(2).build(handler).unwrap();
    for i in 0..20 {
        pool.add(i % 3, i).await.unwrap();
    }
    started.recv().await.unwrap();
    let stopper = tokio::spawn({
        let pool = pool.clone();
        async move { pool.stop(StopMode::Drain).await }
    });
    // Intake closes at once, while items are still pending.
    while pool.try_add(99, 99).is_ok() {
        tokio::task::yield_now().await;
    }
    assert_eq!(pool.add(5, 5).await.unwrap_err().into_inner(), (5, 5));
    gate.add_permits(100);
    assert!(stopper.await.unwrap().is_empty());
    let stats = pool.stats();
    // The try_adds that got in before the close are handled too.
    assert!(stats.handled >= 20);
    assert_eq!((stats.pending, stats.in_flight, stats.workers), (0, 0, 0));
}

#[tokio::test]
async fn abort_stop_returns_pending_in_order() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder().workers(1).build(handler).unwrap();
    pool.add(0, 0).await.unwrap();
    started.recv().await.unwrap();
    let mut expected = Vec::new();
    for i in 1..=10 {
        let key = [1, 2][i as usize % 2];
        pool.add(key, i).await.unwrap();
        expected.push((key, i));
    }
    let stopper = tokio::spawn({
        let pool = pool.clone();
        async move { pool.stop(StopMode::Abort).await }
    });
    while pool.stats().pending != 0 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1); // let the in-flight item finish
    let left = stopper.await.unwrap();
    assert_eq!(left, expected);
    let stats = pool.stats();
    assert_eq!((stats.handled, stats.keys, stats.workers), (1, 0, 0));
    assert!(matches!(
        pool.try_add(1, 1),
        Err(TryAddError::Stopped(1, 1))
    ));
}

#[tokio::test]
async fn resize_at_run_time() {
    let pool = KeyedPool::builder()
        .workers(1)
        .build(|_k: u8, _i: u8| async {})
        .unwrap();
    pool.set_workers(5).unwrap();
    assert_eq!(pool.stats().workers, 5);
    pool.set_workers(2).unwrap();
    while pool.stats().workers != 2 {
        tokio::task::yield_now().await;
    }
    for i in 0..50 {
        pool.add(i % 5, i).await.unwrap();
    }
    assert_eq!(pool.set_workers(0), Err(BuildError::ZeroWorkers));
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 50);
    assert_eq!(pool.set_workers(3), Err(BuildError::Stopped));
}

#[tokio::test]
async fn shrinking_limits_parallelism() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder().workers(3).build(handler).unwrap();
    pool.set_workers(1).unwrap();
    while pool.stats().workers != 1 {
        tokio::task::yield_now().await;
    }
    pool.add(1, 1).await.unwrap();
    pool.add(2, 2).await.unwrap();
    started.recv().await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(pool.stats().in_flight, 1);
    gate.add_permits(2);
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 2);
}

#[tokio::test]
async fn runs_a_channel_stream() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let pool = KeyedPool::builder()
        .capacity(8)
        .build(move |_k: u32, _i: u32| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for i in 0..1000 {
            tx.send((i % 17, i)).await.unwrap();
        }
    });
    let added = pool
        .run(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    feeder.await.unwrap();
    assert_eq!(added, 1000);
    pool.stop(StopMode::Drain).await;
    assert_eq!(count.load(Ordering::SeqCst), 1000);
}

#[tokio::test]
async fn run_hands_back_the_item_after_stop() {
    let pool = KeyedPool::builder()
        .build(|_k: u32, _i: u32| async {})
        .unwrap();
    pool.stop(StopMode::Drain).await;
    let err = pool
        .run(futures::stream::iter([(1, 2), (3, 4)]))
        .await
        .unwrap_err();
    assert_eq!(err.into_inner(), (1, 2));
}

#[tokio::test]
async fn dropping_the_last_handle_drains() {
    let count = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = count.clone();
    let pool = KeyedPool::builder()
        .build(move |_k: u32, _i: u32| {
            let (c, tx) = (c.clone(), tx.clone());
            async move {
                if c.fetch_add(1, Ordering::SeqCst) == 99 {
                    let _ = tx.send(());
                }
            }
        })
        .unwrap();
    let adder = pool.adder();
    for i in 0..100 {
        pool.add(i % 4, i).await.unwrap();
    }
    drop(pool);
    rx.recv().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 100);
    // Eventually the drain closes intake for the adder too.
    assert!(adder.add(1, 1).await.is_err());
}

#[tokio::test]
async fn build_errors() {
    let b = || KeyedPool::<u8, u8>::builder();
    assert_eq!(
        b().workers(0).build(|_, _| async {}).unwrap_err(),
        BuildError::ZeroWorkers
    );
    assert_eq!(
        b().capacity(0).build(|_, _| async {}).unwrap_err(),
        BuildError::ZeroCapacity
    );
    assert_eq!(
        b().per_key_concurrency(0)
            .build(|_, _| async {})
            .unwrap_err(),
        BuildError::ZeroConcurrency
    );
}

#[test]
fn build_outside_a_runtime_fails() {
    let err = KeyedPool::<u8, u8>::builder()
        .build(|_, _| async {})
        .unwrap_err();
    assert_eq!(err, BuildError::NoRuntime);
}

#[test]
fn handles_and_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _g = rt.enter();
    let pool = KeyedPool::<String, Vec<u8>>::builder()
        .build(|_, _| async {})
        .unwrap();
    send_sync(&pool);
    send_sync(&pool.adder());
    send(&pool.add(String::new(), vec![]));
    send(&pool.adder().add(String::new(), vec![]));
    send(&pool.stop(StopMode::Drain));
    send(&pool.stop_timeout(StopMode::Drain, Duration::from_secs(1)));
    send(&pool.run(futures::stream::empty()));
    fn error<E: std::error::Error + Send + Sync + 'static>() {}
    error::<StopTimeoutError<String, Vec<u8>>>();
}

/// A pool built by `builder` whose handler, for the items `waits` picks,
/// waits until the producer of [`produce_then_signal`] made its last add:
/// the shape of a deadlock between a handler and a producer blocked on room.
fn waiting_for_the_producer(
    builder: Builder<u32, u32>,
    waits: fn(u32, u32) -> bool,
) -> (KeyedPool<u32, u32>, Arc<tokio::sync::Notify>) {
    let signal = Arc::new(tokio::sync::Notify::new());
    let s = signal.clone();
    let pool = builder
        .build(move |key: u32, i: u32| {
            let s = s.clone();
            async move {
                if waits(key, i) {
                    s.notified().await;
                }
            }
        })
        .unwrap();
    (pool, signal)
}

/// Adds `items` in order from a task, then signals the waiting handler;
/// fails if the producer stays blocked (the pool deadlocked), then drains.
async fn produce_then_signal(
    pool: KeyedPool<u32, u32>,
    signal: Arc<tokio::sync::Notify>,
    items: Vec<(u32, u32)>,
) {
    let producer = tokio::spawn({
        let pool = pool.clone();
        async move {
            for (k, i) in items {
                pool.add(k, i).await.unwrap();
            }
            signal.notify_one();
        }
    });
    tokio::time::timeout(Duration::from_secs(3600), producer)
        .await
        .expect("producer kept out while there was room")
        .unwrap();
    pool.stop(StopMode::Drain).await;
}

/// Regression: waking blocked producers only in batches (once 1/16 of the
/// capacity was free) let a producer wait while there was room; a handler
/// waiting for that producer then deadlocked the pool.
#[tokio::test(start_paused = true)]
async fn blocked_add_is_woken_by_a_single_free_slot() {
    let (pool, signal) =
        waiting_for_the_producer(KeyedPool::builder().workers(1).capacity(32), |key, _| {
            key == 0
        });
    // Key 0 first: its handler holds the only worker; 32 more fill the pool.
    produce_then_signal(pool.clone(), signal, (0..33).map(|k| (k, k)).collect()).await;
    assert_eq!(pool.stats().handled, 33);
}

/// Regression: a handler of a one-item batch (per-key concurrency 2 makes
/// every batch one item) that waits for a producer blocked on room: the one
/// slot its start freed is below the wake-up margin, so only the rule "a
/// worker whose handler waits reports any free slot" lets the producer in.
#[tokio::test(start_paused = true)]
async fn a_waiting_one_item_handler_lets_a_producer_blocked_on_room_in() {
    let (pool, signal) = waiting_for_the_producer(
        KeyedPool::builder()
            .workers(1)
            .capacity(16)
            .per_key_concurrency(2),
        |key, _| key == 0,
    );
    // 16 fill the pool; the 17th needs the slot key 0's start freed.
    produce_then_signal(pool.clone(), signal, (0..17).map(|k| (k, k)).collect()).await;
    assert_eq!(pool.stats().handled, 17);
}

/// Regression: a handler that waits in the middle of its key's run held the
/// room of the run's items that had already run (only the batch's first
/// item had left the pending count), so a producer it waits for stayed
/// blocked at capacity 4 with two items really pending.
#[tokio::test(start_paused = true)]
async fn a_handler_waiting_mid_run_holds_no_room() {
    let (pool, signal) =
        waiting_for_the_producer(KeyedPool::builder().workers(1).capacity(4), |_, i| i == 3);
    // One key: the worker takes all four as one run; item 3 waits.
    for i in 1..=4 {
        pool.try_add(7, i).unwrap();
    }
    produce_then_signal(pool.clone(), signal, vec![(7, 5), (7, 6)]).await;
    assert_eq!(pool.stats().handled, 6);
}

/// Regression: an idle worker must be woken for an add even when the worker
/// woken before it found its item already moved (here by `stats`, which
/// drains the intake) and went on to run a handler that waits for that add.
#[tokio::test(start_paused = true)]
async fn an_add_reaches_an_idle_worker_while_the_other_waits_for_it() {
    let done = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let pool = KeyedPool::builder()
        .workers(2)
        .build({
            let (done, started) = (done.clone(), started.clone());
            move |key: u32, _i: u32| {
                let (done, started) = (done.clone(), started.clone());
                async move {
                    if key == 0 {
                        started.notify_one();
                        done.notified().await; // key 1's item must run meanwhile
                    } else {
                        done.notify_one();
                    }
                }
            }
        })
        .unwrap();
    while pool.stats().worker_waits < 2 {
        tokio::task::yield_now().await; // both workers park
    }
    pool.try_add(0, 0).unwrap(); // wakes one worker
    let _ = pool.stats(); // moves the item before that worker looks
    started.notified().await; // key 0's handler runs and waits
    pool.try_add(1, 1).unwrap(); // only the other, parked worker can run it
    tokio::time::timeout(Duration::from_secs(3600), pool.stop(StopMode::Drain))
        .await
        .expect("key 1's item never ran while key 0's handler waited for it");
    assert_eq!(pool.stats().handled, 2);
}

// ------------------------------------------------------------------ batches
//
// A worker takes several queued items (of one key, or of several keys) under
// one lock and runs them one after the other. These tests pin down what that
// must never change: abort hands back what did not start, a waiting handler
// never holds other keys, and a long queue does not starve other keys.

/// Regression: a batch's items after its first once left the pending count
/// when the worker took them, and came back when it handed them back
/// unstarted (a handler waited), so producers that filled the room meanwhile
/// pushed the pool above its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_handed_back_unstarted_never_push_the_pool_above_its_capacity() {
    let (release, parked) = (
        Arc::new(std::sync::Barrier::new(2)),
        Arc::new(std::sync::Barrier::new(2)),
    );
    let gate = Arc::new(Semaphore::new(0));
    let pool = KeyedPool::builder()
        .workers(1)
        .capacity(4)
        .build({
            let (release, parked, gate) = (release.clone(), parked.clone(), gate.clone());
            move |key: u32, _i: u32| {
                let (release, parked, gate) = (release.clone(), parked.clone(), gate.clone());
                async move {
                    match key {
                        // Holds the worker (and its thread) inside its batch
                        // while the test adds.
                        0 => {
                            parked.wait();
                            release.wait();
                        }
                        // Waits: the worker hands back the batch's rest.
                        1 => gate.acquire().await.unwrap().forget(),
                        _ => {}
                    }
                }
            }
        })
        .unwrap();
    for k in 0..4 {
        pool.try_add(k, k).unwrap();
    }
    // The worker took keys 0..4 as one batch and is inside key 0's handler.
    tokio::task::spawn_blocking({
        let parked = parked.clone();
        move || parked.wait()
    })
    .await
    .unwrap();
    let mut k = 10;
    while pool.try_add(k, k).is_ok() {
        k += 1;
    }
    assert!(pool.stats().pending <= 4, "{:?}", pool.stats());
    tokio::task::spawn_blocking(move || release.wait())
        .await
        .unwrap();
    // Key 1's handler waits; keys 2 and 3 went back unstarted.
    while pool.stats().in_flight != 1 || pool.stats().handled != 1 {
        tokio::task::yield_now().await;
    }
    let stats = pool.stats();
    assert!(stats.pending <= 4, "pending above the capacity: {stats:?}");
    gate.add_permits(1);
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 4 + (k - 10) as u64, "every item once");
}

#[tokio::test]
async fn abort_hands_back_items_a_worker_took_but_did_not_start() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder().workers(1).build(handler).unwrap();
    // Queued before the worker first runs: it takes all ten in one batch.
    for i in 1..=10 {
        pool.try_add(7, i).unwrap();
    }
    assert_eq!(started.recv().await, Some((7, 1)));
    let stopper = tokio::spawn({
        let pool = pool.clone();
        async move { pool.stop(StopMode::Abort).await }
    });
    // Let the stop close intake before the first item finishes; probes
    // added before that are queued, so they are handed back too.
    let mut expected: Vec<(u32, u32)> = (2..=10).map(|i| (7, i)).collect();
    while pool.try_add(8, 0).is_ok() {
        expected.push((8, 0));
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    let left = stopper.await.unwrap();
    assert_eq!(left, expected, "the rest of the batch, in add order");
    let stats = pool.stats();
    assert_eq!(
        (stats.handled, stats.pending, stats.in_flight, stats.keys),
        (1, 0, 0, 0)
    );
}

#[tokio::test]
async fn a_waiting_handler_hands_back_the_other_keys_of_its_batch() {
    // Key 1 waits for key 2's handler. Both are queued before an idle worker
    // runs, so it takes both in one batch; when key 1's handler waits, the
    // worker must hand key 2 back for the other worker, or neither finishes.
    let (gate, mut started, gated_handler) = gated();
    let signal = Arc::new(tokio::sync::Notify::new());
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let pool = KeyedPool::builder()
        .workers(2)
        .build({
            let signal = signal.clone();
            move |k: u32, i: u32| {
                let (signal, done_tx) = (signal.clone(), done_tx.clone());
                let gated = gated_handler(k, i);
                async move {
                    match k {
                        0 => gated.await,
                        1 => {
                            let _ = done_tx.send(10); // waiting now
                            signal.notified().await
                        }
                        2 => signal.notify_one(),
                        _ => {}
                    }
                    let _ = done_tx.send(k);
                }
                .boxed()
            }
        })
        .unwrap();
    pool.try_add(0, 0).unwrap(); // occupies one worker until the gate opens
    assert_eq!(started.recv().await, Some((0, 0)));
    pool.try_add(3, 0).unwrap(); // the other worker runs it without waiting
    assert_eq!(done.recv().await, Some(3));
    pool.try_add(1, 0).unwrap();
    pool.try_add(2, 0).unwrap();
    assert_eq!(done.recv().await, Some(10));
    // Key 1 waits; key 2 is back in the queue, not held by its worker.
    let stats = pool.stats();
    assert_eq!((stats.in_flight, stats.pending), (2, 1));
    gate.add_permits(1); // the first worker is free and takes key 2
    let mut finished = Vec::new();
    for _ in 0..3 {
        finished.push(
            tokio::time::timeout(Duration::from_secs(10), done.recv())
                .await
                .expect("no deadlock")
                .unwrap(),
        );
    }
    finished.sort_unstable();
    assert_eq!(finished, [0, 1, 2]);
    pool.stop(StopMode::Drain).await;
    assert_eq!(pool.stats().handled, 4);
}

#[tokio::test]
async fn a_long_queue_does_not_starve_another_key() {
    // One worker, 64 slow items on key 1 (each at least 1 ms, far beyond the
    // worker's time slice), then one item on key 2: key 2 runs after at most
    // two items of key 1, not after the whole batch.
    let order = Arc::new(Mutex::new(Vec::new()));
    let pool = KeyedPool::builder()
        .workers(1)
        .build({
            let order = order.clone();
            move |k: u32, _i: u32| {
                if k == 1 {
                    std::thread::sleep(Duration::from_millis(1)); // a slow, blocking handler
                }
                order.lock().unwrap().push(k);
                async {}
            }
        })
        .unwrap();
    for i in 0..64 {
        pool.try_add(1, i).unwrap();
    }
    pool.try_add(2, 0).unwrap();
    pool.stop(StopMode::Drain).await;
    let order = order.lock().unwrap();
    assert_eq!(order.len(), 65);
    let pos = order.iter().position(|k| *k == 2).unwrap();
    assert!(pos <= 2, "key 2 ran after {pos} items of key 1");
}

#[tokio::test]
async fn abort_from_inside_a_handler_leaves_the_rest_for_the_next_stop() {
    let cell: Arc<std::sync::OnceLock<KeyedPool<u32, u32>>> = Arc::default();
    let (tx, mut inside) = mpsc::unbounded_channel();
    let pool = KeyedPool::builder()
        .workers(1)
        .build({
            let cell = cell.clone();
            move |_k: u32, i: u32| {
                let (cell, tx) = (cell.clone(), tx.clone());
                async move {
                    if i == 1 {
                        let pool = cell.get().expect("set before any item runs");
                        let _ = tx.send(pool.stop(StopMode::Abort).await);
                    }
                }
            }
        })
        .unwrap();
    assert!(cell.set(pool.clone()).is_ok());
    for i in 1..=5 {
        pool.try_add(7, i).unwrap(); // one batch: the worker has not run yet
    }
    // The handler's own stop does not wait, so the rest of its batch is
    // not back yet; nothing is lost: the next stop returns it.
    assert_eq!(inside.recv().await, Some(Vec::new()));
    let left = pool.stop(StopMode::Abort).await;
    assert_eq!(left, [(7, 2), (7, 3), (7, 4), (7, 5)]);
    assert_eq!(pool.stats().handled, 1);
}

// Issue #10: `stop(Abort)` given up on (its future dropped) while a handler
// is stuck must leave every item that did not start for a later `stop`.

#[tokio::test(start_paused = true)]
async fn abandoned_abort_stop_keeps_the_items_for_the_next_stop() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder().workers(1).build(handler).unwrap();
    // Queued before the worker first runs: it takes all three keys at once;
    // key 1's handler waits, so keys 2 and 3 go back to the queue.
    for k in 1..=3 {
        pool.try_add(k, 0).unwrap();
    }
    assert_eq!(started.recv().await, Some((1, 0)));
    // The handler is stuck: the stop cannot finish, the caller gives up.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), pool.stop(StopMode::Abort)).await;
    assert!(gave_up.is_err(), "the stuck handler keeps the worker");
    let stats = pool.stats();
    assert_eq!((stats.aborted, stats.pending, stats.in_flight), (2, 0, 1));
    gate.add_permits(1);
    let left = pool.stop(StopMode::Abort).await;
    assert_eq!(
        left,
        [(2, 0), (3, 0)],
        "nothing vanished with the dropped stop"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.handled, stats.pending, stats.aborted, stats.workers),
        (1, 0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn stop_timeout_returns_every_unstarted_item_while_a_handler_is_stuck() {
    let (gate, mut started, handler) = gated();
    let pool = KeyedPool::builder().workers(1).build(handler).unwrap();
    // One batch: key 7's three items and key 8's one. The handler of (7, 1)
    // never returns (the gate stays shut until the end).
    for i in 1..=3 {
        pool.try_add(7, i).unwrap();
    }
    pool.try_add(8, 0).unwrap();
    assert_eq!(started.recv().await, Some((7, 1)));
    let err = pool
        .stop_timeout(StopMode::Abort, Duration::from_secs(1))
        .await
        .unwrap_err();
    let StopTimeoutError::TimedOut {
        items, in_flight, ..
    } = err
    else {
        panic!("timed out");
    };
    assert_eq!(
        items,
        [(7, 2), (7, 3), (8, 0)],
        "the stuck handler's key held back nothing"
    );
    assert_eq!(in_flight, 1);
    let stats = pool.stats();
    assert_eq!(
        (stats.pending, stats.aborted, stats.in_flight, stats.handled),
        (0, 0, 1, 0)
    );
    // The handler returns late: its worker exits, nothing more comes back.
    gate.add_permits(1);
    assert!(pool.stop(StopMode::Abort).await.is_empty());
    let stats = pool.stats();
    assert_eq!((stats.handled, stats.keys, stats.workers), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn stop_timeout_drains_until_the_deadline_then_hands_back_the_rest() {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let pool = KeyedPool::builder()
        .workers(2)
        .build({
            let gate = gate.clone();
            move |k: u32, i: u32| {
                let (gate, tx) = (gate.clone(), tx.clone());
                async move {
                    let _ = tx.send((k, i));
                    if (k, i) == (1, 1) {
                        gate.acquire().await.unwrap().forget();
                    }
                }
            }
        })
        .unwrap();
    // Key 1 is stuck behind its first item; key 2 runs freely.
    for i in 1..=3 {
        pool.try_add(1, i).unwrap();
    }
    for i in 1..=5 {
        pool.try_add(2, i).unwrap();
    }
    assert_eq!(started.recv().await, Some((1, 1)));
    let err = pool
        .stop_timeout(StopMode::Drain, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.into_items(), [(1, 2), (1, 3)]);
    let stats = pool.stats();
    assert_eq!((stats.handled, stats.pending, stats.in_flight), (5, 0, 1));
    gate.add_permits(1);
    let left = pool
        .stop_timeout(StopMode::Drain, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(left.is_empty());
    assert_eq!((pool.stats().handled, pool.stats().workers), (6, 0));
}

/// After the deadline `stop_timeout` waits for a worker that is running a
/// batch (here blocked inside one of its handlers) to hand back the rest of
/// it, so those items are in the error too, not left for a later `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_timeout_waits_for_a_busy_worker_to_hand_back_its_batch() {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let (release5, wait5) = std::sync::mpsc::channel::<()>();
    let (release9, wait9) = std::sync::mpsc::channel::<()>();
    let (wait5, wait9) = (Arc::new(Mutex::new(wait5)), Arc::new(Mutex::new(wait9)));
    let pool = KeyedPool::builder()
        .workers(2)
        .build({
            let gate = gate.clone();
            move |k: u32, i: u32| {
                let (gate, tx, wait5, wait9) =
                    (gate.clone(), tx.clone(), wait5.clone(), wait9.clone());
                async move {
                    let _ = tx.send((k, i));
                    match (k, i) {
                        (1, 1) => gate.acquire().await.unwrap().forget(),
                        // These block their worker's thread until released.
                        (5, 0) => drop(wait5.lock().unwrap().recv()),
                        (9, 0) => drop(wait9.lock().unwrap().recv()),
                        _ => {}
                    }
                }
                .boxed()
            }
        })
        .unwrap();
    // One worker waits on key 1 (its other item back in the queue), the
    // other is blocked in key 5: key 9's items queue up for it.
    pool.try_add(1, 1).unwrap();
    assert_eq!(started.recv().await, Some((1, 1)));
    pool.try_add(1, 2).unwrap();
    pool.try_add(5, 0).unwrap();
    assert_eq!(started.recv().await, Some((5, 0)));
    for i in 0..3 {
        pool.try_add(9, i).unwrap();
    }
    // Key 5's handler returns without waiting, so its worker takes all of
    // key 9 at once, and blocks in the first of them.
    release5.send(()).unwrap();
    assert_eq!(started.recv().await, Some((9, 0)));
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let stop = async {
        let res = pool
            .stop_timeout(StopMode::Drain, Duration::from_millis(10))
            .await;
        stopped.store(true, Ordering::SeqCst);
        res
    };
    let watch = async {
        // The deadline passed once the abort took key 1's queued item out;
        // only then does the busy worker go on (or once the stop returned,
        // so a stop that does not wait fails the test instead of hanging it).
        while pool.stats().aborted == 0 && !stopped.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        release9.send(()).unwrap();
    };
    let (res, ()) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(stop, watch) })
            .await
            .expect("the stop returns once the busy worker handed back");
    assert_eq!(res.unwrap_err().into_items(), [(1, 2), (9, 1), (9, 2)]);
    let stats = pool.stats();
    assert_eq!((stats.handled, stats.aborted, stats.in_flight), (2, 0, 1));
    gate.add_permits(1);
    assert!(pool.stop(StopMode::Drain).await.is_empty());
    assert_eq!(pool.stats().handled, 3);
}
