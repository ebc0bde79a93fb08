//! One sync facade for the concurrent core.
//!
//! Everything the lock-free parts of the crate use to share memory comes through
//! here, so that `RUSTFLAGS="--cfg loom"` swaps in [`loom`]'s model-checked
//! types for the whole crate at once (the same shape as `tokio/src/loom/`).
//! Code outside this module must not name `std::sync` atomics or mutexes
//! directly when it takes part in a loom model.

#[cfg(not(loom))]
mod imp {
    #[allow(unused_imports)]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::Arc;

    /// A mutex that does not poison: a panic while holding it leaves the data
    /// as it was, and the next locker carries on (none of our critical
    /// sections can leave the data half-updated).
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(std::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// `Arc::into_inner`: the value if this was the last strong reference.
    pub(crate) fn arc_into_inner<T>(this: Arc<T>) -> Option<T> {
        Arc::into_inner(this)
    }

    /// The keyed pool's locks (its intake and its queues): `parking_lot`'s
    /// mutex, which spins a little longer, then yields the thread, before it
    /// parks it. The workers' looks hold the queues' lock for a few µs, long
    /// enough that std's mutex often sleeps in the kernel and must be woken;
    /// parking_lot's took the pool at 10,000 uniform keys from 6.56M to
    /// 7.10M items/s, steady, with the one-hot-key case unchanged (6 rounds
    /// each, `SNAPSTREAM_BENCH_SECTION=go cargo bench --bench pools`,
    /// 2026-12-04). It does not poison either.
    #[derive(Debug, Default)]
    pub(crate) struct PoolMutex<T>(parking_lot::Mutex<T>);

    impl<T> PoolMutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(parking_lot::Mutex::new(value))
        }

        #[inline]
        pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, T> {
            self.0.lock()
        }

        #[inline]
        pub(crate) fn try_lock(&self) -> Option<parking_lot::MutexGuard<'_, T>> {
            self.0.try_lock()
        }
    }

    /// `std::cell::UnsafeCell` with loom's closure-based access API, so that
    /// under loom every access is checked for a data race.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        #[inline(always)]
        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        #[inline(always)]
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(loom)]
mod imp {
    #[allow(unused_imports)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use loom::sync::Arc;

    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// loom's `Arc` has no `into_inner`; `try_unwrap` is the same when the
    /// caller drops the `Err` arm (a race there only costs one level of
    /// nesting in the iterative chain drop).
    pub(crate) fn arc_into_inner<T>(this: Arc<T>) -> Option<T> {
        Arc::try_unwrap(this).ok()
    }

    pub(crate) use loom::cell::UnsafeCell;

    /// Under loom the keyed pool's locks are loom's, like every other.
    pub(crate) type PoolMutex<T> = Mutex<T>;
}

#[allow(unused_imports)]
pub(crate) use imp::*;
