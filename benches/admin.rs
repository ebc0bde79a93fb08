//! What the admin's metrics cost the hot paths: publisher fan-out, keyed
//! pool and memory work queue throughput, with
//!
//! * **off**: no admin (the only mode when built without the `admin` feature);
//! * **on, no recorder**: an `Admin` over the parts, `collect()` every 10 ms
//!   with no `metrics` recorder installed;
//! * **on, Prometheus**: the same after a Prometheus recorder is installed
//!   globally, rendering `/metrics` text every 10 ms.
//!
//! The admin reads the parts' own figures when scraped; the few counters
//! and histograms the hot paths keep (lag closes, publish batch sizes,
//! snapshot build and push times, pool and lease waits) are compiled in
//! with or without the feature, so the differences measure the scrapes.
//! Rounds interleave the modes (the global recorder cannot be removed, so
//! its rounds come last, each paired with an "off" run).
//!
//! `cargo bench --features admin --bench admin`, or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --features admin --bench admin`
//! (tiny sizes, checks only).

use std::sync::Arc;
use std::time::{Duration, Instant};

use snapstream::event::{Event, Message};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
use snapstream::workpool::{KeyedPool, StopMode};

struct Sizes {
    subscribers: usize,
    batches: u64,
    pool_items: u64,
    queue_items: u64,
    rounds: usize,
}

fn sizes() -> Sizes {
    if std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some() {
        Sizes {
            subscribers: 4,
            batches: 200,
            pool_items: 2_000,
            queue_items: 500,
            rounds: 1,
        }
    } else {
        Sizes {
            subscribers: 100,
            batches: 20_000,
            pool_items: 200_000,
            queue_items: 50_000,
            rounds: 5,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    #[cfg(feature = "admin")]
    NoRecorder,
    #[cfg(feature = "admin")]
    Prometheus,
}

/// The parts under test, built fresh per run.
struct Parts {
    publisher: Publisher<u64>,
    pool: KeyedPool<u64, u64>,
    queue: WorkQueue<u64>,
}

fn parts() -> Parts {
    let mut b = Publisher::<u64>::builder();
    b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    b.lag_limit(None);
    let publisher = b.build();
    let pool = KeyedPool::builder()
        .workers(4)
        .capacity(1024)
        .build(|_k: u64, _v: u64| async {})
        .unwrap();
    let base = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
    let dead = Arc::new(MemoryQueue::new("q.dead", QueueOptions::default()).unwrap());
    let queue = WorkQueue::new(
        base,
        dead,
        WorkQueueOptions::default()
            .batch_len(64)
            .batch_delay(Duration::ZERO),
        |_b: Vec<Item<u64>>| async { Vec::new() },
    )
    .unwrap();
    Parts {
        publisher,
        pool,
        queue,
    }
}

/// Starts the scraper of `mode`; stops when the returned sender drops.
fn scraper(mode: Mode, p: &Parts) -> Option<tokio::sync::oneshot::Sender<()>> {
    #[cfg(feature = "admin")]
    {
        if mode == Mode::Off {
            return None;
        }
        let admin = snapstream::admin::Admin::builder()
            .publisher(&p.publisher)
            .keyed_pool("pool", &p.pool)
            .queue(&p.queue);
        let admin = match mode {
            Mode::Prometheus => admin.prometheus(prometheus_handle()),
            _ => admin,
        }
        .build()
        .unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut rx => return,
                }
                if mode == Mode::Prometheus {
                    let text = admin.render_metrics().await;
                    assert!(text.contains("snapstream_queue_pushes_total"));
                } else {
                    admin.collect().await;
                }
            }
        });
        Some(tx)
    }
    #[cfg(not(feature = "admin"))]
    {
        let _ = (mode, p);
        None
    }
}

#[cfg(feature = "admin")]
fn prometheus_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .unwrap()
        })
        .clone()
}

/// Events per second delivered to all subscribers.
async fn fanout(p: &Parts, s: &Sizes) -> f64 {
    let mut readers = Vec::new();
    let last = s.batches + 1;
    for _ in 0..s.subscribers {
        let mut sub = p
            .publisher
            .subscribe(SubscribeRequest::new("t", "k"))
            .unwrap();
        readers.push(tokio::spawn(async move {
            let mut seen = 0u64;
            while let Some(m) = futures::StreamExt::next(&mut sub).await {
                let m: Message<u64> = m.expect("no lag limit, no close");
                if let Some(b) = m.events() {
                    seen += b.events().len() as u64;
                    if b.index() >= last {
                        break;
                    }
                }
            }
            seen
        }));
    }
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    for i in 2..=last {
        p.publisher
            .publish(vec![Event::new("t", "k", i, i)])
            .unwrap();
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for r in readers {
        assert!(r.await.unwrap() >= 1, "every reader saw live events");
    }
    (s.batches * s.subscribers as u64) as f64 / t0.elapsed().as_secs_f64()
}

/// Items per second through the keyed pool.
async fn pool(p: &Parts, s: &Sizes) -> f64 {
    let t0 = Instant::now();
    for i in 0..s.pool_items {
        p.pool.add(i % 1000, i).await.unwrap();
    }
    p.pool.stop(StopMode::Drain).await;
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(p.pool.stats().handled, s.pool_items);
    s.pool_items as f64 / secs
}

/// Items per second pushed and handled through the memory work queue.
async fn queue(p: &Parts, s: &Sizes) -> f64 {
    let t0 = Instant::now();
    for i in 0..s.queue_items {
        p.queue.push(i).await.unwrap();
    }
    p.queue.flush(Duration::from_secs(60)).await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(p.queue.acked(), s.queue_items);
    s.queue_items as f64 / secs
}

async fn run(mode: Mode, s: &Sizes) -> [f64; 3] {
    let p = parts();
    let stop = scraper(mode, &p);
    let out = [fanout(&p, s).await, pool(&p, s).await, queue(&p, s).await];
    drop(stop);
    p.queue.shutdown(Duration::from_secs(5)).await;
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let s = sizes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        #[allow(unused_mut)]
        let mut phases: Vec<[Mode; 2]> = vec![[Mode::Off, Mode::Off]];
        #[cfg(feature = "admin")]
        {
            phases = vec![[Mode::Off, Mode::NoRecorder], [Mode::Off, Mode::Prometheus]];
        }
        println!(
            "{:<28} {:>14} {:>14} {:>14}",
            "mode", "fan-out ev/s", "pool items/s", "queue items/s"
        );
        for pair in phases {
            let mut figs: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..s.rounds {
                for (i, mode) in pair.iter().enumerate() {
                    figs[i].push(run(*mode, &s).await);
                }
            }
            let med: Vec<[f64; 3]> = figs
                .iter()
                .map(|f| [0, 1, 2].map(|k| median(f.iter().map(|x| x[k]).collect())))
                .collect();
            for (i, mode) in pair.iter().enumerate() {
                let m = med[i];
                let vs: Vec<String> = (0..3)
                    .map(|k| format!("{:+.1}%", (m[k] / med[0][k] - 1.0) * 100.0))
                    .collect();
                println!(
                    "{:<28} {:>14.0} {:>14.0} {:>14.0}   vs off: {}",
                    format!("{mode:?}"),
                    m[0],
                    m[1],
                    m[2],
                    vs.join(" / ")
                );
            }
        }
    });
}
