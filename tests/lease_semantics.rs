//! Lease pool: targets, waiting, release, fairness, stop.

use std::collections::HashMap;
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use snapstream::lease::{AcquireError, Counts, Lease, LeasePool, TryAcquireError};

#[tokio::test]
async fn target_200_grants_200_and_the_201st_waits() {
    let pool = LeasePool::new();
    pool.set("k", 200);
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(pool.acquire("k").await.unwrap());
    }
    assert_eq!(
        pool.get(&"k"),
        Counts {
            target: 200,
            active: 200
        }
    );
    let mut extra = Box::pin(pool.acquire("k"));
    assert!(futures::poll!(extra.as_mut()).is_pending());
    assert_eq!(
        pool.try_acquire("k").unwrap_err(),
        TryAcquireError::NoHeadroom
    );
    held.pop();
    let lease = extra.await.unwrap();
    assert_eq!(pool.get(&"k").active, 200);
    drop(lease);
    drop(held);
    assert_eq!(pool.get(&"k").active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_waiters_are_served_as_holders_release() {
    let pool = LeasePool::new();
    pool.set(1u32, 200);
    let holders: Vec<Lease<u32>> = (0..200).map(|_| pool.try_acquire(1).unwrap()).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for _ in 0..200 {
        let (pool, tx) = (pool.clone(), tx.clone());
        waiters.push(tokio::spawn(async move {
            let lease = pool.acquire(1).await.unwrap();
            assert!(pool.get(&1).active <= 200);
            tx.send(lease.id()).unwrap();
            lease
        }));
    }
    drop(tx);
    for h in holders {
        drop(h);
    }
    let mut ids = Vec::new();
    for w in waiters {
        let lease = w.await.unwrap();
        assert!(!lease.is_released());
        ids.push(lease.id());
        std::mem::forget(lease); // keep them counted (tested below)
    }
    let mut sent: Vec<u64> = Vec::new();
    while let Some(id) = rx.recv().await {
        sent.push(id);
    }
    assert_eq!(sent.len(), 200);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "ids are unique");
    assert!(ids.iter().all(|id| *id > 200), "ids increase");
    assert_eq!(
        pool.get(&1),
        Counts {
            target: 200,
            active: 200
        }
    );
}

#[tokio::test]
async fn raising_the_target_grants_exactly_one_more() {
    let pool = LeasePool::new();
    pool.set("k", 200);
    let _held: Vec<_> = (0..200).map(|_| pool.try_acquire("k").unwrap()).collect();
    let mut a = Box::pin(pool.acquire("k"));
    let mut b = Box::pin(pool.acquire("k"));
    assert!(futures::poll!(a.as_mut()).is_pending());
    assert!(futures::poll!(b.as_mut()).is_pending());
    pool.set("k", 201);
    // Granted when `set` returned: the first waiter, and only it.
    let Poll::Ready(granted) = futures::poll!(a.as_mut()) else {
        panic!("the first waiter was not served by set");
    };
    assert!(futures::poll!(b.as_mut()).is_pending());
    assert_eq!(
        pool.get(&"k"),
        Counts {
            target: 201,
            active: 201
        }
    );
    drop(granted);
}

#[tokio::test]
async fn lowering_revokes_nothing_then_raising_grants_again() {
    let pool = LeasePool::new();
    pool.set("k", 3);
    let mut held: Vec<_> = (0..3).map(|_| pool.try_acquire("k").unwrap()).collect();
    pool.set("k", 1);
    assert_eq!(
        pool.get(&"k"),
        Counts {
            target: 1,
            active: 3
        }
    );
    held.pop();
    assert!(
        pool.try_acquire("k").is_err(),
        "active 2 is not below target 1"
    );
    held.pop();
    assert!(
        pool.try_acquire("k").is_err(),
        "active 1 is not below target 1"
    );
    pool.set("k", 2);
    let again = pool.try_acquire("k").unwrap();
    assert_eq!(
        pool.get(&"k"),
        Counts {
            target: 2,
            active: 2
        }
    );
    drop((again, held));
}

#[tokio::test]
async fn zero_removes_the_key_once_its_leases_are_gone() {
    let pool = LeasePool::new();
    pool.set("k", 2);
    let a = pool.try_acquire("k").unwrap();
    pool.set("k", 0);
    assert_eq!(pool.keys(), 1);
    assert_eq!(
        pool.get(&"k"),
        Counts {
            target: 0,
            active: 1
        }
    );
    pool.set("k", 1);
    assert!(
        pool.try_acquire("k").is_err(),
        "the outstanding lease still counts"
    );
    pool.set("k", 0);
    drop(a);
    assert_eq!(pool.keys(), 0);
    assert_eq!(pool.get(&"k"), Counts::default());
}

#[tokio::test]
async fn release_is_idempotent_and_drop_releases() {
    let pool = LeasePool::new();
    pool.set("k", 2);
    let mut a = pool.try_acquire("k").unwrap();
    let b = pool.try_acquire("k").unwrap();
    a.release();
    a.release();
    assert!(a.is_released());
    assert_eq!(pool.get(&"k").active, 1);
    drop(a);
    assert_eq!(pool.get(&"k").active, 1);
    drop(b);
    assert_eq!(pool.get(&"k").active, 0);
}

#[tokio::test]
async fn cancelled_acquire_passes_its_grant_on() {
    let pool = LeasePool::new();
    pool.set("k", 1);
    let held = pool.try_acquire("k").unwrap();
    let mut a = Box::pin(pool.acquire("k"));
    let mut b = Box::pin(pool.acquire("k"));
    assert!(futures::poll!(a.as_mut()).is_pending());
    assert!(futures::poll!(b.as_mut()).is_pending());
    drop(held); // granted to `a`
    drop(a); // never collected: goes to `b`
    let lease = b.await.unwrap();
    assert_eq!(pool.get(&"k").active, 1);
    drop(lease);
}

#[tokio::test]
async fn stop_ends_waiters_and_release_after_is_harmless() {
    let pool = LeasePool::new();
    pool.set("k", 1);
    let held = pool.try_acquire("k").unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire("k").await }
    });
    let mut stream = pool.leases();
    let mut next = stream.next();
    assert!(futures::poll!(&mut next).is_pending());
    tokio::task::yield_now().await;
    pool.stop();
    assert_eq!(waiter.await.unwrap().unwrap_err(), AcquireError::Stopped);
    assert!(next.await.is_none());
    assert!(stream.next().await.is_none());
    assert_eq!(pool.acquire("k").await.unwrap_err(), AcquireError::Stopped);
    assert_eq!(pool.try_acquire("k").unwrap_err(), TryAcquireError::Stopped);
    drop(held);
    assert_eq!(
        pool.get(&"k"),
        Counts {
            target: 1,
            active: 0
        }
    );
}

#[tokio::test]
async fn keyed_acquirers_wait_for_a_key_set_later() {
    let pool = LeasePool::new();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire("late").await.unwrap() }
    });
    tokio::task::yield_now().await;
    pool.set("late", 1);
    let lease = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*lease.key(), "late");
}

/// Fairness: keys with targets 2 and 1, leases released at once, get the
/// stream's leases 2:1 (smooth weighted round-robin by headroom).
#[tokio::test]
async fn stream_shares_follow_headroom() {
    let pool = LeasePool::new();
    pool.set("spam", 2);
    pool.set("eggs", 1);
    let mut counts: HashMap<&str, u32> = HashMap::new();
    let mut leases = pool.leases();
    for _ in 0..300 {
        let lease = leases.next().await.unwrap();
        *counts.entry(lease.key()).or_default() += 1;
    }
    assert_eq!(counts["spam"], 200);
    assert_eq!(counts["eggs"], 100);
}

/// With leases held for a while, as in Teleport's example, the key with
/// more headroom still gets more.
#[tokio::test]
async fn stream_prefers_the_key_with_more_headroom_while_leases_are_held() {
    let pool = LeasePool::new();
    pool.set("a", 3);
    pool.set("b", 1);
    let mut leases = pool.leases();
    let mut counts: HashMap<&str, u32> = HashMap::new();
    let mut held = std::collections::VecDeque::new();
    for _ in 0..400 {
        let lease = leases.next().await.unwrap();
        *counts.entry(lease.key()).or_default() += 1;
        held.push_back(lease);
        if held.len() > 2 {
            held.pop_front();
        }
    }
    assert!(counts["a"] > 2 * counts["b"], "{counts:?}");
}

#[tokio::test]
async fn keyed_waiters_come_before_the_stream() {
    let pool = LeasePool::new();
    pool.set("k", 1);
    let held = pool.try_acquire("k").unwrap();
    let mut stream = pool.leases();
    let mut from_stream = stream.next();
    assert!(futures::poll!(&mut from_stream).is_pending());
    let mut keyed = Box::pin(pool.acquire("k"));
    assert!(futures::poll!(keyed.as_mut()).is_pending());
    drop(held);
    let Poll::Ready(lease) = futures::poll!(keyed.as_mut()) else {
        panic!("the keyed waiter was not served first");
    };
    assert!(futures::poll!(&mut from_stream).is_pending());
    drop(lease);
}

#[test]
fn handles_and_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let pool = LeasePool::<String>::new();
    send_sync(&pool);
    send_sync(&pool.leases());
    send(&pool.acquire(String::new()));
    pool.set(String::new(), 1);
    send_sync(&pool.try_acquire(String::new()).unwrap());
}
