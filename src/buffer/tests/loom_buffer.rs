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

/// A reader moving its pin (freeing what is behind it) while the writer
/// appends and a clone of the reader is dropped on another thread: every
/// batch is read once, in order, and nothing is freed early.
#[test]
fn loom_repin_vs_append_vs_clone_drop() {
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
