//! `kill -9` of cluster processes. The test binary re-executes itself as a
//! child (`child_process`, selected by an environment variable) playing a
//! node or the writer, and SIGKILLs it mid-run:
//!
//! - a node process killed and restarted catches up from its on-disk
//!   checkpoint (no rebuild); its remote subscribers fail over to the other
//!   node and back, with nothing lost or doubled;
//! - the writer process killed while a put is in flight: every change it
//!   reported acknowledged is in every view; the one in flight is in every
//!   view or in none — identically on every node.

mod cluster_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cluster_support::{
    delete_log, free_port, nats_server_binary, open_log, Kv, Model, View, PATIENCE,
};
use futures::StreamExt;
use snapstream::cluster::{JsonCodec, Log, LogConfig, LogWriter, Node, NodeState};
use snapstream::event::{Event, Message, Subject, Topic};
use snapstream::net::{Client, RemoteRequest, RemoteSubscriber, Server};
use snapstream::publisher::BoxError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const TOPIC: &str = "t";
const ROLE: &str = "SNAPSTREAM_KILL_CHILD";
/// The NATS connection name of a child (the writer test waits for the
/// server to drop it).
const WRITER_NAME: &str = "snapstream-killed-child";

// ---- the child ---------------------------------------------------------

/// A node state kept in a file: restored at start, written on persist
/// (write, sync, rename), so a SIGKILLed node resumes from its checkpoint.
#[derive(Default)]
struct FileKv {
    path: PathBuf,
    data: BTreeMap<String, (u64, String)>,
}

impl FileKv {
    fn open(path: PathBuf) -> Self {
        let data = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).expect("state file decodes"),
            Err(_) => BTreeMap::new(),
        };
        Self { path, data }
    }
}

impl NodeState<String> for FileKv {
    fn apply(&mut self, e: &Event<String>) {
        let key = e.subject().as_key().expect("a key").to_string();
        self.data.insert(key, (e.index(), e.payload().clone()));
    }

    fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
        self.data
            .iter()
            .filter(|(k, _)| subject.is_wildcard() || subject.as_key() == Some(k.as_str()))
            .map(|(k, (i, v))| Event::new(topic.clone(), k.as_str(), *i, v.clone()))
            .collect()
    }

    fn reset(&mut self) {
        self.data.clear();
    }

    fn persist(&mut self, _index: u64) -> Result<(), BoxError> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec(&self.data)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} set for the child"))
}

async fn child_log() -> Log {
    let client = async_nats::ConnectOptions::new()
        .name(WRITER_NAME)
        .connect(var("KILL_URL"))
        .await
        .unwrap();
    Log::open(
        client,
        &LogConfig::new(var("KILL_STREAM"), var("KILL_PREFIX")),
    )
    .await
    .unwrap()
}

/// A node with a file state, a checkpoint and a server on a fixed port.
/// Prints `CHILD ready <applied at start>`; answers `wait <i>` on stdin
/// with `CHILD state <rebuilds> <json>` once it has applied `i`.
async fn child_node() {
    let log = child_log().await;
    let dir = PathBuf::from(var("KILL_DIR"));
    let mut b = Node::builder(&log, FileKv::open(dir.join("state.json")), JsonCodec);
    b.wildcard_topic(TOPIC)
        .checkpoint(dir.join("checkpoint"))
        .snapshot_cache_ttl(Duration::from_secs(3600));
    let node = b.start().await.unwrap();
    let started = node.applied();
    let addr = format!("127.0.0.1:{}", var("KILL_PORT")).parse().unwrap();
    let _server = node.server(JsonCodec).bind(addr).await.unwrap();
    println!("CHILD ready {started}");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        let index: u64 = line.strip_prefix("wait ").unwrap().parse().unwrap();
        node.wait_for_index(index, PATIENCE).await.unwrap();
        let state = node.read(|s, _| s.data.clone()).await;
        println!(
            "CHILD state {} {}",
            node.stats().rebuilds,
            serde_json::to_string(&state).unwrap()
        );
    }
}

/// Puts change after change, each under its own key `w<k>`: prints
/// `CHILD sending <k>` before the put and `CHILD acked <k> <index>` once
/// JetStream acknowledged it.
async fn child_writer() {
    let log = child_log().await;
    let w = log.writer::<String, _>(JsonCodec);
    for k in 0u64.. {
        println!("CHILD sending {k}");
        match w.put(TOPIC, &format!("w{k}"), &format!("v{k}")).await {
            Ok(index) => println!("CHILD acked {k} {index}"),
            Err(e) => println!("CHILD error {k} {e}"),
        }
    }
}

/// The child's entry point; a no-op in the parent.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match role.as_str() {
            "node" => child_node().await,
            "writer" => child_writer().await,
            other => panic!("unknown child role {other}"),
        }
    });
}

// ---- the parent ----------------------------------------------------------

/// A child process, SIGKILLed when dropped.
struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Proc {
    fn spawn(role: &str, log: &Log, url: &str, dir: &Path, port: u16) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "child_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env("KILL_URL", url)
            .env("KILL_STREAM", log.stream_name())
            .env("KILL_PREFIX", log.prefix())
            .env("KILL_DIR", dir)
            .env("KILL_PORT", port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the child");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the child printed with `CHILD `, without it.
    async fn line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let line = self.stdout.next_line().await.unwrap().expect("child ended");
                if let Some(rest) = child_line(&line) {
                    return rest.to_string();
                }
            }
        })
        .await
        .expect("child stalled")
    }

    /// SIGKILLs the child; returns the `CHILD ` lines it printed that were
    /// not read yet.
    async fn kill(mut self) -> Vec<String> {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(!status.success(), "killed, not exited");
        let mut rest = Vec::new();
        while let Some(line) = self.stdout.next_line().await.unwrap() {
            if let Some(line) = child_line(&line) {
                rest.push(line.to_string());
            }
        }
        rest
    }

    /// Asks a node child for its state once it has applied `index`:
    /// (rebuilds since it started, key → (index, value)).
    async fn state_at(&mut self, index: u64) -> (u64, BTreeMap<String, (u64, String)>) {
        self.stdin
            .write_all(format!("wait {index}\n").as_bytes())
            .await
            .unwrap();
        let line = self.line().await;
        let rest = line.strip_prefix("state ").expect("a state line");
        let (rebuilds, json) = rest.split_once(' ').unwrap();
        (
            rebuilds.parse().unwrap(),
            serde_json::from_str(json).unwrap(),
        )
    }
}

/// What follows `CHILD ` in a line of the child's stdout (the test
/// harness's `test child_process ... ` may precede the first one).
fn child_line(line: &str) -> Option<&str> {
    line.find("CHILD ").map(|at| &line[at + "CHILD ".len()..])
}

async fn start_node(log: &Log) -> (Node<String, Kv>, Server) {
    let mut b = Node::builder(log, Kv::default(), JsonCodec);
    b.wildcard_topic(TOPIC)
        .snapshot_cache_ttl(Duration::from_secs(3600));
    let node = b.start().await.unwrap();
    let server = node
        .server(JsonCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (node, server)
}

fn client(addresses: &[&str]) -> Client<String, JsonCodec> {
    Client::builder(addresses.iter().map(|a| a.to_string()))
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
        .build_with::<String, _>(JsonCodec)
        .unwrap()
}

/// A remote wildcard view, with its framing.
struct Remote {
    sub: RemoteSubscriber<String>,
    view: View,
    new_snapshots: usize,
}

impl Remote {
    fn new(client: &Client<String, JsonCodec>) -> Self {
        Self {
            sub: client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard)),
            view: View::fresh(),
            new_snapshots: 0,
        }
    }

    async fn follow_to(&mut self, index: u64) {
        while !self.view.complete_to(index) {
            let msg = tokio::time::timeout(PATIENCE, self.sub.next())
                .await
                .expect("remote subscriber stalled")
                .expect("remote stream ended")
                .expect("remote subscriber failed");
            if matches!(msg, Message::NewSnapshotToFollow) {
                self.new_snapshots += 1;
            }
            self.view.apply(msg);
        }
    }
}

async fn put_n(model: &mut Model, w: &LogWriter<String, JsonCodec>, n: usize) {
    for _ in 0..n {
        let k = model.changes.len();
        model
            .put(w, TOPIC, &format!("k{}", k % 5), &format!("v{k}"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_process_resumes_from_its_checkpoint_and_its_clients_fail_over_and_back() {
    let Some(url) = cluster_support::url().await else {
        return;
    };
    let Some((_nats, log)) = open_log("kill_node").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    put_n(&mut model, &writer, 10).await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let a_addr = format!("http://127.0.0.1:{port}");
    let mut a = Proc::spawn("node", &log, &url, dir.path(), port);
    assert_eq!(a.line().await, "ready 0", "first start: no checkpoint");
    let (b, sb) = start_node(&log).await;
    let b_addr = format!("http://{}", sb.local_addr());

    // Two views start on A (the child), one on B.
    let on_a = client(&[&a_addr, &b_addr]);
    let on_b = client(&[&b_addr, &a_addr]);
    let mut remotes = vec![Remote::new(&on_a), Remote::new(&on_a), Remote::new(&on_b)];
    for r in &mut remotes {
        r.follow_to(model.last()).await;
    }
    put_n(&mut model, &writer, 10).await;
    for r in &mut remotes {
        r.follow_to(model.last()).await;
    }
    let (_, state) = a.state_at(model.last()).await;
    assert_eq!(state, model.at(TOPIC, model.last()));

    // kill -9 A while changes keep coming: its views move to B.
    let writes = {
        let (mut model, writer) = (model.clone(), log.writer::<String, _>(JsonCodec));
        tokio::spawn(async move {
            put_n(&mut model, &writer, 20).await;
            model
        })
    };
    a.kill().await;
    let mut model = writes.await.unwrap();
    for r in &mut remotes {
        r.follow_to(model.last()).await;
    }
    assert!(remotes[0].sub.reconnects() >= 1 && remotes[1].sub.reconnects() >= 1);

    // A restarts from its checkpoint and catches up without a rebuild.
    let mut a = Proc::spawn("node", &log, &url, dir.path(), port);
    let ready = a.line().await;
    let started: u64 = ready.strip_prefix("ready ").unwrap().parse().unwrap();
    assert!(started > 0, "resumed from the on-disk checkpoint ({ready})");
    let (rebuilds, state) = a.state_at(model.last()).await;
    assert_eq!(rebuilds, 0, "caught up from the checkpoint, not rebuilt");
    assert_eq!(state, model.at(TOPIC, model.last()));
    // A fresh view on A (its publisher restarted empty) holds the index
    // the others will resume from.
    let mut anchor = Remote::new(&client(&[&a_addr]));
    anchor.follow_to(model.last()).await;

    // B's server goes away: every view moves (back) to A and resumes there.
    sb.shutdown().await.unwrap();
    put_n(&mut model, &writer, 10).await;
    let last = model.last();
    anchor.follow_to(last).await;
    for (i, r) in remotes.iter_mut().enumerate() {
        r.follow_to(last).await;
        assert_eq!(r.new_snapshots, 0, "view {i}: no new snapshot on failover");
        assert_eq!(r.view.snapshots.len(), 1, "view {i}: one snapshot");
        let at = r.view.snapshots[0].0;
        assert_eq!(
            r.view.live,
            model.after(TOPIC, at),
            "view {i}: every change once, none skipped"
        );
        assert_eq!(r.view.data, model.at(TOPIC, last), "view {i}: converged");
    }
    assert!(remotes[2].sub.reconnects() >= 1, "B's view moved to A");
    assert!(
        remotes[0].sub.reconnects() >= 2,
        "A's views went and came back"
    );
    assert_eq!(b.read(|s, _| s.topic(TOPIC)).await, model.at(TOPIC, last));
    a.kill().await;
    delete_log(&log).await;
}

/// A `nats-server -js` of the test's own, with its monitoring port; killed
/// on drop.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    monitor: u16,
    _dir: tempfile::TempDir,
}

impl OwnNats {
    fn start() -> Option<Self> {
        let bin = nats_server_binary();
        let Some(bin) = bin else {
            eprintln!("notice: no nats-server binary (set NATS_SERVER_BIN); skipping");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let (port, monitor) = (free_port(), free_port());
        let child = std::process::Command::new(bin)
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
            .expect("start nats-server");
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

    /// Opens a fresh log once the server answers (no signal tells when it
    /// listens but trying).
    async fn open_log(&self) -> (async_nats::Client, Log) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let opened = async {
                let client = async_nats::connect(self.url()).await?;
                let log = Log::open(
                    client.clone(),
                    &LogConfig::new("KILL_WRITER", "kill-writer"),
                )
                .await?;
                Ok::<_, BoxError>((client, log))
            };
            match opened.await {
                Ok(opened) => return opened,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("nats-server not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("own nats-server never became ready: {e}"),
            }
        }
    }

    /// Waits until the server has dropped every connection named `name`:
    /// it has then processed everything that connection sent.
    async fn wait_connection_gone(&self, name: &str) {
        let url = format!("http://127.0.0.1:{}/connz?limit=1024", self.monitor);
        let http = reqwest::Client::new();
        tokio::time::timeout(PATIENCE, async {
            loop {
                let connz: serde_json::Value =
                    http.get(&url).send().await.unwrap().json().await.unwrap();
                let open = connz["connections"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["name"] == name));
                if !open {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the server drops the killed writer's connection");
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_killed_before_the_ack_leaves_its_change_in_every_view_or_in_none() {
    // Its own server: its monitoring endpoint tells when the killed
    // writer's connection is gone.
    let Some(nats) = OwnNats::start() else {
        return;
    };
    let url = nats.url();
    let (_nats_client, log) = nats.open_log().await;
    let (a, sa) = start_node(&log).await;
    let (b, sb) = start_node(&log).await;
    let (a_addr, b_addr) = (
        format!("http://{}", sa.local_addr()),
        format!("http://{}", sb.local_addr()),
    );
    // A first change, so that the views' snapshots need not wait for one.
    let writer = log.writer::<String, _>(JsonCodec);
    let first = writer.put(TOPIC, "start", &"0".to_string()).await.unwrap();
    let mut views = vec![
        Remote::new(&client(&[&a_addr])),
        Remote::new(&client(&[&b_addr])),
    ];
    for v in &mut views {
        v.follow_to(first).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let mut w = Proc::spawn("writer", &log, &url, dir.path(), 0);
    let mut sent = BTreeSet::new();
    let mut acked = BTreeMap::new();
    let read = |line: &str, sent: &mut BTreeSet<u64>, acked: &mut BTreeMap<u64, u64>| {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("sending"), Some(k), None) => {
                sent.insert(k.parse::<u64>().unwrap());
            }
            (Some("acked"), Some(k), Some(i)) => {
                acked.insert(k.parse::<u64>().unwrap(), i.parse::<u64>().unwrap());
            }
            _ => panic!("unexpected line from the writer: {line}"),
        }
    };
    while acked.len() < 20 {
        let line = w.line().await;
        read(&line, &mut sent, &mut acked);
    }
    // The writer is killed while it puts (between a put's send and its
    // ack, most likely); what it printed before dying still counts.
    for line in w.kill().await {
        read(&line, &mut sent, &mut acked);
    }

    // Once the server has dropped the writer's connection, anything it had
    // in flight is in the log before this change, or never will be: once
    // every view has the change, compare them.
    nats.wait_connection_gone(WRITER_NAME).await;
    let marker = writer.put(TOPIC, "end", &"0".to_string()).await.unwrap();
    for v in &mut views {
        v.follow_to(marker).await;
    }
    a.wait_for_index(marker, PATIENCE).await.unwrap();
    b.wait_for_index(marker, PATIENCE).await.unwrap();
    let a_state = a.read(|s, _| s.topic(TOPIC)).await;
    let b_state = b.read(|s, _| s.topic(TOPIC)).await;
    assert_eq!(a_state, b_state, "the nodes agree");
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.view.data, a_state, "view {i} equals the nodes' state");
    }
    for (k, index) in &acked {
        assert_eq!(
            a_state.get(&format!("w{k}")),
            Some(&(*index, format!("v{k}"))),
            "acknowledged change {k} is in every view"
        );
    }
    let landed: BTreeSet<u64> = a_state
        .keys()
        .filter_map(|k| k.strip_prefix('w'))
        .map(|k| k.parse().unwrap())
        .collect();
    assert!(
        landed.is_subset(&sent),
        "only changes the writer sent are in the log: {landed:?} vs {sent:?}"
    );
    let in_flight: Vec<_> = sent.iter().filter(|k| !acked.contains_key(k)).collect();
    eprintln!(
        "writer killed with {} change(s) sent but not acknowledged: {:?}; in the log: {:?}",
        in_flight.len(),
        in_flight,
        landed
            .iter()
            .filter(|k| !acked.contains_key(k))
            .collect::<Vec<_>>()
    );
    sa.shutdown().await.unwrap();
    sb.shutdown().await.unwrap();
}
