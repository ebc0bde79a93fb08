//! Snapstream nodes fed by JetStream vs subscribers watching a NATS KV
//! bucket directly, side by side in one run.
//!
//! * **snapstream**: 1 or 3 nodes, each an ordered JetStream consumer of the
//!   log applying it and publishing into its publisher, served over gRPC
//!   (`Node::server`); the subscribers are remote wildcard subscriptions,
//!   subscriber i on node i mod nodes, one `net::Client` (one HTTP/2
//!   connection) per 100 of a node's subscribers.
//! * **NATS KV**: every subscriber runs `kv.watch_all()` on the bucket — one
//!   JetStream consumer each, one NATS connection per 100 watchers. The
//!   bucket keeps a history of 64 values per key, so that no change of a
//!   round is superseded before every watch delivered it (see
//!   [`KV_HISTORY`]); a watch's transient errors are counted and the watcher
//!   goes on, as its ordered consumer recreates itself.
//!
//! Each round writes a burst of changes (32 puts in flight) whose values
//! carry the write time; every subscriber must receive every change (counted,
//! the run fails otherwise). Deliveries/s is changes × subscribers over the
//! time from the first write to the last delivery; p50/p99 is write-to-view
//! latency over every delivery. The load on NATS is what its own monitoring
//! says: the stream's consumers (JetStream API) and the messages the server
//! sent (`/varz` `out_msgs`) during the round. The consumers are read once
//! every subscriber has its snapshot *and* every node has applied the
//! round's first change (so no node is still in its start-up replay), and
//! again after the last delivery. The bench starts its own
//! `nats-server -js -m PORT` (installed with apt when missing; skipped with
//! a notice when it cannot be).
//!
//! `cargo bench --features jetstream,net --bench cluster`
//! (`SNAPSTREAM_BENCH_ROUNDS=N` rounds, default 3, interleaved, medians), or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --features jetstream,net --bench cluster`
//! (1 node, 100 subscribers, a few changes: checks only).
//!
//! After the cases, a node's rebuild (no checkpoint) from a log of 1,000
//! keys changed 100 times each, the whole log against a compacted one
//! (`LogConfig::compacted`), interleaved, at least 3 rounds.
//!
//! Knobs: `SNAPSTREAM_BENCH_CASES=3x100,3x5000` runs only those cases
//! (nodes × subscribers; add `rebuild` for the rebuild comparison); `SNAPSTREAM_BENCH_SYSTEMS=snapstream` (or `kv`)
//! runs only that side; `SNAPSTREAM_BENCH_PERF_CTL=FIFO` drives
//! `perf record -D -1 --control fifo:FIFO` (or `perf stat`) so that it
//! samples only the rounds' bursts (the bench's `nats-server` is its child:
//! `perf` follows it too).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use snapstream::cluster::{JsonCodec, Log, LogConfig, Node, NodeState};
use snapstream::event::{Event, Message, Subject, Topic};
use snapstream::net::{Client, RemoteRequest};
use tokio::sync::mpsc;

const TOPIC: &str = "bench";
const PER_CONNECTION: usize = 100;
const IN_FLIGHT: usize = 32;
const KEYS: usize = 64;
const PATIENCE: Duration = Duration::from_secs(300);

struct Sizes {
    scenarios: Vec<(usize, usize)>,
    writes: usize,
    rounds: usize,
    quick: bool,
    /// Run the rebuild comparison (whole log against compacted).
    rebuild: bool,
}

fn sizes() -> Sizes {
    if std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some() {
        return Sizes {
            scenarios: vec![(1, 100)],
            writes: 20,
            rounds: 1,
            quick: true,
            rebuild: false,
        };
    }
    let rounds = std::env::var("SNAPSTREAM_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    let all = vec![
        (1, 100),
        (1, 1_000),
        (1, 5_000),
        (3, 100),
        (3, 1_000),
        (3, 5_000),
    ];
    // `SNAPSTREAM_BENCH_CASES=3x100,3x5000`: only these (nodes × subscribers).
    // `rebuild` among them: the rebuild comparison too.
    let cases = std::env::var("SNAPSTREAM_BENCH_CASES");
    let rebuild = cases
        .as_ref()
        .map_or(true, |c| c.split(',').any(|c| c.trim() == "rebuild"));
    let scenarios = match cases {
        Ok(cases) => cases
            .split(',')
            .filter_map(|c| {
                let (n, s) = c.trim().split_once('x')?;
                Some((n.parse().ok()?, s.parse().ok()?))
            })
            .filter(|&(n, s): &(usize, usize)| n > 0 && s > 0)
            .collect(),
        Err(_) => all,
    };
    Sizes {
        scenarios,
        writes: 200,
        rounds,
        quick: false,
        rebuild,
    }
}

/// `SNAPSTREAM_BENCH_SYSTEMS=snapstream` or `=kv`: run only that side
/// (default both).
fn runs(system: &str) -> bool {
    std::env::var("SNAPSTREAM_BENCH_SYSTEMS")
        .map(|v| v.split(',').any(|s| s.trim() == system))
        .unwrap_or(true)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), now_ns())
}

// ---- the server ------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server_binary() -> Option<PathBuf> {
    let find = || {
        std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                [
                    "/usr/sbin/nats-server",
                    "/usr/bin/nats-server",
                    "/usr/local/bin/nats-server",
                ]
                .map(PathBuf::from),
            )
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    eprintln!("nats-server missing: installing it with apt-get (package nats-server)");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "nats-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    find()
}

/// The bench's own `nats-server -js -m PORT`; killed on drop.
struct Nats {
    child: Child,
    port: u16,
    monitor: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Option<Self> {
        let bin = nats_server_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let (port, monitor) = (free_port(), free_port());
        let child = Command::new(bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor.to_string(),
                "-sd",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Self {
            child,
            port,
            monitor,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn connect(&self) -> async_nats::Client {
        self.connect_with(async_nats::ConnectOptions::new).await
    }

    async fn connect_with(
        &self,
        options: impl Fn() -> async_nats::ConnectOptions,
    ) -> async_nats::Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match options().connect(self.url()).await {
                Ok(c) => return c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("the bench's nats-server does not answer: {e}"),
            }
        }
    }

    /// `stream`'s entries in the monitoring endpoint's `/jsz?{query}`.
    async fn stream_details(&self, query: &str, stream: &str) -> Vec<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/jsz?{query}", self.monitor);
        let jsz: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .filter(|s| s["name"] == stream)
            .cloned()
            .collect()
    }

    /// The consumers of `stream` (`/jsz?streams=true`).
    async fn consumers(&self, stream: &str) -> usize {
        self.stream_details("streams=true", stream)
            .await
            .iter()
            .map(|s| s["state"]["consumer_count"].as_u64().unwrap_or(0) as usize)
            .sum()
    }

    /// How many consumers of `stream` are replacements an ordered consumer
    /// made of itself (async-nats names them `{first}_{n}`).
    async fn recreated_consumers(&self, stream: &str) -> usize {
        self.stream_details("consumers=true", stream)
            .await
            .iter()
            .flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten())
            .filter(|c| c["name"].as_str().is_some_and(|n| n.contains('_')))
            .count()
    }

    /// Messages the server has sent to its clients (`/varz` `out_msgs`).
    async fn out_msgs(&self) -> u64 {
        self.varz("out_msgs").await
    }

    /// A counter of `/varz` (`out_msgs`, `slow_consumers`).
    async fn varz(&self, field: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/varz", self.monitor);
        let varz: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        varz[field].as_u64().unwrap_or(0)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `SNAPSTREAM_BENCH_PERF_CTL=FIFO`, tells `perf record -D -1 --control
/// fifo:FIFO` (or `perf stat`) to sample only the rounds' bursts (from the
/// first write to the last delivery).
fn perf_control(command: &str) {
    if let Some(fifo) = std::env::var_os("SNAPSTREAM_BENCH_PERF_CTL") {
        if let Err(e) = std::fs::write(&fifo, format!("{command}\n")) {
            eprintln!("perf control {command}: {e}");
        }
    }
}

// ---- rebuilds: the whole log against a compacted one -----------------------

/// Keys, and changes of each, in the logs the rebuilds read.
const REBUILD_KEYS: usize = 1_000;
const REBUILD_PER_KEY: usize = 100;

/// A log holding `REBUILD_PER_KEY` changes of each of `REBUILD_KEYS` keys,
/// compacted or not: the log, its last index, and the messages it holds.
async fn rebuild_log(nats: &Nats, compacted: bool) -> (Log, u64, u64) {
    let client = nats.connect().await;
    let stream = unique(if compacted {
        "BENCH_COMPACTED"
    } else {
        "BENCH_FULL"
    });
    let config = LogConfig::new(stream.as_str(), format!("bench.{}", stream.to_lowercase()))
        .compacted(compacted);
    let log = Log::open(client, &config).await.unwrap();
    let writer = log.writer::<String, _>(JsonCodec);
    let last = futures::stream::iter(0..REBUILD_KEYS * REBUILD_PER_KEY)
        .map(|i| {
            let writer = writer.clone();
            async move {
                writer
                    .put(TOPIC, &format!("k{}", i % REBUILD_KEYS), &i.to_string())
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .fold(0, |last, i| async move { last.max(i) })
        .await;
    let mut stream = log.jetstream().get_stream(log.stream_name()).await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    (log, last, messages)
}

/// A node started without a checkpoint on `log`, until it has applied
/// `last`: how long that took, and the keys its state then holds.
async fn rebuild_once(log: &Log, last: u64) -> (Duration, usize) {
    let started = Instant::now();
    let mut b = Node::builder(log, Kv::default(), JsonCodec);
    b.wildcard_topic(TOPIC);
    let node = b.start().await.unwrap();
    node.wait_for_index(last, PATIENCE).await.unwrap();
    let took = started.elapsed();
    let keys = node.read(|kv, _| kv.0.len()).await;
    assert_eq!(node.stats().gaps, 0, "a rebuild sees no gap");
    node.shutdown().await;
    (took, keys)
}

/// Rebuilds from the whole log and from a compacted one, interleaved,
/// `rounds` times each; prints the table.
async fn rebuild_comparison(nats: &Nats, rounds: usize) {
    let mut logs = Vec::new();
    for compacted in [false, true] {
        logs.push((compacted, rebuild_log(nats, compacted).await));
    }
    let mut took: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, (compacted, (log, last, _))) in logs.iter().enumerate() {
            let (t, keys) = rebuild_once(log, *last).await;
            assert_eq!(keys, REBUILD_KEYS, "the rebuilt state holds every key");
            eprintln!("round {round}: rebuild, compacted {compacted}: {t:?}");
            took[i].push(t);
        }
    }
    println!();
    println!(
        "A node's rebuild (no checkpoint) from a log of {} keys changed {} times each, median of {rounds}:",
        REBUILD_KEYS, REBUILD_PER_KEY
    );
    println!();
    println!("| log | changes written | messages in the stream | rebuild ms |");
    println!("|---|---:|---:|---:|");
    for (i, (compacted, (log, _, messages))) in logs.iter().enumerate() {
        took[i].sort();
        let median = took[i][took[i].len() / 2];
        println!(
            "| {} | {} | {messages} | {:.1} |",
            if *compacted {
                "compacted (`LogConfig::compacted`)"
            } else {
                "every change kept (default)"
            },
            REBUILD_KEYS * REBUILD_PER_KEY,
            median.as_secs_f64() * 1e3
        );
        log.jetstream()
            .delete_stream(log.stream_name())
            .await
            .unwrap();
    }
}

// ---- one round -----------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    deliveries_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// The stream's consumers once every subscriber is ready, before the
    /// burst.
    consumers: usize,
    /// ... and after the last delivery (a consumer recreated meanwhile shows
    /// as a difference only when caught mid-way; the nodes' restart counters
    /// are printed too).
    consumers_after: usize,
    out_msgs: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1_000.0
}

fn outcome(mut latencies: Vec<u64>, elapsed: Duration, consumers: usize, out_msgs: u64) -> Outcome {
    latencies.sort_unstable();
    Outcome {
        deliveries_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        consumers,
        consumers_after: consumers,
        out_msgs,
    }
}

/// The nodes' state: each key's newest value.
#[derive(Default)]
struct Kv(BTreeMap<String, Event<String>>);

impl NodeState<String> for Kv {
    fn apply(&mut self, e: &Event<String>) {
        if let Some(k) = e.subject().as_key() {
            self.0.insert(k.to_string(), e.clone());
        }
    }

    fn snapshot(&self, _topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
        match subject.as_key() {
            Some(k) => self.0.get(k).cloned().into_iter().collect(),
            None => self.0.values().cloned().collect(),
        }
    }

    fn reset(&mut self) {
        self.0.clear();
    }
}

async fn snapstream_round(nats: &Nats, nodes: usize, subs: usize, writes: usize) -> Outcome {
    let client = nats.connect().await;
    let stream = unique("BENCH_LOG");
    let log = Log::open(
        client,
        &LogConfig::new(stream.as_str(), format!("bench.{}", stream.to_lowercase())),
    )
    .await
    .unwrap();
    let writer = log.writer::<String, _>(JsonCodec);
    // A first change, so that no snapshot waits for one.
    let seed = writer.put(TOPIC, "seed", &"0".to_string()).await.unwrap();
    let mut running = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..nodes {
        let mut b = Node::builder(&log, Kv::default(), JsonCodec);
        b.wildcard_topic(TOPIC);
        let node = b.start().await.unwrap();
        let server = node
            .server(JsonCodec)
            .progress_interval(None)
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        servers.push(server);
        running.push(node);
    }
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(subs);
    let mut tasks = Vec::new();
    // Subscriber i on node i % nodes (every node serves some, even at 100
    // subscribers on 3 nodes), one connection per 100 of a node's.
    let groups = (0..nodes).flat_map(|n| {
        let on_node = subs / nodes + usize::from(n < subs % nodes);
        (0..on_node.div_ceil(PER_CONNECTION))
            .map(move |g| (n, PER_CONNECTION.min(on_node - g * PER_CONNECTION)))
    });
    for (node, size) in groups {
        let address = format!("http://{}", servers[node].local_addr());
        // `SNAPSTREAM_BENCH_NET_MUX=0`: one `Subscribe` call per subscriber
        // (default, as the client's: one `Multiplex` call per connection).
        let multiplex = std::env::var("SNAPSTREAM_BENCH_NET_MUX").map_or(true, |v| v != "0");
        let client = Client::builder([address])
            .buffer(256)
            .multiplex(multiplex)
            .build_with::<String, _>(JsonCodec)
            .unwrap();
        for _ in 0..size {
            let mut sub = client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard));
            let ready = ready_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(writes);
                let mut in_snapshot = true;
                while latencies.len() < writes {
                    match sub.next().await.expect("stream").expect("subscriber") {
                        Message::EndOfSnapshot { .. } => {
                            in_snapshot = false;
                            ready.send(()).await.unwrap();
                        }
                        Message::NewSnapshotToFollow => panic!("resnapshot in the bench"),
                        Message::Events(batch) if !in_snapshot => {
                            let at = now_ns();
                            for e in batch.events() {
                                if e.subject().as_key() != Some("seed") {
                                    let sent: u64 = e.payload().parse().unwrap();
                                    latencies.push(at.saturating_sub(sent));
                                }
                            }
                        }
                        Message::Events(_) => {}
                    }
                }
                latencies
            }));
        }
    }
    drop(ready_tx);
    for _ in 0..subs {
        ready_rx
            .recv()
            .await
            .expect("every subscriber gets its snapshot");
    }
    // Every node has applied the seed: its follower is past its start-up
    // replay and on the consumer it keeps (snapshots only wait for the node
    // that serves them).
    for node in &running {
        node.wait_for_index(seed, PATIENCE).await.unwrap();
    }
    let consumers = nats.consumers(log.stream_name()).await;
    let restarts_before: u64 = running.iter().map(|n| n.stats().consumer_restarts).sum();
    let before = nats.out_msgs().await;
    perf_control("enable");
    let started = Instant::now();
    futures::stream::iter(0..writes)
        .map(|k| {
            let writer = writer.clone();
            async move {
                writer
                    .put(TOPIC, &format!("k{}", k % KEYS), &now_ns().to_string())
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let mut latencies = Vec::with_capacity(subs * writes);
    for t in tasks {
        let got = tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap();
        assert_eq!(got.len(), writes, "every subscriber got every change");
        latencies.extend(got);
    }
    let elapsed = started.elapsed();
    perf_control("disable");
    let out = nats.out_msgs().await - before;
    let consumers_after = nats.consumers(log.stream_name()).await;
    let recreated = nats.recreated_consumers(log.stream_name()).await;
    let restarts: u64 = running
        .iter()
        .map(|n| n.stats().consumer_restarts)
        .sum::<u64>()
        - restarts_before;
    if consumers_after != consumers || restarts > 0 || recreated > 0 {
        eprintln!(
            "snapstream {nodes} node(s), {subs} subscribers: {consumers} consumers before the burst, \
             {consumers_after} after ({recreated} recreated by async-nats), {restarts} consumer restarts"
        );
    }
    for s in servers {
        s.shutdown().await.unwrap();
    }
    drop(running);
    log.jetstream()
        .delete_stream(log.stream_name())
        .await
        .unwrap();
    let mut o = outcome(latencies, elapsed, consumers, out);
    o.consumers_after = consumers_after;
    o
}

/// What the KV watchers' NATS clients reported (`event_callback`).
#[derive(Default)]
struct ClientEvents {
    slow_consumer: AtomicU64,
    disconnected: AtomicU64,
    connected: AtomicU64,
    other: AtomicU64,
}

impl ClientEvents {
    fn count(&self, e: &async_nats::Event) {
        let c = match e {
            async_nats::Event::SlowConsumer(_) => &self.slow_consumer,
            async_nats::Event::Disconnected => &self.disconnected,
            async_nats::Event::Connected => &self.connected,
            async_nats::Event::Closed => return,
            _ => {
                eprintln!("KV watcher client: {e}");
                &self.other
            }
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} slow-consumer drops, {} disconnects, {} connects (the first included), {} other events",
            l(&self.slow_consumer),
            l(&self.disconnected),
            l(&self.connected),
            l(&self.other)
        )
    }
}

/// The errors KV watches returned before going on, by kind.
#[derive(Default)]
struct WatchErrors(std::sync::Mutex<BTreeMap<String, u64>>);

impl WatchErrors {
    fn count(&self, e: &async_nats::jetstream::kv::WatcherError) {
        *self.0.lock().unwrap().entry(e.to_string()).or_default() += 1;
    }

    fn summary(&self) -> String {
        let m = self.0.lock().unwrap();
        if m.is_empty() {
            return "none".to_string();
        }
        m.iter()
            .map(|(k, n)| format!("{n}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The KV bucket's history: values kept per key (`kv::Config::history`,
/// whose maximum this is).
///
/// With KV's default history of 1, a put replaces the key's previous value
/// in the stream at once, and a watch's consumer that has not delivered that
/// value yet never does: the watcher gets the key's newest value, not every
/// change. Under a burst to 5,000 watchers the server falls behind and the
/// watchers miss changes (seen on this machine: consumers whose
/// `delivered.consumer_seq` was 190 at `stream_seq` 200, nothing pending,
/// no slow consumer) — whether a round "completed" then depended on how busy
/// the machine was. The snapstream log keeps every change, and each of its
/// subscribers must get all of them; so the bucket keeps every change of a
/// round too (200 writes over [`KEYS`] keys: at most 4 per key), as a user
/// whose watchers must see every change would configure it.
const KV_HISTORY: i64 = 64;

/// How long KV watchers may take to get every change before the round is
/// recorded as failed (at 5,000 watchers they never do: see the README).
const KV_PATIENCE: Duration = Duration::from_secs(60);

/// One KV round, or `None` when a put failed or a watcher did not get every
/// change within [`KV_PATIENCE`].
async fn kv_round(nats: &Nats, subs: usize, writes: usize) -> Option<Outcome> {
    let client = nats.connect().await;
    let js = async_nats::jetstream::new(client);
    let bucket = unique("bench_kv");
    // The bucket's stream as `create_key_value` makes it (async-nats'
    // request carries fields the Debian nats-server 2.9 does not answer in
    // a shape it parses): rollups, direct gets, and a history of
    // [`KV_HISTORY`] values per key — see there.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: KV_HISTORY,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let kv = js.get_key_value(&bucket).await.unwrap();
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(subs);
    let mut tasks = Vec::new();
    let events = Arc::new(ClientEvents::default());
    let received = Arc::new(AtomicU64::new(0));
    let per_watcher: Arc<Vec<AtomicU64>> = Arc::new((0..subs).map(|_| AtomicU64::new(0)).collect());
    let watch_errors = Arc::new(WatchErrors::default());
    let slow_before = nats.varz("slow_consumers").await;
    for group in 0..subs.div_ceil(PER_CONNECTION) {
        let conn = nats
            .connect_with(|| {
                let events = events.clone();
                async_nats::ConnectOptions::new().event_callback(move |e| {
                    let events = events.clone();
                    async move { events.count(&e) }
                })
            })
            .await;
        let bucket_kv = async_nats::jetstream::new(conn)
            .get_key_value(&bucket)
            .await
            .unwrap();
        for _ in 0..PER_CONNECTION.min(subs - group * PER_CONNECTION) {
            let kv = bucket_kv.clone();
            let ready = ready_tx.clone();
            let received = received.clone();
            let per_watcher = per_watcher.clone();
            let me = tasks.len();
            let watch_errors = watch_errors.clone();
            tasks.push(tokio::spawn(async move {
                let mut watch = kv.watch_all().await.unwrap();
                ready.send(()).await.unwrap();
                let mut latencies = Vec::with_capacity(writes);
                while latencies.len() < writes {
                    let entry = match watch.next().await.expect("watch ended") {
                        Ok(entry) => entry,
                        // Transient: the watch's ordered consumer recreates
                        // itself from the last change it delivered (a missed
                        // idle heartbeat, a recreation that failed once).
                        Err(e) => {
                            watch_errors.count(&e);
                            continue;
                        }
                    };
                    let at = now_ns();
                    received.fetch_add(1, Ordering::Relaxed);
                    per_watcher[me].fetch_add(1, Ordering::Relaxed);
                    let sent: u64 = std::str::from_utf8(&entry.value).unwrap().parse().unwrap();
                    latencies.push(at.saturating_sub(sent));
                }
                latencies
            }));
        }
    }
    drop(ready_tx);
    for _ in 0..subs {
        ready_rx.recv().await.expect("every watcher starts");
    }
    let consumers = nats.consumers(&format!("KV_{bucket}")).await;
    let before = nats.out_msgs().await;
    perf_control("enable");
    let started = Instant::now();
    let kv = Arc::new(kv);
    let puts: Vec<Result<(), String>> = futures::stream::iter(0..writes)
        .map(|k| {
            let kv = kv.clone();
            async move {
                kv.put(format!("k{}", k % KEYS), now_ns().to_string().into())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let puts_ok = puts.iter().all(Result::is_ok);
    let mut latencies = Vec::with_capacity(subs * writes);
    let deadline = tokio::time::Instant::now() + KV_PATIENCE;
    let mut complete = puts_ok;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(got)) if complete => {
                assert_eq!(got.len(), writes, "every watcher got every change");
                latencies.extend(got);
            }
            _ => {
                abort.abort();
                complete = false;
            }
        }
    }
    let elapsed = started.elapsed();
    perf_control("disable");
    let out = nats.out_msgs().await - before;
    let slow = nats.varz("slow_consumers").await - slow_before;
    if !complete {
        let counts: Vec<u64> = per_watcher
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let short = counts.iter().filter(|&&c| c < writes as u64).count();
        let mut hist: BTreeMap<u64, usize> = BTreeMap::new();
        for &c in &counts {
            *hist.entry(c / 20 * 20).or_default() += 1;
        }
        eprintln!(
            "KV diagnosis: {short} watchers short; received (bucket of 20 → watchers): {hist:?}"
        );
        let url = format!(
            "http://127.0.0.1:{}/jsz?consumers=true&config=true",
            nats.monitor
        );
        let jsz: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
        let mut delivered: BTreeMap<u64, usize> = BTreeMap::new();
        let (mut recreated, mut total, mut waiting) = (0, 0, 0);
        for a in jsz["account_details"].as_array().into_iter().flatten() {
            for st in a["stream_detail"].as_array().into_iter().flatten() {
                if st["name"] != format!("KV_{bucket}").as_str() {
                    continue;
                }
                for c in st["consumer_detail"].as_array().into_iter().flatten() {
                    total += 1;
                    if c["name"].as_str().is_some_and(|n| n.contains('_')) {
                        recreated += 1;
                    }
                    *pending
                        .entry(c["num_pending"].as_u64().unwrap_or(0) / 20 * 20)
                        .or_default() += 1;
                    *delivered
                        .entry(c["delivered"]["consumer_seq"].as_u64().unwrap_or(0) / 20 * 20)
                        .or_default() += 1;
                    waiting += c["num_waiting"].as_u64().unwrap_or(0);
                    if total == 1 {
                        eprintln!("KV diagnosis: a consumer: {c}");
                    }
                }
            }
        }
        eprintln!("KV diagnosis: server: {total} consumers, {recreated} recreated; num_pending buckets {pending:?}; delivered consumer_seq buckets {delivered:?}; waiting {waiting}");
    }
    let _ = js.delete_key_value(&bucket).await;
    eprintln!(
        "NATS KV watch, {subs} watchers: {} of {} changes received; puts failed: {}; \
         server slow consumers: {slow}; watcher clients: {}; watch errors (went on): {}",
        received.load(Ordering::Relaxed),
        subs * writes,
        puts.iter().filter(|r| r.is_err()).count(),
        events.summary(),
        watch_errors.summary()
    );
    if !complete {
        eprintln!(
            "NATS KV watch, {subs} watchers: FAILED ({})",
            if puts_ok {
                format!("not every watcher got every change within {KV_PATIENCE:?}")
            } else {
                format!(
                    "a put was not acknowledged: {}",
                    puts.iter().find_map(|r| r.as_ref().err()).unwrap()
                )
            }
        );
        return None;
    }
    Some(outcome(latencies, elapsed, consumers, out))
}

// ---- the table -------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn medians(v: &[Outcome]) -> Outcome {
    Outcome {
        deliveries_per_s: median(v.iter().map(|o| o.deliveries_per_s).collect()),
        p50_us: median(v.iter().map(|o| o.p50_us).collect()),
        p99_us: median(v.iter().map(|o| o.p99_us).collect()),
        consumers: v.iter().map(|o| o.consumers).max().unwrap_or(0),
        consumers_after: v.iter().map(|o| o.consumers_after).max().unwrap_or(0),
        out_msgs: median(v.iter().map(|o| o.out_msgs as f64).collect()) as u64,
    }
}

fn main() {
    let s = sizes();
    let Some(nats) = Nats::start() else {
        eprintln!("notice: no nats-server (set NATS_SERVER_BIN, or install nats-server); cluster bench skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "cluster bench: {} changes per round (burst, {IN_FLIGHT} puts in flight), {} interleaved round(s), medians; load average at start: {}",
        s.writes,
        s.rounds,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let mut snap: BTreeMap<(usize, usize), Vec<Outcome>> = BTreeMap::new();
    let mut kv: BTreeMap<usize, Vec<Option<Outcome>>> = BTreeMap::new();
    rt.block_on(async {
        for round in 0..s.rounds {
            for &(nodes, subs) in &s.scenarios {
                if runs("snapstream") {
                    let o = snapstream_round(&nats, nodes, subs, s.writes).await;
                    eprintln!(
                        "round {round}: snapstream {nodes} node(s), {subs} subscribers: {o:?}"
                    );
                    snap.entry((nodes, subs)).or_default().push(o);
                }
                // One KV run per subscriber count and round (nodes play no
                // part there), next to the first snapstream run of that count.
                if runs("kv") && kv.get(&subs).is_none_or(|v| v.len() <= round) {
                    let o = kv_round(&nats, subs, s.writes).await;
                    eprintln!("round {round}: NATS KV watch, {subs} watchers: {o:?}");
                    kv.entry(subs).or_default().push(o);
                }
            }
        }
    });
    println!();
    println!("| nodes | subscribers | snapstream deliveries/s | KV watch deliveries/s | ratio | p50 / p99 ms snapstream | p50 / p99 ms KV watch | NATS consumers snapstream / KV | NATS msgs sent snapstream / KV |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut consumers_ok = true;
    let mut target_row = None;
    for (&subs, v) in &kv {
        if !snap.keys().any(|&(_, s)| s == subs) {
            let done: Vec<Outcome> = v.iter().flatten().copied().collect();
            if done.len() < v.len() {
                println!("| – | {subs} | – | FAILED | – | – | – | – / {subs} | – / – |");
            } else {
                let b = medians(&done);
                println!(
                    "| – | {subs} | – | {:.0} | – | – | {:.1} / {:.1} | – / {} | – / {} |",
                    b.deliveries_per_s,
                    b.p50_us / 1e3,
                    b.p99_us / 1e3,
                    b.consumers,
                    b.out_msgs
                );
            }
        }
    }
    for (&(nodes, subs), outcomes) in &snap {
        let a = medians(outcomes);
        let every = |f: fn(&Outcome) -> usize| outcomes.iter().all(|o| f(o) == nodes);
        consumers_ok &= every(|o| o.consumers) && every(|o| o.consumers_after);
        let Some(kv_runs) = kv.get(&subs) else {
            println!(
                "| {nodes} | {subs} | {:.0} | not run | – | {:.1} / {:.1} | – | {} / – | {} / – |",
                a.deliveries_per_s,
                a.p50_us / 1e3,
                a.p99_us / 1e3,
                a.consumers,
                a.out_msgs
            );
            continue;
        };
        let done: Vec<Outcome> = kv_runs.iter().flatten().copied().collect();
        if done.len() < kv_runs.len() {
            // A failed KV round fails the case for KV.
            println!(
                "| {nodes} | {subs} | {:.0} | FAILED | – | {:.1} / {:.1} | – | {} / {subs} | {} / – |",
                a.deliveries_per_s,
                a.p50_us / 1e3,
                a.p99_us / 1e3,
                a.consumers,
                a.out_msgs
            );
            if (nodes, subs) == (3, 5_000) {
                target_row = Some((f64::INFINITY, a.p99_us, f64::INFINITY));
            }
            continue;
        }
        let b = medians(&done);
        let ratio = a.deliveries_per_s / b.deliveries_per_s;
        if (nodes, subs) == (3, 5_000) {
            target_row = Some((ratio, a.p99_us, b.p99_us));
        }
        println!(
            "| {nodes} | {subs} | {:.0} | {:.0} | **{ratio:.1}×** | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {} / {} |",
            a.deliveries_per_s,
            b.deliveries_per_s,
            a.p50_us / 1e3,
            a.p99_us / 1e3,
            b.p50_us / 1e3,
            b.p99_us / 1e3,
            a.consumers,
            b.consumers,
            a.out_msgs,
            b.out_msgs
        );
    }
    println!();
    println!(
        "target: NATS serves one consumer per node whatever the subscriber count: {}",
        if consumers_ok { "met" } else { "NOT met" }
    );
    match target_row {
        Some((ratio, p99, kv_p99)) => {
            println!(
                "target: 5,000 subscribers on 3 nodes, snapstream ≥ 5× the deliveries/s of KV watchers: {} ({ratio:.1}×)",
                if ratio >= 5.0 { "met" } else { "NOT met" }
            );
            println!(
                "target: ... at p99 ≤ theirs: {} ({:.1} ms vs {:.1} ms)",
                if p99 <= kv_p99 { "met" } else { "NOT met" },
                p99 / 1e3,
                kv_p99 / 1e3
            );
        }
        None if s.quick => println!("quick mode: checks only (every subscriber got every change)"),
        None => println!("target row (3 nodes, 5,000 subscribers) not run"),
    }
    if s.rebuild && runs("snapstream") {
        rt.block_on(rebuild_comparison(&nats, s.rounds.max(3)));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
