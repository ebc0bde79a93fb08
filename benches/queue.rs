//! End-to-end work queue throughput: push -> handle (no-op) -> ack.
//!
//! Runs, interleaved in one process on a 2-thread tokio runtime:
//! - a plain `tokio::sync::mpsc` channel (bounded 1024, one consumer task) as
//!   the baseline;
//! - `WorkQueue` over `MemoryQueue` with batch 1 and 64;
//! - `WorkQueue` over the disk backend (feature `disk`) with batch 1 and 64;
//! - `WorkQueue` over Redis (feature `redis`, only when `REDIS_URL` is set).
//!
//! Each case has 4 producer tasks pushing concurrently (so the disk backend
//! can group-commit). Prints items/s (median of the rounds) and push latency p99 per case.
//!
//! ```text
//! cargo bench --bench queue --all-features
//! SNAPSTREAM_BENCH_QUICK=1 cargo bench --bench queue   # CI: tiny sizes, checks only
//! SNAPSTREAM_BENCH_FILTER=memory cargo bench --bench queue   # mpsc + matching cases
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapstream::queue::{BaseQueue, Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
use tokio::sync::{mpsc, Notify};

static BATCHES: AtomicU64 = AtomicU64::new(0);

struct Sample {
    items_per_sec: f64,
    push_p99: Duration,
}

fn p99(mut lat: Vec<Duration>) -> Duration {
    lat.sort_unstable();
    lat[(lat.len() * 99 / 100).min(lat.len() - 1)]
}

/// Concurrent producer tasks in every case (lets the disk backend group-commit).
const PRODUCERS: u64 = 4;

async fn bench_mpsc(n: u64) -> Sample {
    let (tx, mut rx) = mpsc::channel::<u64>(1024);
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut got = 0u64;
        while let Some(v) = rx.recv().await {
            std::hint::black_box(v);
            got += 1;
        }
        got
    });
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity((n / PRODUCERS) as usize);
                for i in 0..n / PRODUCERS {
                    let t = Instant::now();
                    tx.send(p * n + i).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    drop(tx);
    let mut lat = Vec::with_capacity(n as usize);
    for p in producers {
        lat.extend(p.await.unwrap());
    }
    let got = consumer.await.unwrap();
    assert_eq!(got, n);
    Sample {
        items_per_sec: n as f64 / start.elapsed().as_secs_f64(),
        push_p99: p99(lat),
    }
}

async fn bench_work(
    base: Arc<dyn BaseQueue>,
    dead: Arc<dyn BaseQueue>,
    batch: usize,
    n: u64,
) -> Sample {
    let done = Arc::new(AtomicU64::new(0));
    let all_done = Arc::new(Notify::new());
    let (d, a) = (done.clone(), all_done.clone());
    let opts = WorkQueueOptions::default()
        .batch_len(batch)
        .batch_delay(Duration::from_millis(1));
    let q = WorkQueue::new(base, dead, opts, move |b: Vec<Item<u64>>| {
        for i in &b {
            std::hint::black_box(i.value());
        }
        BATCHES.fetch_add(1, Ordering::Relaxed);
        if d.fetch_add(b.len() as u64, Ordering::AcqRel) + b.len() as u64 == n {
            a.notify_one();
        }
        async { Vec::new() }
    })
    .unwrap();
    let finished = all_done.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let q = q.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity((n / PRODUCERS) as usize);
                for i in 0..n / PRODUCERS {
                    let t = Instant::now();
                    q.push(p * n + i).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n as usize);
    for p in producers {
        lat.extend(p.await.unwrap());
    }
    finished.await;
    let elapsed = start.elapsed();
    if std::env::var_os("SNAPSTREAM_BENCH_DEBUG").is_some() {
        let b = BATCHES.swap(0, Ordering::Relaxed);
        eprintln!(
            "batch {batch}: {b} handler calls, {:.1} items each",
            n as f64 / b as f64
        );
    }
    assert_eq!(done.load(Ordering::Acquire), n);
    q.shutdown(Duration::from_secs(10)).await;
    assert_eq!(q.len().await.unwrap().total(), 0, "every item acked");
    Sample {
        items_per_sec: n as f64 / elapsed.as_secs_f64(),
        push_p99: p99(lat),
    }
}

fn memory_pair(tag: &str) -> (Arc<dyn BaseQueue>, Arc<dyn BaseQueue>) {
    (
        Arc::new(MemoryQueue::new(tag, QueueOptions::default()).unwrap()),
        Arc::new(MemoryQueue::new(format!("{tag}.dead"), QueueOptions::default()).unwrap()),
    )
}

type Case = (String, u64, Vec<Sample>);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let rounds = if quick { 1 } else { 3 };
    let n_mem: u64 = if quick { 2_000 } else { 200_000 };
    #[cfg(feature = "disk")]
    let n_disk: u64 = if quick { 400 } else { 4_000 };
    #[cfg(feature = "redis")]
    let n_redis: u64 = if quick { 200 } else { 40_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    #[cfg(feature = "disk")]
    let dir = tempfile::tempdir().unwrap();
    #[cfg(feature = "disk")]
    let store = snapstream::queue::disk::DiskStore::open(dir.path().join("bench.redb")).unwrap();
    #[cfg(feature = "redis")]
    let redis_url = std::env::var("REDIS_URL").ok();

    let mut cases: Vec<Case> = vec![
        ("tokio mpsc (bounded 1024)".into(), n_mem, vec![]),
        ("WorkQueue memory, batch 1".into(), n_mem, vec![]),
        ("WorkQueue memory, batch 64".into(), n_mem, vec![]),
    ];
    #[cfg(feature = "disk")]
    {
        cases.push(("WorkQueue disk, batch 1".into(), n_disk, vec![]));
        cases.push(("WorkQueue disk, batch 64".into(), n_disk, vec![]));
    }
    #[cfg(feature = "redis")]
    if redis_url.is_some() {
        cases.push(("WorkQueue redis, batch 1".into(), n_redis, vec![]));
        cases.push(("WorkQueue redis, batch 64".into(), n_redis, vec![]));
    }

    // SNAPSTREAM_BENCH_FILTER=memory keeps mpsc plus the cases naming it.
    if let Ok(f) = std::env::var("SNAPSTREAM_BENCH_FILTER") {
        cases.retain(|c| c.0.starts_with("tokio") || c.0.contains(&f));
    }

    rt.block_on(async {
        for round in 0..rounds {
            for (idx, (label, n, samples)) in cases.iter_mut().enumerate() {
                let n = *n;
                let tag = format!("bench-{}-{round}-{idx}", std::process::id());
                let batch = if label.ends_with("batch 64") { 64 } else { 1 };
                let s = if label.starts_with("tokio") {
                    bench_mpsc(n).await
                } else if label.contains("memory") {
                    let (b, d) = memory_pair(&tag);
                    bench_work(b, d, batch, n).await
                } else if label.contains("disk") {
                    #[cfg(feature = "disk")]
                    {
                        let b = store.queue(&tag, QueueOptions::default()).unwrap();
                        let d = store
                            .queue(&format!("{tag}.dead"), QueueOptions::default())
                            .unwrap();
                        bench_work(Arc::new(b), Arc::new(d), batch, n).await
                    }
                    #[cfg(not(feature = "disk"))]
                    unreachable!()
                } else {
                    #[cfg(feature = "redis")]
                    {
                        use snapstream::queue::redis::RedisQueue;
                        let url = redis_url.as_deref().unwrap();
                        let b = RedisQueue::connect(url, tag.clone(), QueueOptions::default())
                            .await
                            .unwrap();
                        let d = RedisQueue::connect(
                            url,
                            format!("{tag}.dead"),
                            QueueOptions::default(),
                        )
                        .await
                        .unwrap();
                        let s = bench_work(Arc::new(b), Arc::new(d), batch, n).await;
                        s
                    }
                    #[cfg(not(feature = "redis"))]
                    unreachable!()
                };
                samples.push(s);
            }
        }
    });

    let mut base = 0.0;
    println!("| case | items | items/s (median of {rounds}) | vs mpsc | push p99 |");
    println!("|---|---:|---:|---:|---:|");
    for (label, n, samples) in &cases {
        let mut ips: Vec<f64> = samples.iter().map(|s| s.items_per_sec).collect();
        let m = median(&mut ips);
        if base == 0.0 {
            base = m;
        }
        let mut p: Vec<f64> = samples.iter().map(|s| s.push_p99.as_secs_f64()).collect();
        let p = median(&mut p);
        println!(
            "| {label} | {n} | {:.0} | {:.2}x slower | {:.1} µs |",
            m,
            base / m,
            p * 1e6
        );
    }
    if quick {
        println!("quick mode: sizes are tiny, numbers are not meaningful");
    }
}
