//! Fan-out benchmark: snapstream's EventBuffer vs `tokio::sync::broadcast` vs
//! `async-broadcast`, in one process, interleaved round by round, on a
//! 2-worker multi-thread runtime.
//!
//! tokio broadcast runs in two configurations, labelled in the table:
//! - **fair**: a ring as large as the run, the writer never throttled (the
//!   ratios and targets are against this one);
//! - **throttled**: a 1,024-slot ring, the writer yielding while the ring is
//!   full (what a real user of a bounded ring must do not to lag readers).
//!
//! A second table repeats the 1- and 16-reader runs with the machine's other
//! core kept busy by a spinning thread the bench starts itself, and the
//! output ends with whether each target of issue #14 is met.
//!
//! Run: `cargo bench --bench fanout` (full, a few minutes) or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --bench fanout` (tiny sizes,
//! checksums only; CI runs this).
//!
//! Every subscriber checks that it received every event once, in order, and
//! checksums the payloads; any loss or reordering is counted and reported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapstream::buffer::EventBuffer;

// ---------------------------------------------------------------------------
// A counting allocator, for bytes retained per event.

struct Counting;

static ALLOCATED: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarding the caller's layout to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as for `alloc`/`dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------
// Payloads.

trait Payload: Clone + Send + Sync + 'static {
    const NAME: &'static str;
    /// Bytes that are the payload proper (excluded from "overhead").
    const PAYLOAD_BYTES: usize;
    fn make(i: u64) -> Self;
    fn value(&self) -> u64;
}

impl Payload for u64 {
    const NAME: &'static str = "u64";
    const PAYLOAD_BYTES: usize = 8;
    fn make(i: u64) -> Self {
        i
    }
    fn value(&self) -> u64 {
        *self
    }
}

#[derive(Clone)]
struct Big(Arc<[u8; 256]>);

impl Payload for Big {
    const NAME: &'static str = "256 B";
    const PAYLOAD_BYTES: usize = 256;
    fn make(i: u64) -> Self {
        let mut bytes = [0u8; 256];
        bytes[..8].copy_from_slice(&i.to_le_bytes());
        bytes[255] = i as u8;
        Big(Arc::new(bytes))
    }
    fn value(&self) -> u64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(head)
    }
}

/// What a subscriber checks: every value once, in order.
#[derive(Default)]
struct Check {
    next: u64,
    sum: u64,
    errors: u64,
}

impl Check {
    fn see(&mut self, v: u64) {
        if v != self.next {
            self.errors += 1;
        }
        self.next = v + 1;
        self.sum = self.sum.wrapping_add(v);
    }
    fn finish(&self, events: u64) -> u64 {
        let expected = events * events.saturating_sub(1) / 2;
        self.errors + u64::from(self.sum != expected) + u64::from(self.next != events)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    Snapstream,
    /// tokio broadcast with a ring as large as the run, no writer throttle.
    Tokio,
    /// tokio broadcast with a [`THROTTLED_CAPACITY`] ring, the writer
    /// yielding while it is full.
    TokioThrottled,
    AsyncBroadcast,
}

const IMPLS: [Impl; 4] = [
    Impl::Snapstream,
    Impl::Tokio,
    Impl::TokioThrottled,
    Impl::AsyncBroadcast,
];

/// Ring size of the throttled tokio configuration.
const THROTTLED_CAPACITY: usize = 1024;

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Snapstream => "snapstream",
            Impl::Tokio => "tokio broadcast (fair: ring = run)",
            Impl::TokioThrottled => "tokio broadcast (throttled: ring 1024)",
            Impl::AsyncBroadcast => "async-broadcast",
        }
    }
}

static ERRORS: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------
// Burst: publish `events` as fast as possible to `subs` subscribers.

struct Burst {
    /// Wall time from the first publish until every subscriber is done.
    total: Duration,
    /// Time the publisher spent publishing.
    publish: Duration,
}

async fn burst<P: Payload>(imp: Impl, subs: usize, events: u64) -> Burst {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subs);
    let mut tasks = Vec::with_capacity(subs);
    macro_rules! spawn_subs {
        ($make_rx:expr, |$rx:ident, $check:ident| $recv:block) => {
            for _ in 0..subs {
                let mut $rx = $make_rx;
                let ready = ready_tx.clone();
                tasks.push(tokio::spawn(async move {
                    let mut $check = Check::default();
                    drop(ready);
                    while $check.next < events $recv
                    $check.finish(events)
                }));
            }
        };
    }
    let start;
    let publish;
    match imp {
        Impl::Snapstream => {
            let mut w = EventBuffer::<P>::new();
            spawn_subs!(w.head(), |rx, check| {
                match rx.next().await {
                    Ok(batch) => batch.iter().for_each(|p| check.see(p.value())),
                    Err(_) => break,
                }
            });
            drop(ready_tx);
            let _ = ready_rx.recv().await;
            start = Instant::now();
            for i in 0..events {
                w.append_one(P::make(i));
            }
            publish = start.elapsed();
            for t in tasks.drain(..) {
                ERRORS.fetch_add(t.await.unwrap(), Ordering::Relaxed);
            }
        }
        Impl::Tokio => {
            let (tx, _) = tokio::sync::broadcast::channel::<P>(events.max(2) as usize);
            spawn_subs!(tx.subscribe(), |rx, check| {
                match rx.recv().await {
                    Ok(p) => check.see(p.value()),
                    Err(_) => break,
                }
            });
            drop(ready_tx);
            let _ = ready_rx.recv().await;
            start = Instant::now();
            for i in 0..events {
                let _ = tx.send(P::make(i));
            }
            publish = start.elapsed();
            for t in tasks.drain(..) {
                ERRORS.fetch_add(t.await.unwrap(), Ordering::Relaxed);
            }
        }
        Impl::TokioThrottled => {
            let (tx, _) = tokio::sync::broadcast::channel::<P>(THROTTLED_CAPACITY);
            spawn_subs!(tx.subscribe(), |rx, check| {
                match rx.recv().await {
                    Ok(p) => check.see(p.value()),
                    Err(_) => break,
                }
            });
            drop(ready_tx);
            let _ = ready_rx.recv().await;
            start = Instant::now();
            for i in 0..events {
                // Never overwrite what the slowest reader has not read.
                while tx.len() >= THROTTLED_CAPACITY {
                    tokio::task::yield_now().await;
                }
                let _ = tx.send(P::make(i));
            }
            publish = start.elapsed();
            for t in tasks.drain(..) {
                ERRORS.fetch_add(t.await.unwrap(), Ordering::Relaxed);
            }
        }
        Impl::AsyncBroadcast => {
            let (tx, rx0) = async_broadcast::broadcast::<P>(events.max(2) as usize);
            spawn_subs!(rx0.clone(), |rx, check| {
                match rx.recv().await {
                    Ok(p) => check.see(p.value()),
                    Err(_) => break,
                }
            });
            drop(rx0);
            drop(ready_tx);
            let _ = ready_rx.recv().await;
            start = Instant::now();
            for i in 0..events {
                let _ = tx.try_broadcast(P::make(i));
            }
            publish = start.elapsed();
            for t in tasks.drain(..) {
                ERRORS.fetch_add(t.await.unwrap(), Ordering::Relaxed);
            }
        }
    }
    Burst {
        total: start.elapsed(),
        publish,
    }
}

// ---------------------------------------------------------------------------
// Paced: 1,000 events/s; latency from publish to receipt, per delivery.

struct Recorder {
    base: Instant,
    stamps: Arc<Vec<AtomicU64>>,
    check: Check,
    lat: Vec<u64>,
}

impl Recorder {
    fn see(&mut self, v: u64) {
        let now = self.base.elapsed().as_nanos() as u64;
        let sent = self.stamps[v as usize].load(Ordering::Acquire);
        self.lat.push(now.saturating_sub(sent));
        self.check.see(v);
    }
}

async fn paced<P: Payload>(imp: Impl, subs: usize, events: u64) -> Vec<u64> {
    let base = Instant::now();
    let stamps: Arc<Vec<AtomicU64>> = Arc::new((0..events).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::with_capacity(subs);
    macro_rules! spawn_subs {
        ($make_rx:expr, |$rx:ident, $on:ident| $recv:block) => {
            for _ in 0..subs {
                let mut $rx = $make_rx;
                let stamps = stamps.clone();
                tasks.push(tokio::spawn(async move {
                    let mut $on = Recorder {
                        base,
                        stamps,
                        check: Check::default(),
                        lat: Vec::with_capacity(events as usize),
                    };
                    while $on.check.next < events $recv
                    ERRORS.fetch_add($on.check.finish(events), Ordering::Relaxed);
                    $on.lat
                }));
            }
        };
    }
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    macro_rules! publish {
        ($send:expr) => {
            for i in 0..events {
                tick.tick().await;
                stamps[i as usize].store(base.elapsed().as_nanos() as u64, Ordering::Release);
                $send(i);
            }
        };
    }
    match imp {
        Impl::Snapstream => {
            let mut w = EventBuffer::<P>::new();
            spawn_subs!(w.head(), |rx, on| {
                match rx.next().await {
                    Ok(batch) => batch.iter().for_each(|p| on.see(p.value())),
                    Err(_) => break,
                }
            });
            publish!(|i| w.append_one(P::make(i)));
        }
        Impl::Tokio | Impl::TokioThrottled => {
            let capacity = if imp == Impl::Tokio {
                events.max(2) as usize
            } else {
                // At 1,000 events/s the ring never fills: no throttle needed.
                THROTTLED_CAPACITY
            };
            let (tx, _) = tokio::sync::broadcast::channel::<P>(capacity);
            spawn_subs!(tx.subscribe(), |rx, on| {
                match rx.recv().await {
                    Ok(p) => on.see(p.value()),
                    Err(_) => break,
                }
            });
            publish!(|i| {
                let _ = tx.send(P::make(i));
            });
        }
        Impl::AsyncBroadcast => {
            let (tx, rx0) = async_broadcast::broadcast::<P>(events.max(2) as usize);
            spawn_subs!(rx0.clone(), |rx, on| {
                match rx.recv().await {
                    Ok(p) => on.see(p.value()),
                    Err(_) => break,
                }
            });
            drop(rx0);
            publish!(|i| {
                let _ = tx.try_broadcast(P::make(i));
            });
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

// ---------------------------------------------------------------------------
// Memory per retained event with one stalled subscriber, and the cost of
// dropping that subscriber.

struct Retained {
    bytes_per_event: f64,
    drop_ns: u128,
}

fn retained<P: Payload>(imp: Impl, events: u64) -> Retained {
    // Payloads are made up front so their own allocation is not counted.
    let payloads: Vec<P> = (0..events).map(P::make).collect();
    let inline_payload = P::PAYLOAD_BYTES.min(std::mem::size_of::<P>());
    let before = ALLOCATED.load(Ordering::SeqCst);
    let (after, drop_ns) = match imp {
        Impl::Snapstream => {
            let mut w = EventBuffer::<P>::new();
            let stalled = w.head();
            for p in &payloads {
                w.append_one(p.clone());
            }
            let after = ALLOCATED.load(Ordering::SeqCst);
            let t = Instant::now();
            drop(stalled);
            (after, t.elapsed().as_nanos())
        }
        // A stalled reader of a throttled ring stops the writer: nothing to
        // retain (the caller skips it).
        Impl::Tokio | Impl::TokioThrottled => {
            let (tx, stalled) = tokio::sync::broadcast::channel::<P>(events as usize);
            for p in &payloads {
                let _ = tx.send(p.clone());
            }
            let after = ALLOCATED.load(Ordering::SeqCst);
            let t = Instant::now();
            drop(stalled);
            (after, t.elapsed().as_nanos())
        }
        Impl::AsyncBroadcast => {
            let (tx, stalled) = async_broadcast::broadcast::<P>(events as usize);
            for p in &payloads {
                let _ = tx.try_broadcast(p.clone());
            }
            let after = ALLOCATED.load(Ordering::SeqCst);
            let t = Instant::now();
            drop(stalled);
            (after, t.elapsed().as_nanos())
        }
    };
    // The payloads' own allocations were made before `before`: what was
    // added is the channel's overhead plus the inline part of each payload
    // (the `u64`, or the `Arc` pointer), which is subtracted up to the
    // payload's size.
    let added = (after - before) as f64 / events as f64;
    Retained {
        bytes_per_event: added - inline_payload as f64,
        drop_ns,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Keeps one core busy while alive: a thread spinning on a flag.
struct Spinner {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Spinner {
    fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut spins = 0u64;
            while !flag.load(Ordering::Relaxed) {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
            spins
        });
        Spinner {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Median ns/delivery per impl over `rounds` interleaved rounds (who goes
/// first rotates), for `impls`.
fn burst_medians<P: Payload>(
    rt: &tokio::runtime::Runtime,
    impls: &[Impl],
    subs: usize,
    events: u64,
    rounds: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = impls.len();
    let mut per_delivery: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut per_publish: Vec<Vec<f64>> = vec![Vec::new(); n];
    for round in 0..rounds {
        for k in 0..n {
            let idx = (k + round) % n; // rotate who goes first
            let b = rt.block_on(burst::<P>(impls[idx], subs, events));
            per_delivery[idx].push(b.total.as_nanos() as f64 / (events as f64 * subs as f64));
            per_publish[idx].push(b.publish.as_nanos() as f64 / events as f64);
        }
    }
    (
        per_delivery.into_iter().map(median).collect(),
        per_publish.into_iter().map(median).collect(),
    )
}

/// One target of issue #14: snapstream's speed-up over fair tokio.
struct Target {
    what: String,
    speedup: f64,
    min: f64,
}

fn main() {
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let subs_list: &[usize] = if quick {
        &[1, 16, 256]
    } else {
        &[1, 16, 256, 4096]
    };
    let rounds = if quick { 1 } else { 5 };
    let deliveries: u64 = if quick { 20_000 } else { 4_000_000 };
    let paced_events: u64 = if quick { 20 } else { 500 };

    println!("# fanout: snapstream vs tokio::sync::broadcast vs async-broadcast");
    println!("2-worker multi-thread runtime, {rounds} interleaved round(s), median shown");
    println!("speed-up = fair tokio's ns/delivery ÷ this impl's (above 1: faster than tokio)\n");

    let mut targets: Vec<Target> = Vec::new();

    fn run_payload<P: Payload>(
        rt: &tokio::runtime::Runtime,
        subs_list: &[usize],
        rounds: usize,
        deliveries: u64,
        paced_events: u64,
        targets: &mut Vec<Target>,
    ) {
        println!("## payload {}\n", P::NAME);
        println!(
            "| subscribers | impl | ns/delivery | speed-up vs fair tokio | publisher ns/event | p50 latency µs | p99 latency µs |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|");
        for &subs in subs_list {
            let events = (deliveries / subs as u64).clamp(200, 1_000_000);
            let (nd, np) = burst_medians::<P>(rt, &IMPLS, subs, events, rounds);
            let mut lat: Vec<Vec<u64>> = Vec::new();
            for imp in IMPLS {
                lat.push(rt.block_on(paced::<P>(imp, subs, paced_events)));
            }
            let tokio_nd = nd[1];
            for (k, imp) in IMPLS.iter().enumerate() {
                let p50 = pct(&mut lat[k], 0.50) as f64 / 1000.0;
                let p99 = pct(&mut lat[k], 0.99) as f64 / 1000.0;
                println!(
                    "| {subs} | {} | {:.1} | {:.2}× | {:.1} | {p50:.1} | {p99:.1} |",
                    imp.name(),
                    nd[k],
                    tokio_nd / nd[k],
                    np[k],
                );
            }
            let min = match subs {
                1 => Some(2.0),
                16 => Some(3.0),
                _ => None,
            };
            if let (Some(min), true) = (min, P::NAME == "u64") {
                targets.push(Target {
                    what: format!("{subs} reader(s), quiet machine, u64"),
                    speedup: tokio_nd / nd[0],
                    min,
                });
            }
        }
        println!();
    }
    run_payload::<u64>(
        &rt,
        subs_list,
        rounds,
        deliveries,
        paced_events,
        &mut targets,
    );
    run_payload::<Big>(
        &rt,
        subs_list,
        rounds,
        deliveries,
        paced_events,
        &mut targets,
    );

    // The other core loaded: a spinning thread competes with the runtime.
    let loaded_rounds = if quick { 1 } else { 7 };
    println!("## payload u64, the other core loaded by a spinning thread\n");
    println!("| subscribers | impl | ns/delivery | speed-up vs fair tokio |");
    println!("|---:|---|---:|---:|");
    for subs in [1usize, 16] {
        let events = (deliveries / subs as u64).clamp(200, 1_000_000);
        // (The throttled ring is left out here: its writer spins on a full
        // ring, which under load only measures the scheduler.)
        let impls = [Impl::Snapstream, Impl::Tokio];
        let (nd, _) = {
            let _spin = Spinner::start();
            burst_medians::<u64>(&rt, &impls, subs, events, loaded_rounds)
        };
        for (k, imp) in impls.iter().enumerate() {
            println!(
                "| {subs} | {} | {:.1} | {:.2}× |",
                imp.name(),
                nd[k],
                nd[1] / nd[k]
            );
        }
        if subs == 1 {
            targets.push(Target {
                what: "1 reader, other core loaded, u64".into(),
                speedup: nd[1] / nd[0],
                min: 1.2,
            });
        }
    }
    println!();

    let retained_events: u64 = if quick { 10_000 } else { 1_000_000 };
    println!("## one stalled subscriber, {retained_events} events retained (requested bytes; RSS: `benches/memory.rs`)\n");
    println!("| payload | impl | bytes/event beyond payload | drop the stalled subscriber (ms) |");
    println!("|---|---|---:|---:|");
    let retaining = [Impl::Snapstream, Impl::Tokio, Impl::AsyncBroadcast];
    for imp in retaining {
        let r = retained::<u64>(imp, retained_events);
        println!(
            "| u64 | {} | {:.1} | {:.2} |",
            imp.name(),
            r.bytes_per_event,
            r.drop_ns as f64 / 1e6
        );
    }
    for imp in retaining {
        let r = retained::<Big>(imp, retained_events);
        println!(
            "| 256 B (Arc) | {} | {:.1} | {:.2} |",
            imp.name(),
            r.bytes_per_event,
            r.drop_ns as f64 / 1e6
        );
    }

    println!("\n## targets (issue #14: speed-up over fair tokio, median)\n");
    println!("| case | speed-up | target | met |");
    println!("|---|---:|---:|---|");
    for t in &targets {
        println!(
            "| {} | {:.2}× | ≥ {:.1}× | {} |",
            t.what,
            t.speedup,
            t.min,
            if t.speedup >= t.min { "yes" } else { "**no**" }
        );
    }
    if quick {
        println!("(quick mode: tiny sizes, 1 round — the verdicts mean nothing here)");
    }

    let errors = ERRORS.load(Ordering::Relaxed);
    println!("\nlost or reordered deliveries: {errors}");
    if errors != 0 {
        eprintln!("FAILED: {errors} lost or reordered deliveries");
        std::process::exit(1);
    }
}
