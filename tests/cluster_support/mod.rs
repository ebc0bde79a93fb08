//! Shared by the `cluster_*` integration tests: where NATS is, unique stream
//! names, a key-value node state (optionally "durable" and gated), a model of
//! what the writer got acknowledged, and a subscriber-side view.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use snapstream::cluster::{JsonCodec, Log, LogConfig, LogWriter, Node, NodeState};
use snapstream::event::{Event, Message, Subject, Topic};
use snapstream::publisher::{BoxError, Subscription, SubscriptionError};

/// Generous bound for waits that must succeed (a hang fails the test
/// instead of blocking it forever); never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The `nats-server` binary for tests that start their own servers:
/// `NATS_SERVER_BIN`, or Debian's and the usual install paths.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return Some(p.into());
    }
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `NATS_URL`, or the local server if one answers; `None` (after a printed
/// notice) when neither is there, so the caller skips.
pub async fn url() -> Option<String> {
    if let Ok(url) = std::env::var("NATS_URL") {
        return Some(url);
    }
    if tokio::net::TcpStream::connect("127.0.0.1:4222")
        .await
        .is_ok()
    {
        return Some("nats://127.0.0.1:4222".into());
    }
    eprintln!("notice: NATS_URL is unset and nothing answers at 127.0.0.1:4222; skipping");
    None
}

/// A stream name unique to this test, process and moment.
pub fn unique_stream(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "TEST_{}_{}_{nanos}",
        test.to_uppercase(),
        std::process::id()
    )
}

/// Opens a fresh log for `test`; `None` when NATS is not there.
pub async fn open_log(test: &str) -> Option<(async_nats::Client, Log)> {
    open_log_with(test, |c| c).await
}

/// As [`open_log`], with `configure` applied to the log's config.
pub async fn open_log_with(
    test: &str,
    configure: impl FnOnce(LogConfig) -> LogConfig,
) -> Option<(async_nats::Client, Log)> {
    let url = url().await?;
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let stream = unique_stream(test);
    let prefix = format!("snapstream-test.{}", stream.to_lowercase());
    let log = Log::open(client.clone(), &configure(LogConfig::new(stream, prefix)))
        .await
        .expect("open log");
    Some((client, log))
}

/// Deletes the log's stream (end of a test).
pub async fn delete_log(log: &Log) {
    log.jetstream()
        .delete_stream(log.stream_name())
        .await
        .expect("delete stream");
}

/// key → (index of its last change, value).
pub type KeyValues = BTreeMap<String, (u64, String)>;

/// What the writer got acknowledged: (index, topic, key, value), in order.
#[derive(Default, Clone, Debug)]
pub struct Model {
    pub changes: Vec<(u64, String, String, String)>,
}

impl Model {
    pub async fn put(
        &mut self,
        w: &LogWriter<String, JsonCodec>,
        topic: &str,
        key: &str,
        value: &str,
    ) -> u64 {
        let index = w
            .put(topic, key, &value.to_string())
            .await
            .expect("put acknowledged");
        if let Some(last) = self.changes.last() {
            assert!(index > last.0, "acknowledged indexes increase");
        }
        self.changes
            .push((index, topic.into(), key.into(), value.into()));
        index
    }

    pub fn last(&self) -> u64 {
        self.changes.last().map_or(0, |c| c.0)
    }

    /// key → (index of its last change, value) in `topic` up to `index`.
    pub fn at(&self, topic: &str, index: u64) -> BTreeMap<String, (u64, String)> {
        let mut m = BTreeMap::new();
        for (i, t, k, v) in &self.changes {
            if *i <= index && t == topic {
                m.insert(k.clone(), (*i, v.clone()));
            }
        }
        m
    }

    /// The changes of `topic` after `index`, in order.
    pub fn after(&self, topic: &str, index: u64) -> Vec<(u64, String, String)> {
        self.changes
            .iter()
            .filter(|(i, t, _, _)| *i > index && t == topic)
            .map(|(i, _, k, v)| (*i, k.clone(), v.clone()))
            .collect()
    }
}

/// A gate the state's `apply` blocks on for indexes at or above a threshold.
#[derive(Default)]
pub struct Gate {
    /// `Some(i)`: apply of index ≥ i blocks.
    closed_from: Mutex<Option<u64>>,
    cv: Condvar,
}

impl Gate {
    pub fn close_from(&self, index: u64) {
        *self.closed_from.lock().unwrap() = Some(index);
    }

    pub fn open(&self) {
        *self.closed_from.lock().unwrap() = None;
        self.cv.notify_all();
    }

    fn pass(&self, index: u64) {
        let mut g = self.closed_from.lock().unwrap();
        while matches!(*g, Some(from) if index >= from) {
            g = self.cv.wait(g).unwrap();
        }
    }
}

/// What a "durable" state survives a restart with.
#[derive(Default, Clone, Debug)]
pub struct Disk {
    pub data: BTreeMap<(Topic, String), (u64, String)>,
    pub persisted_at: u64,
    /// Every index ever applied, in order (across restarts).
    pub applied: Vec<u64>,
}

/// A key-value node state: each key's newest value and the index that set it.
#[derive(Default)]
pub struct Kv {
    pub data: BTreeMap<(Topic, String), (u64, String)>,
    /// Every index applied by this instance (and, when restored, before).
    pub applied: Vec<u64>,
    pub resets: usize,
    pub disk: Option<Arc<Mutex<Disk>>>,
    pub gate: Option<Arc<Gate>>,
}

impl Kv {
    /// A state restored from (and persisting to) `disk`.
    pub fn durable(disk: Arc<Mutex<Disk>>) -> Self {
        let d = disk.lock().unwrap().clone();
        Self {
            data: d.data,
            applied: d.applied,
            disk: Some(disk),
            ..Default::default()
        }
    }

    pub fn gated(gate: Arc<Gate>) -> Self {
        Self {
            gate: Some(gate),
            ..Default::default()
        }
    }

    /// key → (index, value) of `topic`.
    pub fn topic(&self, topic: &str) -> BTreeMap<String, (u64, String)> {
        self.data
            .iter()
            .filter(|((t, _), _)| t.as_str() == topic)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl NodeState<String> for Kv {
    fn apply(&mut self, event: &Event<String>) {
        if let Some(gate) = &self.gate {
            // The follower runs on a multi-thread runtime: let its other
            // tasks move while this apply waits.
            tokio::task::block_in_place(|| gate.pass(event.index()));
        }
        let key = event.subject().as_key().expect("a key").to_string();
        self.data.insert(
            (event.topic().clone(), key),
            (event.index(), event.payload().clone()),
        );
        self.applied.push(event.index());
    }

    fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
        self.data
            .iter()
            .filter(|((t, k), _)| {
                t == topic && (subject.is_wildcard() || subject.as_key() == Some(k))
            })
            .map(|((t, k), (i, v))| Event::new(t.clone(), k.as_str(), *i, v.clone()))
            .collect()
    }

    fn reset(&mut self) {
        self.data.clear();
        self.resets += 1;
    }

    fn persist(&mut self, index: u64) -> Result<(), BoxError> {
        if let Some(disk) = &self.disk {
            let mut d = disk.lock().unwrap();
            d.data = self.data.clone();
            d.applied = self.applied.clone();
            d.persisted_at = index;
        }
        Ok(())
    }
}

/// Starts a node on `log` serving `services` (wildcards on) with the
/// durable state `disk` and a checkpoint file.
pub async fn start_durable(
    log: &Log,
    disk: &Arc<Mutex<Disk>>,
    checkpoint: &std::path::Path,
) -> Node<String, Kv> {
    let mut b = Node::builder(log, Kv::durable(disk.clone()), JsonCodec);
    b.wildcard_topic("services").checkpoint(checkpoint);
    b.start().await.unwrap()
}

/// A subscriber's materialized view of one topic (wildcard subscription).
#[derive(Default, Debug)]
pub struct View {
    pub data: BTreeMap<String, (u64, String)>,
    /// (snapshot index, snapshot content) for each snapshot received.
    pub snapshots: Vec<(u64, KeyValues)>,
    /// Live events after the latest snapshot: (index, key, value).
    pub live: Vec<(u64, String, String)>,
    in_snapshot: bool,
    pub last_index: u64,
}

impl View {
    /// A view of a fresh subscription (it starts inside a snapshot).
    pub fn fresh() -> Self {
        Self {
            in_snapshot: true,
            ..Default::default()
        }
    }

    /// A view resumed at `index` holding `data`.
    pub fn resumed(data: BTreeMap<String, (u64, String)>, index: u64) -> Self {
        Self {
            data,
            last_index: index,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, msg: Message<String>) {
        match msg {
            Message::NewSnapshotToFollow => {
                self.data.clear();
                self.live.clear();
                self.in_snapshot = true;
            }
            Message::EndOfSnapshot { index } => {
                assert!(self.in_snapshot, "EndOfSnapshot outside a snapshot");
                self.in_snapshot = false;
                self.last_index = index;
                self.snapshots.push((index, self.data.clone()));
            }
            Message::Events(batch) => {
                for e in batch.events() {
                    let key = e.subject().as_key().unwrap().to_string();
                    if !self.in_snapshot {
                        assert!(
                            e.index() > self.last_index,
                            "live index {} after {}",
                            e.index(),
                            self.last_index
                        );
                        self.live
                            .push((e.index(), key.clone(), e.payload().clone()));
                    }
                    self.data.insert(key, (e.index(), e.payload().clone()));
                }
                if !self.in_snapshot {
                    self.last_index = batch.index();
                }
            }
        }
    }

    /// Whether the view is complete up to `index` (outside a snapshot).
    pub fn complete_to(&self, index: u64) -> bool {
        !self.in_snapshot && self.last_index >= index
    }

    /// Reads `sub` until the view is complete up to `index`.
    pub async fn follow_to(
        &mut self,
        sub: &mut Subscription<String>,
        index: u64,
    ) -> Result<(), SubscriptionError> {
        while self.in_snapshot || self.last_index < index {
            let msg = tokio::time::timeout(PATIENCE, sub.next())
                .await
                .expect("subscription stalled")?;
            self.apply(msg);
        }
        Ok(())
    }
}
