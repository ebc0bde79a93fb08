//! Publisher benchmark, in one process on a 2-worker multi-thread runtime:
//!
//! 1. subscribe latency, snapshot-cache hit vs miss, with a 1,000-event
//!    snapshot (time from `subscribe` until `EndOfSnapshot` was read);
//! 2. publish throughput with 10,000 keys × 10 subscribers attached;
//! 3. end-to-end deliveries/s for 1,000 subscribers (each watching one key)
//!    vs the same workload on `tokio::sync::broadcast` with per-subscriber
//!    filtering, at 100 and 10,000 keys, interleaved round by round.
//!
//! Run: `cargo bench --bench publisher` (full, about a minute) or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --bench publisher` (tiny sizes,
//! delivery counts checked only).
//!
//! Every subscriber counts what it received; a count that is off fails the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use snapstream::event::{Event, Message};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

struct Sizes {
    subscribes: usize,
    snapshot_events: u64,
    publish_keys: usize,
    subs_per_key: usize,
    publishes: u64,
    e2e_subscribers: usize,
    e2e_events: u64,
    rounds: usize,
}

fn sizes() -> (bool, Sizes) {
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let s = if quick {
        Sizes {
            subscribes: 5,
            snapshot_events: 50,
            publish_keys: 100,
            subs_per_key: 2,
            publishes: 1_000,
            e2e_subscribers: 20,
            e2e_events: 1_000,
            rounds: 1,
        }
    } else {
        Sizes {
            subscribes: 200,
            snapshot_events: 1_000,
            publish_keys: 10_000,
            subs_per_key: 10,
            publishes: 200_000,
            e2e_subscribers: 1_000,
            e2e_events: 200_000,
            rounds: 3,
        }
    };
    (quick, s)
}

fn snapshot_publisher(events: u64, ttl: Duration) -> Publisher<u64> {
    let mut b = Publisher::<u64>::builder();
    b.snapshot_cache_ttl(ttl);
    b.register(
        "t",
        move |req: SnapshotRequest, mut sink: SnapshotSink<u64>| async move {
            for i in 0..events {
                sink.append_one(Event::new("t", req.subject().clone(), i + 1, i))?;
            }
            Ok(events)
        },
    )
    .unwrap();
    b.build()
}

async fn subscribe_to_end(p: &Publisher<u64>, expect: u64) -> Duration {
    let start = Instant::now();
    let mut sub = p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
    let mut n = 0;
    loop {
        match sub.next().await.unwrap() {
            Message::Events(b) => n += b.len() as u64,
            Message::EndOfSnapshot { .. } => break,
            Message::NewSnapshotToFollow => unreachable!(),
        }
    }
    let took = start.elapsed();
    assert_eq!(n, expect, "snapshot events");
    took
}

async fn bench_subscribe(s: &Sizes) -> (Duration, Duration) {
    // Miss: TTL 0 and no other subscriber, so every subscribe builds.
    let miss_p = snapshot_publisher(s.snapshot_events, Duration::ZERO);
    // Hit: a keeper holds the key, the chain stays cached.
    let hit_p = snapshot_publisher(s.snapshot_events, Duration::from_secs(3600));
    let _keeper = {
        let mut k = hit_p.subscribe(SubscribeRequest::new("t", "k")).unwrap();
        while !matches!(k.next().await.unwrap(), Message::EndOfSnapshot { .. }) {}
        k
    };
    let (mut miss, mut hit) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..s.subscribes {
        miss += subscribe_to_end(&miss_p, s.snapshot_events).await;
        hit += subscribe_to_end(&hit_p, s.snapshot_events).await;
    }
    assert_eq!(miss_p.stats().cache_misses, s.subscribes as u64);
    assert_eq!(hit_p.stats().cache_misses, 1);
    (miss / s.subscribes as u32, hit / s.subscribes as u32)
}

async fn bench_publish(s: &Sizes) -> f64 {
    let mut b = Publisher::<u64>::builder();
    b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    let keys: Vec<Arc<str>> = (0..s.publish_keys)
        .map(|k| Arc::from(format!("k{k}")))
        .collect();
    let mut subs = Vec::new();
    for key in &keys {
        for _ in 0..s.subs_per_key {
            let mut sub = p
                .subscribe(SubscribeRequest::new("t", key.clone()))
                .unwrap();
            assert!(sub.next().await.unwrap().is_framing());
            subs.push(sub);
        }
    }
    let start = Instant::now();
    for i in 0..s.publishes {
        let key = keys[(i as usize) % keys.len()].clone();
        p.publish(vec![Event::new("t", key, i + 2, i)]).unwrap();
    }
    let rate = s.publishes as f64 / start.elapsed().as_secs_f64();
    // Check: every subscriber gets exactly its key's events. Awaited, not
    // polled once: a subscriber can have read its snapshot's end before the
    // snapshot's task (on the other thread) has joined it to the live
    // buffer, and then its events come once that task runs (a busy CI
    // machine delayed it past a single poll). The timeout only bounds a
    // failure.
    let per_key = s.publishes / s.publish_keys as u64;
    for sub in &mut subs {
        let mut n = 0;
        while n < per_key {
            let m = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .expect("a subscriber's events arrive")
                .expect("the subscription goes on");
            n += m.events().unwrap().len() as u64;
        }
        assert_eq!(n, per_key);
        assert!(
            futures::FutureExt::now_or_never(sub.next()).is_none(),
            "no event beyond its key's"
        );
    }
    rate
}

/// snapstream: each subscriber subscribes to one key and counts its events.
async fn e2e_snapstream(keys: usize, subs: usize, events: u64) -> f64 {
    let mut b = Publisher::<u64>::builder();
    b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    let p = b.build();
    let names: Vec<Arc<str>> = (0..keys).map(|k| Arc::from(format!("k{k}"))).collect();
    let mut tasks = Vec::new();
    let mut expected_total = 0;
    for s in 0..subs {
        let key = s % keys;
        let expect = (0..events).filter(|i| *i as usize % keys == key).count() as u64;
        expected_total += expect;
        let mut sub = p
            .subscribe(SubscribeRequest::new("t", names[key].clone()))
            .unwrap();
        assert!(sub.next().await.unwrap().is_framing());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < expect {
                n += sub.next().await.unwrap().events().unwrap().len() as u64;
            }
            n
        }));
    }
    let start = Instant::now();
    for i in 0..events {
        p.publish(vec![Event::new(
            "t",
            names[i as usize % keys].clone(),
            i + 2,
            i,
        )])
        .unwrap();
        if i & 1023 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let took = start.elapsed();
    assert_eq!(total, expected_total);
    total as f64 / took.as_secs_f64()
}

/// What a user would otherwise write: one broadcast channel, every
/// subscriber receives every event and keeps those of its key.
async fn e2e_broadcast(keys: usize, subs: usize, events: u64) -> f64 {
    let (tx, _) = tokio::sync::broadcast::channel::<Event<u64>>(events as usize + 1);
    let names: Vec<Arc<str>> = (0..keys).map(|k| Arc::from(format!("k{k}"))).collect();
    let mut tasks = Vec::new();
    let mut expected_total = 0;
    for s in 0..subs {
        let key = names[s % keys].clone();
        let expect = (0..events)
            .filter(|i| *i as usize % keys == s % keys)
            .count() as u64;
        expected_total += expect;
        let mut rx = tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            let mut seen = 0;
            while seen < events {
                let e = rx.recv().await.expect("no lag: capacity holds every event");
                seen += 1;
                if e.subject().as_key() == Some(&*key) {
                    n += 1;
                }
            }
            n
        }));
    }
    let start = Instant::now();
    for i in 0..events {
        tx.send(Event::new("t", names[i as usize % keys].clone(), i + 2, i))
            .unwrap();
        if i & 1023 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let took = start.elapsed();
    assert_eq!(total, expected_total);
    total as f64 / took.as_secs_f64()
}

fn main() {
    let (quick, s) = sizes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (miss, hit) = bench_subscribe(&s).await;
        let publish = bench_publish(&s).await;
        let mut e2e = Vec::new();
        for keys in [100usize, 10_000] {
            let keys = if quick { keys / 10 } else { keys };
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..s.rounds {
                ours.push(e2e_snapstream(keys, s.e2e_subscribers, s.e2e_events).await);
                theirs.push(e2e_broadcast(keys, s.e2e_subscribers, s.e2e_events).await);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                v[v.len() / 2]
            };
            e2e.push((keys, median(&mut ours), median(&mut theirs)));
        }
        if quick {
            println!("quick mode: all delivery counts checked");
        }
        println!(
            "| scenario | snapstream | peer | ratio |\n|---|---|---|---|"
        );
        println!(
            "| subscribe, {}-event snapshot: cache hit vs miss (µs) | hit {:.1} | miss {:.1} | hit = 1/{:.1} of miss |",
            s.snapshot_events,
            hit.as_secs_f64() * 1e6,
            miss.as_secs_f64() * 1e6,
            miss.as_secs_f64() / hit.as_secs_f64()
        );
        println!(
            "| publish, {} keys × {} subscribers (events/s) | {:.0} | – | – |",
            s.publish_keys, s.subs_per_key, publish
        );
        for (keys, ours, theirs) in e2e {
            println!(
                "| end-to-end, {} subscribers, {} keys (deliveries/s) | {:.0} | broadcast+filter {:.0} | {:.1}× |",
                s.e2e_subscribers,
                keys,
                ours,
                theirs,
                ours / theirs
            );
        }
    });
}
