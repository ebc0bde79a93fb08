//! A state store behind a publisher, for the network tests: every change to
//! a key stores its per-key sequence number (1, 2, 3, ...) at a new global
//! index, so a view can tell a skipped or doubled event from its payload.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapstream::event::{Event, Subject};
use snapstream::net::{ServerStats, ServerStatsHandle, ViewState};
use snapstream::publisher::{Publisher, PublisherBuilder, SnapshotRequest, SnapshotSink};

pub const TOPIC: &str = "kv";

#[derive(Default)]
pub struct StoreState {
    pub index: u64,
    pub keys: BTreeMap<String, (u64, u64)>, // key -> (index, sequence)
}

#[derive(Clone, Default)]
pub struct Store(pub Arc<Mutex<StoreState>>);

impl Store {
    /// Applies one change to `key` and publishes it (store first, then
    /// publisher, as a state store does).
    pub fn write(&self, publisher: &Publisher<u64>, key: &str) -> u64 {
        let mut st = self.0.lock().unwrap();
        st.index += 1;
        let index = st.index;
        let seq = st.keys.get(key).map_or(0, |e| e.1) + 1;
        st.keys.insert(key.to_string(), (index, seq));
        // Publish under the store lock: events reach the publisher in index order.
        publisher
            .publish(vec![Event::new(TOPIC, key, index, seq)])
            .unwrap();
        index
    }

    pub fn get(&self, key: &str) -> Option<(u64, u64)> {
        self.0.lock().unwrap().keys.get(key).copied()
    }

    pub fn publisher(&self) -> Publisher<u64> {
        self.publisher_with(Publisher::<u64>::builder())
    }

    pub fn publisher_with_lag_limit(&self, limit: u64) -> Publisher<u64> {
        let mut b = Publisher::<u64>::builder();
        b.lag_limit(Some(limit));
        self.publisher_with(b)
    }

    fn publisher_with(&self, mut b: PublisherBuilder<u64>) -> Publisher<u64> {
        let store = self.clone();
        b.register_with_wildcard(
            TOPIC,
            move |r: SnapshotRequest, mut s: SnapshotSink<u64>| {
                let store = store.clone();
                async move {
                    let (index, events) = {
                        let st = store.0.lock().unwrap();
                        let events: Vec<_> = st
                            .keys
                            .iter()
                            .filter(|(k, _)| match r.subject() {
                                Subject::Wildcard => true,
                                Subject::Key(want) => **want == ***k,
                            })
                            .map(|(k, (i, seq))| Event::new(TOPIC, k.as_str(), *i, *seq))
                            .collect();
                        (st.index, events)
                    };
                    if !events.is_empty() {
                        s.append(events)?;
                    }
                    Ok(index.max(1))
                }
            },
        )
        .unwrap();
        b.build()
    }
}

/// A view state that checks every live event against the one before it:
/// the per-key sequence must go up by exactly one, the index must grow.
#[derive(Default)]
pub struct Checked {
    pub keys: BTreeMap<String, (u64, u64)>,
    pub violations: Vec<String>,
    pub live_applied: u64,
}

impl ViewState<u64> for Checked {
    fn reset(&mut self) {
        self.keys.clear();
    }

    fn apply(&mut self, e: &Event<u64>) {
        let key = e.subject().as_key().unwrap().to_string();
        let seq = *e.payload();
        if let Some(&(index, prev)) = self.keys.get(&key) {
            // Snapshot events come in one go after a reset; a repeated key
            // there is a violation too.
            if seq != prev + 1 || e.index() <= index {
                self.violations.push(format!(
                    "{key}: seq {prev}->{seq}, index {index}->{}",
                    e.index()
                ));
            }
            self.live_applied += 1;
        }
        self.keys.insert(key, (e.index(), seq));
    }
}

/// Waits until the server's figures satisfy `done`. The server counts a
/// stream's end when it drops the stream, after the client saw the status:
/// there is no signal to wait on across the socket, so this re-reads the
/// figures (bounded, never a timing assertion).
pub async fn until(stats: &ServerStatsHandle, done: impl Fn(&ServerStats) -> bool) -> ServerStats {
    for _ in 0..2_000 {
        let s = stats.stats();
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the server's figures never got there: {:?}", stats.stats());
}
