//! Reading every figure ([`overview`]) and recording it through the
//! `metrics` facade ([`record`]).

use std::collections::{BTreeMap, HashMap};

use std::fmt::Write as _;

use serde::Serialize;

use super::Inner;
use crate::event::Subject;
use crate::histogram::Histogram;
use crate::publisher::KeyStats;

/// Every figure the admin watches, read at one moment; what
/// [`Admin::overview`](super::Admin::overview) returns and `api/overview`
/// answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Overview {
    /// Whether mutating endpoints are refused (no token configured).
    pub read_only: bool,
    /// The publisher's topics, in registration order (empty without one).
    pub topics: Vec<TopicView>,
    /// Snapshot builds started (handler calls; the cache's misses).
    pub snapshot_builds: u64,
    /// Subscribers served from a cached or running snapshot.
    pub snapshot_cache_hits: u64,
    /// The keyed pools, in the order they were given.
    pub pools: Vec<PoolView>,
    /// The lease pools, in the order they were given.
    pub lease_pools: Vec<LeasePoolView>,
    /// The work queues, by name.
    pub queues: Vec<QueueView>,
    /// The network subscribe servers (feature `net`), in the order they
    /// were given.
    pub servers: Vec<ServerView>,
}

/// A histogram summed up for the page: count, mean and upper estimates of
/// the median and the 99th percentile (bucket bounds; `null` when nothing
/// was recorded or above the largest bucket).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HistogramView {
    /// Values recorded.
    pub count: u64,
    /// Their mean; `None` when nothing was recorded.
    pub mean: Option<f64>,
    /// [`Histogram::quantile`]`(0.5)`.
    pub p50: Option<f64>,
    /// [`Histogram::quantile`]`(0.99)`.
    pub p99: Option<f64>,
}

impl HistogramView {
    fn of(h: &Histogram) -> Self {
        let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
        Self {
            count: h.count,
            mean: (h.count > 0).then(|| h.sum / h.count as f64),
            p50: finite(h.quantile(0.5)),
            p99: finite(h.quantile(0.99)),
        }
    }
}

/// One network subscribe server's figures
/// ([`net::ServerStats`](crate::net::ServerStats) when feature `net` is on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ServerView {
    /// The name it was given.
    pub name: String,
    /// Subscribe streams open now.
    pub open_streams: usize,
    /// Subscribe streams opened.
    pub streams_opened: u64,
    /// Streams ended: the client went away.
    pub ended_client_gone: u64,
    /// Streams ended: force-closed.
    pub ended_force_closed: u64,
    /// Streams ended: server or publisher shutdown.
    pub ended_shutdown: u64,
    /// Streams ended: the subscriber lagged.
    pub ended_lagged: u64,
    /// Streams ended: another error.
    pub ended_error: u64,
    /// Response messages sent.
    pub messages_sent: u64,
    /// Bytes of the response messages sent (protobuf-encoded).
    pub bytes_sent: u64,
    /// Progress marks sent.
    pub progress_marks_sent: u64,
    /// Connections closed after carrying no stream for the idle timeout.
    pub connections_closed_idle: u64,
}

/// One topic's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TopicView {
    /// The topic.
    pub topic: String,
    /// Subscribers over all its keys.
    pub subscribers: usize,
    /// Keys with a live buffer (someone subscribes).
    pub keys: usize,
    /// The largest lag of any subscriber, in batches.
    pub max_lag: u64,
    /// Live batches held in memory over its keys.
    pub retained: u64,
    /// Keys with a cached snapshot chain.
    pub cached: usize,
    /// Keys with a snapshot build running.
    pub building: usize,
    /// Batches appended to its watched keys, as seen by the reads so far
    /// (a key's count is read while it has a buffer).
    pub published: u64,
    /// How many keys' furthest-behind subscriber lags by how much.
    pub lag: Vec<LagBucket>,
    /// Events delivered to its subscribers since the publisher was built
    /// ([`TopicStats::delivered`](crate::publisher::TopicStats::delivered)).
    pub deliveries: u64,
    /// Subscribers closed for lag (`Lagged`) since the publisher was built.
    pub lagged: u64,
    /// Subscribers detached for lag to re-snapshot since the publisher was
    /// built.
    pub resnapshotted: u64,
    /// Events per publish call to the topic.
    pub publish_batch_events: HistogramView,
    /// Time the topic's snapshot handler took, in seconds.
    pub snapshot_build_seconds: HistogramView,
}

/// Keys whose furthest-behind subscriber lags by at most `upto` batches (and
/// more than the previous bucket's `upto`); `upto: null` is the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LagBucket {
    /// The bucket's upper bound, inclusive; `None` for no bound.
    pub upto: Option<u64>,
    /// Keys in the bucket.
    pub keys: usize,
}

/// The upper bounds of the lag buckets.
const LAG_BOUNDS: [u64; 5] = [0, 1, 10, 100, 1000];

/// One key of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyView {
    /// The key, or `*` for the wildcard.
    pub subject: String,
    /// Whether it is the topic's wildcard.
    pub wildcard: bool,
    /// Subscribers holding the key's buffer.
    pub subscribers: usize,
    /// Batches the furthest-behind subscriber has yet to read.
    pub max_lag: u64,
    /// Live batches held in memory.
    pub retained: u64,
    /// Batches appended since the buffer was created.
    pub published: u64,
    /// Whether a snapshot chain is cached.
    pub cached: bool,
    /// Whether a snapshot build runs.
    pub building: bool,
}

impl KeyView {
    pub(crate) fn from_stats(k: &KeyStats) -> Self {
        Self {
            subject: subject_name(&k.subject),
            wildcard: k.subject.is_wildcard(),
            subscribers: k.subscribers,
            max_lag: k.max_lag,
            retained: k.retained,
            published: k.published,
            cached: k.cached,
            building: k.building,
        }
    }
}

fn subject_name(s: &Subject) -> String {
    s.as_key().map_or_else(|| "*".to_owned(), str::to_owned)
}

/// One keyed pool's figures ([`workpool::Stats`](crate::workpool::Stats)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolView {
    /// The name it was given.
    pub name: String,
    /// Items accepted and not yet started.
    pub pending: usize,
    /// Keys a worker holds.
    pub in_flight: usize,
    /// Keys with pending or in-flight items.
    pub keys: usize,
    /// Items whose handler returned.
    pub handled: u64,
    /// Items whose handler panicked.
    pub panicked: u64,
    /// Live workers.
    pub workers: usize,
    /// Adds that had to wait for room.
    pub add_waits: u64,
}

/// One lease pool's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LeasePoolView {
    /// The name it was given.
    pub name: String,
    /// Keys the pool keeps (a target, leases or waiters).
    pub keys: usize,
    /// Acquires that had to wait.
    pub waits: u64,
    /// The counts of the keys it was given to watch.
    pub watched: Vec<LeaseKeyView>,
}

/// The counts of one watched lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LeaseKeyView {
    /// The key, as displayed.
    pub key: String,
    /// Leases it should converge to.
    pub target: u64,
    /// Leases held.
    pub active: u64,
}

/// One work queue's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct QueueView {
    /// Its name.
    pub name: String,
    /// Its storage (`memory`, `disk`, `redis`).
    pub backend: String,
    /// Workers running.
    pub workers: usize,
    /// Workers running a handler.
    pub active_workers: usize,
    /// Most workers allowed.
    pub max_workers: usize,
    /// Items ready; `None` when the base queue failed.
    pub ready: Option<u64>,
    /// Items waiting out a back-off; `None` when the base queue failed.
    pub delayed: Option<u64>,
    /// Items handed out; `None` when the base queue failed.
    pub leased: Option<u64>,
    /// Items in the dead-letter queue; `None` when it failed.
    pub dead_letters: Option<u64>,
    /// Items this process stored in the base queue.
    pub pushed: u64,
    /// Items acknowledged as handled.
    pub acked: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Items moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Time the base queue took to store a push, in seconds.
    pub push_seconds: HistogramView,
    /// What a failing backend reported.
    pub error: Option<String>,
}

/// Each key's published count at the last read, and each topic's total.
#[derive(Default)]
pub(crate) struct Seen {
    last: HashMap<(String, Subject), u64>,
    totals: BTreeMap<String, u64>,
}

pub(crate) async fn overview(inner: &Inner) -> Overview {
    let mut view = Overview {
        read_only: inner.token.is_none(),
        topics: Vec::new(),
        snapshot_builds: 0,
        snapshot_cache_hits: 0,
        pools: Vec::new(),
        lease_pools: Vec::new(),
        queues: Vec::new(),
        servers: Vec::new(),
    };
    if let Some(p) = &inner.publisher {
        let stats = p.stats();
        view.snapshot_builds = stats.cache_misses;
        view.snapshot_cache_hits = stats.cache_hits;
        let mut seen = inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = HashMap::with_capacity(seen.last.len());
        for t in &stats.topics {
            let name = t.topic.as_str().to_owned();
            let mut grown = 0;
            let mut lag = vec![0usize; LAG_BOUNDS.len() + 1];
            for k in &t.keys {
                let id = (name.clone(), k.subject.clone());
                let before = seen.last.get(&id).copied().unwrap_or(0);
                // A smaller count is a buffer created anew since.
                grown += if k.published >= before {
                    k.published - before
                } else {
                    k.published
                };
                last.insert(id, k.published);
                let at = LAG_BOUNDS
                    .iter()
                    .position(|b| k.max_lag <= *b)
                    .unwrap_or(LAG_BOUNDS.len());
                lag[at] += 1;
            }
            let total = seen.totals.entry(name.clone()).or_default();
            *total += grown;
            let (sizes, builds) = p.histograms(&name).unwrap_or_default();
            view.topics.push(TopicView {
                topic: name,
                subscribers: t.subscribers,
                keys: t.keys.len(),
                max_lag: t.keys.iter().map(|k| k.max_lag).max().unwrap_or(0),
                retained: t.keys.iter().map(|k| k.retained).sum(),
                cached: t.keys.iter().filter(|k| k.cached).count(),
                building: t.keys.iter().filter(|k| k.building).count(),
                published: *total,
                lag: lag
                    .into_iter()
                    .enumerate()
                    .map(|(i, keys)| LagBucket {
                        upto: LAG_BOUNDS.get(i).copied(),
                        keys,
                    })
                    .collect(),
                deliveries: t.delivered,
                lagged: t.lagged,
                resnapshotted: t.resnapshotted,
                publish_batch_events: HistogramView::of(&sizes),
                snapshot_build_seconds: HistogramView::of(&builds),
            });
        }
        seen.last = last;
    }
    for (name, p) in &inner.pools {
        let s = p.stats();
        view.pools.push(PoolView {
            name: name.clone(),
            pending: s.pending,
            in_flight: s.in_flight,
            keys: s.keys,
            handled: s.handled,
            panicked: s.panicked,
            workers: s.workers,
            add_waits: s.add_waits,
        });
    }
    for (name, l) in &inner.leases {
        view.lease_pools.push(LeasePoolView {
            name: name.clone(),
            keys: l.keys(),
            waits: l.waits(),
            watched: l
                .counts()
                .into_iter()
                .map(|(key, c)| LeaseKeyView {
                    key,
                    target: c.target,
                    active: c.active,
                })
                .collect(),
        });
    }
    for q in inner.queues.values() {
        view.queues.push(queue_view(q.as_ref()).await);
    }
    #[cfg(feature = "net")]
    for (name, server) in &inner.servers {
        let s = server.stats();
        view.servers.push(ServerView {
            name: name.clone(),
            open_streams: s.open_streams,
            streams_opened: s.streams_opened,
            ended_client_gone: s.streams_ended.client_gone,
            ended_force_closed: s.streams_ended.force_closed,
            ended_shutdown: s.streams_ended.shutdown,
            ended_lagged: s.streams_ended.lagged,
            ended_error: s.streams_ended.error,
            messages_sent: s.messages_sent,
            bytes_sent: s.bytes_sent,
            progress_marks_sent: s.progress_marks_sent,
            connections_closed_idle: s.connections_closed_idle,
        });
    }
    view
}

pub(crate) async fn queue_view(q: &dyn super::sources::AdminQueue) -> QueueView {
    let len = q.len().await;
    let dead = q.dead_count().await;
    let error = match (&len, &dead) {
        (Err(e), _) | (_, Err(e)) => Some(e.to_string()),
        _ => None,
    };
    let len = len.ok();
    QueueView {
        name: q.name().to_owned(),
        backend: q.backend().to_string(),
        workers: q.workers(),
        active_workers: q.active(),
        max_workers: q.max_workers(),
        ready: len.map(|l| l.ready),
        delayed: len.map(|l| l.delayed),
        leased: len.map(|l| l.leased),
        dead_letters: dead.ok(),
        pushed: q.pushed(),
        acked: q.acked(),
        retries: q.retries(),
        dead_lettered: q.dead_lettered(),
        push_seconds: HistogramView::of(&q.push_latency()),
        error,
    }
}

/// Describes every metric to the current recorder (its `# HELP` lines).
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("snapstream_topic_subscribers", "Subscribers of the topic");
    describe_gauge!(
        "snapstream_topic_keys",
        "Keys of the topic with a live buffer"
    );
    describe_gauge!(
        "snapstream_topic_max_lag_batches",
        "Batches the furthest-behind subscriber of the topic has yet to read"
    );
    describe_gauge!(
        "snapstream_topic_retained_batches",
        "Live batches of the topic held in memory"
    );
    describe_gauge!(
        "snapstream_topic_snapshots_cached",
        "Keys of the topic with a cached snapshot"
    );
    describe_gauge!(
        "snapstream_topic_snapshot_builds_running",
        "Keys of the topic with a snapshot build running"
    );
    describe_counter!(
        "snapstream_topic_published_batches_total",
        "Batches appended to the topic's watched keys, as seen by the scrapes"
    );
    describe_counter!(
        "snapstream_topic_deliveries_total",
        "Events delivered to the topic's subscribers (snapshot and live)"
    );
    describe_counter!(
        "snapstream_topic_lagged_subscribers_total",
        "Subscribers of the topic closed for lag (Lagged)"
    );
    describe_counter!(
        "snapstream_topic_resnapshotted_subscribers_total",
        "Subscribers of the topic detached for lag to re-snapshot"
    );
    describe_counter!(
        "snapstream_snapshot_builds_total",
        "Snapshot builds started (snapshot cache misses)"
    );
    describe_counter!(
        "snapstream_snapshot_cache_hits_total",
        "Subscribers served from a cached or running snapshot"
    );
    describe_gauge!(
        "snapstream_pool_pending",
        "Items accepted and not yet started"
    );
    describe_gauge!(
        "snapstream_pool_in_flight",
        "Keys a worker of the pool holds"
    );
    describe_gauge!(
        "snapstream_pool_keys",
        "Keys with pending or in-flight items"
    );
    describe_gauge!("snapstream_pool_workers", "Live workers of the pool");
    describe_counter!(
        "snapstream_pool_handled_total",
        "Items whose handler returned"
    );
    describe_counter!(
        "snapstream_pool_panics_total",
        "Items whose handler panicked"
    );
    describe_counter!(
        "snapstream_pool_add_waits_total",
        "Adds that had to wait for room in the pool"
    );
    describe_gauge!("snapstream_lease_keys", "Keys the lease pool keeps");
    describe_counter!(
        "snapstream_lease_acquire_waits_total",
        "Lease acquires that had to wait"
    );
    describe_gauge!("snapstream_lease_target", "Target leases of the key");
    describe_gauge!("snapstream_lease_active", "Leases of the key held");
    describe_gauge!("snapstream_queue_ready", "Items ready in the base queue");
    describe_gauge!("snapstream_queue_delayed", "Items waiting out a back-off");
    describe_gauge!(
        "snapstream_queue_leased",
        "Items handed out, not acknowledged"
    );
    describe_gauge!(
        "snapstream_queue_dead_letters",
        "Items in the dead-letter queue"
    );
    describe_gauge!("snapstream_queue_workers", "Workers of the queue running");
    describe_gauge!(
        "snapstream_queue_active_workers",
        "Workers running a handler"
    );
    describe_gauge!("snapstream_queue_max_workers", "Most workers allowed");
    describe_counter!(
        "snapstream_queue_pushes_total",
        "Items stored in the base queue"
    );
    describe_counter!(
        "snapstream_queue_acks_total",
        "Items acknowledged as handled"
    );
    describe_counter!("snapstream_queue_retries_total", "Retries scheduled");
    describe_counter!(
        "snapstream_queue_dead_lettered_total",
        "Items moved to the dead-letter queue"
    );
    describe_gauge!(
        "snapstream_net_open_streams",
        "Subscribe streams of the server open now"
    );
    describe_counter!(
        "snapstream_net_streams_opened_total",
        "Subscribe streams the server opened"
    );
    describe_counter!(
        "snapstream_net_streams_ended_total",
        "Subscribe streams ended, by reason (client_gone, force_closed, shutdown, lagged, error)"
    );
    describe_counter!(
        "snapstream_net_messages_sent_total",
        "Response messages the server sent"
    );
    describe_counter!(
        "snapstream_net_sent_bytes_total",
        "Bytes of the response messages sent, protobuf-encoded"
    );
    describe_counter!(
        "snapstream_net_progress_marks_sent_total",
        "Progress marks the server sent to quiet streams"
    );
    describe_counter!(
        "snapstream_net_connections_closed_idle_total",
        "Connections the server closed after they carried no stream for the idle timeout"
    );
}

/// Records `view` through the current recorder.
pub(crate) fn record(inner: &Inner, view: &Overview) {
    use metrics::{counter, gauge};
    if inner.publisher.is_some() {
        counter!("snapstream_snapshot_builds_total").absolute(view.snapshot_builds);
        counter!("snapstream_snapshot_cache_hits_total").absolute(view.snapshot_cache_hits);
    }
    for t in &view.topics {
        let l = [("topic", t.topic.clone())];
        gauge!("snapstream_topic_subscribers", &l).set(t.subscribers as f64);
        gauge!("snapstream_topic_keys", &l).set(t.keys as f64);
        gauge!("snapstream_topic_max_lag_batches", &l).set(t.max_lag as f64);
        gauge!("snapstream_topic_retained_batches", &l).set(t.retained as f64);
        gauge!("snapstream_topic_snapshots_cached", &l).set(t.cached as f64);
        gauge!("snapstream_topic_snapshot_builds_running", &l).set(t.building as f64);
        counter!("snapstream_topic_published_batches_total", &l).absolute(t.published);
        counter!("snapstream_topic_deliveries_total", &l).absolute(t.deliveries);
        counter!("snapstream_topic_lagged_subscribers_total", &l).absolute(t.lagged);
        counter!("snapstream_topic_resnapshotted_subscribers_total", &l).absolute(t.resnapshotted);
    }
    for p in &view.pools {
        let l = [("pool", p.name.clone())];
        gauge!("snapstream_pool_pending", &l).set(p.pending as f64);
        gauge!("snapstream_pool_in_flight", &l).set(p.in_flight as f64);
        gauge!("snapstream_pool_keys", &l).set(p.keys as f64);
        gauge!("snapstream_pool_workers", &l).set(p.workers as f64);
        counter!("snapstream_pool_handled_total", &l).absolute(p.handled);
        counter!("snapstream_pool_panics_total", &l).absolute(p.panicked);
        counter!("snapstream_pool_add_waits_total", &l).absolute(p.add_waits);
    }
    for p in &view.lease_pools {
        gauge!("snapstream_lease_keys", "pool" => p.name.clone()).set(p.keys as f64);
        counter!("snapstream_lease_acquire_waits_total", "pool" => p.name.clone())
            .absolute(p.waits);
        for k in &p.watched {
            let l = [("pool", p.name.clone()), ("key", k.key.clone())];
            gauge!("snapstream_lease_target", &l).set(k.target as f64);
            gauge!("snapstream_lease_active", &l).set(k.active as f64);
        }
    }
    for q in &view.queues {
        let l = [("queue", q.name.clone())];
        if let (Some(r), Some(d), Some(le)) = (q.ready, q.delayed, q.leased) {
            gauge!("snapstream_queue_ready", &l).set(r as f64);
            gauge!("snapstream_queue_delayed", &l).set(d as f64);
            gauge!("snapstream_queue_leased", &l).set(le as f64);
        }
        if let Some(d) = q.dead_letters {
            gauge!("snapstream_queue_dead_letters", &l).set(d as f64);
        }
        gauge!("snapstream_queue_workers", &l).set(q.workers as f64);
        gauge!("snapstream_queue_active_workers", &l).set(q.active_workers as f64);
        gauge!("snapstream_queue_max_workers", &l).set(q.max_workers as f64);
        counter!("snapstream_queue_pushes_total", &l).absolute(q.pushed);
        counter!("snapstream_queue_acks_total", &l).absolute(q.acked);
        counter!("snapstream_queue_retries_total", &l).absolute(q.retries);
        counter!("snapstream_queue_dead_lettered_total", &l).absolute(q.dead_lettered);
    }
    for s in &view.servers {
        let l = [("server", s.name.clone())];
        gauge!("snapstream_net_open_streams", &l).set(s.open_streams as f64);
        counter!("snapstream_net_streams_opened_total", &l).absolute(s.streams_opened);
        for (reason, n) in [
            ("client_gone", s.ended_client_gone),
            ("force_closed", s.ended_force_closed),
            ("shutdown", s.ended_shutdown),
            ("lagged", s.ended_lagged),
            ("error", s.ended_error),
        ] {
            counter!(
                "snapstream_net_streams_ended_total",
                "server" => s.name.clone(),
                "reason" => reason
            )
            .absolute(n);
        }
        counter!("snapstream_net_messages_sent_total", &l).absolute(s.messages_sent);
        counter!("snapstream_net_sent_bytes_total", &l).absolute(s.bytes_sent);
        counter!("snapstream_net_progress_marks_sent_total", &l).absolute(s.progress_marks_sent);
        counter!("snapstream_net_connections_closed_idle_total", &l)
            .absolute(s.connections_closed_idle);
    }
}

/// The histograms `/metrics` renders itself: the `metrics` facade's
/// histograms take single observations, and these are bucket counts kept by
/// the hot paths, so they are written here in the exposition format.
const HISTOGRAMS: [(&str, &str); 3] = [
    (
        "snapstream_topic_publish_batch_events",
        "Events per publish call to the topic",
    ),
    (
        "snapstream_topic_snapshot_build_seconds",
        "Time the topic's snapshot handler took, start to end or failure",
    ),
    (
        "snapstream_queue_push_duration_seconds",
        "Time the base queue took to store a push",
    ),
];

/// Renders the histograms in the Prometheus text format (after the
/// exporter's text, whose names do not overlap).
///
/// The topics are `view`'s (the scrape's own read): a second
/// `Publisher::stats` would lock every subscriber once more per scrape.
pub(crate) fn render_histograms(inner: &Inner, view: &Overview, out: &mut String) {
    let mut by_name: [Vec<(&str, String, Histogram)>; 3] = Default::default();
    if let Some(p) = &inner.publisher {
        for t in &view.topics {
            let name = t.topic.clone();
            if let Some((sizes, builds)) = p.histograms(&name) {
                by_name[0].push(("topic", name.clone(), sizes));
                by_name[1].push(("topic", name, builds));
            }
        }
    }
    for (name, q) in &inner.queues {
        by_name[2].push(("queue", name.clone(), q.push_latency()));
    }
    for ((name, help), series) in HISTOGRAMS.iter().zip(by_name) {
        if series.is_empty() {
            continue;
        }
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (label, value, h) in series {
            let value = escape(&value);
            for b in &h.buckets {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{value}\",le=\"{}\"}} {}",
                    b.le, b.count
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {}", h.count);
        }
    }
}

/// A label value escaped for the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
