//! Loom models of the lease grant path.

use futures::StreamExt;
use loom::future::block_on;
use loom::thread;

use crate::lease::{AcquireError, Counts, LeasePool};

/// A release races a keyed acquirer and a stream acquirer: both get a lease
/// in turn, the target is never exceeded, nothing stays counted.
#[test]
fn loom_grant_release_races_two_acquirers() {
    loom::model(|| {
        let pool = LeasePool::new();
        pool.set(1u8, 1);
        let held = pool.try_acquire(1).unwrap();
        let keyed = {
            let p = pool.clone();
            thread::spawn(move || {
                let lease = block_on(p.acquire(1)).unwrap();
                assert_eq!(p.get(&1).active, 1);
                drop(lease);
            })
        };
        let any = {
            let p = pool.clone();
            thread::spawn(move || {
                let mut leases = p.leases();
                let lease = block_on(leases.next()).unwrap();
                assert_eq!(p.get(&1).active, 1);
                drop(lease);
            })
        };
        drop(held);
        keyed.join().unwrap();
        any.join().unwrap();
        assert_eq!(
            pool.get(&1),
            Counts {
                target: 1,
                active: 0
            }
        );
    });
}

/// `set` raising a target races an acquirer registering: no lost wake-up.
#[test]
fn loom_grant_set_races_acquire() {
    loom::model(|| {
        let pool = LeasePool::new();
        let waiter = {
            let p = pool.clone();
            thread::spawn(move || block_on(p.acquire(7u8)).map(|l| l.id()))
        };
        pool.set(7, 1);
        assert_eq!(waiter.join().unwrap(), Ok(1));
        assert_eq!(
            pool.get(&7),
            Counts {
                target: 1,
                active: 0
            }
        );
    });
}

/// `stop` races an acquirer: it ends with `Stopped`, never hangs.
#[test]
fn loom_grant_stop_races_acquire() {
    loom::model(|| {
        let pool = LeasePool::<u8>::new();
        let waiter = {
            let p = pool.clone();
            thread::spawn(move || block_on(p.acquire(1)).map(|_| ()))
        };
        pool.stop();
        assert_eq!(waiter.join().unwrap(), Err(AcquireError::Stopped));
    });
}
