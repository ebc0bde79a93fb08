//! Shared helpers of the `publisher_*` integration tests: a tiny state store
//! that publishes every change and answers snapshots, and a subscriber-side
//! materialized view.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use snapstream::event::{Event, Message, Subject};
use snapstream::publisher::{
    Publisher, PublisherBuilder, SnapshotRequest, SnapshotSink, Subscription, SubscriptionError,
};
use tokio::sync::Semaphore;

pub const TOPIC: &str = "kv";

/// A key-value store at an index; every write is published under its lock,
/// so publish order is index order and a snapshot sees a consistent state.
pub struct Store {
    state: Mutex<StoreState>,
    publisher: Mutex<Option<Publisher<u64>>>,
    /// Snapshot handler calls.
    pub calls: AtomicUsize,
    /// When set, the handler takes one permit before reading the state.
    pub gate: Option<Arc<Semaphore>>,
}

#[derive(Default)]
pub struct StoreState {
    pub index: u64,
    /// key → (index of last write, value)
    pub data: BTreeMap<String, (u64, u64)>,
    /// Every write: (key, index).
    pub log: Vec<(String, u64)>,
}

impl Store {
    pub fn new(gate: Option<Arc<Semaphore>>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(StoreState::default()),
            publisher: Mutex::new(None),
            calls: AtomicUsize::new(0),
            gate,
        })
    }

    /// Registers the store's handler for `TOPIC` (with wildcard support).
    pub fn register(self: &Arc<Self>, b: &mut PublisherBuilder<u64>) {
        let store = self.clone();
        b.register_with_wildcard(
            TOPIC,
            move |req: SnapshotRequest, sink: SnapshotSink<u64>| {
                let store = store.clone();
                async move { store.snapshot(req, sink).await }
            },
        )
        .unwrap();
    }

    pub fn publisher(self: &Arc<Self>, b: &mut PublisherBuilder<u64>) -> Publisher<u64> {
        self.register(b);
        let p = b.build();
        *self.publisher.lock().unwrap() = Some(p.clone());
        p
    }

    async fn snapshot(
        &self,
        req: SnapshotRequest,
        mut sink: SnapshotSink<u64>,
    ) -> Result<u64, snapstream::publisher::BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let (index, items) = {
            let st = self.state.lock().unwrap();
            let items: Vec<_> = st
                .data
                .iter()
                .filter(|(k, _)| match req.subject() {
                    Subject::Wildcard => true,
                    Subject::Key(key) => &**key == k.as_str(),
                })
                .map(|(k, (i, v))| Event::new(TOPIC, k.as_str(), *i, *v))
                .collect();
            (st.index, items)
        };
        for e in items {
            sink.append_one(e)?;
        }
        Ok(index)
    }

    /// Writes `key = value` at the next index and publishes it.
    pub fn write(&self, key: &str, value: u64) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.index += 1;
        let index = st.index;
        st.data.insert(key.to_string(), (index, value));
        st.log.push((key.to_string(), index));
        if let Some(p) = &*self.publisher.lock().unwrap() {
            p.publish(vec![Event::new(TOPIC, key, index, value)])
                .unwrap();
        }
        index
    }

    /// Writes several keys at one index (one publish).
    pub fn write_many(&self, kvs: &[(&str, u64)]) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.index += 1;
        let index = st.index;
        let mut events = Vec::new();
        for (k, v) in kvs {
            st.data.insert(k.to_string(), (index, *v));
            events.push(Event::new(TOPIC, *k, index, *v));
        }
        if let Some(p) = &*self.publisher.lock().unwrap() {
            p.publish(events).unwrap();
        }
        index
    }

    /// Takes the store's publisher handle (so it can be dropped).
    pub fn take_publisher(&self) -> Option<Publisher<u64>> {
        self.publisher.lock().unwrap().take()
    }

    /// Indexes of the writes to `key` above `after`.
    pub fn writes_after(&self, key: &str, after: u64) -> Vec<u64> {
        let st = self.state.lock().unwrap();
        st.log
            .iter()
            .filter(|(k, i)| k == key && *i > after)
            .map(|(_, i)| *i)
            .collect()
    }

    pub fn index(&self) -> u64 {
        self.state.lock().unwrap().index
    }

    /// The store's values, restricted to `key` (or all for `None`).
    pub fn view(&self, key: Option<&str>) -> BTreeMap<String, u64> {
        self.state
            .lock()
            .unwrap()
            .data
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == k.as_str()))
            .map(|(k, (_, v))| (k.clone(), *v))
            .collect()
    }
}

/// A subscriber's materialized view, with the checks "nothing twice" (live
/// indexes strictly increase) built in.
#[derive(Default, Debug)]
pub struct View {
    pub data: BTreeMap<String, u64>,
    pub snapshot_done: bool,
    pub last_live: u64,
    pub eos_index: u64,
    pub new_snapshots: usize,
    pub live_indexes: Vec<u64>,
}

impl View {
    pub fn apply(&mut self, m: Message<u64>) {
        match m {
            Message::NewSnapshotToFollow => {
                self.data.clear();
                self.snapshot_done = false;
                self.new_snapshots += 1;
                self.live_indexes.clear();
            }
            Message::EndOfSnapshot { index } => {
                assert!(
                    !self.snapshot_done,
                    "two EndOfSnapshot without a new snapshot"
                );
                self.snapshot_done = true;
                self.last_live = index;
                self.eos_index = index;
            }
            Message::Events(b) => {
                let idx = b.index();
                if self.snapshot_done {
                    assert!(
                        idx > self.last_live,
                        "live index {idx} after {}",
                        self.last_live
                    );
                    self.last_live = idx;
                    self.live_indexes.push(idx);
                }
                for e in b.iter() {
                    self.data
                        .insert(e.subject().as_key().unwrap().to_string(), *e.payload());
                }
            }
        }
    }

    /// Reads everything available without waiting (the subscription must be
    /// polled on the current task).
    pub fn drain(&mut self, sub: &mut Subscription<u64>) -> Result<(), SubscriptionError> {
        use futures::FutureExt;
        while let Some(r) = sub.next().now_or_never() {
            self.apply(r?);
        }
        Ok(())
    }
}

/// Next message or panic if none is ready right now.
pub fn ready(sub: &mut Subscription<u64>) -> Result<Message<u64>, SubscriptionError> {
    use futures::FutureExt;
    sub.next().now_or_never().expect("a message is ready")
}

/// Whether nothing is ready right now.
pub fn nothing_ready(sub: &mut Subscription<u64>) -> bool {
    use futures::FutureExt;
    sub.next().now_or_never().is_none()
}

/// Lets spawned tasks (snapshot builds) run to their next await point, on a
/// current-thread runtime. Not a sleep: yields a bounded number of times.
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// A publisher builder with no cache and no lag limit unless set.
pub fn builder() -> PublisherBuilder<u64> {
    let mut b = Publisher::<u64>::builder();
    b.snapshot_cache_ttl(std::time::Duration::ZERO);
    b
}
