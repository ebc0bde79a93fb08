//! What the admin's metrics cost the hot paths: publisher fan-out, keyed
//! pool and memory work queue throughput, each in three modes:
//!
//! * **off**: no admin (the only mode when built without the `admin`
//!   feature: that build is the separate "feature off" binary);
//! * **on, no recorder**: an `Admin` over the parts, `collect()` every
//!   scrape interval with no `metrics` recorder installed;
//! * **on, Prometheus**: the admin renders `/metrics` (its own Prometheus
//!   recorder, the default when the service installs none) every scrape
//!   interval.
//!
//! The few counters and histograms the hot paths keep (deliveries, lag
//! closes, publish batch sizes, snapshot build and push times, pool and
//! lease waits) are compiled in with or without the feature, so the
//! differences measure the scrapes. No global recorder is installed, so the
//! three modes interleave freely: each workload runs
//! [`Sizes::rounds`] rounds of (off, no recorder, Prometheus), the order
//! rotated every round; a mode's figure is the median over its rounds of
//! its throughput relative to the "off" run of the same round, printed
//! with the lowest and highest such ratio (the spread) and whether the
//! target is met (≤ 1% slower without a recorder, ≤ 5% with Prometheus).
//! The line "off vs off" compares each round's "off" run with the previous
//! round's: the noise of the machine.
//!
//! The scrape interval is `SNAPSTREAM_BENCH_SCRAPE_MS` (default 10 ms, far
//! more often than a Prometheus server scrapes); the bench prints what one
//! scrape cost, so the share of a core at any interval follows.
//!
//! `cargo bench --features admin --bench admin` (the table),
//! `cargo bench --bench admin` (feature off: the "off" rows only), or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --features admin --bench admin`
//! (tiny sizes, checks only).

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Rounds of (off, no recorder, Prometheus) per workload.
    rounds: usize,
}

fn sizes() -> Sizes {
    if std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some() {
        Sizes {
            subscribers: 4,
            batches: 200,
            pool_items: 2_000,
            queue_items: 500,
            rounds: 7,
        }
    } else {
        // Each run lasts about half a second on an idle 2-core machine:
        // dozens of scrapes per run, and long enough that a scheduler hiccup
        // does not decide a round.
        Sizes {
            subscribers: 100,
            batches: 50_000,
            pool_items: 2_000_000,
            queue_items: 500_000,
            rounds: 9,
        }
    }
}

fn scrape_every() -> Duration {
    let ms = std::env::var("SNAPSTREAM_BENCH_SCRAPE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    Duration::from_millis(ms.max(1))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    #[cfg(feature = "admin")]
    NoRecorder,
    #[cfg(feature = "admin")]
    Prometheus,
}

impl Mode {
    fn all() -> Vec<Mode> {
        #[allow(unused_mut)]
        let mut v = vec![Mode::Off];
        #[cfg(feature = "admin")]
        v.extend([Mode::NoRecorder, Mode::Prometheus]);
        v
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Off => "off",
            #[cfg(feature = "admin")]
            Mode::NoRecorder => "on, no recorder",
            #[cfg(feature = "admin")]
            Mode::Prometheus => "on, Prometheus",
        }
    }

    /// Most slowdown allowed, as a ratio to "off".
    fn target(self) -> Option<f64> {
        match self {
            Mode::Off => None,
            #[cfg(feature = "admin")]
            Mode::NoRecorder => Some(0.01),
            #[cfg(feature = "admin")]
            Mode::Prometheus => Some(0.05),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Fanout,
    Pool,
    Queue,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Fanout => "fan-out (events/s)",
            Workload::Pool => "keyed pool (items/s)",
            Workload::Queue => "memory queue (items/s)",
        }
    }
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

/// Scrapes done and the time they took, over the whole bench, per mode.
#[derive(Default)]
struct ScrapeCost {
    count: AtomicU64,
    nanos: AtomicU64,
}

/// Starts the scraper of `mode`; it stops when the returned sender drops.
fn scraper(
    mode: Mode,
    p: &Parts,
    cost: &Arc<ScrapeCost>,
) -> Option<tokio::sync::oneshot::Sender<()>> {
    #[cfg(feature = "admin")]
    {
        if mode == Mode::Off {
            return None;
        }
        let admin = snapstream::admin::Admin::builder()
            .publisher(&p.publisher)
            .keyed_pool("pool", &p.pool)
            .queue(&p.queue)
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let cost = cost.clone();
        let every = scrape_every();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut rx => return,
                }
                let t0 = Instant::now();
                if mode == Mode::Prometheus {
                    let text = admin.render_metrics().await;
                    assert!(text.contains("snapstream_queue_pushes_total"));
                } else {
                    admin.collect().await;
                }
                cost.count.fetch_add(1, Ordering::Relaxed);
                cost.nanos
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        });
        Some(tx)
    }
    #[cfg(not(feature = "admin"))]
    {
        let _ = (mode, p, cost);
        None
    }
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
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        p.publisher.stats().topics[0].delivered >= s.batches * s.subscribers as u64,
        "the deliveries counter saw every live event"
    );
    (s.batches * s.subscribers as u64) as f64 / secs
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

async fn run(w: Workload, mode: Mode, s: &Sizes, cost: &Arc<ScrapeCost>) -> f64 {
    let p = parts();
    let stop = scraper(mode, &p, cost);
    let out = match w {
        Workload::Fanout => fanout(&p, s).await,
        Workload::Pool => pool(&p, s).await,
        Workload::Queue => queue(&p, s).await,
    };
    drop(stop);
    p.queue.shutdown(Duration::from_secs(5)).await;
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pct(r: f64) -> String {
    format!("{:+.1}%", (r - 1.0) * 100.0)
}

fn main() {
    let s = sizes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let modes = Mode::all();
    let costs: Vec<Arc<ScrapeCost>> = modes.iter().map(|_| Arc::default()).collect();
    println!(
        "admin metrics cost: {} rounds per workload, modes interleaved (order rotated), scrape every {:?}",
        s.rounds,
        scrape_every()
    );
    #[cfg(not(feature = "admin"))]
    println!("built without the `admin` feature: \"off\" only (the feature-off binary)");
    println!(
        "{:<24} {:<16} {:>14}  {:>8}  {:>18}  target",
        "workload", "mode", "median", "vs off", "spread (min..max)"
    );
    let mut all_met = true;
    rt.block_on(async {
        for w in [Workload::Fanout, Workload::Pool, Workload::Queue] {
            // figs[mode][round]
            let mut figs: Vec<Vec<f64>> = modes.iter().map(|_| Vec::new()).collect();
            for round in 0..s.rounds {
                for k in 0..modes.len() {
                    let m = (k + round) % modes.len();
                    let v = run(w, modes[m], &s, &costs[m]).await;
                    figs[m].push(v);
                }
            }
            let off = &figs[0];
            let noise: Vec<f64> = off.windows(2).map(|p| p[1] / p[0]).collect();
            for (m, mode) in modes.iter().enumerate() {
                let med = median(figs[m].clone());
                let (vs, spread, verdict) = if *mode == Mode::Off {
                    let spread = if noise.is_empty() {
                        String::new()
                    } else {
                        let lo = noise.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = noise.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        format!("{}..{}", pct(lo), pct(hi))
                    };
                    (
                        String::new(),
                        spread,
                        "(off vs previous off: the noise)".to_owned(),
                    )
                } else {
                    let ratios: Vec<f64> = figs[m].iter().zip(off).map(|(v, o)| v / o).collect();
                    let r = median(ratios.clone());
                    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let target = mode.target().expect("on modes have targets");
                    let met = r >= 1.0 - target;
                    all_met &= met;
                    (
                        pct(r),
                        format!("{}..{}", pct(lo), pct(hi)),
                        format!(
                            "≤ {:.0}% slower: {}",
                            target * 100.0,
                            if met { "met" } else { "NOT met" }
                        ),
                    )
                };
                println!(
                    "{:<24} {:<16} {:>14.0}  {:>8}  {:>18}  {}",
                    w.label(),
                    mode.label(),
                    med,
                    vs,
                    spread,
                    verdict
                );
            }
        }
    });
    for (m, mode) in modes.iter().enumerate() {
        let n = costs[m].count.load(Ordering::Relaxed);
        if n > 0 {
            let each = costs[m].nanos.load(Ordering::Relaxed) as f64 / n as f64;
            println!(
                "one scrape, {}: {:.1} µs on average over {n} ({:.2}% of one core at one scrape per {:?})",
                mode.label(),
                each / 1e3,
                each / scrape_every().as_nanos() as f64 * 100.0,
                scrape_every()
            );
        }
    }
    #[cfg(feature = "admin")]
    println!(
        "targets: {}",
        if all_met {
            "all met"
        } else {
            "NOT all met (see above)"
        }
    );
    let _ = all_met;
}
