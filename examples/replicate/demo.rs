//! The engine of the `replicate` demo: a toy key-value store replicated to
//! hundreds of subscribers through snapstream, with per-key side effects in a
//! keyed ordered pool, a lease pool limiting work per node, and webhooks
//! delivered through a durable work queue to a flaky endpoint.
//!
//! `main.rs` parses the command line, runs [`run`] and prints the summary;
//! `tests/demo_replicate.rs` includes this file with `#[path]` and runs it
//! with tiny sizes.
//!
//! # What runs
//!
//! ```text
//!  producer ──publish──► Publisher ──► per-key subscribers (views)
//!  (store)     (index)      │     └──► wildcard subscribers (views)
//!     ▲                     │
//!     └── snapshot handler ─┤
//!                           └──► wildcard feed ──► KeyedPool (per-key side effects,
//!                                                   each under a LeasePool lease)
//!                                                        │ webhooks
//!                                                        ▼
//!                                    WorkQueue over disk | memory | Redis ──► flaky endpoint
//! ```
//!
//! At the end the producer stops, every view reads up to the store's final
//! index and is compared with the store; the pool's own replica too; every
//! webhook pushed must have been delivered or dead-lettered.

#[path = "admin.rs"]
mod admin;
#[path = "remote.rs"]
pub mod remote;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use snapstream::event::{Event, Message, Subject};
use snapstream::lease::{LeasePool, TryAcquireError};
use snapstream::publisher::{
    BoxError, LagPolicy, Publisher, SnapshotHandler, SnapshotRequest, SnapshotSink,
    SubscribeRequest, Subscription, SubscriptionError,
};
use snapstream::queue::{
    BaseQueue, Item, Manager, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions,
};
use snapstream::workpool::{KeyedPool, StopMode};
use tokio::sync::watch;
use tokio::time::Instant;

/// The one topic of the store.
const TOPIC: &str = "kv";
/// How long, after the producer stops, every view has to reach the final index.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the work queue has to deliver (or dead-letter) every webhook.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// One webhook per this many published changes.
const WEBHOOK_EVERY: u64 = 8;
/// Webhooks whose sequence number is 7 modulo this always fail ("poison").
const POISON_EVERY: u64 = 50;
/// Attempts before a webhook is dead-lettered.
const MAX_ATTEMPTS: u32 = 4;
/// One side effect in this many holds its lease for a millisecond.
const SLOW_SIDE_EFFECT_EVERY: u64 = 16;

/// Where the work queue keeps its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// An embedded redb file in the data directory (crash-safe).
    Disk,
    /// Process memory.
    Memory,
    /// A Redis server (see `--redis`; needs a build with `--features redis`).
    Redis,
}

/// A state-replication service, end to end, on snapstream.
///
/// A key-value store applies a steady stream of changes and publishes each
/// with an increasing index. Hundreds of subscribers (per-key and wildcard)
/// materialize views from snapshot + live events; some read slowly (the lag
/// policy detaches them), some disconnect and resume from their last index.
/// A keyed ordered worker pool applies per-key side effects under a lease
/// pool, and a durable work queue delivers webhooks to a flaky endpoint.
/// At the end every view is checked against the store.
#[derive(Parser, Debug, Clone)]
#[command(name = "replicate", version)]
pub struct Config {
    /// Seconds the store keeps changing.
    #[arg(long, default_value_t = 12.0)]
    pub duration: f64,
    /// Subscribers: 1 in 25 wildcard, 2 in 50 slow wildcard, 1 in 10 slow
    /// per-key, 2 in 10 reconnecting per-key, the rest per-key.
    #[arg(long, default_value_t = 500)]
    pub subscribers: usize,
    /// Keys in the store.
    #[arg(long, default_value_t = 200)]
    pub keys: usize,
    /// Changes per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Work queue backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Disk)]
    pub backend: BackendKind,
    /// Redis URL for the work queue (implies `--backend redis`, which alone
    /// uses redis://127.0.0.1:6379). The run's queues are deleted at exit,
    /// on Ctrl-C too.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Directory for the disk queue's file, kept after the run; a later run
    /// on it delivers what this one left [default: a new temporary directory,
    /// removed at exit, on Ctrl-C too].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The publisher's lag limit, in batches behind a key's newest event.
    #[arg(long, default_value_t = 1_000)]
    pub lag_limit: u64,
    /// Nodes (lease-pool keys) the side effects are spread over.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Concurrent side effects allowed per node (the lease target).
    #[arg(long, default_value_t = 2)]
    pub leases_per_node: u64,
    /// Workers of the keyed pool.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Random seed for the changes and the subscribers' behaviour.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Tiny sizes, for the tests: 1.5 s, 40 subscribers, 16 keys, 1,000
    /// changes/s, lag limit at most 100, at most 20 remote subscribers
    /// (overrides those flags), no progress bar.
    #[arg(long)]
    pub quick: bool,
    /// Do not draw the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Corrupt one view before the check (proves the check can fail).
    #[arg(long, hide = true)]
    pub break_a_view: bool,
    /// Corrupt one remote view before the check (proves that check can fail).
    #[arg(long, hide = true)]
    pub break_a_remote_view: bool,
    /// Serve the admin page (topics, pools, queues, dead letters, /metrics)
    /// on this address during the run; needs the `admin` feature.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
    /// Remote subscribers over gRPC: client-side views (keyed and wildcard)
    /// sharing one HTTP/2 connection, and reconnecting subscribers on
    /// connections of their own. The default run serves them over loopback
    /// (127.0.0.1, a free port); with `--connect` they subscribe there.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub remote: usize,
    /// Run only the store, its publisher and the gRPC server on ADDR (such
    /// as 127.0.0.1:7000; port 0 picks a free one, printed at start): the
    /// store changes for `--duration` seconds, then holds still and keeps
    /// serving until Ctrl-C.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = ["connect", "admin", "data_dir", "redis", "backend", "break_a_view"]
    )]
    pub serve: Option<std::net::SocketAddr>,
    /// Run only `--remote` remote subscribers against a `--serve` run at
    /// ADDR (host:port or http://host:port) for `--duration` seconds, then
    /// check every view against a fresh snapshot read over the network.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = ["admin", "data_dir", "redis", "backend", "break_a_view"]
    )]
    pub connect: Option<String>,
}

/// The most changes per second `--rate` accepts.
pub const MAX_RATE: u64 = 100_000_000;
/// The longest `--duration` accepted, in seconds: a year.
pub const MAX_DURATION_SECS: f64 = 365.0 * 86_400.0;

impl Config {
    /// Checks the flags as given (before `--quick` replaces some): every
    /// count the demo divides work by must be at least 1, the duration from
    /// 0 to [`MAX_DURATION_SECS`], the rate at most [`MAX_RATE`], and
    /// `--data-dir` only with the disk backend.
    ///
    /// # Errors
    ///
    /// The first flag that is out of range, as a [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = |flag, why| Err(ConfigError::Zero { flag, why });
        if !(0.0..=MAX_DURATION_SECS).contains(&self.duration) {
            return Err(ConfigError::Duration(self.duration));
        }
        if self.keys == 0 {
            return zero("keys", "the store needs at least 1 key");
        }
        if self.rate == 0 {
            return zero("rate", "the store must make at least 1 change per second");
        }
        if self.rate > MAX_RATE {
            return Err(ConfigError::TooLarge {
                flag: "rate",
                value: self.rate,
                max: MAX_RATE,
            });
        }
        if self.lag_limit == 0 {
            return zero(
                "lag-limit",
                "a subscriber must be allowed at least 1 batch behind, or every change \
                 would re-snapshot every subscriber",
            );
        }
        if self.nodes == 0 {
            return zero("nodes", "the side effects need at least 1 node");
        }
        if self.leases_per_node == 0 {
            return zero(
                "leases-per-node",
                "with no lease per node no side effect could ever run",
            );
        }
        if self.workers == 0 {
            return zero("workers", "the keyed pool needs at least 1 worker");
        }
        let disk = self.redis.is_none() && self.backend == BackendKind::Disk;
        if let (Some(dir), false) = (&self.data_dir, disk) {
            return Err(ConfigError::DataDirUnused(dir.clone()));
        }
        if self.admin.is_some() && !cfg!(feature = "admin") {
            return Err(ConfigError::NoAdmin);
        }
        if self.connect.is_some() && self.remote == 0 {
            return zero(
                "remote",
                "--connect runs remote subscribers only: at least 1",
            );
        }
        Ok(())
    }

    /// The configuration with `--quick` and `--redis` applied.
    fn effective(mut self) -> Self {
        if self.quick {
            self.duration = 1.5;
            self.subscribers = 40;
            self.keys = 16;
            self.rate = 1_000;
            self.lag_limit = self.lag_limit.min(100);
            self.remote = self.remote.min(20);
            self.no_progress = true;
        }
        if self.redis.is_some() {
            self.backend = BackendKind::Redis;
        }
        self
    }
}

/// A flag the demo cannot run with. The binary exits with 2 on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A count the demo needs at least one of is 0.
    #[error("invalid --{flag} 0: {why}")]
    Zero {
        /// The flag, without its dashes.
        flag: &'static str,
        /// Why 0 cannot work.
        why: &'static str,
    },
    /// A value above what the demo can hold in memory.
    #[error("invalid --{flag} {value}: at most {max}")]
    TooLarge {
        /// The flag, without its dashes.
        flag: &'static str,
        /// What was given.
        value: u64,
        /// The largest value accepted.
        max: u64,
    },
    /// `--duration` is negative, NaN, or more than a year.
    #[error("invalid --duration {0}: must be a number of seconds from 0 to 31536000 (a year)")]
    Duration(f64),
    /// `--data-dir` with a backend other than disk, which would ignore it.
    #[error("--data-dir {}: only the disk backend keeps a data directory", .0.display())]
    DataDirUnused(PathBuf),
    /// `--admin` in a build without the `admin` feature.
    #[error(
        "--admin needs the admin feature: \
         cargo run --release --features admin --example replicate -- --admin 127.0.0.1:8080"
    )]
    NoAdmin,
}

/// Why the demo could not run to its verdict (as opposed to running and
/// finding a problem, which the [`Report`] says). The binary exits with 2,
/// or 130 for [`DemoError::Interrupted`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// A flag is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--data-dir` names something that is not a directory.
    #[error("--data-dir {}: exists and is not a directory", .0.display())]
    DataDirNotADirectory(PathBuf),
    /// `--data-dir` could not be created.
    #[error("--data-dir {}: cannot create it", path.display())]
    CreateDataDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// No temporary directory for the disk queue.
    #[error("cannot create a temporary directory for the disk queue")]
    TempDir(#[source] std::io::Error),
    /// The disk queue's file could not be opened.
    #[error("cannot open the disk queue in {}", path.display())]
    OpenDisk {
        /// The file.
        path: PathBuf,
        /// What the disk store said.
        #[source]
        source: BoxError,
    },
    /// Redis could not be reached.
    #[error("cannot open the work queue on Redis at {url}")]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Redis {
        /// The URL.
        url: String,
        /// What the Redis backend said.
        #[source]
        source: snapstream::queue::QueueError,
    },
    /// `--backend redis` in a build without the `redis` feature.
    #[error("this build has no Redis backend: run it with `--features redis`")]
    #[cfg_attr(feature = "redis", allow(dead_code))]
    NoRedis,
    /// `--serve`: the gRPC server could not start.
    #[error("--serve {addr}: cannot serve there")]
    Serve {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the server said.
        #[source]
        source: snapstream::net::ServeError,
    },
    /// `--connect`: no replicate server answers there.
    #[error(transparent)]
    Connect(#[from] remote::ConnectError),
    /// Another part of the demo could not be set up.
    #[error("cannot set up {what}")]
    Setup {
        /// The part.
        what: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The run was interrupted (Ctrl-C) and cleaned up after itself.
    #[error("interrupted")]
    Interrupted {
        /// What was removed, deleted or kept, one line each.
        cleanup: Vec<String>,
    },
}

/// `error`, then each of its causes, one per line, as the binary prints them:
///
/// ```text
/// replicate: --data-dir /tmp/f/x: cannot create it
///   caused by: Not a directory (os error 20)
/// ```
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut s = format!("replicate: {error}\n");
    let mut source = error.source();
    while let Some(e) = source {
        let _ = writeln!(s, "  caused by: {e}");
        source = e.source();
    }
    s
}

/// `error` and its causes on one line, `: `-separated, for the report.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut s = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(s, ": {e}");
        source = e.source();
    }
    s
}

// ---------------------------------------------------------------------------
// The store

/// What an event carries: the new value (`None`: deleted), whether the
/// producer published it (`false`: a snapshot handler made it) and when, for
/// the latency figures.
#[derive(Debug)]
pub struct Change {
    value: Option<u64>,
    live: bool,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    value: u64,
    index: u64,
}

#[derive(Debug, Default)]
struct StoreState {
    entries: BTreeMap<Arc<str>, Entry>,
    /// The index of the newest change.
    index: u64,
    /// The index of the newest change of each key (put or delete).
    changed_at: HashMap<Arc<str>, u64>,
}

type Store = Arc<Mutex<StoreState>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The snapshot handler: the current state of one key, or of every key, as
/// of the store's current index. It reads the store under the same lock the
/// producer publishes under, so the index it returns matches exactly the
/// changes it contains.
fn snapshot_handler(store: Store) -> impl SnapshotHandler<Change> {
    move |req: SnapshotRequest, mut sink: SnapshotSink<Change>| {
        let store = store.clone();
        async move {
            let at = Instant::now();
            let event = |k: &Arc<str>, e: &Entry| {
                let change = Change {
                    value: Some(e.value),
                    live: false,
                    at,
                };
                Event::new(TOPIC, Subject::Key(k.clone()), e.index, change)
            };
            let (events, index): (Vec<Event<Change>>, u64) = {
                let st = lock(&store);
                let events = match req.subject().as_key() {
                    Some(key) => st
                        .entries
                        .get_key_value(key)
                        .map(|(k, e)| event(k, e))
                        .into_iter()
                        .collect(),
                    None => st.entries.iter().map(|(k, e)| event(k, e)).collect(),
                };
                (events, st.index)
            };
            // Stream it in chunks, as a store reading from disk would.
            let mut events = events.into_iter().peekable();
            while events.peek().is_some() {
                sink.append(events.by_ref().take(64).collect())?;
            }
            Ok::<u64, BoxError>(index)
        }
    }
}

/// Builds the store with every key present, indexes 1..=keys.
fn initial_store(keys: &[Arc<str>], rng: &mut StdRng) -> Store {
    let mut st = StoreState::default();
    for k in keys {
        st.index += 1;
        let e = Entry {
            value: rng.gen_range(0..1_000_000),
            index: st.index,
        };
        st.entries.insert(k.clone(), e);
        st.changed_at.insert(k.clone(), st.index);
    }
    Arc::new(Mutex::new(st))
}

/// Applies changes at `rate` per second until `stop_at`, publishing each
/// under the store's lock. Returns how many it applied.
async fn produce(
    store: Store,
    publisher: Publisher<Change>,
    keys: Arc<Vec<Arc<str>>>,
    rate: u64,
    stop_at: Instant,
    mut rng: StdRng,
    published: Arc<AtomicU64>,
) -> Result<u64, String> {
    let start = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(5));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done = 0u64;
    loop {
        ticks.tick().await;
        let now = Instant::now().min(stop_at);
        let due = (rate as f64 * (now - start).as_secs_f64()) as u64;
        if due > done {
            let n = (due - done) as usize;
            let mut st = lock(&store);
            let mut events = Vec::with_capacity(n);
            let at = Instant::now();
            for _ in 0..n {
                st.index += 1;
                let index = st.index;
                let key = keys[rng.gen_range(0..keys.len())].clone();
                let value = if st.entries.contains_key(&key) && rng.gen_ratio(1, 10) {
                    st.entries.remove(&key);
                    None
                } else {
                    let value = rng.gen_range(0..1_000_000);
                    st.entries.insert(key.clone(), Entry { value, index });
                    Some(value)
                };
                st.changed_at.insert(key.clone(), index);
                events.push(Event::new(
                    TOPIC,
                    Subject::Key(key),
                    index,
                    Change {
                        value,
                        live: true,
                        at,
                    },
                ));
            }
            publisher
                .publish(events)
                .map_err(|e| format!("publish failed: {}", chain(&e)))?;
            drop(st);
            done = due;
            published.store(done, Ordering::Relaxed);
        }
        if now >= stop_at {
            return Ok(done);
        }
    }
}

/// The store at the end: what every view must match.
#[derive(Debug)]
pub struct Final {
    index: u64,
    entries: HashMap<Arc<str>, u64>,
    changed_at: HashMap<Arc<str>, u64>,
}

impl Final {
    fn of(store: &Store) -> Self {
        let st = lock(store);
        Final {
            index: st.index,
            entries: st
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), e.value))
                .collect(),
            changed_at: st.changed_at.clone(),
        }
    }

    /// The index a view of `subject` must have seen to be up to date.
    fn target(&self, subject: &Subject) -> u64 {
        match subject.as_key() {
            Some(k) => self.changed_at.get(k).copied().unwrap_or(0),
            None => self.index,
        }
    }

    /// Whether `view` holds exactly the store's state for `subject`.
    fn matches(&self, subject: &Subject, view: &HashMap<Arc<str>, u64>) -> bool {
        match subject.as_key() {
            Some(k) => match self.entries.get(k) {
                Some(v) => view.len() == 1 && view.get(k) == Some(v),
                None => view.is_empty(),
            },
            None => *view == self.entries,
        }
    }
}

// ---------------------------------------------------------------------------
// Latency histogram (log-linear, 8 buckets per power of two, microseconds)

#[derive(Debug, Clone)]
struct Hist {
    counts: Vec<u64>,
    total: u64,
}

impl Hist {
    const BUCKETS: usize = 8 * 62;

    fn new() -> Self {
        Hist {
            counts: vec![0; Self::BUCKETS],
            total: 0,
        }
    }

    fn bucket(us: u64) -> usize {
        if us < 8 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as usize; // >= 3
        let sub = ((us >> (e - 3)) & 7) as usize;
        ((e - 2) * 8 + sub).min(Self::BUCKETS - 1)
    }

    /// The smallest value of bucket `i`.
    fn low(i: usize) -> u64 {
        if i < 8 {
            return i as u64;
        }
        let e = i / 8 + 2;
        (8 + (i % 8) as u64) << (e - 3)
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[Self::bucket(us)] += 1;
        self.total += 1;
    }

    fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The `q` quantile (0..=1), as the midpoint of its bucket.
    fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total as f64 * q).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = (Self::low(i), Self::low(i + 1));
                return Some(Duration::from_micros((lo + hi) / 2));
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------
// Subscribers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Normal,
    Slow,
    Reconnecting,
}

#[derive(Debug, Clone)]
struct Spec {
    id: usize,
    subject: Subject,
    role: Role,
    policy: LagPolicy,
}

impl Spec {
    fn of(id: usize, keys: &[Arc<str>]) -> Spec {
        let key = || Subject::Key(keys[(id * 7919) % keys.len()].clone());
        let (subject, role, policy) = match (id % 50, id % 10) {
            (0 | 25, _) => (Subject::Wildcard, Role::Normal, LagPolicy::Resnapshot),
            (1, _) => (Subject::Wildcard, Role::Slow, LagPolicy::Resnapshot),
            (2, _) => (Subject::Wildcard, Role::Slow, LagPolicy::Error),
            (_, 3) if id % 20 == 3 => (key(), Role::Slow, LagPolicy::Resnapshot),
            (_, 3) => (key(), Role::Slow, LagPolicy::Error),
            (_, 4 | 5) => (key(), Role::Reconnecting, LagPolicy::Error),
            _ => (key(), Role::Normal, LagPolicy::Error),
        };
        Spec {
            id,
            subject,
            role,
            policy,
        }
    }
}

/// Counters shared by every subscriber (read by the progress bar too).
#[derive(Debug, Default)]
struct Counters {
    deliveries: AtomicU64,
    lag_resnapshots: AtomicU64,
    lagged_errors: AtomicU64,
    reconnects: AtomicU64,
    resumed_live: AtomicU64,
    resumed_snapshot: AtomicU64,
    restarted: AtomicU64,
}

/// A materialized view of one subscription.
#[derive(Debug, Default)]
struct View {
    entries: HashMap<Arc<str>, u64>,
    /// The newest index the view reflects (0 until its first snapshot ends).
    seen: u64,
    /// Whether a snapshot has completed (so `seen` can be resumed from).
    complete: bool,
    /// Between the start of a snapshot and its `EndOfSnapshot`.
    in_snapshot: bool,
}

impl View {
    fn reset(&mut self) {
        self.entries.clear();
        self.seen = 0;
        self.complete = false;
        self.in_snapshot = true;
    }
}

#[derive(Debug)]
struct SubResult {
    spec: Spec,
    converged: bool,
    reason: Option<String>,
    hist: Hist,
}

fn subscribe(
    publisher: &Publisher<Change>,
    spec: &Spec,
    index: u64,
) -> Result<Subscription<Change>, String> {
    let req = SubscribeRequest::new(TOPIC, spec.subject.clone())
        .index(index)
        .on_lag(spec.policy);
    publisher
        .subscribe(req)
        .map_err(|e| format!("subscribe failed: {e}"))
}

/// One subscriber: reads its subscription into a view until the end signal,
/// then until it reached the store's final index; then compares.
async fn subscriber(
    spec: Spec,
    publisher: Publisher<Change>,
    mut end: watch::Receiver<Option<Arc<Final>>>,
    counters: Arc<Counters>,
    seed: u64,
    break_view: bool,
) -> SubResult {
    let mut rng = StdRng::seed_from_u64(seed ^ (spec.id as u64).wrapping_mul(0x9E37_79B9));
    let mut hist = Hist::new();
    let mut view = View {
        in_snapshot: true,
        ..View::default()
    };
    let fail = |spec: Spec, hist: Hist, reason: String| SubResult {
        spec,
        converged: false,
        reason: Some(reason),
        hist,
    };
    let mut sub = match subscribe(&publisher, &spec, 0) {
        Ok(s) => s,
        Err(e) => return fail(spec, hist, e),
    };
    let mut reconnect_every = || Duration::from_millis(rng.gen_range(300..1_500));
    let mut next_disconnect =
        (spec.role == Role::Reconnecting).then(|| Instant::now() + reconnect_every());
    // Set by a resume: `Some(true)` after a reconnect (classified by its
    // first message), `Some(false)` after a lag error (not counted).
    let mut just_resumed: Option<bool> = None;
    let mut deadline: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);

    loop {
        if let Some(fin) = end.borrow().as_ref() {
            if view.complete && view.seen >= fin.target(&spec.subject) {
                break;
            }
        }
        tokio::select! {
            msg = sub.next() => {
                if let Some(count) = just_resumed.take() {
                    if !count {
                        // After a lag error: neither a reconnect nor a lag re-snapshot.
                    } else if matches!(msg, Ok(Message::NewSnapshotToFollow)) {
                        counters.resumed_snapshot.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counters.resumed_live.fetch_add(1, Ordering::Relaxed);
                    }
                } else if matches!(msg, Ok(Message::NewSnapshotToFollow)) {
                    counters.lag_resnapshots.fetch_add(1, Ordering::Relaxed);
                }
                match msg {
                    Ok(Message::NewSnapshotToFollow) => view.reset(),
                    Ok(Message::EndOfSnapshot { index }) => {
                        view.seen = index;
                        view.complete = true;
                        view.in_snapshot = false;
                    }
                    Ok(Message::Events(batch)) => {
                        for e in batch.iter() {
                            let Some(key) = e.subject().as_key() else { continue };
                            let change = e.payload();
                            match change.value {
                                Some(v) => { view.entries.insert(Arc::from(key), v); }
                                None => { view.entries.remove(key); }
                            }
                            if !view.in_snapshot {
                                hist.record(change.at.elapsed());
                                view.seen = view.seen.max(e.index());
                            }
                        }
                        counters.deliveries.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        if spec.role == Role::Slow {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Err(SubscriptionError::Lagged { .. }) => {
                        counters.lagged_errors.fetch_add(1, Ordering::Relaxed);
                        let from = if view.complete { view.seen } else { 0 };
                        if from == 0 {
                            view.reset();
                        }
                        sub = match subscribe(&publisher, &spec, from) {
                            Ok(s) => s,
                            Err(e) => return fail(spec, hist, e),
                        };
                        just_resumed = (from > 0).then_some(false);
                    }
                    Err(e) => return fail(spec, hist, format!("subscription ended: {e}")),
                }
            }
            _ = tokio::time::sleep_until(next_disconnect.unwrap_or(far)), if next_disconnect.is_some() => {
                // Disconnect, then resume from the last index seen (or start
                // over when the snapshot had not finished).
                drop(sub);
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                let from = if view.complete { view.seen } else { 0 };
                if from == 0 {
                    // Disconnected mid-snapshot: nothing to resume from.
                    counters.restarted.fetch_add(1, Ordering::Relaxed);
                    view.reset();
                }
                sub = match subscribe(&publisher, &spec, from) {
                    Ok(s) => s,
                    Err(e) => return fail(spec, hist, e),
                };
                just_resumed = (from > 0).then_some(true);
                next_disconnect = Some(Instant::now() + reconnect_every());
            }
            changed = end.changed(), if deadline.is_none() => {
                // The producer stopped: no more disconnects, a deadline to converge.
                let _ = changed;
                next_disconnect = None;
                deadline = Some(Instant::now() + CONVERGE_TIMEOUT);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                let target = end.borrow().as_ref().map_or(0, |f| f.target(&spec.subject));
                let reason = format!("reached index {} of {target} before the deadline", view.seen);
                return fail(spec, hist, reason);
            }
        }
    }
    drop(sub);
    if break_view {
        view.entries.insert(Arc::from("not-a-key"), 0);
    }
    let fin = end.borrow().clone().expect("the end was signalled");
    let converged = fin.matches(&spec.subject, &view.entries);
    SubResult {
        reason: (!converged).then(|| {
            format!(
                "view differs from the store ({} entries)",
                view.entries.len()
            )
        }),
        spec,
        converged,
        hist,
    }
}

// ---------------------------------------------------------------------------
// Side effects: keyed pool + lease pool, and the webhook queue

/// One item of the keyed pool.
#[derive(Debug)]
enum SideEffect {
    /// A key's value changed (or was deleted) at `index`.
    Apply {
        index: u64,
        value: Option<u64>,
        live: bool,
    },
    /// A re-snapshot at `index` did not contain the key: it is gone.
    Absent { index: u64 },
}

/// A webhook: "key changed to value at index".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Webhook {
    run: u64,
    seq: u64,
    key: String,
    index: u64,
    value: u64,
}

/// The keyed pool's replica of the store: key -> (value, index applied).
type Replica = HashMap<Arc<str>, (Option<u64>, u64)>;

/// What the side-effect pipeline saw.
#[derive(Debug, Default)]
struct Effects {
    /// The pool's own replica of the store.
    replica: Mutex<Replica>,
    applied: AtomicU64,
    order_violations: AtomicU64,
    lease_waits: AtomicU64,
    active: Vec<AtomicU64>,
    max_active: Vec<AtomicU64>,
    webhooks_made: AtomicU64,
    feed_resnapshots: AtomicU64,
}

/// Reads a wildcard subscription into the keyed pool until the store's final
/// index. Returns an error text if the subscription failed.
async fn feed(
    publisher: Publisher<Change>,
    pool: KeyedPool<Arc<str>, SideEffect>,
    keys: Arc<Vec<Arc<str>>>,
    mut end: watch::Receiver<Option<Arc<Final>>>,
    effects: Arc<Effects>,
) -> Result<(), String> {
    let spec = Spec {
        id: usize::MAX,
        subject: Subject::Wildcard,
        role: Role::Normal,
        policy: LagPolicy::Resnapshot,
    };
    let mut sub = subscribe(&publisher, &spec, 0)?;
    let mut in_snapshot = true;
    let mut in_this_snapshot: HashSet<Arc<str>> = HashSet::new();
    let mut seen = 0;
    let mut deadline: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let stopped = |_| "the keyed pool stopped".to_string();
    loop {
        if let Some(fin) = end.borrow().as_ref() {
            if !in_snapshot && seen >= fin.index {
                return Ok(());
            }
        }
        tokio::select! {
            msg = sub.next() => match msg {
                Ok(Message::NewSnapshotToFollow) => {
                    effects.feed_resnapshots.fetch_add(1, Ordering::Relaxed);
                    in_snapshot = true;
                    in_this_snapshot.clear();
                }
                Ok(Message::Events(batch)) => {
                    for e in batch.iter() {
                        let Some(key) = e.subject().as_key() else { continue };
                        let key: Arc<str> = Arc::from(key);
                        if in_snapshot {
                            in_this_snapshot.insert(key.clone());
                        } else {
                            seen = seen.max(e.index());
                        }
                        let fx = SideEffect::Apply {
                            index: e.index(),
                            value: e.payload().value,
                            live: !in_snapshot,
                        };
                        pool.add(key, fx).await.map_err(stopped)?;
                    }
                }
                Ok(Message::EndOfSnapshot { index }) => {
                    // What a snapshot does not contain no longer exists.
                    for k in keys.iter().filter(|k| !in_this_snapshot.contains(*k)) {
                        pool.add(k.clone(), SideEffect::Absent { index }).await.map_err(stopped)?;
                    }
                    in_snapshot = false;
                    seen = index;
                }
                Err(e) => return Err(format!("side-effect feed ended: {e}")),
            },
            changed = end.changed(), if deadline.is_none() => {
                let _ = changed;
                deadline = Some(Instant::now() + CONVERGE_TIMEOUT);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                return Err(format!("side-effect feed reached index {seen} before the deadline"));
            }
        }
    }
}

/// The keyed pool's handler: one side effect, in order per key, under a
/// lease of the key's node.
async fn side_effect(
    key: Arc<str>,
    fx: SideEffect,
    node: usize,
    leases: LeasePool<usize>,
    effects: Arc<Effects>,
    webhooks: futures::channel::mpsc::UnboundedSender<(String, u64, u64)>,
) {
    let _lease = match leases.try_acquire(node) {
        Ok(lease) => lease,
        Err(TryAcquireError::NoHeadroom) => {
            effects.lease_waits.fetch_add(1, Ordering::Relaxed);
            match leases.acquire(node).await {
                Ok(lease) => lease,
                Err(_) => return,
            }
        }
        Err(_) => return,
    };
    let active = effects.active[node].fetch_add(1, Ordering::AcqRel) + 1;
    effects.max_active[node].fetch_max(active, Ordering::AcqRel);
    let index = match fx {
        SideEffect::Apply { index, .. } | SideEffect::Absent { index } => index,
    };
    {
        let mut replica = lock(&effects.replica);
        let slot = replica.entry(key.clone()).or_insert((None, 0));
        match fx {
            SideEffect::Apply { value, live, .. } => {
                if index > slot.1 {
                    *slot = (value, index);
                    if live {
                        if let Some(v) = value {
                            if index.is_multiple_of(WEBHOOK_EVERY) {
                                effects.webhooks_made.fetch_add(1, Ordering::Relaxed);
                                let _ = webhooks.unbounded_send((key.to_string(), index, v));
                            }
                        }
                    }
                } else if live {
                    // A live change at or below what was applied: out of order.
                    effects.order_violations.fetch_add(1, Ordering::Relaxed);
                }
            }
            SideEffect::Absent { .. } => {
                if index > slot.1 {
                    *slot = (None, index);
                }
            }
        }
    }
    effects.applied.fetch_add(1, Ordering::Relaxed);
    if index.is_multiple_of(SLOW_SIDE_EFFECT_EVERY) {
        // A slow side effect (say, a call to another service), lease held.
        tokio::time::sleep(Duration::from_millis(1)).await;
    } else {
        tokio::task::yield_now().await;
    }
    effects.active[node].fetch_sub(1, Ordering::AcqRel);
}

/// The webhook endpoint's answers: poison webhooks always fail, the others
/// fail one time in five (decided by a hash, so a run is repeatable).
fn endpoint_fails(seq: u64, attempts: u32) -> bool {
    if seq % POISON_EVERY == 7 {
        return true;
    }
    let mut h = seq
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(attempts as u64);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    h.is_multiple_of(5)
}

/// What the webhook endpoint saw.
#[derive(Debug)]
struct Deliveries {
    /// This run's webhooks the endpoint accepted, by sequence number.
    delivered: Mutex<HashSet<u64>>,
    redelivered: AtomicU64,
    attempts: AtomicU64,
    /// Webhooks of earlier runs handed to the endpoint, by (run, seq).
    earlier_seen: Mutex<HashSet<(u64, u64)>>,
    /// Of those, the ones it accepted.
    earlier_delivered: Mutex<HashSet<(u64, u64)>>,
    /// How many webhooks of earlier runs are done with: accepted, or failed
    /// for the last time (the work queue then dead-letters them).
    earlier_done: watch::Sender<u64>,
}

impl Deliveries {
    fn new() -> Self {
        Deliveries {
            delivered: Mutex::default(),
            redelivered: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            earlier_seen: Mutex::default(),
            earlier_delivered: Mutex::default(),
            earlier_done: watch::Sender::new(0),
        }
    }

    /// One delivery attempt of `hook`, the `attempts`-th retry; whether the
    /// endpoint refused it.
    fn attempt(&self, hook: &Webhook, attempts: u32, run_id: u64) -> bool {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let fails = endpoint_fails(hook.seq, attempts);
        if hook.run == run_id {
            if !fails && !lock(&self.delivered).insert(hook.seq) {
                self.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            return fails;
        }
        // Left in the queue by an earlier run: delivered like this run's,
        // and counted apart so the end can check every one of them.
        let id = (hook.run, hook.seq);
        lock(&self.earlier_seen).insert(id);
        let done = if fails {
            attempts.saturating_add(1) >= MAX_ATTEMPTS
        } else {
            let first = lock(&self.earlier_delivered).insert(id);
            if !first {
                self.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            first
        };
        if done {
            self.earlier_done.send_modify(|n| *n += 1);
        }
        fails
    }
}

/// Opens the work queue's base and dead-letter queues.
async fn open_queues(
    cfg: &Config,
    run_id: u64,
) -> Result<(Arc<dyn BaseQueue>, Arc<dyn BaseQueue>, QueueHome), DemoError> {
    let opts = QueueOptions::default();
    match cfg.backend {
        BackendKind::Memory => Ok((
            Arc::new(
                MemoryQueue::new("webhooks", opts.clone()).expect("default options are valid"),
            ),
            Arc::new(MemoryQueue::new("webhooks.dead", opts).expect("default options are valid")),
            QueueHome::Memory,
        )),
        BackendKind::Disk => {
            let (dir, temp) = match &cfg.data_dir {
                Some(d) => {
                    if let Err(source) = std::fs::create_dir_all(d) {
                        return Err(if d.exists() && !d.is_dir() {
                            DemoError::DataDirNotADirectory(d.clone())
                        } else {
                            DemoError::CreateDataDir {
                                path: d.clone(),
                                source,
                            }
                        });
                    }
                    (d.clone(), None)
                }
                None => {
                    let t = tempfile::Builder::new()
                        .prefix("snapstream-demo-")
                        .tempdir()
                        .map_err(DemoError::TempDir)?;
                    (t.path().to_path_buf(), Some(t))
                }
            };
            let path = dir.join("webhooks.redb");
            let open = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let store = snapstream::queue::disk::DiskStore::open(&path)?;
                    let base = store.queue("webhooks", QueueOptions::default())?;
                    let dead = store.queue("webhooks.dead", QueueOptions::default())?;
                    Ok::<_, BoxError>((store, base, dead))
                })
            };
            let opened = match open.await {
                Ok(r) => r,
                Err(e) => Err(e.into()),
            };
            let (store, base, dead) =
                opened.map_err(|source| DemoError::OpenDisk { path, source })?;
            Ok((
                Arc::new(base),
                Arc::new(dead),
                QueueHome::Disk {
                    dir,
                    temp,
                    store: Some(store),
                },
            ))
        }
        BackendKind::Redis => open_redis(cfg, run_id).await,
    }
}

#[cfg(feature = "redis")]
async fn open_redis(
    cfg: &Config,
    run_id: u64,
) -> Result<(Arc<dyn BaseQueue>, Arc<dyn BaseQueue>, QueueHome), DemoError> {
    use snapstream::queue::redis::RedisQueue;
    let url = cfg
        .redis
        .clone()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
    let name = format!("snapstream-demo-{run_id:x}");
    let connect = |name: String| {
        let url = url.clone();
        async move {
            RedisQueue::connect(&url, name, QueueOptions::default())
                .await
                .map(Arc::new)
                .map_err(|source| DemoError::Redis { url, source })
        }
    };
    let base = connect(name.clone()).await?;
    let dead = connect(format!("{name}.dead")).await?;
    Ok((
        base.clone(),
        dead.clone(),
        QueueHome::Redis {
            url,
            name,
            queues: [base, dead],
        },
    ))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(
    _cfg: &Config,
    _run_id: u64,
) -> Result<(Arc<dyn BaseQueue>, Arc<dyn BaseQueue>, QueueHome), DemoError> {
    Err(DemoError::NoRedis)
}

/// How long the end of a run (or of an interrupted one) waits for the work
/// queue's workers, and for Redis to delete the run's queues.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the queue lives (kept alive for the run, cleaned up after it).
enum QueueHome {
    Memory,
    Disk {
        dir: PathBuf,
        /// The temporary directory, when no `--data-dir` was given.
        temp: Option<tempfile::TempDir>,
        store: Option<snapstream::queue::disk::DiskStore>,
    },
    #[cfg(feature = "redis")]
    Redis {
        url: String,
        name: String,
        queues: [Arc<snapstream::queue::redis::RedisQueue>; 2],
    },
}

impl QueueHome {
    fn describe(&self) -> String {
        match self {
            QueueHome::Memory => "memory".to_string(),
            QueueHome::Disk { dir, temp, .. } => format!(
                "disk, in {}{}",
                dir.display(),
                if temp.is_some() { " (temporary)" } else { "" }
            ),
            #[cfg(feature = "redis")]
            QueueHome::Redis { url, name, .. } => format!("redis, {url} queue {name}"),
        }
    }

    /// Removes what the run made that is not to be kept — the temporary
    /// directory, the Redis queues — and says, one line each, what it
    /// removed and what it kept. `left` and `dead` are the queue's items and
    /// dead letters, when they could be read.
    async fn clean_up(self, left: Option<u64>, dead: Option<u64>) -> Vec<String> {
        let count = |v: Option<u64>| v.map_or("?".to_string(), thousands);
        match self {
            QueueHome::Memory => Vec::new(),
            QueueHome::Disk {
                dir,
                temp: Some(temp),
                mut store,
            } => {
                // The file closes with its last handle; the directory goes.
                store.take();
                match temp.close() {
                    Ok(()) => vec![format!("removed the temporary directory {}", dir.display())],
                    Err(e) => vec![format!(
                        "could not remove the temporary directory {}: {}",
                        dir.display(),
                        chain(&e)
                    )],
                }
            }
            QueueHome::Disk {
                dir, temp: None, ..
            } => {
                let mut line = format!(
                    "kept {}: {} webhooks queued, {} dead letters",
                    dir.join("webhooks.redb").display(),
                    count(left),
                    count(dead)
                );
                if left.unwrap_or(0) > 0 {
                    let _ = write!(
                        line,
                        " (run again with --data-dir {} to deliver them)",
                        dir.display()
                    );
                }
                vec![line]
            }
            #[cfg(feature = "redis")]
            QueueHome::Redis { queues, .. } => {
                let mut deleted = Vec::new();
                let mut lines = Vec::new();
                for q in &queues {
                    let name = BaseQueue::name(q.as_ref()).to_string();
                    match tokio::time::timeout(SHUTDOWN_TIMEOUT, q.delete()).await {
                        Ok(Ok(_)) => deleted.push(name),
                        Ok(Err(e)) => lines.push(format!(
                            "could not delete the Redis queue {name}: {}",
                            chain(&e)
                        )),
                        Err(_) => lines.push(format!(
                            "could not delete the Redis queue {name}: no answer within {} s",
                            SHUTDOWN_TIMEOUT.as_secs()
                        )),
                    }
                }
                if !deleted.is_empty() {
                    lines.insert(
                        0,
                        format!("deleted the Redis queues {}", deleted.join(" and ")),
                    );
                }
                lines
            }
        }
    }
}

/// The tasks of a run, aborted together when it ends or is interrupted.
#[derive(Default)]
struct Tasks(Mutex<tokio::task::JoinSet<()>>);

impl Tasks {
    /// Spawns `task`; its output arrives on the returned receiver (which
    /// errs if the task panicked or was aborted).
    fn spawn<F>(&self, task: F) -> tokio::sync::oneshot::Receiver<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.0).spawn(async move {
            let _ = tx.send(task.await);
        });
        rx
    }

    /// Aborts every task still running and waits until each has stopped
    /// (and dropped what it held: queue handles, the disk file).
    async fn shutdown(&self) {
        let mut set = std::mem::take(&mut *lock(&self.0));
        set.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// The report

/// What the run found. [`Report::ok`] is the demo's verdict, and
/// [`Report::failures`] the reasons when it fails.
#[derive(Debug, Default)]
pub struct Report {
    /// Changes the store applied (and published).
    pub published: u64,
    /// Seconds the producer ran.
    pub produce_secs: f64,
    /// Seconds from the first subscriber to the last view checked.
    pub total_secs: f64,
    /// Subscribers by kind: (total, wildcard, slow, reconnecting).
    pub subscribers: (usize, usize, usize, usize),
    /// Events delivered to the subscribers' views.
    pub deliveries: u64,
    /// Delivery latency p50 and p99 (publish to view, live events only) of
    /// the subscribers that keep up.
    pub latency: (Option<Duration>, Option<Duration>),
    /// The same for the deliberately slow subscribers.
    pub slow_latency: (Option<Duration>, Option<Duration>),
    /// Snapshot builds (handler calls) and cache hits.
    pub snapshots: (u64, u64),
    /// Lag: automatic re-snapshots and `Lagged` errors (then resumed).
    pub lag: (u64, u64),
    /// Reconnects, resumed without a snapshot, resumed with a new snapshot,
    /// started over (disconnected before the first snapshot ended).
    pub resumes: (u64, u64, u64, u64),
    /// Views that converged, and the reasons of those that did not.
    pub views: (usize, Vec<String>),
    /// Side effects applied, out-of-order live changes, and whether the pool's
    /// replica matched the store.
    pub side_effects: (u64, u64, bool),
    /// Lease pool: highest concurrency seen on any node, the target, waits.
    pub leases: (u64, u64, u64),
    /// Work queue backend description.
    pub queue_backend: String,
    /// The work queue's backend.
    pub backend: Option<BackendKind>,
    /// The queue manager's listing after the final flush.
    pub manager_view: String,
    /// Webhooks: pushed, delivered, retried, dead-lettered, lost, failed
    /// pushes, and those earlier runs left.
    pub webhooks: WebhookFigures,
    /// The remote subscribers' figures (`None`: `--remote 0`, or the
    /// server could not start, which [`Report::errors`] then says).
    pub remote: Option<remote::RemoteFigures>,
    /// Peak resident memory (VmHWM), in KiB, where the OS reports it.
    pub peak_memory_kib: Option<u64>,
    /// Errors that stopped a part of the run, each with its causes.
    pub errors: Vec<String>,
    /// What the end of the run removed (the temporary directory, the Redis
    /// queues) or kept (`--data-dir`), one line each.
    pub cleanup: Vec<String>,
}

/// The work queue's figures.
#[derive(Debug, Default)]
pub struct WebhookFigures {
    /// Accepted by the work queue.
    pub pushed: u64,
    /// Distinct webhooks the endpoint accepted.
    pub delivered: u64,
    /// Deliveries of a webhook already delivered (at-least-once).
    pub redelivered: u64,
    /// Times an item was handed back for a retry.
    pub retried: u64,
    /// This run's webhooks in the dead-letter queue at the end.
    pub dead_lettered: u64,
    /// Of those, poison webhooks (they always fail).
    pub dead_poison: u64,
    /// Pushed and neither delivered nor dead-lettered.
    pub lost: u64,
    /// Pushes refused even after retries.
    pub push_failed: u64,
    /// The first refused push's error, with its causes.
    pub push_error: Option<String>,
    /// Items in the queue at the end (`None`: it could not be read).
    pub left: Option<u64>,
    /// Why waiting for the last deliveries gave up, if it did.
    pub flush_error: Option<String>,
    /// The webhooks earlier runs left in the queue.
    pub earlier: EarlierFigures,
    /// Dead letters of earlier runs, in the dead-letter queue from the start
    /// (dead letters stay until removed).
    pub dead_kept: u64,
}

/// The webhooks found in the queue at the start, left by an earlier run (one
/// killed mid-run, on the same `--data-dir`): each must end delivered or
/// dead-lettered, as this run's own.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EarlierFigures {
    /// In the queue when it was opened.
    pub found: u64,
    /// Of those, accepted by the endpoint.
    pub delivered: u64,
    /// Of those, dead-lettered by this run.
    pub dead_lettered: u64,
    /// Of those, neither.
    pub lost: u64,
}

impl Report {
    /// Whether every view converged and no webhook was lost (nor any of
    /// those earlier runs left).
    pub fn ok(&self) -> bool {
        self.failures().is_empty()
    }

    /// Why the verdict is FAILED, one short reason each; empty when OK.
    pub fn failures(&self) -> Vec<String> {
        let n = |v: u64| thousands(v);
        let mut why = Vec::new();
        let (converged, not_converged) = &self.views;
        if let Some(first) = not_converged.first() {
            why.push(format!(
                "{} of {} views did not converge (first: {first})",
                not_converged.len(),
                converged + not_converged.len()
            ));
        }
        let (_, out_of_order, replica_matches) = self.side_effects;
        if out_of_order > 0 {
            why.push(format!("{} side effects ran out of order", n(out_of_order)));
        }
        if !replica_matches {
            why.push("the keyed pool's replica differs from the store".to_string());
        }
        let (max_active, target, _) = self.leases;
        if max_active > target {
            why.push(format!(
                "a node ran {max_active} side effects at once (target {target})"
            ));
        }
        let w = &self.webhooks;
        if w.push_failed > 0 {
            let mut s = format!("{} failed pushes", n(w.push_failed));
            if let Some(e) = &w.push_error {
                let _ = write!(s, " ({e})");
            }
            why.push(s);
        }
        if w.lost > 0 {
            why.push(self.lost_reason());
        }
        if w.earlier.lost > 0 {
            why.push(format!(
                "{} of the {} webhooks earlier runs left were neither delivered nor dead-lettered",
                n(w.earlier.lost),
                n(w.earlier.found)
            ));
        }
        if let Some(r) = &self.remote {
            why.extend(r.failures());
        }
        why.extend(self.errors.iter().cloned());
        why
    }

    /// Where the lost webhooks went: still queued when waiting gave up, or
    /// gone from the queue (dropped by its backend).
    fn lost_reason(&self) -> String {
        let w = &self.webhooks;
        let lost = thousands(w.lost);
        let Some(left) = w.left else {
            return format!(
                "{lost} lost: neither delivered nor dead-lettered (the queue could not be read)"
            );
        };
        let still = left.min(w.lost);
        let gone = w.lost - still;
        let queued = || {
            let mut s = "still queued".to_string();
            if let Some(e) = &w.flush_error {
                let _ = write!(s, " when waiting gave up ({e})");
            }
            s
        };
        let dropped = match self.backend {
            Some(BackendKind::Redis) => "the server dropped them",
            Some(BackendKind::Disk) => "the queue file no longer holds them",
            Some(BackendKind::Memory) | None => "the queue no longer holds them",
        };
        match (still, gone) {
            (_, 0) => format!("{lost} lost: {}", queued()),
            (0, _) => format!("{lost} lost: {dropped}"),
            _ => format!(
                "{lost} lost: {} {}, {} gone ({dropped})",
                thousands(still),
                queued(),
                thousands(gone)
            ),
        }
    }

    /// The summary table.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let n = |v: u64| thousands(v);
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.2} ms", d.as_secs_f64() * 1e3)
            })
        };
        let yes = |b: bool| if b { "yes" } else { "NO" };
        let (subs, wild, slow, reconn) = self.subscribers;
        let views_total = self.views.0 + self.views.1.len();
        let w = &self.webhooks;
        let mut rows: Vec<(&str, String)> = vec![
            (
                "events published",
                format!(
                    "{} in {:.1} s ({}/s)",
                    n(self.published),
                    self.produce_secs,
                    n((self.published as f64 / self.produce_secs.max(1e-9)) as u64)
                ),
            ),
            (
                "subscribers",
                format!("{subs} ({wild} wildcard, {slow} slow, {reconn} reconnecting)"),
            ),
            (
                "deliveries",
                format!(
                    "{} ({}/s)",
                    n(self.deliveries),
                    n((self.deliveries as f64 / self.total_secs.max(1e-9)) as u64)
                ),
            ),
            (
                "delivery latency p50 / p99",
                format!(
                    "{} / {} (slow readers: {} / {})",
                    ms(self.latency.0),
                    ms(self.latency.1),
                    ms(self.slow_latency.0),
                    ms(self.slow_latency.1)
                ),
            ),
            (
                "snapshot cache hit rate",
                format!(
                    "{:.1}% ({} hits, {} builds)",
                    100.0 * self.snapshots.1 as f64
                        / (self.snapshots.0 + self.snapshots.1).max(1) as f64,
                    n(self.snapshots.1),
                    n(self.snapshots.0)
                ),
            ),
            (
                "lag policy",
                format!(
                    "{} re-snapshots, {} lagged + resumed",
                    n(self.lag.0),
                    n(self.lag.1)
                ),
            ),
            (
                "reconnects",
                format!(
                    "{} ({} resumed live, {} with a new snapshot, {} mid-snapshot restarts)",
                    n(self.resumes.0),
                    n(self.resumes.1),
                    n(self.resumes.2),
                    n(self.resumes.3)
                ),
            ),
            (
                "keyed pool side effects",
                format!(
                    "{} applied, in order per key: {}, replica matches: {}",
                    n(self.side_effects.0),
                    yes(self.side_effects.1 == 0),
                    yes(self.side_effects.2)
                ),
            ),
            (
                "lease pool",
                format!(
                    "max {} concurrent per node (target {}), {} waits",
                    self.leases.0,
                    self.leases.1,
                    n(self.leases.2)
                ),
            ),
            ("work queue", self.queue_backend.clone()),
            ("queue manager", self.manager_view.clone()),
            (
                "queue items",
                format!(
                    "{} pushed, {} handled, {} retried, {} dead-lettered ({} poison)",
                    n(w.pushed),
                    n(w.delivered),
                    n(w.retried),
                    n(w.dead_lettered),
                    n(w.dead_poison)
                ),
            ),
            (
                "queue items lost",
                format!(
                    "{} ({} redelivered, {} failed pushes)",
                    n(w.lost),
                    n(w.redelivered),
                    n(w.push_failed)
                ),
            ),
            (
                "left by earlier runs",
                if w.earlier.found == 0 {
                    "none found at start".to_string()
                } else {
                    format!(
                        "{} found at start, each checked: {} delivered, {} dead-lettered, {} lost",
                        n(w.earlier.found),
                        n(w.earlier.delivered),
                        n(w.earlier.dead_lettered),
                        n(w.earlier.lost)
                    )
                },
            ),
        ];
        if let Some(r) = &self.remote {
            rows.extend(r.rows());
        }
        rows.extend([
            (
                "peak memory (VmHWM)",
                self.peak_memory_kib
                    .map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            ),
            (
                "all views converged",
                format!(
                    "{} ({}/{views_total})",
                    yes(self.views.1.is_empty()),
                    self.views.0
                ),
            ),
        ]);
        if w.dead_kept > 0 {
            let at = rows
                .iter()
                .position(|(k, _)| *k == "left by earlier runs")
                .map_or(rows.len(), |i| i + 1);
            rows.insert(
                at,
                (
                    "dead letters kept",
                    format!(
                        "{} from earlier runs, still stored: dead letters stay until removed \
                     (the queue manager's count includes them)",
                        n(w.dead_kept)
                    ),
                ),
            );
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let _ = writeln!(s, "{:-<1$}", "", width + 50);
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<width$}  {v}");
        }
        let _ = writeln!(s, "{:-<1$}", "", width + 50);
        for reason in self.views.1.iter().take(10) {
            let _ = writeln!(s, "not converged: {reason}");
        }
        for reason in self.remote.iter().flat_map(|r| r.views.1.iter().take(10)) {
            let _ = writeln!(s, "not converged: {reason}");
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(s, "verdict: OK - every view converged, nothing lost");
        } else {
            let _ = writeln!(s, "verdict: FAILED - {}", failures.join("; "));
        }
        s
    }
}

fn thousands(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Peak resident set size from `/proc/self/status` (Linux), in KiB.
fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// The run

/// A run whose work queue is open: [`start`] made it, [`Running::finish`]
/// runs it to its verdict.
pub struct Running {
    cfg: Config,
    run_id: u64,
    home: QueueHome,
    queue: WorkQueue<Webhook>,
    manager: Manager,
    deliveries: Arc<Deliveries>,
    /// Webhooks in the queue when it was opened (left by earlier runs).
    found_at_start: u64,
    /// Dead letters in the queue when it was opened (from earlier runs).
    dead_at_start: u64,
    queue_backend: String,
}

/// Opens the work queue (a temporary directory, `--data-dir`, or Redis) and
/// prints the header on stderr. Nothing is published yet.
///
/// # Errors
///
/// [`DemoError::Config`] for a flag out of range (see [`Config::validate`]);
/// otherwise when a part cannot start: the data directory or the disk
/// queue's file cannot be opened, Redis cannot be reached. A temporary
/// directory made before the error is removed.
pub async fn start(cfg: Config) -> Result<Running, DemoError> {
    cfg.validate()?;
    let cfg = cfg.effective();
    let run_id: u64 = rand::random();
    let (base, dead, home) = open_queues(&cfg, run_id).await?;
    let setup = |what| {
        move |e: snapstream::queue::QueueError| DemoError::Setup {
            what,
            source: Box::new(e),
        }
    };
    // Read before any worker takes an item: what earlier runs left.
    let found_at_start = base
        .len()
        .await
        .map_err(setup("the work queue (reading its length)"))?
        .total();
    let dead_at_start = dead
        .len()
        .await
        .map_err(setup("the dead-letter queue (reading its length)"))?
        .total();
    let deliveries = Arc::new(Deliveries::new());
    let queue = {
        let deliveries = deliveries.clone();
        let opts = WorkQueueOptions::default()
            .batch_len(32)
            .batch_delay(Duration::from_millis(5))
            .max_workers(4)
            .max_attempts(MAX_ATTEMPTS)
            .backoff(Duration::from_millis(20), Duration::from_millis(200));
        WorkQueue::new(base, dead, opts, move |batch: Vec<Item<Webhook>>| {
            let deliveries = deliveries.clone();
            async move {
                batch
                    .into_iter()
                    .filter(|item| deliveries.attempt(item, item.attempts(), run_id))
                    .collect()
            }
        })
        .map_err(|e| DemoError::Setup {
            what: "the work queue",
            source: Box::new(e),
        })?
    };
    let manager = Manager::new();
    manager.add(&queue).map_err(|e| DemoError::Setup {
        what: "the queue manager",
        source: Box::new(e),
    })?;
    let queue_backend = home.describe();
    eprintln!(
        "replicate: {} subscribers, {} keys, {} changes/s for {:.1} s; work queue: {queue_backend}",
        cfg.subscribers,
        cfg.keys,
        thousands(cfg.rate),
        cfg.duration
    );
    if found_at_start > 0 {
        eprintln!(
            "replicate: the work queue holds {} webhooks left by an earlier run: this run \
             delivers them (or dead-letters them) with its own and checks every one",
            thousands(found_at_start)
        );
    }
    if dead_at_start > 0 {
        eprintln!(
            "replicate: {} dead letters of earlier runs are kept in the dead-letter queue; \
             they stay there until removed (delete {} to start afresh)",
            thousands(dead_at_start),
            match &home {
                QueueHome::Disk { dir, .. } => dir.display().to_string(),
                _ => "the queue".to_string(),
            }
        );
    }
    Ok(Running {
        cfg,
        run_id,
        home,
        queue,
        manager,
        deliveries,
        found_at_start,
        dead_at_start,
        queue_backend,
    })
}

/// Runs the demo: [`start`], then [`Running::finish`] with no interruption.
/// Prints a short header and a progress bar (unless `no_progress`) on
/// stderr; returns the figures.
///
/// # Errors
///
/// As [`start`]. Problems found while running are in the [`Report`].
#[allow(dead_code)] // the binary uses start and finish; tests/demo_replicate.rs this
pub async fn run(cfg: Config) -> Result<Report, DemoError> {
    start(cfg).await?.finish(std::future::pending()).await
}

impl Running {
    /// The temporary directory the disk queue is in, when no `--data-dir`
    /// was given.
    #[allow(dead_code)] // for tests/demo_replicate.rs
    pub fn temp_dir(&self) -> Option<&std::path::Path> {
        match &self.home {
            QueueHome::Disk {
                dir, temp: Some(_), ..
            } => Some(dir),
            _ => None,
        }
    }

    /// The names of the run's Redis queues (empty on other backends).
    #[allow(dead_code)] // for tests/demo_replicate.rs
    pub fn redis_queues(&self) -> Vec<String> {
        match &self.home {
            #[cfg(feature = "redis")]
            QueueHome::Redis { name, .. } => vec![name.clone(), format!("{name}.dead")],
            _ => Vec::new(),
        }
    }

    /// Runs the store, the subscribers, the side effects and the webhooks to
    /// the verdict, unless `stop` completes first (the binary passes Ctrl-C).
    /// Either way it then cleans up: removes the temporary directory, deletes
    /// the Redis queues, or keeps `--data-dir` (and says so in
    /// [`Report::cleanup`] or [`DemoError::Interrupted`]).
    ///
    /// # Errors
    ///
    /// [`DemoError::Interrupted`] when `stop` completed first.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropped midway, it leaves the temporary directory or
    /// Redis queues behind. Pass the cancellation as `stop` instead.
    pub async fn finish(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Report, DemoError> {
        let tasks = Tasks::default();
        let leases = LeasePool::new();
        let bar = if self.cfg.no_progress {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new((self.cfg.duration * 10.0) as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>3} [{bar:30}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        };
        let outcome = {
            let body = self.body(&tasks, &leases, &bar);
            tokio::pin!(stop);
            tokio::select! {
                biased;
                report = body => Some(report),
                () = &mut stop => None,
            }
        };
        // Interrupted or not, nothing of the run keeps going.
        leases.stop();
        tasks.shutdown().await;
        bar.finish_and_clear();
        match outcome {
            Some(mut report) => {
                report.cleanup = self.clean_up().await;
                Ok(report)
            }
            None => {
                self.manager.shutdown_all(SHUTDOWN_TIMEOUT).await;
                Err(DemoError::Interrupted {
                    cleanup: self.clean_up().await,
                })
            }
        }
    }

    /// Counts what the queue keeps, closes it, and cleans up its home.
    async fn clean_up(self) -> Vec<String> {
        let Running {
            queue,
            manager,
            home,
            ..
        } = self;
        let left = queue.len().await.ok().map(|l| l.total());
        let dead = queue.dead_letter_count().await.ok();
        drop(manager);
        drop(queue);
        home.clean_up(left, dead).await
    }

    /// The run itself; `finish` races it against `stop`.
    async fn body(&self, tasks: &Tasks, leases: &LeasePool<usize>, bar: &ProgressBar) -> Report {
        let cfg = &self.cfg;
        let run_id = self.run_id;
        let queue = &self.queue;
        let mut errors = Vec::new();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let keys: Arc<Vec<Arc<str>>> = Arc::new(
            (0..cfg.keys)
                .map(|i| Arc::from(format!("svc-{i:04}")))
                .collect(),
        );

        // The store and its publisher.
        let store = initial_store(&keys, &mut rng);
        let mut builder = Publisher::<Change>::builder();
        builder.lag_limit(Some(cfg.lag_limit));
        if let Err(e) = builder.register_with_wildcard(TOPIC, snapshot_handler(store.clone())) {
            errors.push(format!("registering the store's topic: {}", chain(&e)));
        }
        let publisher = builder.build();

        // The pusher: webhooks made by the side effects go into the work queue.
        let (hook_tx, hook_rx) = futures::channel::mpsc::unbounded::<(String, u64, u64)>();
        let hook_closer = hook_tx.clone();
        let pushed: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let push_failed = Arc::new(AtomicU64::new(0));
        let push_error: Arc<Mutex<Option<String>>> = Arc::default();
        let pusher = {
            let (queue, pushed, push_failed, push_error) = (
                queue.clone(),
                pushed.clone(),
                push_failed.clone(),
                push_error.clone(),
            );
            let seq = Arc::new(AtomicU64::new(0));
            tasks.spawn(
                hook_rx.for_each_concurrent(256, move |(key, index, value)| {
                    let (queue, pushed, push_failed, push_error) = (
                        queue.clone(),
                        pushed.clone(),
                        push_failed.clone(),
                        push_error.clone(),
                    );
                    let seq = seq.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut hook = Webhook {
                            run: run_id,
                            seq,
                            key,
                            index,
                            value,
                        };
                        for attempt in 0..5 {
                            match queue.push(hook).await {
                                Ok(_) => {
                                    lock(&pushed).insert(seq);
                                    return;
                                }
                                Err(e) => {
                                    if attempt == 4 {
                                        lock(&push_error).get_or_insert_with(|| chain(&e));
                                    }
                                    hook = e.into_item();
                                }
                            }
                        }
                        push_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }),
            )
        };

        // Side effects: keyed ordered pool, each under a lease of its node.
        for node in 0..cfg.nodes {
            leases.set(node, cfg.leases_per_node);
        }
        let effects = Arc::new(Effects {
            active: (0..cfg.nodes).map(|_| AtomicU64::new(0)).collect(),
            max_active: (0..cfg.nodes).map(|_| AtomicU64::new(0)).collect(),
            ..Effects::default()
        });
        let node_of: Arc<HashMap<Arc<str>, usize>> = Arc::new(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), i % cfg.nodes))
                .collect(),
        );
        let pool = {
            let (leases, effects, node_of) = (leases.clone(), effects.clone(), node_of.clone());
            KeyedPool::builder()
                .workers(cfg.workers)
                .capacity(4096)
                .build(move |key: Arc<str>, fx: SideEffect| {
                    let node = node_of.get(&key).copied().unwrap_or(0);
                    side_effect(
                        key,
                        fx,
                        node,
                        leases.clone(),
                        effects.clone(),
                        hook_tx.clone(),
                    )
                })
        };
        let pool = match pool {
            Ok(pool) => Some(pool),
            Err(e) => {
                errors.push(format!("building the keyed pool: {}", chain(&e)));
                None
            }
        };

        // The operator's view, when asked for.
        if let (Some(addr), Some(pool)) = (cfg.admin, &pool) {
            let served = admin::serve(addr, &publisher, pool, leases, cfg.nodes, queue).await;
            if let Err(e) = served {
                errors.push(format!("serving the admin page on {addr}: {}", chain(&*e)));
            }
        }

        // The end signal: the store's final state.
        let (end_tx, end_rx) = watch::channel::<Option<Arc<Final>>>(None);
        let counters = Arc::new(Counters::default());
        let started = Instant::now();
        let feed_task = pool.clone().map(|pool| {
            tasks.spawn(feed(
                publisher.clone(),
                pool,
                keys.clone(),
                end_rx.clone(),
                effects.clone(),
            ))
        });
        // The gRPC server over loopback, and the remote subscribers.
        let mut server = None;
        let mut remotes = None;
        if cfg.remote > 0 {
            match remote::serve(&publisher, std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await {
                Ok(s) => {
                    let at = s.local_addr().to_string();
                    let started = remote::Remotes::start(
                        &at,
                        cfg.remote,
                        &keys,
                        end_rx.clone(),
                        cfg.seed,
                        "the store",
                        cfg.break_a_remote_view,
                    );
                    match started {
                        Ok(r) => remotes = Some(r),
                        Err(e) => {
                            errors.push(format!("starting the remote subscribers: {}", chain(&e)))
                        }
                    }
                    server = Some(s);
                }
                Err(e) => errors.push(format!("starting the gRPC server: {}", chain(&e))),
            }
        }
        let specs: Vec<Spec> = (0..cfg.subscribers).map(|i| Spec::of(i, &keys)).collect();
        let mut subscribers = Vec::with_capacity(specs.len());
        for spec in specs {
            let break_view = cfg.break_a_view && spec.id == 0;
            subscribers.push(tasks.spawn(subscriber(
                spec,
                publisher.clone(),
                end_rx.clone(),
                counters.clone(),
                cfg.seed,
                break_view,
            )));
        }

        // Progress.
        let published = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (bar, published, counters, queue) = (
                bar.clone(),
                published.clone(),
                counters.clone(),
                queue.clone(),
            );
            let deliveries = self.deliveries.clone();
            let pushed = pushed.clone();
            let duration = cfg.duration;
            tasks.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(100));
                loop {
                    every.tick().await;
                    let t = started.elapsed().as_secs_f64();
                    bar.set_position(((t * 10.0) as u64).min(bar.length().unwrap_or(0)));
                    if t > duration {
                        continue;
                    }
                    bar.set_message(format!(
                        "{} events, {} deliveries, webhooks: {} ok of {}, {} retried, {} dead",
                        thousands(published.load(Ordering::Relaxed)),
                        thousands(counters.deliveries.load(Ordering::Relaxed)),
                        thousands(lock(&deliveries.delivered).len() as u64),
                        thousands(lock(&pushed).len() as u64),
                        thousands(queue.retries()),
                        thousands(queue.dead_lettered()),
                    ));
                }
            })
        };

        // Run the store.
        let stop_at = started + Duration::from_secs_f64(cfg.duration);
        let produced = produce(
            store.clone(),
            publisher.clone(),
            keys.clone(),
            cfg.rate,
            stop_at,
            StdRng::seed_from_u64(cfg.seed.wrapping_add(1)),
            published.clone(),
        )
        .await;
        let produce_secs = started.elapsed().as_secs_f64();
        let published_count = match produced {
            Ok(n) => n,
            Err(e) => {
                errors.push(e);
                published.load(Ordering::Relaxed)
            }
        };
        let fin = Arc::new(Final::of(&store));
        let _ = end_tx.send(Some(fin.clone()));
        bar.set_message("converging: every view reads up to the final index");

        // Every view reads up to the final index, then is compared.
        let mut hist = Hist::new();
        let mut slow_hist = Hist::new();
        let mut converged = 0;
        let mut not_converged = Vec::new();
        let (mut wild, mut slow, mut reconn) = (0, 0, 0);
        for t in subscribers {
            match t.await {
                Ok(r) => {
                    wild += usize::from(r.spec.subject.is_wildcard());
                    slow += usize::from(r.spec.role == Role::Slow);
                    reconn += usize::from(r.spec.role == Role::Reconnecting);
                    if r.spec.role == Role::Slow {
                        slow_hist.merge(&r.hist);
                    } else {
                        hist.merge(&r.hist);
                    }
                    if r.converged {
                        converged += 1;
                    } else {
                        not_converged.push(format!(
                            "subscriber {} ({:?}, {}): {}",
                            r.spec.id,
                            r.spec.role,
                            r.spec.subject,
                            r.reason.unwrap_or_default()
                        ));
                    }
                }
                Err(_) => not_converged.push("a subscriber task panicked".to_string()),
            }
        }
        let remote = match remotes {
            Some(r) => Some(r.finish().await),
            None => None,
        };
        if let Some(server) = server {
            if let Err(e) = server.shutdown().await {
                errors.push(format!("stopping the gRPC server: {}", chain(&e)));
            }
        }
        let total_secs = started.elapsed().as_secs_f64();

        // The side effects: the feed reaches the final index, the pool drains.
        if let Some(feed_task) = feed_task {
            match feed_task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("the side-effect feed panicked".to_string()),
            }
        }
        if let Some(pool) = pool {
            pool.stop(StopMode::Drain).await;
            let pool_stats = pool.stats();
            if pool_stats.panicked > 0 {
                errors.push(format!("{} side effects panicked", pool_stats.panicked));
            }
        }
        hook_closer.close_channel(); // the pusher ends once it pushed what is buffered
        let replica_matches = {
            let replica = lock(&effects.replica);
            let present: HashMap<Arc<str>, u64> = replica
                .iter()
                .filter_map(|(k, (v, _))| v.map(|v| (k.clone(), v)))
                .collect();
            present == fin.entries
        };

        // The webhooks: every push in, then everything delivered or dead,
        // this run's and those earlier runs left.
        bar.set_message("delivering the last webhooks");
        if pusher.await.is_err() {
            errors.push("the webhook pusher panicked".to_string());
        }
        let mut flush_error = None;
        if let Err(e) = self.manager.flush_all(FLUSH_TIMEOUT).await {
            flush_error = Some(chain(&e));
        }
        if self.found_at_start > 0 {
            bar.set_message("delivering the webhooks earlier runs left");
            let mut done = self.deliveries.earlier_done.subscribe();
            let found = self.found_at_start;
            let wait = done.wait_for(|n| *n >= found);
            if tokio::time::timeout(FLUSH_TIMEOUT, wait).await.is_err() {
                flush_error.get_or_insert_with(|| {
                    format!(
                        "the webhooks earlier runs left were not all handled within {} s",
                        FLUSH_TIMEOUT.as_secs()
                    )
                });
            }
        }
        let manager_view = self
            .manager
            .queues()
            .await
            .into_iter()
            .map(|q| {
                let left = q.length.map_or("?".to_string(), |l| thousands(l.total()));
                let dead = q.dead_letters.map_or("?".to_string(), thousands);
                format!(
                    "{} ({}): {left} left, {dead} dead letters stored, {} workers of max {}",
                    q.name, q.backend, q.workers, q.max_workers
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let retried = queue.retries();
        // Every worker gone, every dead letter written: then list them.
        self.manager.shutdown_all(SHUTDOWN_TIMEOUT).await;
        let left = queue.len().await.ok().map(|l| l.total());
        let mut dead_seqs = HashSet::new();
        let mut earlier_dead = HashSet::new();
        {
            let earlier_seen = lock(&self.deliveries.earlier_seen).clone();
            match queue.dead_letters().await {
                Ok(letters) => {
                    for l in letters {
                        let Ok(h) = serde_json::from_slice::<Webhook>(&l.payload) else {
                            continue;
                        };
                        if h.run == run_id {
                            dead_seqs.insert(h.seq);
                        } else if earlier_seen.contains(&(h.run, h.seq)) {
                            earlier_dead.insert((h.run, h.seq));
                        }
                    }
                }
                Err(e) => errors.push(format!("listing dead letters: {}", chain(&e))),
            }
        }
        tasks.shutdown().await; // the ticker
        drop(ticker);

        let pushed = std::mem::take(&mut *lock(&pushed));
        let delivered = lock(&self.deliveries.delivered).clone();
        let lost = pushed
            .iter()
            .filter(|s| !delivered.contains(s) && !dead_seqs.contains(s))
            .count() as u64;
        let earlier = {
            let delivered = lock(&self.deliveries.earlier_delivered).clone();
            let handled = delivered.union(&earlier_dead).count() as u64;
            EarlierFigures {
                found: self.found_at_start,
                delivered: delivered.len() as u64,
                dead_lettered: earlier_dead.len() as u64,
                lost: self.found_at_start.saturating_sub(handled),
            }
        };
        let webhooks = WebhookFigures {
            pushed: pushed.len() as u64,
            delivered: delivered.len() as u64,
            redelivered: self.deliveries.redelivered.load(Ordering::Relaxed),
            retried,
            dead_lettered: dead_seqs.len() as u64,
            dead_poison: dead_seqs.iter().filter(|s| *s % POISON_EVERY == 7).count() as u64,
            lost,
            push_failed: push_failed.load(Ordering::Relaxed),
            push_error: lock(&push_error).take(),
            left,
            flush_error,
            earlier,
            dead_kept: self.dead_at_start,
        };
        let stats = publisher.stats();
        let max_active = effects
            .max_active
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Report {
            published: published_count,
            produce_secs,
            total_secs,
            subscribers: (cfg.subscribers, wild, slow, reconn),
            deliveries: c(&counters.deliveries),
            latency: (hist.quantile(0.5), hist.quantile(0.99)),
            slow_latency: (slow_hist.quantile(0.5), slow_hist.quantile(0.99)),
            snapshots: (stats.cache_misses, stats.cache_hits),
            lag: (
                c(&counters.lag_resnapshots) + c(&effects.feed_resnapshots),
                c(&counters.lagged_errors),
            ),
            resumes: (
                c(&counters.reconnects),
                c(&counters.resumed_live),
                c(&counters.resumed_snapshot),
                c(&counters.restarted),
            ),
            views: (converged, not_converged),
            side_effects: (
                c(&effects.applied),
                c(&effects.order_violations),
                replica_matches,
            ),
            leases: (max_active, cfg.leases_per_node, c(&effects.lease_waits)),
            queue_backend: self.queue_backend.clone(),
            backend: Some(cfg.backend),
            manager_view,
            webhooks,
            remote,
            peak_memory_kib: peak_memory_kib(),
            errors,
            cleanup: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// `--serve` and `--connect`

/// `--serve ADDR`: the store, its publisher and the gRPC server, bound;
/// [`Serving::run`] runs it.
pub struct Serving {
    cfg: Config,
    store: Store,
    keys: Arc<Vec<Arc<str>>>,
    publisher: Publisher<Change>,
    server: snapstream::net::Server,
}

/// What a `--serve` run did.
#[derive(Debug, Default)]
pub struct ServeReport {
    /// Changes the store applied (and published).
    pub published: u64,
    /// Seconds the producer ran.
    pub produce_secs: f64,
    /// The store's index when it stopped changing.
    pub final_index: u64,
    /// Remote streams still open when the server stopped.
    pub open_streams: usize,
    /// Errors of the run.
    pub errors: Vec<String>,
}

impl ServeReport {
    /// Whether the store and the server ran without an error.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The table.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let rows = [
            (
                "events published",
                format!(
                    "{} in {:.1} s ({}/s)",
                    thousands(self.published),
                    self.produce_secs,
                    thousands((self.published as f64 / self.produce_secs.max(1e-9)) as u64)
                ),
            ),
            ("final index", thousands(self.final_index)),
            (
                "remote streams open at the end",
                thousands(self.open_streams as u64),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let _ = writeln!(s, "{:-<1$}", "", width + 50);
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<width$}  {v}");
        }
        let _ = writeln!(s, "{:-<1$}", "", width + 50);
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        let _ = writeln!(
            s,
            "verdict: {}",
            if self.ok() {
                "OK - served until stopped"
            } else {
                "FAILED"
            }
        );
        s
    }
}

/// Starts `--serve`: checks the flags, builds the store and binds the gRPC
/// server on `cfg.serve`. Nothing changes until [`Serving::run`].
///
/// # Errors
///
/// [`DemoError::Config`] for a flag out of range, [`DemoError::Serve`] when
/// the address cannot be bound.
pub async fn start_serving(cfg: Config) -> Result<Serving, DemoError> {
    cfg.validate()?;
    let cfg = cfg.effective();
    let addr = cfg
        .serve
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let keys: Arc<Vec<Arc<str>>> = Arc::new(
        (0..cfg.keys)
            .map(|i| Arc::from(format!("svc-{i:04}")))
            .collect(),
    );
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let store = initial_store(&keys, &mut rng);
    let mut builder = Publisher::<Change>::builder();
    builder.lag_limit(Some(cfg.lag_limit));
    builder
        .register_with_wildcard(TOPIC, snapshot_handler(store.clone()))
        .map_err(|e| DemoError::Setup {
            what: "the store's topic",
            source: Box::new(e),
        })?;
    let publisher = builder.build();
    let server = remote::serve(&publisher, addr)
        .await
        .map_err(|source| DemoError::Serve { addr, source })?;
    Ok(Serving {
        cfg,
        store,
        keys,
        publisher,
        server,
    })
}

impl Serving {
    /// The address the server listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// Changes the store for `--duration` seconds (unless `stop` completes
    /// first), then keeps serving its final state until `stop` completes;
    /// then shuts the server down.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: pass the cancellation as `stop`.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> ServeReport {
        let cfg = &self.cfg;
        let mut report = ServeReport::default();
        eprintln!(
            "replicate: serving topic {TOPIC:?} ({} keys) on {}; {} changes/s for {:.1} s, \
             then the store holds still until Ctrl-C",
            cfg.keys,
            self.local_addr(),
            thousands(cfg.rate),
            cfg.duration
        );
        tokio::pin!(stop);
        let started = Instant::now();
        let published = Arc::new(AtomicU64::new(0));
        let produce = produce(
            self.store.clone(),
            self.publisher.clone(),
            self.keys.clone(),
            cfg.rate,
            started + Duration::from_secs_f64(cfg.duration),
            StdRng::seed_from_u64(cfg.seed.wrapping_add(1)),
            published.clone(),
        );
        let stopped_early = tokio::select! {
            produced = produce => {
                if let Err(e) = produced {
                    report.errors.push(e);
                }
                false
            }
            () = &mut stop => true,
        };
        report.published = published.load(Ordering::Relaxed);
        report.produce_secs = started.elapsed().as_secs_f64();
        report.final_index = lock(&self.store).index;
        if !stopped_early {
            eprintln!(
                "replicate: the store holds still at index {}; serving until Ctrl-C",
                thousands(report.final_index)
            );
            stop.await;
        }
        report.open_streams = self.server.active_streams();
        if let Err(e) = self.server.shutdown().await {
            report
                .errors
                .push(format!("stopping the gRPC server: {}", chain(&e)));
        }
        report
    }
}

/// `--connect ADDR`: remote subscribers only, against a `--serve` run;
/// see [`remote::connect`].
///
/// # Errors
///
/// [`DemoError::Config`] for a flag out of range, [`DemoError::Connect`]
/// when no replicate server answers at the address,
/// [`DemoError::Interrupted`] when `stop` completed first.
pub async fn connect(
    cfg: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<remote::ConnectReport, DemoError> {
    cfg.validate()?;
    let cfg = cfg.effective();
    let address = cfg.connect.clone().unwrap_or_default();
    let run = remote::connect(
        &address,
        cfg.remote,
        Duration::from_secs_f64(cfg.duration),
        cfg.seed,
    );
    tokio::select! {
        report = run => Ok(report?),
        () = stop => Err(DemoError::Interrupted { cleanup: Vec::new() }),
    }
}
