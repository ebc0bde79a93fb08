//! Loom model of the dispatcher: 2 producers, 1 key, 2 workers, capacity 1.

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
        // This producer adds two items: they must be handled in this order.
        block_on(shared.add(0, 1)).map_err(|_| ()).unwrap();
        block_on(shared.add(0, 2)).map_err(|_| ()).unwrap();
        other.join().unwrap();
        shared.close(Closing::Drain);
        for w in workers {
            w.join().unwrap();
        }
        let log = log.lock();
        assert_eq!(log.len(), 3, "each item exactly once: {log:?}");
        let pos = |x| log.iter().position(|i| *i == x).unwrap();
        assert!(pos(1) < pos(2), "per-producer order on one key: {log:?}");
        let stats = shared.stats();
        assert_eq!((stats.handled, stats.keys, stats.workers), (3, 0, 0));
    });
}
