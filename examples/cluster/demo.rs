//! The cluster demo's engine (`examples/cluster`): several nodes fed from
//! one NATS JetStream log, remote clients spread over them, one node killed
//! mid-run, every view checked key by key against the writer's state.
//! Included by `tests/demo_cluster.rs`, so the test runs exactly this code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use snapstream::cluster::{JsonCodec, Log, LogConfig, LogWriter, Node, NodeState, WriteError};
use snapstream::event::{Event, Message, Subject, Topic};
use snapstream::net::{Client, RemoteRequest, RemoteSubscriber, Server};
use tokio::sync::watch;

/// The topic every change goes to.
const TOPIC: &str = "demo";
/// Bound on the waits that must succeed (a hang ends the run with an error).
const PATIENCE: Duration = Duration::from_secs(60);

/// Several snapstream nodes fed from one NATS JetStream log: remote clients
/// spread over them, one node killed mid-run, every view checked.
#[derive(Parser, Debug, Clone)]
#[command(name = "cluster")]
pub struct Config {
    /// Nodes to run (2 to 9).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=9))]
    pub nodes: u16,
    /// Remote clients started on each node (each is given every node's
    /// address, its own first).
    #[arg(long, default_value_t = 4)]
    pub clients_per_node: usize,
    /// Changes the writer puts into the log.
    #[arg(long, default_value_t = 2_000)]
    pub changes: usize,
    /// Keys the changes are spread over.
    #[arg(long, default_value_t = 64)]
    pub keys: usize,
    /// A short run (200 changes, 2 clients per node), for tests.
    #[arg(long)]
    pub quick: bool,
    /// The NATS server (default: $NATS_URL, else nats://127.0.0.1:4222).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Corrupt one view before the check (shows that the check can fail).
    #[arg(long)]
    pub break_a_view: bool,
}

impl Config {
    fn url(&self) -> String {
        self.nats_url
            .clone()
            .or_else(|| std::env::var("NATS_URL").ok())
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
    }

    fn changes(&self) -> usize {
        if self.quick {
            200
        } else {
            self.changes.max(2)
        }
    }

    fn clients_per_node(&self) -> usize {
        if self.quick {
            2
        } else {
            self.clients_per_node.max(1)
        }
    }
}

/// key → (index of its last change, value).
type KeyValues = BTreeMap<String, (u64, String)>;

/// A node's state: each key's newest value and the index that set it.
#[derive(Default)]
struct Kv(KeyValues);

impl NodeState<String> for Kv {
    fn apply(&mut self, e: &Event<String>) {
        if let Some(k) = e.subject().as_key() {
            self.0
                .insert(k.to_string(), (e.index(), e.payload().clone()));
        }
    }

    fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
        self.0
            .iter()
            .filter(|(k, _)| subject.is_wildcard() || subject.as_key() == Some(k.as_str()))
            .map(|(k, (i, v))| Event::new(topic.clone(), k.as_str(), *i, v.clone()))
            .collect()
    }

    fn reset(&mut self) {
        self.0.clear();
    }
}

/// One node's line of the table.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub killed: bool,
    /// Stream sequence applied (at its death for the killed node).
    pub applied: u64,
    /// Remote subscribers on its server before the kill, and at the end.
    pub subscribers: (usize, usize),
}

/// One client's line of the table.
#[derive(Debug, Clone)]
pub struct ClientRow {
    pub name: String,
    pub started_on: String,
    pub reconnects: u64,
    /// Events applied to the view (snapshot and live).
    pub events: u64,
    /// Snapshots received (1: no new snapshot after a failover).
    pub snapshots: u64,
    /// Live events at or below an index already applied (must be 0).
    pub duplicates: u64,
    /// Keys whose (index, value) differ from the writer's state.
    pub mismatched: usize,
}

impl ClientRow {
    pub fn failed_over(&self) -> bool {
        self.reconnects > 0
    }

    pub fn converged(&self) -> bool {
        self.mismatched == 0 && self.duplicates == 0
    }
}

/// What the run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub nodes: Vec<NodeRow>,
    pub clients: Vec<ClientRow>,
    pub changes: usize,
    pub last_index: u64,
    pub killed: String,
    pub elapsed: Duration,
}

impl Report {
    /// Every view converged, and every client of the killed node failed over.
    pub fn ok(&self) -> bool {
        self.all_converged() && self.killed_clients_failed_over()
    }

    pub fn all_converged(&self) -> bool {
        self.clients.iter().all(ClientRow::converged)
    }

    pub fn killed_clients_failed_over(&self) -> bool {
        self.clients
            .iter()
            .filter(|c| c.started_on == self.killed)
            .all(ClientRow::failed_over)
    }

    /// The table and the verdict.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} changes written (last index {}), {} killed mid-run, {:.1} s",
            self.changes,
            self.last_index,
            self.killed,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "node  state   events applied  subscribers before -> after"
        );
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "{:<5} {:<7} {:>14}  {:>18} -> {}",
                n.name,
                if n.killed { "killed" } else { "up" },
                n.applied,
                n.subscribers.0,
                n.subscribers.1
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "client  started on  failed over  reconnects  events  snapshots  duplicates  converged"
        );
        for c in &self.clients {
            let _ = writeln!(
                s,
                "{:<7} {:<11} {:<12} {:>10} {:>7} {:>10} {:>11}  {}",
                c.name,
                c.started_on,
                if c.failed_over() { "yes" } else { "no" },
                c.reconnects,
                c.events,
                c.snapshots,
                c.duplicates,
                if c.converged() {
                    "yes".to_string()
                } else {
                    format!("NO ({} keys differ)", c.mismatched)
                }
            );
        }
        let converged = self.clients.iter().filter(|c| c.converged()).count();
        let moved = self.clients.iter().filter(|c| c.failed_over()).count();
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "every view converged: {} ({converged}/{} checked key by key against the writer's state)",
            if self.all_converged() { "yes" } else { "no" },
            self.clients.len()
        );
        let _ = writeln!(
            s,
            "clients failed over: {moved} (every client of {}: {})",
            self.killed,
            if self.killed_clients_failed_over() {
                "yes"
            } else {
                "no"
            }
        );
        let _ = write!(
            s,
            "verdict: {}",
            if self.ok() {
                "OK"
            } else {
                "FAILED (see the rows above)"
            }
        );
        s
    }
}

/// A remote view's result (with its subscriber, still open).
struct ViewResult {
    sub: RemoteSubscriber<String>,
    data: KeyValues,
    events: u64,
    snapshots: u64,
    duplicates: u64,
    reconnects: u64,
}

/// Follows a wildcard subscription until its view is complete up to the
/// target index (set once the writer is done).
async fn follow(
    client: Client<String, JsonCodec>,
    mut target: watch::Receiver<u64>,
) -> Result<ViewResult, String> {
    let mut r = ViewResult {
        sub: client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard)),
        data: KeyValues::new(),
        events: 0,
        snapshots: 0,
        duplicates: 0,
        reconnects: 0,
    };
    let (mut in_snapshot, mut last) = (true, 0u64);
    loop {
        if !in_snapshot && last >= *target.borrow() {
            r.reconnects = r.sub.reconnects();
            return Ok(r);
        }
        let msg = tokio::select! {
            m = r.sub.next() => m,
            _ = target.changed() => continue,
        };
        match msg {
            None => return Err("remote stream ended".into()),
            Some(Err(e)) => return Err(format!("remote subscriber failed: {e}")),
            Some(Ok(Message::NewSnapshotToFollow)) => {
                r.data.clear();
                in_snapshot = true;
            }
            Some(Ok(Message::EndOfSnapshot { index })) => {
                in_snapshot = false;
                last = index;
                r.snapshots += 1;
            }
            Some(Ok(Message::Events(batch))) => {
                for e in batch.events() {
                    r.events += 1;
                    if !in_snapshot && e.index() <= last {
                        r.duplicates += 1;
                    }
                    let key = e.subject().as_key().unwrap_or_default().to_string();
                    r.data.insert(key, (e.index(), e.payload().clone()));
                }
                if !in_snapshot {
                    last = last.max(batch.index());
                }
            }
        }
    }
}

/// Puts change `k` (of key `k % keys`), noting it in the writer's state.
async fn put(
    writer: &LogWriter<String, JsonCodec>,
    keys: usize,
    k: usize,
    state: &mut KeyValues,
) -> Result<u64, WriteError> {
    let key = format!("key-{:03}", k % keys);
    let value = format!("v{k}");
    let index = writer.put(TOPIC, &key, &value).await?;
    state.insert(key, (index, value));
    Ok(index)
}

fn unique_stream() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("DEMO_CLUSTER_{}_{nanos}", std::process::id())
}

/// Runs the demo.
///
/// # Errors
///
/// When NATS does not answer, or a node, server or view fails.
pub async fn run(config: Config) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    let started = Instant::now();
    let url = config.url();
    let nats = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&url))
        .await
        .map_err(|_| format!("NATS at {url} does not answer"))??;
    let stream = unique_stream();
    let log = Log::open(
        nats,
        &LogConfig::new(stream.as_str(), format!("demo.{}", stream.to_lowercase())),
    )
    .await?;
    let result = run_on(&config, &log, started).await;
    log.jetstream().delete_stream(log.stream_name()).await?;
    result
}

async fn run_on(
    config: &Config,
    log: &Log,
    started: Instant,
) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    let writer = log.writer::<String, _>(JsonCodec);
    let keys = config.keys.max(1);
    let mut state = KeyValues::new();
    // A first change, so that no snapshot waits for one.
    let mut last = put(&writer, keys, 0, &mut state).await?;

    let n = usize::from(config.nodes);
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        let mut b = Node::builder(log, Kv::default(), JsonCodec);
        // Keep snapshot chains for the whole run: a client failing over
        // resumes on a node that still holds its index, without a snapshot.
        b.wildcard_topic(TOPIC)
            .snapshot_cache_ttl(Duration::from_secs(600));
        let node = b.start().await?;
        let server = node
            .server(JsonCodec)
            .bind("127.0.0.1:0".parse().expect("address"))
            .await?;
        nodes.push(Some(node));
        servers.push(Some(server));
    }
    let addresses: Vec<String> = servers
        .iter()
        .map(|s| format!("http://{}", s.as_ref().expect("up").local_addr()))
        .collect();

    let (target_tx, target_rx) = watch::channel(u64::MAX);
    let mut views = Vec::new();
    for i in 0..n {
        for _ in 0..config.clients_per_node() {
            let rotated: Vec<String> = (0..n).map(|j| addresses[(i + j) % n].clone()).collect();
            let client = Client::builder(rotated)
                .backoff(Duration::from_millis(10), Duration::from_millis(200))
                .build_with::<String, _>(JsonCodec)?;
            let name = format!("c{}", views.len());
            views.push((
                name,
                format!("n{i}"),
                tokio::spawn(follow(client, target_rx.clone())),
            ));
        }
    }
    // Every client is connected before the writes begin.
    let per_node = config.clients_per_node();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let open: usize = servers
                .iter()
                .map(|s| s.as_ref().map_or(0, Server::active_streams))
                .sum();
            if open >= n * per_node {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| "the clients did not all connect")?;
    let before: Vec<usize> = servers
        .iter()
        .map(|s| s.as_ref().map_or(0, Server::active_streams))
        .collect();

    let changes = config.changes();
    let victim = 0;
    let mut killed_applied = 0;
    for k in 1..changes {
        if k == changes / 2 {
            // Kill node n0: its server goes away and its follower stops.
            if let Some(server) = servers[victim].take() {
                server.shutdown().await?;
            }
            if let Some(node) = nodes[victim].take() {
                killed_applied = node.applied();
                drop(node);
            }
        }
        last = put(&writer, keys, k, &mut state).await?;
    }
    target_tx.send_replace(last);

    let mut clients = Vec::new();
    let mut open = Vec::new();
    for (c, (name, started_on, task)) in views.into_iter().enumerate() {
        let mut r = tokio::time::timeout(PATIENCE, task)
            .await
            .map_err(|_| format!("{name} did not converge in time"))???;
        if config.break_a_view && c == 0 {
            if let Some((_, v)) = r.data.iter_mut().next() {
                v.1.push_str("-broken");
            }
        }
        let mut mismatched = state
            .iter()
            .filter(|(k, v)| r.data.get(*k) != Some(v))
            .count();
        mismatched += r.data.keys().filter(|k| !state.contains_key(*k)).count();
        open.push(r.sub);
        clients.push(ClientRow {
            name,
            started_on,
            reconnects: r.reconnects,
            events: r.events,
            snapshots: r.snapshots,
            duplicates: r.duplicates,
            mismatched,
        });
    }
    let mut rows = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let after = servers[i].as_ref().map_or(0, Server::active_streams);
        rows.push(NodeRow {
            name: format!("n{i}"),
            killed: node.is_none(),
            applied: match node {
                Some(node) => {
                    node.wait_for_index(last, PATIENCE).await?;
                    node.stats().applied
                }
                None => killed_applied,
            },
            subscribers: (before[i], after),
        });
    }
    drop(open);
    for server in servers.into_iter().flatten() {
        server.shutdown().await?;
    }
    Ok(Report {
        nodes: rows,
        clients,
        changes,
        last_index: last,
        killed: format!("n{victim}"),
        elapsed: started.elapsed(),
    })
}
