//! Property test: the lease pool against a simple model.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use proptest::prelude::*;
use snapstream::lease::{AcquireError, Counts, Lease, LeasePool};

#[derive(Debug, Clone)]
enum Op {
    Set(u8, u64),
    TryAcquire(u8),
    Acquire(u8),
    Release(usize),
    Cancel(usize),
    PollAny,
    Stop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3u8, 0..4u64).prop_map(|(k, t)| Op::Set(k, t)),
        2 => (0..3u8).prop_map(Op::TryAcquire),
        3 => (0..3u8).prop_map(Op::Acquire),
        4 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => Just(Op::PollAny),
        1 => Just(Op::Stop),
    ]
}

#[derive(Default)]
struct Model {
    counts: HashMap<u8, Counts>,
    /// Waiting acquirers per key, by waiter number, oldest first.
    waiters: HashMap<u8, VecDeque<u64>>,
    stopped: bool,
}

impl Model {
    fn headroom(&self, k: u8) -> u64 {
        let c = self.counts.get(&k).copied().unwrap_or_default();
        c.target.saturating_sub(c.active)
    }

    /// Grants to waiters of `k`; returns the waiter numbers served.
    fn serve(&mut self, k: u8) -> Vec<u64> {
        let mut served = Vec::new();
        if self.stopped {
            return served;
        }
        while self.headroom(k) > 0 {
            let Some(w) = self.waiters.entry(k).or_default().pop_front() else {
                break;
            };
            self.counts.entry(k).or_default().active += 1;
            served.push(w);
        }
        served
    }
}

type Pending = (u64, u8, BoxFuture<'static, Result<Lease<u8>, AcquireError>>);

fn noop_cx() -> Context<'static> {
    Context::from_waker(futures::task::noop_waker_ref())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn lease_pool_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let pool = LeasePool::<u8>::new();
        let mut model = Model::default();
        let mut held: Vec<Lease<u8>> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut next_waiter = 0u64;
        let mut last_id = 0u64;
        for op in ops {
            let mut expect_served: Vec<u64> = Vec::new();
            match op {
                Op::Set(k, t) => {
                    pool.set(k, t);
                    model.counts.entry(k).or_default().target = t;
                    expect_served = model.serve(k);
                }
                Op::TryAcquire(k) => {
                    let can = !model.stopped
                        && model.headroom(k) > 0
                        && model.waiters.get(&k).is_none_or(|w| w.is_empty());
                    let got = pool.try_acquire(k);
                    prop_assert_eq!(got.is_ok(), can);
                    if let Ok(l) = got {
                        model.counts.entry(k).or_default().active += 1;
                        held.push(l);
                    }
                }
                Op::Acquire(k) => {
                    let p = pool.clone();
                    let mut fut = async move { p.acquire(k).await }.boxed();
                    let w = next_waiter;
                    next_waiter += 1;
                    let now = !model.stopped
                        && model.headroom(k) > 0
                        && model.waiters.get(&k).is_none_or(|w| w.is_empty());
                    match fut.as_mut().poll(&mut noop_cx()) {
                        Poll::Ready(Ok(l)) => {
                            prop_assert!(now);
                            model.counts.entry(k).or_default().active += 1;
                            held.push(l);
                        }
                        Poll::Ready(Err(_)) => prop_assert!(model.stopped),
                        Poll::Pending => {
                            prop_assert!(!now && !model.stopped);
                            model.waiters.entry(k).or_default().push_back(w);
                            pending.push((w, k, fut));
                        }
                    }
                }
                Op::Release(i) if !held.is_empty() => {
                    let mut l = held.swap_remove(i % held.len());
                    let k = *l.key();
                    l.release();
                    l.release();
                    let c = model.counts.entry(k).or_default();
                    c.active -= 1;
                    expect_served = model.serve(k);
                }
                Op::Cancel(i) if !pending.is_empty() => {
                    let (w, k, fut) = pending.swap_remove(i % pending.len());
                    drop(fut);
                    model.waiters.entry(k).or_default().retain(|x| *x != w);
                }
                Op::PollAny => {
                    let mut s = pool.leases();
                    let can: Vec<u8> = (0..3)
                        .filter(|k| !model.stopped && model.headroom(*k) > 0)
                        .collect();
                    match Pin::new(&mut s).poll_next(&mut noop_cx()) {
                        Poll::Ready(Some(l)) => {
                            prop_assert!(can.contains(l.key()), "{:?} had no headroom", l.key());
                            model.counts.entry(*l.key()).or_default().active += 1;
                            held.push(l);
                        }
                        Poll::Ready(None) => prop_assert!(model.stopped),
                        Poll::Pending => prop_assert!(can.is_empty()),
                    }
                }
                Op::Stop => {
                    pool.stop();
                    model.stopped = true;
                    model.waiters.clear();
                }
                Op::Release(_) | Op::Cancel(_) => {}
            }
            // Collect what the real pool granted and compare with the model.
            let mut served = Vec::new();
            let mut still = Vec::new();
            let mut round_ids = Vec::new();
            for (w, k, mut fut) in pending.drain(..) {
                match fut.as_mut().poll(&mut noop_cx()) {
                    Poll::Ready(Ok(l)) => {
                        round_ids.push(l.id());
                        served.push(w);
                        held.push(l);
                    }
                    Poll::Ready(Err(AcquireError::Stopped)) => prop_assert!(model.stopped),
                    Poll::Ready(Err(e)) => prop_assert!(false, "unexpected {e}"),
                    Poll::Pending => still.push((w, k, fut)),
                }
            }
            pending = still;
            // Ids increase in grant order (the futures were polled in another order).
            round_ids.sort_unstable();
            if let Some(first) = round_ids.first() {
                prop_assert!(*first > last_id);
                last_id = *round_ids.last().unwrap();
            }
            if let Some(newest) = held.iter().map(|l| l.id()).max() {
                last_id = last_id.max(newest);
            }
            served.sort_unstable();
            expect_served.sort_unstable();
            prop_assert_eq!(served, expect_served);
            for k in 0..3u8 {
                let want = model.counts.get(&k).copied().unwrap_or_default();
                prop_assert_eq!(pool.get(&k), want, "key {}", k);
            }
            let mut ids: Vec<u64> = held.iter().map(|l| l.id()).collect();
            ids.sort_unstable();
            ids.dedup();
            prop_assert_eq!(ids.len(), held.len(), "lease ids are unique");
        }
        drop(pending);
        drop(held);
        for k in 0..3u8 {
            prop_assert_eq!(pool.get(&k).active, 0);
        }
    }
}
