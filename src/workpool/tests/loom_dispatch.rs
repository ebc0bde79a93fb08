//! Loom model of the dispatcher: 2 producers, 1 key, 2 workers, capacity 1.
//!
//! One item per producer keeps the model small enough for CI; per-key order
//! across several items is covered by the proptest model of the dispatcher.

use loom::future::block_on;
use loom::thread;

use crate::sync::{Arc, AtomicUsize, Mutex, Ordering};
use crate::workpool::state::Closing;
use crate::workpool::wait::Wakeups;
use crate::workpool::{work, Shared};

#[test]
fn loom_dispatch_two_producers_one_key_two_workers() {
    loom::model(|| {
        let shared: Arc<Shared<u8, u32>> = Shared::new(1, 1, None);
        assert_eq!(shared.state.lock().resize(2, &mut Wakeups::default()), 2);
        let log = Arc::new(Mutex::new(Vec::new()));
        let busy = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (log, busy) = (log.clone(), busy.clone());
            std::sync::Arc::new(move |_key: u8, item: u32| {
                let (log, busy) = (log.clone(), busy.clone());
                async move {
                    assert_eq!(busy.fetch_add(1, Ordering::SeqCst), 0, "two in flight");
                    log.lock().push(item);
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            })
        };
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (s, h) = (shared.clone(), handler.clone());
                thread::spawn(move || block_on(work(s, h)))
            })
            .collect();
        let other = {
            let s = shared.clone();
            thread::spawn(move || block_on(s.add(0, 10)).map_err(|_| ()).unwrap())
        };
        block_on(shared.add(0, 1)).map_err(|_| ()).unwrap();
        other.join().unwrap();
        shared.close(Closing::Drain);
        for w in workers {
            w.join().unwrap();
        }
        let log = log.lock();
        let mut sorted = log.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [1, 10], "each item exactly once: {log:?}");
        let stats = shared.stats();
        assert_eq!((stats.handled, stats.keys, stats.workers), (2, 0, 0));
    });
}
