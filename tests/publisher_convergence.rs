//! 1,000 subscribers across 100 keys (plus wildcard subscribers), subscribing
//! while a concurrent publisher writes, all converge to the publisher's state
//! (a materialized-view check), each live change received exactly once.

mod publisher_support;

use std::time::Duration;

use snapstream::event::Subject;
use snapstream::publisher::SubscribeRequest;

use publisher_support::{builder, Store, View, TOPIC};

const KEYS: usize = 100;
const SUBSCRIBERS: usize = 1_000;
const WILDCARDS: usize = 4;
const ROUNDS: usize = 20;
const DONE: u64 = u64::MAX;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_converge_to_the_publishers_state() {
    let store = Store::new(None);
    let mut b = builder();
    b.snapshot_cache_ttl(Duration::from_secs(30));
    let p = store.publisher(&mut b);
    store.write("seed", 0);
    let keys: Vec<String> = (0..KEYS).map(|k| format!("key-{k}")).collect();

    let mut readers = Vec::new();
    let mut spawned = 0;
    for round in 0..ROUNDS {
        for (k, key) in keys.iter().enumerate() {
            store.write(key, (round * KEYS + k) as u64);
            // Subscribers arrive while the writes go on.
            if (round * KEYS + k).is_multiple_of(ROUNDS * KEYS / SUBSCRIBERS)
                && spawned < SUBSCRIBERS
            {
                let key = keys[spawned % KEYS].clone();
                let mut sub = p
                    .subscribe(SubscribeRequest::new(TOPIC, key.as_str()))
                    .unwrap();
                spawned += 1;
                readers.push(tokio::spawn(async move {
                    let mut view = View::default();
                    // Until the final write is in *and* the snapshot has
                    // ended: a late subscriber's snapshot may already hold
                    // DONE, and its EndOfSnapshot index is what the checks
                    // below compare against.
                    while !(view.snapshot_done && view.data.get(&key) == Some(&DONE)) {
                        view.apply(sub.next().await.unwrap());
                    }
                    (Some(key), view)
                }));
            }
        }
        if round.is_multiple_of(5) && readers.len() < SUBSCRIBERS + WILDCARDS {
            let mut sub = p
                .subscribe(SubscribeRequest::new(TOPIC, Subject::Wildcard))
                .unwrap();
            let keys = keys.clone();
            readers.push(tokio::spawn(async move {
                let mut view = View::default();
                while !(view.snapshot_done && keys.iter().all(|k| view.data.get(k) == Some(&DONE)))
                {
                    view.apply(sub.next().await.unwrap());
                }
                (None, view)
            }));
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(spawned, SUBSCRIBERS);
    for key in &keys {
        store.write(key, DONE);
    }
    let mut wildcards = 0;
    for r in readers {
        let (key, view) = r.await.unwrap();
        match key {
            Some(key) => {
                assert_eq!(view.data, store.view(Some(&key)), "{key}");
                assert_eq!(
                    view.live_indexes,
                    store.writes_after(&key, view.eos_index),
                    "{key}"
                );
            }
            None => {
                wildcards += 1;
                assert_eq!(view.data, store.view(None));
                // One batch per index for the wildcard: every write after
                // its snapshot, exactly once.
                let mut all: Vec<u64> = keys
                    .iter()
                    .chain(std::iter::once(&"seed".to_string()))
                    .flat_map(|k| store.writes_after(k, view.eos_index))
                    .collect();
                all.sort_unstable();
                assert_eq!(view.live_indexes, all);
            }
        }
    }
    assert_eq!(wildcards, WILDCARDS);
    let stats = p.stats();
    assert!(
        stats.cache_hits > 0,
        "later subscribers of a key reuse its snapshot"
    );
}
