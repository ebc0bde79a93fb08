//! Keyed pool and lease pool against their peers, interleaved in one process.
//!
//! `cargo bench --bench pools` (full, 1-3 minutes) or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --bench pools` (tiny sizes, checks only).
//!
//! The first section (`SNAPSTREAM_BENCH_SECTION=go`) runs **Gitpod's own Go
//! pool** (the seed, built by the anchor's `run.sh` in
//! `../shared/anchors/go-gitpod-pool/`, or `$GITPOD_POOL_ANCHOR`) and the keyed
//! pool on the anchor's workload, round by round in one run, and with them
//! the workload's **channel ceiling** (the same producer and handler with no
//! pool: one mpsc channel into one task; see [`channel_run`]); see
//! [`go_section`]. For profiling one case: `SNAPSTREAM_BENCH_CASE=uniform10k`
//! (or `uniform16`, `hot10k`, `hot16`), `SNAPSTREAM_BENCH_SCALE` and
//! `SNAPSTREAM_BENCH_ROUNDS` override the item scale and the rounds,
//! `GITPOD_POOL_ANCHOR=/none` skips the Go side, and `SNAPSTREAM_BENCH_DIAG=1`
//! prints, per snapstream run, the pool's batches and worker parks, the
//! producer's waits for room, how often the handler's mutex was contended
//! and how many items each thread handled and added (counts that do not
//! depend on the machine's load, unlike the rate).
//!
//! Other peers:
//! * **journal scan**: Gitpod's algorithm (one shared journal, workers scan it
//!   for the first item whose key is free, `Vec::remove` it), written here.
//! * **per-key Mutex**: a task spawned per item that locks its key's
//!   `tokio::sync::Mutex`, then takes one of N worker permits.
//! * **mpsc**: one `tokio::sync::mpsc` channel to one task (no keys at all).
//! * **Semaphore**: `tokio::sync::Semaphore` permits vs leases.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapstream::lease::LeasePool;
use snapstream::workpool::{KeyedPool, StopMode};
use tokio::sync::{mpsc, Notify, Semaphore};

const WORKERS: usize = 4;
const CAPACITY: usize = 1024;

struct Sizes {
    items: u64,
    hot_backlog: u64,
    cold_probes: usize,
    backlog_items: u64,
    lease_ops: u64,
    rounds: usize,
}

fn sizes() -> Sizes {
    if std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some() {
        Sizes {
            items: 2_000,
            hot_backlog: 1_000,
            cold_probes: 50,
            backlog_items: 200,
            lease_ops: 2_000,
            rounds: 1,
        }
    } else {
        Sizes {
            items: 200_000,
            hot_backlog: 100_000,
            cold_probes: 1_000,
            backlog_items: 2_000,
            lease_ops: 300_000,
            rounds: 3,
        }
    }
}

/// What a probe item reports: when it was added.
type Probe = Option<(Instant, mpsc::UnboundedSender<Duration>)>;

/// A hot item holds its key busy until its run's gate opens (at the end).
type Hot = Option<Arc<Semaphore>>;

async fn handle(probe: Probe, hot: Hot) {
    if let Some((t0, tx)) = probe {
        let _ = tx.send(t0.elapsed());
    }
    if let Some(gate) = hot {
        let _ = gate.acquire().await;
    }
}

/// One implementation under test.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Imp {
    Keyed,
    Journal,
    KeyMutex,
}

const IMPS: [Imp; 3] = [Imp::Keyed, Imp::Journal, Imp::KeyMutex];

// ---------------------------------------------------------------- journal scan

struct JState {
    journal: Vec<(u64, Probe, Hot)>,
    busy: HashSet<u64>,
    stop: bool,
}

struct Journal {
    st: Mutex<JState>,
    incoming: Notify,
    room: Semaphore,
    done: AtomicU64,
}

impl Journal {
    fn start(capacity: usize) -> Arc<Self> {
        let j = Arc::new(Journal {
            st: Mutex::new(JState {
                journal: Vec::new(),
                busy: HashSet::new(),
                stop: false,
            }),
            incoming: Notify::new(),
            room: Semaphore::new(capacity),
            done: AtomicU64::new(0),
        });
        for _ in 0..WORKERS {
            let j = j.clone();
            tokio::spawn(async move { while !j.work().await {} });
        }
        j
    }

    async fn add(&self, key: u64, probe: Probe, hot: Hot) {
        self.room.acquire().await.unwrap().forget();
        self.st.lock().unwrap().journal.push((key, probe, hot));
        self.incoming.notify_one();
    }

    /// The seed's `work`: scan for an item whose queue is free.
    async fn work(&self) -> bool {
        let found = {
            let mut st = self.st.lock().unwrap();
            if st.stop {
                return true;
            }
            let pos = st.journal.iter().position(|(k, _, _)| !st.busy.contains(k));
            pos.map(|i| {
                let item = st.journal.remove(i);
                st.busy.insert(item.0);
                item
            })
        };
        match found {
            Some((key, probe, hot)) => {
                self.room.add_permits(1);
                handle(probe, hot).await;
                self.st.lock().unwrap().busy.remove(&key);
                self.done.fetch_add(1, Ordering::Relaxed);
                self.incoming.notify_one();
            }
            None => self.incoming.notified().await,
        }
        false
    }

    fn stop(&self) {
        let mut st = self.st.lock().unwrap();
        st.stop = true;
        st.journal.clear();
        drop(st);
        for _ in 0..WORKERS * 2 {
            self.incoming.notify_one();
        }
        self.incoming.notify_waiters();
    }
}

// ------------------------------------------------------------- per-key mutex

struct KeyMutex {
    locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    workers: Arc<Semaphore>,
    room: Arc<Semaphore>,
    done: Arc<AtomicU64>,
    added: AtomicU64,
    abort: Arc<std::sync::atomic::AtomicBool>,
}

impl KeyMutex {
    fn new(capacity: usize) -> Self {
        KeyMutex {
            locks: Mutex::default(),
            workers: Arc::new(Semaphore::new(WORKERS)),
            room: Arc::new(Semaphore::new(capacity)),
            done: Arc::default(),
            added: AtomicU64::new(0),
            abort: Arc::default(),
        }
    }

    async fn add(&self, key: u64, probe: Probe, hot: Hot) {
        let room = self.room.clone().acquire_owned().await.unwrap();
        self.added.fetch_add(1, Ordering::Relaxed);
        let lock = self.locks.lock().unwrap().entry(key).or_default().clone();
        let (workers, done, abort) = (self.workers.clone(), self.done.clone(), self.abort.clone());
        tokio::spawn(async move {
            let _g = lock.lock().await;
            let _w = workers.acquire().await.unwrap();
            drop(room);
            if !abort.load(Ordering::Relaxed) {
                handle(probe, hot).await;
            }
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
}

// ------------------------------------------------------- Gitpod's Go pool

/// One case of the Go anchor (`main.go`): its name on the command line, the
/// number of keys, events at `SCALE=1`, and whether every other event goes
/// to key 0 (the "half-hot" cases).
struct GoCase {
    arg: &'static str,
    label: &'static str,
    keys: usize,
    events: u64,
    hot: bool,
    /// Target for the median ratio snapstream / Go.
    target: f64,
}

const GO_CASES: [GoCase; 4] = [
    GoCase {
        arg: "uniform16",
        label: "uniform",
        keys: 16,
        events: 200_000,
        hot: false,
        target: 2.0,
    },
    GoCase {
        arg: "uniform10k",
        label: "uniform",
        keys: 10_000,
        events: 200_000,
        hot: false,
        target: 3.0,
    },
    GoCase {
        arg: "hot10k",
        label: "half on one key",
        keys: 10_000,
        events: 50_000,
        hot: true,
        target: 2.0,
    },
    GoCase {
        arg: "hot16",
        label: "half on one key",
        keys: 16,
        events: 200_000,
        hot: true,
        target: 2.0,
    },
];

/// The most snapstream's runs of one case may spread (max / min items/s).
const MAX_SPREAD: f64 = 1.5;

/// The anchor's directory, holding `run.sh` and `main.go`.
fn go_anchor() -> PathBuf {
    std::env::var_os("GITPOD_POOL_ANCHOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/anchors/go-gitpod-pool")
        })
}

fn have_go() -> bool {
    Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the Go pool can run: the anchor is there, and `go` is (installed
/// from Debian's `golang-go` when missing, except in quick mode).
fn go_ready(quick: bool) -> Result<(), String> {
    let anchor = go_anchor();
    if !anchor.join("run.sh").exists() {
        return Err(format!(
            "no Go anchor at {} (set GITPOD_POOL_ANCHOR)",
            anchor.display()
        ));
    }
    if have_go() {
        return Ok(());
    }
    if quick {
        return Err("`go` is not installed (quick mode does not install it)".into());
    }
    println!("`go` is missing: installing golang-go with apt-get ...");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "golang-go"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if ok && have_go() {
        Ok(())
    } else {
        Err("`go` is missing and `apt-get install -y golang-go` failed".into())
    }
}

/// One run of Gitpod's pool (`run.sh <case>` at `SCALE=scale`; it builds the
/// binary once): events/s, after checking it saw nothing out of order.
fn go_run(case: &GoCase, scale: u64) -> f64 {
    let out = Command::new("bash")
        .arg(go_anchor().join("run.sh"))
        .arg(case.arg)
        .env("SCALE", scale.to_string())
        .output()
        .expect("run the Go anchor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Go anchor failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "gitpod(go) EventWorkerPool uniform keys=16 events=2000000 workers=4 1.43 M events/s out-of-order=0"
    let line = text
        .lines()
        .find(|l| l.contains("EventWorkerPool"))
        .expect("a result line");
    assert!(
        line.ends_with("out-of-order=0"),
        "the Go pool broke per-key order: {line}"
    );
    let events = format!("events={} ", case.events * scale);
    assert!(line.contains(&events), "unexpected workload: {line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "M").expect("a rate");
    words[at - 1].parse::<f64>().expect("a rate") * 1e6
}

/// What the Go driver's handler keeps: each key's last sequence number, the
/// items seen out of order, and how many were handled.
struct Seen {
    last: HashMap<&'static str, u64>,
    bad: u64,
    count: u64,
}

/// The Go driver's handler: under one mutex, count an item that is not after
/// its key's previous one and remember it as the key's last. Returns whether
/// this was the run's last item.
fn handle_item(seen: &Mutex<Seen>, key: &'static str, seq: u64, events: u64, diag: bool) -> bool {
    let mut guard = match seen.try_lock() {
        Ok(g) => g,
        Err(_) => {
            if diag {
                HANDLER_CONTENDED.fetch_add(1, Ordering::Relaxed);
            }
            seen.lock().unwrap()
        }
    };
    let s = &mut *guard;
    match s.last.get_mut(&key) {
        Some(last) => {
            if *last >= seq {
                s.bad += 1;
            }
            *last = seq;
        }
        None => {
            s.last.insert(key, seq);
        }
    }
    s.count += 1;
    if diag {
        count_on(&HANDLED_ON);
    }
    s.count == events
}

/// The key of item `i` in `case`: round robin over the keys, or every other
/// item on `k0` when the case has a hot key.
fn go_key_of(case: &GoCase) -> impl Fn(u64) -> &'static str + Clone + Send + 'static {
    let names = key_names(case.keys);
    let (keys, hot) = (case.keys as u64, case.hot);
    move |i: u64| {
        names[if hot && i.is_multiple_of(2) {
            0
        } else {
            (i % keys) as usize
        }]
    }
}

/// Checks a run's handler state: nothing out of order, every item once (the
/// count, and each key's last item is the last one added to it).
fn check_seen(seen: &Mutex<Seen>, case: &GoCase, events: u64) {
    let key_of = go_key_of(case);
    let s = seen.lock().unwrap();
    assert_eq!((s.bad, s.count), (0, events), "per-key order, exactly once");
    // The key pattern repeats every `2 * keys` items at most: the last ones
    // name every key that got an item, and each key's last item.
    let mut expected: HashMap<&'static str, u64> = HashMap::new();
    for i in events.saturating_sub(2 * case.keys as u64)..events {
        expected.insert(key_of(i), i);
    }
    assert_eq!(
        s.last, expected,
        "each key's last item ran last, no other key seen"
    );
}

fn new_seen() -> Arc<Mutex<Seen>> {
    Arc::new(Mutex::new(Seen {
        last: HashMap::new(),
        bad: 0,
        count: 0,
    }))
}

/// The same run through snapstream's [`KeyedPool`]: `WORKERS` workers, the
/// default capacity, the anchor's key names, key distribution and handler
/// (one mutex around a map of each key's last sequence number, counting any
/// item that is not after its key's previous one). Events/s, from the
/// producer's start to the last handler's return, as the Go driver times it.
///
/// Checks in every run: nothing out of order, every item once (the count, and
/// each key's last item is the last one added to it).
async fn snap_run(case: &GoCase, scale: u64) -> f64 {
    let events = case.events * scale;
    let key_of = go_key_of(case);
    let seen = new_seen();
    let all_done = Arc::new(Notify::new());
    let diag = std::env::var_os("SNAPSTREAM_BENCH_DIAG").is_some();
    let pool = {
        let (seen, all_done) = (seen.clone(), all_done.clone());
        KeyedPool::builder()
            .workers(WORKERS)
            .build(move |key: &'static str, seq: u64| {
                if handle_item(&seen, key, seq, events, diag) {
                    all_done.notify_one();
                }
                std::future::ready(())
            })
            .unwrap()
    };
    let t0 = Instant::now();
    let producer = {
        let (pool, key_of) = (pool.clone(), key_of.clone());
        tokio::spawn(async move {
            for i in 0..events {
                pool.add(key_of(i), i).await.unwrap();
                if diag {
                    count_on(&ADDED_ON);
                }
            }
        })
    };
    all_done.notified().await;
    let rate = events as f64 / t0.elapsed().as_secs_f64();
    producer.await.unwrap();
    if diag {
        let st = pool.stats();
        println!(
            "DIAG {} {:.2}M/s: batches {} ({:.1} items each), worker parks {}, producer waits {}, handler lock contended {}, handled per thread {:?}, added per thread {:?}",
            case.arg,
            rate / 1e6,
            st.batches,
            events as f64 / st.batches as f64,
            st.worker_waits,
            st.add_waits,
            HANDLER_CONTENDED.swap(0, Ordering::Relaxed),
            take_counts(&HANDLED_ON),
            take_counts(&ADDED_ON),
        );
    }
    assert!(pool.stop(StopMode::Drain).await.is_empty());
    assert_eq!(pool.stats().handled, events, "every item handled once");
    check_seen(&seen, case, events);
    rate
}

/// The ceiling of any pool on this workload: the same producer and handler
/// with no pool at all, one `tokio::sync::mpsc` channel (as large as the
/// pool's default capacity) into one task that runs the handler on every
/// item in turn. It dispatches nothing by key (one consumer keeps every
/// key's order trivially) and has no workers to wake, so a pool that
/// dispatches keys to several workers pays at least this much per item.
async fn channel_run(case: &GoCase, scale: u64) -> f64 {
    let events = case.events * scale;
    let key_of = go_key_of(case);
    let seen = new_seen();
    let (tx, mut rx) = mpsc::channel::<(&'static str, u64)>(1024);
    let t0 = Instant::now();
    let consumer = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some((key, seq)) = rx.recv().await {
                if handle_item(&seen, key, seq, events, false) {
                    break;
                }
            }
        })
    };
    let producer = tokio::spawn(async move {
        for i in 0..events {
            tx.send((key_of(i), i)).await.unwrap();
        }
    });
    consumer.await.unwrap();
    let rate = events as f64 / t0.elapsed().as_secs_f64();
    producer.await.unwrap();
    check_seen(&seen, case, events);
    rate
}

/// The anchor's key names `"k0"`, `"k1"`, ... for `keys` keys, made once per
/// process: `&'static str`, like the Go driver's strings a pointer and a
/// length passed by value, with no reference count for the producer and the
/// workers to move between cores (an `Arc<str>` per item had both threads
/// writing each key's count).
fn key_names(keys: usize) -> &'static [&'static str] {
    static NAMES: Mutex<Vec<&'static [&'static str]>> = Mutex::new(Vec::new());
    let mut made = NAMES.lock().unwrap();
    if let Some(names) = made.iter().find(|n| n.len() == keys) {
        return names;
    }
    let names: Vec<&'static str> = (0..keys)
        .map(|i| &*Box::leak(format!("k{i}").into_boxed_str()))
        .collect();
    let names: &'static [&'static str] = Box::leak(names.into_boxed_slice());
    made.push(names);
    names
}

/// `SNAPSTREAM_BENCH_DIAG`: items handled and added on each thread (by a
/// small per-thread index), to tell which threads a run used.
static HANDLED_ON: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static ADDED_ON: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static HANDLER_CONTENDED: AtomicU64 = AtomicU64::new(0);
static NEXT_THREAD: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static THREAD_INDEX: usize = (NEXT_THREAD.fetch_add(1, Ordering::Relaxed) % 8) as usize;
}
fn count_on(counts: &[AtomicU64; 8]) {
    THREAD_INDEX.with(|i| counts[*i].fetch_add(1, Ordering::Relaxed));
}
fn take_counts(counts: &[AtomicU64; 8]) -> Vec<u64> {
    counts
        .iter()
        .map(|c| c.swap(0, Ordering::Relaxed))
        .collect()
}

/// Gitpod's Go pool and the keyed pool, case by case, round by round (which
/// goes first alternates), at 10x the anchor's item counts (`SCALE=10`).
async fn go_section(quick: bool) {
    let (mut scale, mut rounds): (u64, usize) = if quick { (1, 1) } else { (10, 5) };
    // Overrides, for profiling one run: SNAPSTREAM_BENCH_SCALE, SNAPSTREAM_BENCH_ROUNDS.
    if let Some(v) = std::env::var("SNAPSTREAM_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        scale = v;
    }
    if let Some(v) = std::env::var("SNAPSTREAM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        rounds = v;
    }
    println!("# Gitpod's Go EventWorkerPool vs snapstream KeyedPool: {WORKERS} workers, 2 threads (GOMAXPROCS=2 / tokio), one mutex + per-key order map in the handler, SCALE={scale}, {rounds} interleaved rounds");
    let go = match go_ready(quick) {
        Ok(()) => true,
        Err(why) => {
            println!("NOTICE: skipping the Go pool: {why}; running snapstream's side only");
            false
        }
    };
    if quick {
        println!("(quick mode: a correctness check at SCALE=1, one round; the figures and verdicts mean nothing)");
    }
    println!();
    println!("| case | keys | events | Go median [rounds] | snapstream median [rounds] | median ratio (per round) | snapstream max/min | channel ceiling median (ratio to Go) | target | met |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    // SNAPSTREAM_BENCH_CASE=uniform16|uniform10k|hot10k|hot16 (or several, comma-separated) runs only those.
    let only = std::env::var("SNAPSTREAM_BENCH_CASE").ok();
    for case in GO_CASES.iter().filter(|c| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == c.arg))
    }) {
        let (mut g, mut r, mut c, mut ratios, mut ceilings) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            // Go, snapstream, then the channel; the first two swap every round.
            let (a, b) = if round.is_multiple_of(2) {
                let a = if go { go_run(case, scale) } else { f64::NAN };
                (a, snap_run(case, scale).await)
            } else {
                let b = snap_run(case, scale).await;
                (if go { go_run(case, scale) } else { f64::NAN }, b)
            };
            let ch = channel_run(case, scale).await;
            g.push(a);
            r.push(b);
            c.push(ch);
            ratios.push(b / a);
            ceilings.push(ch / a);
        }
        let spread =
            r.iter().cloned().fold(f64::MIN, f64::max) / r.iter().cloned().fold(f64::MAX, f64::min);
        let rounds_of = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.2}", x / 1e6))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (runs, go_runs) = (rounds_of(&r), rounds_of(&g));
        let (gm, rm, cm) = (median(g.clone()), median(r), median(c));
        if go {
            let ratio = median(ratios);
            let met = ratio >= case.target && spread <= MAX_SPREAD;
            println!(
                "| {} | {} | {} | {:.2}M/s [{}] | {:.2}M/s [{}] | {:.2}x | {:.2} | {:.2}M/s ({:.2}x) | ratio >= {}x, max/min <= {MAX_SPREAD} | {} |",
                case.label, case.keys, case.events * scale, gm / 1e6, go_runs, rm / 1e6, runs, ratio, spread,
                cm / 1e6, median(ceilings), case.target,
                if met { "yes" } else { "NO" }
            );
        } else {
            println!(
                "| {} | {} | {} | - | {:.2}M/s [{}] | - | {:.2} | {:.2}M/s | ratio >= {}x, max/min <= {MAX_SPREAD} | - |",
                case.label, case.keys, case.events * scale, rm / 1e6, runs, spread, cm / 1e6, case.target
            );
        }
    }
    println!();
}

// ------------------------------------------------------------------- drivers

enum Running {
    Keyed(KeyedPool<u64, (Probe, Hot)>),
    Journal(Arc<Journal>),
    KeyMutex(KeyMutex),
}

impl Running {
    fn start(imp: Imp, capacity: usize) -> Self {
        match imp {
            Imp::Keyed => Running::Keyed(
                KeyedPool::builder()
                    .workers(WORKERS)
                    .capacity(capacity)
                    .build(|_k, (probe, hot)| handle(probe, hot))
                    .unwrap(),
            ),
            Imp::Journal => Running::Journal(Journal::start(capacity)),
            Imp::KeyMutex => Running::KeyMutex(KeyMutex::new(capacity)),
        }
    }

    async fn add(&self, key: u64, probe: Probe, hot: Hot) {
        match self {
            Running::Keyed(p) => p.add(key, (probe, hot)).await.unwrap(),
            Running::Journal(j) => j.add(key, probe, hot).await,
            Running::KeyMutex(m) => m.add(key, probe, hot).await,
        }
    }

    fn done(&self) -> u64 {
        match self {
            Running::Keyed(p) => p.stats().handled,
            Running::Journal(j) => j.done.load(Ordering::Relaxed),
            Running::KeyMutex(m) => m.done.load(Ordering::Relaxed),
        }
    }

    /// Waits until `n` items were handled (draining).
    async fn drain(self, n: u64) {
        match self {
            Running::Keyed(p) => {
                p.stop(StopMode::Drain).await;
                assert_eq!(p.stats().handled, n);
            }
            other => {
                while other.done() < n {
                    tokio::task::yield_now().await;
                }
                other.abort().await;
            }
        }
    }

    /// Drops whatever is pending.
    async fn abort(self) {
        match self {
            Running::Keyed(p) => {
                p.stop(StopMode::Abort).await;
            }
            Running::Journal(j) => j.stop(),
            Running::KeyMutex(m) => {
                // Let the spawned tasks finish so they do not run into the next measurement.
                m.abort.store(true, Ordering::Relaxed);
                while m.done.load(Ordering::Relaxed) < m.added.load(Ordering::Relaxed) {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

/// Items per second through `imp` with a no-op handler, keys uniform.
async fn uniform(imp: Imp, keys: u64, items: u64) -> f64 {
    let run = Running::start(imp, CAPACITY);
    let t0 = Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..items {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        run.add(x % keys, None, None).await;
    }
    run.drain(items).await;
    items as f64 / t0.elapsed().as_secs_f64()
}

/// Starts `imp` with `backlog` items on one hot key that stays busy.
async fn with_backlog(imp: Imp, backlog: u64) -> (Running, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let run = Running::start(imp, backlog as usize + CAPACITY);
    for _ in 0..backlog {
        run.add(u64::MAX, None, Some(gate.clone())).await;
    }
    (run, gate)
}

/// Ends a run started by [`with_backlog`].
async fn end(run: Running, gate: Arc<Semaphore>) {
    gate.close(); // every hot handler returns at once
    run.abort().await;
}

/// Cold items per second (keys uniform, no-op handler) beside the hot backlog.
async fn cold_rate(imp: Imp, keys: u64, backlog: u64, items: u64) -> f64 {
    let (run, gate) = with_backlog(imp, backlog).await;
    let before = run.done();
    let t0 = Instant::now();
    for i in 0..items {
        run.add(i.wrapping_mul(0x9E37_79B9) % keys, None, None)
            .await;
    }
    while run.done() < before + items {
        tokio::task::yield_now().await;
    }
    let rate = items as f64 / t0.elapsed().as_secs_f64();
    end(run, gate).await;
    rate
}

/// p99 of add-to-start latency of cold-key items, added one at a time, with
/// or without a backlog on one busy hot key.
async fn cold_p99(imp: Imp, keys: u64, backlog: u64, probes: usize) -> Duration {
    let (run, gate) = with_backlog(imp, backlog).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut lat = Vec::with_capacity(probes);
    for i in 0..probes {
        run.add(i as u64 % keys, Some((Instant::now(), tx.clone())), None)
            .await;
        lat.push(rx.recv().await.unwrap());
    }
    end(run, gate).await;
    lat.sort_unstable();
    lat[(lat.len() * 99 / 100).min(lat.len() - 1)]
}

async fn mpsc_noop(items: u64) -> f64 {
    let (tx, mut rx) = mpsc::channel::<(u64, Probe)>(CAPACITY);
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some((_k, p)) = rx.recv().await {
            handle(p, None).await;
            n += 1;
        }
        n
    });
    let t0 = Instant::now();
    for i in 0..items {
        tx.send((i % 16, None)).await.unwrap();
    }
    drop(tx);
    assert_eq!(consumer.await.unwrap(), items);
    items as f64 / t0.elapsed().as_secs_f64()
}

async fn lease_ns(ops: u64, tasks: u64, target: u64) -> f64 {
    let pool = LeasePool::new();
    pool.set(1u64, target);
    let t0 = Instant::now();
    let hs: Vec<_> = (0..tasks)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..ops / tasks {
                    let lease = pool.acquire(1).await.unwrap();
                    drop(lease);
                }
            })
        })
        .collect();
    for h in hs {
        h.await.unwrap();
    }
    assert_eq!(pool.get(&1).active, 0);
    t0.elapsed().as_nanos() as f64 / ops as f64
}

async fn semaphore_ns(ops: u64, tasks: u64, permits: usize) -> f64 {
    let sem = Arc::new(Semaphore::new(permits));
    let t0 = Instant::now();
    let hs: Vec<_> = (0..tasks)
        .map(|_| {
            let sem = sem.clone();
            tokio::spawn(async move {
                for _ in 0..ops / tasks {
                    let permit = sem.acquire().await.unwrap();
                    drop(permit);
                }
            })
        })
        .collect();
    for h in hs {
        h.await.unwrap();
    }
    assert_eq!(sem.available_permits(), permits);
    t0.elapsed().as_nanos() as f64 / ops as f64
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
    // SNAPSTREAM_BENCH_SECTION=go|uniform|backlog|p99|mpsc|lease runs one section.
    let only = std::env::var("SNAPSTREAM_BENCH_SECTION").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    rt.block_on(async {
        if run("go") {
            go_section(quick).await;
        }
        if run("uniform") || run("backlog") || run("p99") {
        println!("# keyed pool: {WORKERS} workers, capacity {CAPACITY}, 2 runtime threads, median of {} rounds", s.rounds);
        println!();
        println!("| scenario | keys | keyed pool | journal scan | per-key Mutex | keyed / journal |");
        println!("|---|---|---|---|---|---|");
        }
        for keys in [16u64, 10_000].into_iter().filter(|_| run("uniform")) {
            let mut r: HashMap<Imp, Vec<f64>> = HashMap::new();
            for _ in 0..s.rounds {
                for imp in IMPS {
                    r.entry(imp).or_default().push(uniform(imp, keys, s.items).await);
                }
            }
            let m: HashMap<Imp, f64> = r.into_iter().map(|(k, v)| (k, median(v))).collect();
            println!(
                "| uniform, items/s | {keys} | {:.0} | {:.0} | {:.0} | {:.1}x |",
                m[&Imp::Keyed], m[&Imp::Journal], m[&Imp::KeyMutex], m[&Imp::Keyed] / m[&Imp::Journal]
            );
        }
        for keys in [16u64, 10_000].into_iter().filter(|_| run("backlog")) {
            let mut r: HashMap<Imp, Vec<f64>> = HashMap::new();
            for _ in 0..s.rounds {
                for imp in IMPS {
                    r.entry(imp).or_default().push(cold_rate(imp, keys, s.hot_backlog, s.backlog_items).await);
                }
            }
            let m: HashMap<Imp, f64> = r.into_iter().map(|(k, v)| (k, median(v))).collect();
            println!(
                "| cold items/s, hot backlog {} | {keys} | {:.0} | {:.0} | {:.0} | {:.1}x |",
                s.hot_backlog, m[&Imp::Keyed], m[&Imp::Journal], m[&Imp::KeyMutex], m[&Imp::Keyed] / m[&Imp::Journal]
            );
        }
        for keys in [16u64, 10_000].into_iter().filter(|_| run("p99")) {
            for backlog in [0, s.hot_backlog] {
                let mut r: HashMap<Imp, Vec<f64>> = HashMap::new();
                for _ in 0..s.rounds {
                    for imp in IMPS {
                        let p99 = cold_p99(imp, keys, backlog, s.cold_probes).await;
                        r.entry(imp).or_default().push(p99.as_secs_f64() * 1e6);
                    }
                }
                let m: HashMap<Imp, f64> = r.into_iter().map(|(k, v)| (k, median(v))).collect();
                println!(
                    "| cold-key dispatch p99 µs, hot backlog {backlog} | {keys} | {:.1} | {:.1} | {:.1} | {:.1}x faster |",
                    m[&Imp::Keyed], m[&Imp::Journal], m[&Imp::KeyMutex], m[&Imp::Journal] / m[&Imp::Keyed]
                );
            }
        }
        if run("mpsc") {
        println!();
        println!("| no-op handler, 16 keys | items/s |");
        println!("|---|---|");
        let (mut kp, mut mp) = (Vec::new(), Vec::new());
        for _ in 0..s.rounds {
            kp.push(uniform(Imp::Keyed, 16, s.items).await);
            mp.push(mpsc_noop(s.items).await);
        }
        let (kp, mp) = (median(kp), median(mp));
        println!("| keyed pool | {kp:.0} |");
        println!("| one mpsc channel to one task | {mp:.0} |");
        println!("| mpsc / keyed pool | {:.2}x |", mp / kp);
        }
        if run("lease") {
        println!();
        println!("| acquire + release | lease pool ns/op | Semaphore ns/op | lease / Semaphore |");
        println!("|---|---|---|---|");
        for (tasks, target) in [(1u64, 1u64), (4, 2)] {
            let (mut l, mut m) = (Vec::new(), Vec::new());
            for _ in 0..s.rounds {
                l.push(lease_ns(s.lease_ops, tasks, target).await);
                m.push(semaphore_ns(s.lease_ops, tasks, target as usize).await);
            }
            let (l, m) = (median(l), median(m));
            println!("| {tasks} task(s), target {target} | {l:.1} | {m:.1} | {:.2}x |", l / m);
        }
        }
    });
}
