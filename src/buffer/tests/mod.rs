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

/// Events with seq `from..=last` are alive when the oldest holder sits at
/// seq `oldest`: everything from the start of its block on.
fn alive_from(oldest: u64) -> u64 {
    oldest - oldest % BLOCK as u64
}

#[test]
fn blocks_nobody_holds_are_freed() {
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
    // 60 consumed: `slow` sits on seq 60 and holds its block, which starts
    // at seq `alive_from(60)` (event `seq - 1`), and every block after it.
    let expected = 100 - (alive_from(60) as usize - 1);
    assert!(expected < 100, "some blocks must have been freed");
    assert_eq!(live.load(StdOrdering::SeqCst), expected);
    let mut at_tail = slow.clone();
    while let Some(Ok(_)) = at_tail.try_next() {}
    // A cursor at the tail holds only the tail block.
    drop(slow);
    let in_tail = 100 - (alive_from(100) as usize - 1);
    assert_eq!(live.load(StdOrdering::SeqCst), in_tail);
    drop(at_tail);
    drop(fast);
    // The writer holds the tail block.
    assert_eq!(live.load(StdOrdering::SeqCst), in_tail);
    drop(w);
    assert_eq!(live.load(StdOrdering::SeqCst), 0);
}

#[test]
fn a_block_is_freed_when_its_last_holder_leaves_it_whoever_that_is() {
    let live = StdArc::new(AtomicUsize::new(0));
    let mut w = EventBuffer::<Counted>::new();
    let mut a = w.head();
    let mut b = w.head();
    let per_block = BLOCK as u64;
    // Fill exactly two blocks' worth after the sentinel block's first slot.
    for i in 0..2 * per_block {
        w.append_one(Counted::new(i, &live));
    }
    let all = 2 * per_block as usize;
    // `a` leaves block 0; `b` still holds it.
    for _ in 0..per_block {
        a.try_next().unwrap().unwrap();
    }
    assert_eq!(live.load(StdOrdering::SeqCst), all);
    // `b` leaves block 0 too: its BLOCK - 1 events go.
    for _ in 0..per_block {
        b.try_next().unwrap().unwrap();
    }
    assert_eq!(live.load(StdOrdering::SeqCst), all - (BLOCK - 1));
    // A clone is a holder as well.
    let c = b.clone();
    while let Some(Ok(_)) = a.try_next() {}
    while let Some(Ok(_)) = b.try_next() {}
    assert_eq!(live.load(StdOrdering::SeqCst), all - (BLOCK - 1));
    drop(c);
    // Only the tail block (seq 2 * BLOCK, one event) is left.
    assert_eq!(live.load(StdOrdering::SeqCst), 1);
    drop((a, b, w));
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

/// A reader in the model: its cursor and the index in the log of the next
/// batch it must see (its position's seq).
struct ModelReader {
    cursor: Cursor<Counted>,
    at: usize,
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
                }),
                Op::CloneReader(i) if !readers.is_empty() => {
                    let r = &readers[i % readers.len()];
                    let copy = ModelReader { cursor: r.cursor.clone(), at: r.at };
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
                        }
                        Some(Err(e)) => prop_assert!(false, "unexpected {:?}", e),
                        None => {
                            prop_assert_eq!(r.at, log.len());
                        }
                    }
                }
                Op::DropReader(i) if !readers.is_empty() => {
                    let n = readers.len();
                    readers.swap_remove(i % n);
                }
                _ => {}
            }
            // What is alive: everything from the start of the block of the
            // oldest position on (a reader's, or the writer's tail). Seq `s`
            // is batch `s - 1` of the log (seq 0 is the sentinel).
            let oldest = readers.iter().map(|r| r.at).min().unwrap_or(log.len()).min(log.len());
            let from = (alive_from(oldest as u64) as usize).saturating_sub(1);
            let expected: usize = log.get(from..).map_or(0, |b| b.iter().map(Vec::len).sum());
            prop_assert_eq!(live.load(StdOrdering::SeqCst), expected);
        }
    }
}

#[test]
fn batches_and_terminal_slots_cross_block_boundaries() {
    // Every append count around a block boundary, ending with an error in
    // the last slot of a block, in the first slot of a new one, and in the
    // middle; readers started at every position see exactly what follows.
    for n in 0..(3 * BLOCK as u64 + 2) {
        let mut w = EventBuffer::<u64, &'static str>::new();
        let mut readers = vec![w.head()];
        for i in 0..n {
            if i.is_multiple_of(3) {
                w.append(vec![i, i]);
            } else {
                w.append_one(i);
            }
            readers.push(w.head());
        }
        w.fail("end");
        for (start, mut r) in readers.into_iter().enumerate() {
            let mut got = Vec::new();
            loop {
                match r.try_next() {
                    Some(Ok(batch)) => got.extend_from_slice(batch),
                    Some(Err(e)) => {
                        assert_eq!(e, ReadError::Failed(&"end"));
                        break;
                    }
                    None => panic!("a failed buffer has no open tail"),
                }
            }
            let expected: Vec<u64> = (start as u64..n)
                .flat_map(|i| {
                    if i.is_multiple_of(3) {
                        vec![i, i]
                    } else {
                        vec![i]
                    }
                })
                .collect();
            assert_eq!(got, expected, "n = {n}, start = {start}");
            assert_eq!(r.try_next(), Some(Err(ReadError::Failed(&"end"))));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_many_readers_cross_block_boundaries_and_free_them() {
    const READERS: usize = 64;
    const APPENDS: u64 = 20 * BLOCK as u64 + 7;
    let live = StdArc::new(AtomicUsize::new(0));
    let mut w = EventBuffer::<Counted>::new();
    let mut tasks = Vec::with_capacity(READERS);
    for k in 0..READERS {
        let mut r = w.head();
        tasks.push(tokio::spawn(async move {
            let mut expected = 0u64;
            let mut steps = 0usize;
            while expected < APPENDS {
                steps += 1;
                if (steps + k).is_multiple_of(7) {
                    tokio::task::yield_now().await;
                }
                match r.next().await {
                    Ok(batch) => {
                        for c in batch {
                            assert_eq!(c.0, expected, "out of order or duplicated");
                            expected += 1;
                        }
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            // Reaching the end: the writer closes, and this reader sees it.
            assert_eq!(r.next().await.err(), Some(ReadError::Closed));
            expected
        }));
    }
    let writer = {
        let live = live.clone();
        tokio::spawn(async move {
            let mut next = 0;
            while next < APPENDS {
                let n = (next % 3 + 1).min(APPENDS - next);
                w.append((next..next + n).map(|v| Counted::new(v, &live)).collect());
                next += n;
                if next.is_multiple_of(5) {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    writer.await.unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), APPENDS);
    }
    // Writer and readers are gone: every block was freed.
    assert_eq!(live.load(StdOrdering::SeqCst), 0);
}
