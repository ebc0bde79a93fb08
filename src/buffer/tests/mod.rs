//! Unit, stress and property tests of the buffer. Loom models are in
//! `loom_buffer.rs`.

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::sync::Arc as StdArc;
use std::task::{Context, Poll};

use futures::task::noop_waker;
use proptest::prelude::*;

use super::*;

/// A payload that counts how many of its kind are alive.
#[derive(Debug)]
struct Counted(u64, StdArc<AtomicUsize>);

impl Counted {
    fn new(value: u64, live: &StdArc<AtomicUsize>) -> Self {
        live.fetch_add(1, StdOrdering::SeqCst);
        Counted(value, live.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, StdOrdering::SeqCst);
    }
}

fn drain<T: Clone, E>(cursor: &mut Cursor<T, E>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(Ok(batch)) = cursor.try_next() {
        out.extend_from_slice(batch);
    }
    out
}

#[test]
fn reader_taken_after_k_appends_sees_only_what_follows() {
    let mut w = EventBuffer::<u32>::new();
    for i in 0..5 {
        w.append_one(i);
    }
    let mut r = w.head();
    w.append(vec![5, 6]);
    w.append_one(7);
    assert_eq!(r.try_next(), Some(Ok(&[5, 6][..])));
    assert_eq!(r.try_next(), Some(Ok(&[7][..])));
    assert_eq!(r.try_next(), None);
}

#[test]
fn a_batch_is_one_node_and_an_empty_batch_is_none() {
    let mut w = EventBuffer::<u32>::new();
    let r = w.head();
    w.append(vec![]);
    assert_eq!(w.seq(), 0);
    w.append(vec![1, 2, 3]);
    assert_eq!(w.seq(), 1);
    assert_eq!(r.lag(), 1);
}

#[test]
fn cancelled_next_leaves_the_cursor_in_place() {
    let mut w = EventBuffer::<u32>::new();
    let mut r = w.head();
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    {
        let mut fut = r.next();
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        // dropped here, mid-wait
    }
    w.append_one(42);
    assert_eq!(r.try_next(), Some(Ok(&[42][..])));
    assert_eq!(r.try_next(), None);
}

#[tokio::test]
async fn cancelled_blocked_next_in_a_task_then_later_call_gets_the_item() {
    let mut w = EventBuffer::<u32>::new();
    let mut r = w.head();
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (parked_tx, parked_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut parked_tx = Some(parked_tx);
        let mut next = r.next();
        let mut cancel_rx = cancel_rx;
        let cancelled = std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = Pin::new(&mut next).poll(cx) {
                return Poll::Ready(Err(v.map(<[u32]>::to_vec).map_err(|_| ())));
            }
            if let Some(tx) = parked_tx.take() {
                let _ = tx.send(());
            }
            Pin::new(&mut cancel_rx).poll(cx).map(|_| Ok(()))
        })
        .await;
        assert!(cancelled.is_ok(), "next returned before any append");
        drop(next);
        r
    });
    parked_rx.await.unwrap();
    cancel_tx.send(()).unwrap();
    let mut r = task.await.unwrap();
    w.append_one(9);
    assert_eq!(r.next().await, Ok(&[9][..]));
}

#[test]
fn try_next_at_the_tail_is_a_follow_position() {
    let mut w = EventBuffer::<u32>::new();
    w.append_one(1);
    let mut r = w.head();
    assert_eq!(r.try_next(), None);
    let mut follow = r.clone();
    w.append_one(2);
    assert_eq!(follow.try_next(), Some(Ok(&[2][..])));
    assert_eq!(r.try_next(), Some(Ok(&[2][..])));
}

#[test]
fn error_is_returned_repeatedly_and_the_cursor_stays_put() {
    let mut w = EventBuffer::<u32, String>::new();
    let mut r = w.head();
    w.append_one(1);
    w.fail("boom".to_string());
    let mut late = r.clone();
    assert_eq!(r.try_next(), Some(Ok(&[1][..])));
    for _ in 0..3 {
        assert_eq!(
            r.try_next(),
            Some(Err(ReadError::Failed(&"boom".to_string())))
        );
    }
    assert_eq!(r.lag(), 1, "the cursor did not move onto the error");
    assert_eq!(late.try_next(), Some(Ok(&[1][..])));
    assert!(matches!(late.try_next(), Some(Err(ReadError::Failed(_)))));
}

#[tokio::test]
async fn dropping_the_writer_closes_waiting_readers() {
    let w = EventBuffer::<u32>::new();
    let mut r = w.head();
    let task = tokio::spawn(async move {
        r.next()
            .await
            .map(<[u32]>::to_vec)
            .map_err(|e| e.to_string())
    });
    tokio::task::yield_now().await;
    drop(w);
    assert_eq!(task.await.unwrap(), Err("buffer closed".to_string()));
}

#[tokio::test]
async fn one_append_wakes_every_waiting_reader() {
    let mut w = EventBuffer::<u32>::new();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut r = w.head();
        tasks.push(tokio::spawn(
            async move { r.next().await.unwrap().to_vec() },
        ));
    }
    // Let every task park on the tail.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    w.append_one(3);
    for t in tasks {
        assert_eq!(t.await.unwrap(), vec![3]);
    }
}

#[test]
fn splice_joins_a_snapshot_onto_live_with_no_gap_or_repeat() {
    let mut live = EventBuffer::<u32>::new();
    live.append_one(1);
    let pos = live.head();
    let mut snap = EventBuffer::new();
    let mut r = snap.head();
    snap.append(vec![10, 11]);
    live.append_one(2);
    snap.splice(&pos).unwrap();
    live.append_one(3);
    assert_eq!(drain(&mut r), vec![10, 11, 2, 3]);
}

#[test]
fn splice_onto_a_newer_buffer_is_refused_and_hands_the_writer_back() {
    let older = EventBuffer::<u32>::new();
    let mut newer = EventBuffer::<u32>::new();
    let pos = newer.head();
    let SpliceError(mut older) = older.splice(&pos).unwrap_err();
    let mut r = older.head();
    older.append_one(1);
    assert_eq!(r.try_next(), Some(Ok(&[1][..])));
    newer.append_one(2);
}

#[test]
fn long_runs_of_empty_nodes_are_skipped_and_dropped_iteratively() {
    // 200,000 nested splices: a reader crosses 200,000 sentinels and splice
    // points to reach the one event, then the whole chain is dropped, all on
    // a 256 KiB stack.
    let mut base = EventBuffer::<u32>::new();
    let mut newest = base.head();
    for _ in 0..200_000 {
        let b = EventBuffer::<u32>::new();
        let head = b.head();
        b.splice(&newest).unwrap();
        newest = head;
    }
    base.append_one(7);
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut r = newest;
            let mut keep = r.clone();
            let got = drain(&mut r);
            drop(r);
            assert!(keep.try_next().is_some());
            drop(keep);
            got
        })
        .unwrap();
    assert_eq!(handle.join().unwrap(), vec![7]);
}

#[test]
fn nodes_nobody_holds_are_freed() {
    let live = StdArc::new(AtomicUsize::new(0));
    let mut w = EventBuffer::<Counted>::new();
    let mut slow = w.head();
    let mut fast = w.head();
    for i in 0..100 {
        w.append_one(Counted::new(i, &live));
    }
    assert_eq!(live.load(StdOrdering::SeqCst), 100);
    while let Some(Ok(_)) = fast.try_next() {}
    // `slow` still holds everything after its start.
    assert_eq!(live.load(StdOrdering::SeqCst), 100);
    for _ in 0..60 {
        slow.try_next().unwrap().unwrap();
    }
    // 60 consumed: `slow` sits on #60 and pins the node it stood on at its
    // last re-pin (every REPIN_EVERY nodes), so at most that many read nodes
    // are still held.
    let pinned_from = 60 - 60 % REPIN_EVERY as usize;
    assert_eq!(live.load(StdOrdering::SeqCst), 100 - pinned_from + 1);
    let mut at_tail = slow.clone();
    while let Some(Ok(_)) = at_tail.try_next() {}
    // A cursor at the tail holds only the tail.
    drop(slow);
    assert_eq!(live.load(StdOrdering::SeqCst), 1);
    drop(at_tail);
    // Only the node `fast` and the writer sit on (the tail) is alive.
    assert_eq!(live.load(StdOrdering::SeqCst), 1);
    drop(fast);
    assert_eq!(live.load(StdOrdering::SeqCst), 1);
    drop(w);
    assert_eq!(live.load(StdOrdering::SeqCst), 0);
}

#[test]
fn a_spliced_snapshot_is_freed_with_its_readers() {
    let live = StdArc::new(AtomicUsize::new(0));
    let mut w = EventBuffer::<Counted>::new();
    let pos = w.head();
    let mut snap = EventBuffer::new();
    let r = snap.head();
    for i in 0..10 {
        snap.append_one(Counted::new(i, &live));
    }
    snap.splice(&pos).unwrap();
    drop(pos);
    w.append_one(Counted::new(99, &live));
    assert_eq!(live.load(StdOrdering::SeqCst), 11);
    drop(r);
    assert_eq!(
        live.load(StdOrdering::SeqCst),
        1,
        "only the live tail is left"
    );
}

#[test]
fn dropping_ten_million_nodes_on_a_small_stack_does_not_overflow() {
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let mut w = EventBuffer::<u64>::new();
            let r = w.head();
            for i in 0..10_000_000u64 {
                w.append_one(i);
            }
            assert_eq!(r.lag(), 10_000_000);
            drop(w);
            drop(r);
        })
        .unwrap();
    handle
        .join()
        .expect("dropping the chain overflowed the stack");
}

#[test]
fn a_cursor_that_cancels_repeatedly_does_not_grow_the_wait_list() {
    let w = EventBuffer::<u32>::new();
    let mut r = w.head();
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    for _ in 0..1000 {
        let mut fut = r.next();
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
    }
    for _ in 0..1000 {
        let mut other = w.head();
        let mut fut = other.next();
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
    }
    let waiters = w.shared.waiters.lock();
    assert!(waiters.slots.len() <= 2, "slots: {}", waiters.slots.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_1000_readers_1000_appends_random_delays() {
    use rand::Rng;
    const READERS: usize = 1000;
    const APPENDS: u64 = 1000;
    let mut w = EventBuffer::<u64>::new();
    let mut tasks = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let mut r = w.head();
        tasks.push(tokio::spawn(async move {
            let mut expected = 0u64;
            while expected < APPENDS {
                let delay = rand::thread_rng().gen_range(0..200u64);
                if delay < 3 {
                    tokio::time::sleep(std::time::Duration::from_micros(delay * 50)).await;
                } else if delay < 20 {
                    tokio::task::yield_now().await;
                }
                let batch = r.next().await.expect("writer never fails here");
                for &v in batch {
                    assert_eq!(v, expected, "out of order or duplicated");
                    expected += 1;
                }
            }
            expected
        }));
    }
    let writer = tokio::spawn(async move {
        let mut next = 0;
        while next < APPENDS {
            let n = rand::thread_rng().gen_range(1..4u64).min(APPENDS - next);
            w.append((next..next + n).collect());
            next += n;
            if rand::thread_rng().gen_bool(0.1) {
                tokio::task::yield_now().await;
            }
        }
        w
    });
    let w = writer.await.unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), APPENDS);
    }
    drop(w);
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    NewReader,
    CloneReader(usize),
    Read(usize),
    DropReader(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..4).prop_map(Op::Append),
        1 => Just(Op::NewReader),
        1 => (0..8usize).prop_map(Op::CloneReader),
        4 => (0..8usize).prop_map(Op::Read),
        1 => (0..8usize).prop_map(Op::DropReader),
    ]
}

/// A reader in the model: its cursor, the index in the log of the next batch
/// it must see, where its pin was last set, and reads since.
struct ModelReader {
    cursor: Cursor<Counted>,
    at: usize,
    pinned_at: usize,
    unpinned: u32,
}

proptest! {
    /// Every reader sees exactly the model's log from its start position on,
    /// batch by batch; nothing unreachable is kept alive.
    #[test]
    fn readers_match_a_vec_model(ops in proptest::collection::vec(op(), 0..300)) {
        let live = StdArc::new(AtomicUsize::new(0));
        let mut w = EventBuffer::<Counted>::new();
        let mut log: Vec<Vec<u8>> = Vec::new();
        let mut readers: Vec<ModelReader> = Vec::new();
        for op in ops {
            match op {
                Op::Append(batch) if !batch.is_empty() => {
                    w.append(batch.iter().map(|&b| Counted::new(u64::from(b), &live)).collect());
                    log.push(batch);
                }
                Op::NewReader => readers.push(ModelReader {
                    cursor: w.head(),
                    at: log.len(),
                    pinned_at: log.len(),
                    unpinned: 0,
                }),
                Op::CloneReader(i) if !readers.is_empty() => {
                    let r = &readers[i % readers.len()];
                    let copy = ModelReader { cursor: r.cursor.clone(), ..*r };
                    readers.push(copy);
                }
                Op::Read(i) if !readers.is_empty() => {
                    let n = readers.len();
                    let r = &mut readers[i % n];
                    match r.cursor.try_next() {
                        Some(Ok(batch)) => {
                            let got: Vec<u8> = batch.iter().map(|c| c.0 as u8).collect();
                            prop_assert_eq!(&got, &log[r.at]);
                            r.at += 1;
                            r.unpinned += 1;
                            if r.unpinned == REPIN_EVERY {
                                r.pinned_at = r.at;
                                r.unpinned = 0;
                            }
                        }
                        Some(Err(e)) => prop_assert!(false, "unexpected {:?}", e),
                        None => {
                            prop_assert_eq!(r.at, log.len());
                            r.pinned_at = r.at;
                            r.unpinned = 0;
                        }
                    }
                }
                Op::DropReader(i) if !readers.is_empty() => {
                    let n = readers.len();
                    readers.swap_remove(i % n);
                }
                _ => {}
            }
            // What is alive: everything from the oldest pin on, plus the
            // tail batch the writer holds. A pin holds the node consumed last
            // when it was set (batch `pinned_at - 1`).
            let oldest = readers.iter().map(|r| r.pinned_at).min().unwrap_or(log.len());
            let from = oldest.saturating_sub(1).min(log.len().saturating_sub(1));
            let expected: usize = log.get(from..).map_or(0, |b| b.iter().map(Vec::len).sum());
            prop_assert_eq!(live.load(StdOrdering::SeqCst), expected);
        }
    }
}

#[test]
fn nodes_a_reader_is_done_with_are_reused_by_the_writer() {
    let mut w = EventBuffer::<u64>::new();
    let mut r = w.head();
    for i in 0..100 {
        w.append_one(i);
    }
    let mut seen = 0;
    while let Some(Ok(batch)) = r.try_next() {
        seen += batch.len();
    }
    assert_eq!(seen, 100);
    // Every node before the tail came back to the bin (sentinel included).
    let binned: Vec<*const Node<u64, Infallible>> =
        w.bin.nodes.lock().iter().map(Arc::as_ptr).collect();
    assert_eq!(binned.len(), 100);
    w.append_one(100);
    assert!(
        binned.contains(&Arc::as_ptr(&w.tail)),
        "the new tail is a recycled node"
    );
    assert_eq!(r.try_next(), Some(Ok(&[100][..])));
    assert_eq!(r.try_next(), None);
}

#[test]
fn a_node_another_reader_still_needs_is_never_recycled() {
    let mut w = EventBuffer::<u64>::new();
    let mut fast = w.head();
    let mut slow = w.head();
    for i in 0..100 {
        w.append_one(i);
    }
    while let Some(Ok(_)) = fast.try_next() {}
    // `slow` pins the sentinel: nothing after it may be reused.
    assert_eq!(w.bin.nodes.lock().len(), 0);
    for i in 100..200 {
        w.append_one(i);
    }
    let mut expected = 0;
    while let Some(Ok(batch)) = slow.try_next() {
        for &v in batch {
            assert_eq!(v, expected);
            expected += 1;
        }
    }
    assert_eq!(expected, 200);
}
