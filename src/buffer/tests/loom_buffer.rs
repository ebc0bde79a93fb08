//! loom models of the buffer's wake-up protocol.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::task::noop_waker;
use loom::future::block_on;
use loom::thread;

use super::*;

/// An append racing a reader that parks: the reader is always woken.
#[test]
fn loom_append_vs_waiting_reader() {
    loom::model(|| {
        let mut w = EventBuffer::<u32>::new();
        let mut r = w.head();
        let t = thread::spawn(move || {
            w.append_one(1);
            w
        });
        assert_eq!(block_on(r.next()), Ok(&[1][..]));
        drop(t.join().unwrap());
    });
}

/// Two readers parked on one tail are both woken by one append.
#[test]
fn loom_two_readers() {
    loom::model(|| {
        let mut w = EventBuffer::<u32>::new();
        let mut r1 = w.head();
        let mut r2 = w.head();
        let t1 = thread::spawn(move || block_on(r1.next()).map(<[u32]>::to_vec).ok());
        let t2 = thread::spawn(move || block_on(r2.next()).map(<[u32]>::to_vec).ok());
        w.append(vec![1, 2]);
        assert_eq!(t1.join().unwrap(), Some(vec![1, 2]));
        assert_eq!(t2.join().unwrap(), Some(vec![1, 2]));
    });
}

/// A reader whose future is dropped mid-wait loses nothing: the next call
/// gets the batch, and the stale registration cannot swallow the wake-up.
#[test]
fn loom_reader_future_dropped_mid_wait() {
    loom::model(|| {
        let mut w = EventBuffer::<u32>::new();
        let mut r = w.head();
        let t = thread::spawn(move || {
            w.append_one(5);
            w
        });
        let early = {
            let waker = noop_waker();
            let mut cx = Context::from_waker(&waker);
            let mut fut = r.next();
            match Pin::new(&mut fut).poll(&mut cx) {
                Poll::Ready(got) => Some(got.map(<[u32]>::to_vec)),
                Poll::Pending => None, // dropped here, mid-wait
            }
        };
        match early {
            Some(got) => assert_eq!(got, Ok(vec![5])),
            None => assert_eq!(block_on(r.next()), Ok(&[5][..])),
        }
        drop(t.join().unwrap());
    });
}

/// A terminal error racing a waiting reader: the reader gets the error.
#[test]
fn loom_error_vs_wait() {
    loom::model(|| {
        let w = EventBuffer::<u32, &'static str>::new();
        let mut r = w.head();
        let t = thread::spawn(move || w.fail("boom"));
        assert_eq!(block_on(r.next()), Err(ReadError::Failed(&"boom")));
        t.join().unwrap();
    });
}

/// Splicing a snapshot racing a reader of it and a live append: the reader
/// sees the snapshot then the live event, once each.
#[test]
fn loom_splice_vs_reader() {
    loom::model(|| {
        let mut live = EventBuffer::<u32>::new();
        let pos = live.head();
        let mut snap = EventBuffer::<u32>::new();
        let mut r = snap.head();
        snap.append_one(1);
        let t = thread::spawn(move || {
            snap.splice(&pos).unwrap();
            live.append_one(2);
            live
        });
        assert_eq!(block_on(r.next()), Ok(&[1][..]));
        assert_eq!(block_on(r.next()), Ok(&[2][..]));
        drop(t.join().unwrap());
    });
}

/// A reader crossing into a new block (letting the old one go) while the
/// writer appends and a clone of the reader is dropped on another thread:
/// every batch is read once, in order, and nothing is freed early.
#[test]
fn loom_block_crossing_vs_append_vs_clone_drop() {
    loom::model(|| {
        let mut w = EventBuffer::<u32>::new();
        let mut r = w.head();
        let clone = r.clone();
        let writer = thread::spawn(move || {
            w.append_one(1);
            w.append_one(2);
            w
        });
        let dropper = thread::spawn(move || drop(clone));
        assert_eq!(block_on(r.next()), Ok(&[1][..]));
        assert_eq!(block_on(r.next()), Ok(&[2][..]));
        drop(writer.join().unwrap());
        dropper.join().unwrap();
    });
}

/// An append that opens a new block racing a reader at the end of the old
/// one (loom builds use blocks of 2 slots): the reader is woken and reads
/// across the boundary, in order.
#[test]
fn loom_append_vs_reader_at_block_boundary() {
    loom::model(|| {
        let mut w = EventBuffer::<u32>::new();
        w.append_one(1); // fills block 0 (sentinel, 1)
        let mut r = w.head();
        let t = thread::spawn(move || {
            w.append_one(2); // block 1, slot 0
            w.append_one(3); // block 1, slot 1
            w
        });
        assert_eq!(block_on(r.next()), Ok(&[2][..]));
        assert_eq!(block_on(r.next()), Ok(&[3][..]));
        drop(t.join().unwrap());
    });
}

/// A payload that counts how many are alive (a plain std counter: it only
/// checks the outcome, it takes no part in the synchronisation).
struct Counted(u32, std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Two readers on two threads leave block 0 while the writer fills block 1:
/// whichever leaves last frees it, exactly once, and nobody reads freed
/// memory (loom checks the slot accesses and the `Arc` counts).
#[test]
fn loom_last_holder_frees_the_block() {
    loom::model(|| {
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let make = |v: u32| {
            live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Counted(v, live.clone())
        };
        let mut w = EventBuffer::<Counted>::new();
        let r1 = w.head();
        let r2 = w.head();
        w.append_one(make(1)); // block 0: sentinel, 1
        let two = make(2);
        let read = |mut r: Cursor<Counted>| {
            thread::spawn(move || {
                let a = block_on(r.next()).map(|b| b[0].0).ok();
                let b = block_on(r.next()).map(|b| b[0].0).ok();
                (a, b)
            })
        };
        let (t1, t2) = (read(r1), read(r2));
        w.append_one(two); // block 1
        assert_eq!(t1.join().unwrap(), (Some(1), Some(2)));
        assert_eq!(t2.join().unwrap(), (Some(1), Some(2)));
        // Both readers are gone: block 0 is freed; the writer holds block 1.
        assert_eq!(live.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(w);
        assert_eq!(live.load(std::sync::atomic::Ordering::SeqCst), 0);
    });
}

/// A terminal error and a close landing in a new block while a reader waits
/// at the end of the old one: the reader gets the error (or the close).
#[test]
fn loom_error_or_close_vs_wait_at_block_boundary() {
    loom::model(|| {
        let mut w = EventBuffer::<u32, &'static str>::new();
        w.append_one(1);
        let mut r = w.head();
        let mut r2 = w.head();
        let t = thread::spawn(move || w.fail("boom"));
        assert_eq!(block_on(r.next()), Err(ReadError::Failed(&"boom")));
        t.join().unwrap();
        assert_eq!(r2.try_next(), Some(Err(ReadError::Failed(&"boom"))));
    });
    loom::model(|| {
        let mut w = EventBuffer::<u32>::new();
        w.append_one(1);
        let mut r = w.head();
        let t = thread::spawn(move || drop(w));
        assert_eq!(block_on(r.next()), Err(ReadError::Closed));
        t.join().unwrap();
    });
}
