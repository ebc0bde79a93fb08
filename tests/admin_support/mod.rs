//! Shared helpers of the `admin_*` tests: a service with a publisher, pools
//! and a work queue whose handler fails on demand, served over a real socket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapstream::admin::{Admin, AdminBuilder};
use snapstream::lease::LeasePool;
use snapstream::publisher::{Publisher, SubscribeRequest, Subscription};
use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
use snapstream::workpool::KeyedPool;
use tokio::sync::Notify;

#[path = "../publisher_support/mod.rs"]
pub mod publisher_support;

pub use publisher_support::{Store, TOPIC};

pub const TOKEN: &str = "test-token";
pub const QUEUE: &str = "jobs";

/// One job of the work queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub n: u64,
}

/// What the queue's handler does and did.
#[derive(Default)]
pub struct Handler {
    /// While set, every item comes back unhandled.
    pub failing: AtomicBool,
    /// The jobs handled, in order.
    pub handled: Mutex<Vec<u64>>,
    pub changed: Notify,
}

impl Handler {
    /// Waits until job `n` was handled.
    pub async fn wait_handled(&self, n: u64) {
        loop {
            let changed = self.changed.notified();
            if self.handled.lock().unwrap().contains(&n) {
                return;
            }
            changed.await;
        }
    }

    pub fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }
}

/// The service an admin watches.
pub struct Service {
    pub store: Arc<Store>,
    pub publisher: Publisher<u64>,
    pub subs: Vec<Subscription<u64>>,
    pub pool: KeyedPool<String, u64>,
    pub leases: LeasePool<String>,
    pub queue: WorkQueue<Job>,
    pub handler: Arc<Handler>,
}

impl Service {
    /// A publisher with two subscribers on key "a", a keyed pool, a lease
    /// pool with key "db" (target 3), and queue [`QUEUE`] whose items
    /// dead-letter after `max_attempts` failures.
    pub async fn start(max_attempts: u32) -> Self {
        let store = Store::new(None);
        let publisher = store.publisher(&mut publisher_support::builder());
        let mut subs = Vec::new();
        for _ in 0..2 {
            subs.push(
                publisher
                    .subscribe(SubscribeRequest::new(TOPIC, "a"))
                    .unwrap(),
            );
        }
        let pool = KeyedPool::builder()
            .workers(2)
            .build(|_k: String, _v: u64| async {})
            .unwrap();
        let leases = LeasePool::new();
        leases.set("db".to_string(), 3);
        let handler = Arc::new(Handler::default());
        let h = handler.clone();
        let base = Arc::new(MemoryQueue::new(QUEUE, QueueOptions::default()).unwrap());
        let dead = Arc::new(MemoryQueue::new("jobs.dead", QueueOptions::default()).unwrap());
        let opts = WorkQueueOptions::default()
            .max_attempts(max_attempts)
            .backoff(Duration::ZERO, Duration::ZERO)
            .batch_delay(Duration::ZERO);
        let queue = WorkQueue::new(base, dead, opts, move |batch: Vec<Item<Job>>| {
            let h = h.clone();
            async move {
                if h.failing.load(Ordering::SeqCst) {
                    return batch;
                }
                h.handled
                    .lock()
                    .unwrap()
                    .extend(batch.iter().map(|i| i.value().n));
                h.changed.notify_waiters();
                Vec::new()
            }
        })
        .unwrap();
        Self {
            store,
            publisher,
            subs,
            pool,
            leases,
            queue,
            handler,
        }
    }

    /// An admin builder watching every part of the service.
    pub fn admin(&self) -> AdminBuilder {
        Admin::builder()
            .publisher(&self.publisher)
            .keyed_pool("index", &self.pool)
            .lease_pool("conns", &self.leases, ["db".to_string()])
            .queue(&self.queue)
    }

    /// Pushes jobs `ns` while the handler fails, and waits until they are
    /// all dead letters.
    pub async fn dead_letters(&self, ns: impl IntoIterator<Item = u64>) {
        self.handler.failing.store(true, Ordering::SeqCst);
        for n in ns {
            self.queue.push(Job { n }).await.unwrap();
        }
        self.queue.flush(Duration::from_secs(10)).await.unwrap();
    }
}

/// Serves `router` on a free local port; returns its address.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}
