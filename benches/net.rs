//! Network benchmark on loopback: snapstream's gRPC subscribe vs etcd's
//! watch vs NATS core subscriptions, side by side in one run.
//!
//! Run: `cargo bench --features net --bench net` (full) or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --features net --bench net`
//! (1 and 100 subscribers, a short storm; CI runs this).
//!
//! # Workload (the same for every system)
//!
//! One writer, N remote subscribers (1, 100, 1,000, 5,000) of one key or of
//! a whole topic (100 keys written in turn), u64 or 256-byte payloads. The
//! payload's first 8 bytes are the write's sequence number; every
//! subscriber checks it gets every value once, in order, and the run fails
//! loudly otherwise. The writer writes at a fixed rate, 1,000 writes/s (one
//! etcd sustains here), and waits for each system's acknowledgement of
//! each write: etcd's `Put` response, NATS' flush round trip (PING/PONG)
//! after each publish, snapstream's `publish` returning (the writer is the
//! store in the server's process, as designed); a writer behind schedule
//! writes at once. From 1,000 subscribers on, the rate asks for more
//! deliveries than any of the three delivers here, so deliveries/s is each
//! system's capacity and latency includes its backlog. Latency is
//! publish-to-view: from the time the write was due (so a writer held back
//! by a slow system counts against that system, not for it: no coordinated
//! omission) to the subscriber's clock when it read the value (one machine,
//! one clock: a side table by sequence number).
//! Deliveries/s is values delivered to all subscribers over the time from
//! the first write to the last delivery.
//!
//! # Servers and connections
//!
//! Every server runs in its own process, so its RSS (`VmRSS`) and CPU
//! (utime + stime over the case's delivery window) are its own (the
//! clients' CPU is this process's, where every system's clients run): snapstream's
//! server is this binary re-executed with `SNAPSTREAM_NETBENCH_SERVER=1`,
//! etcd (`/usr/bin/etcd`, data dir on tmpfs) and `nats-server` are started
//! on free ports and killed at the end. A missing peer is skipped with a
//! notice. All three get one client connection per 100 subscribers (gRPC
//! streams multiplexed on HTTP/2 for snapstream and etcd, subscriptions
//! multiplexed on one NATS connection), so 5,000 subscribers are 50
//! connections and no open-file limit needs raising.
//!
//! # The snapshot storm (Consul's headline workload, snapstream only)
//!
//! 5,000 subscribers of one topic whose snapshot holds 2,000 items subscribe
//! at once; then one item changes each second. Reported: the time until
//! every subscriber holds its whole snapshot, the server's RSS, and its CPU
//! over the steady window (% of one core).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use snapstream::event::{Event, Message, Subject};
use snapstream::net::{BinaryCodec, Client, RemoteRequest, Server};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};

const SERVER_ENV: &str = "SNAPSTREAM_NETBENCH_SERVER";
const SUBS_PER_CONNECTION: usize = 100;
/// Keys of the topic in the whole-topic cases, written in turn.
const TOPIC_KEYS: u64 = 100;
const STORM_ITEMS: u64 = 2_000;
/// Topics the snapstream runs take in turn, so that no run's subscribers
/// get a snapshot the publisher cached (for 10 s) in an earlier run and
/// then that run's writes replayed: a run takes well over a second, so a
/// topic comes round again long after its cached snapshot expired.
const CASE_TOPICS: u64 = 16;
/// The writer's fixed rate, in writes per second.
const WRITE_RATE: u64 = 1_000;
/// Linux's USER_HZ: the unit of utime and stime in /proc/<pid>/stat.
const CLOCK_TICKS_PER_S: f64 = 100.0;
/// A case that has not delivered everything by then fails.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// When write `i` is due after the first.
fn write_offset(i: u64) -> Duration {
    Duration::from_nanos(i * 1_000_000_000 / WRITE_RATE)
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[..8].copy_from_slice(&i.to_le_bytes());
    if len > 8 {
        v[len - 1] = i as u8;
    }
    v
}

fn value_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("payload of at least 8 bytes"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------
// /proc readings of a server process.

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// A child process killed when dropped (a failed run leaves no server behind).
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// The snapstream server process (this binary with SERVER_ENV set).

#[derive(Default)]
struct StoreState {
    index: u64,
    /// The storm topic's items: (index, value).
    storm: Vec<(u64, u64)>,
}

fn server_main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let state = Arc::new(Mutex::new(StoreState {
        index: 1,
        storm: (0..STORM_ITEMS).map(|_| (1, 0)).collect(),
    }));
    let mut b = Publisher::<Bytes>::builder();
    for t in 0..CASE_TOPICS {
        let st = state.clone();
        b.register_with_wildcard(
            format!("t{t}"),
            move |_r: SnapshotRequest, _s: SnapshotSink<Bytes>| {
                let index = st.lock().unwrap().index;
                async move { Ok(index) }
            },
        )
        .unwrap();
    }
    let st = state.clone();
    b.register_with_wildcard(
        "storm",
        move |_r: SnapshotRequest, mut s: SnapshotSink<Bytes>| {
            let (index, events): (u64, Vec<_>) = {
                let st = st.lock().unwrap();
                let events = st
                    .storm
                    .iter()
                    .enumerate()
                    .map(|(n, (i, v))| {
                        Event::new("storm", format!("item{n}"), *i, Bytes::from(payload(*v, 8)))
                    })
                    .collect();
                (st.index, events)
            };
            async move {
                s.append(events)?;
                Ok(index)
            }
        },
    )
    .unwrap();
    let publisher = b.build();
    // `SNAPSTREAM_BENCH_NET_COALESCE=1` turns the server's write coalescing on.
    let coalesce = std::env::var("SNAPSTREAM_BENCH_NET_COALESCE").is_ok_and(|v| v == "1");
    let server = rt
        .block_on(
            match std::env::var("SNAPSTREAM_BENCH_NET_FILL")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                // `SNAPSTREAM_BENCH_NET_FILL=KIB` overrides the server's message fill.
                Some(kib) => {
                    Server::builder(publisher.clone(), BinaryCodec).message_fill(kib << 10)
                }
                None => Server::builder(publisher.clone(), BinaryCodec),
            }
            .coalesce_writes(coalesce)
            .bind("127.0.0.1:0".parse().unwrap()),
        )
        .unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "port {}", server.local_addr().port()).unwrap();
    out.flush().unwrap();

    // Commands, one a line, until stdin closes.
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["write", topic, mode, len, events, base] => {
                let (len, events): (usize, u64) = (len.parse().unwrap(), events.parse().unwrap());
                let base: u64 = base.parse().unwrap();
                let mut sent = Vec::with_capacity(events as usize);
                let (start, start_ns) = (Instant::now(), now_ns());
                for i in 0..events {
                    let due = start + write_offset(i);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let key = if *mode == "key" {
                        "k".to_string()
                    } else {
                        format!("k{}", i % TOPIC_KEYS)
                    };
                    let value = Bytes::from(payload(base + i, len));
                    sent.push(start_ns + write_offset(i).as_nanos() as u64);
                    let mut st = state.lock().unwrap();
                    st.index += 1;
                    publisher
                        .publish(vec![Event::new(*topic, key, st.index, value)])
                        .unwrap();
                }
                let sent: Vec<String> = sent.iter().map(u64::to_string).collect();
                writeln!(out, "sent {}", sent.join(" ")).unwrap();
            }
            ["storm", seq] => {
                let seq: u64 = seq.parse().unwrap();
                let item = (seq % STORM_ITEMS) as usize;
                let at = now_ns();
                let mut st = state.lock().unwrap();
                st.index += 1;
                let index = st.index;
                st.storm[item] = (index, seq);
                publisher
                    .publish(vec![Event::new(
                        "storm",
                        format!("item{item}"),
                        index,
                        Bytes::from(payload(seq, 8)),
                    )])
                    .unwrap();
                writeln!(out, "sent {at}").unwrap();
            }
            ["streams"] => {
                let stats = server.stats();
                writeln!(
                    out,
                    "sent {} {}",
                    stats.open_streams, stats.multiplexed_calls
                )
                .unwrap();
            }
            _ => panic!("unknown command {line:?}"),
        }
        out.flush().unwrap();
    }
    rt.block_on(server.shutdown()).unwrap();
}

/// The parent's handle on the snapstream server process.
struct SnapServer {
    proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: String,
}

impl SnapServer {
    fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(SERVER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("re-executing the bench as the server");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .expect("the server's port line");
        Self {
            addr: format!("http://127.0.0.1:{port}"),
            proc: Proc(child),
            stdin,
            stdout,
        }
    }

    /// Sends one command and returns the send times it answers with.
    fn command(&mut self, cmd: &str) -> Vec<u64> {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix("sent")
            .expect("the server's answer")
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    }
}

// ---------------------------------------------------------------------------
// etcd and nats-server processes.

struct Etcd {
    proc: Proc,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Option<Self> {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        // tmpfs, so etcd's fsync per write costs what memory does: we
        // compare the watch path, not disks.
        let dir = tempfile::Builder::new()
            .prefix("snapstream-netbench-etcd")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let etcd = Self {
            proc: Proc(child),
            url,
            _dir: dir,
        };
        for _ in 0..100 {
            if let Ok(mut c) = etcd_client::Client::connect([&etcd.url], None).await {
                if c.put("ready", "1", None).await.is_ok() {
                    return Some(etcd);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("notice: etcd did not come up at {}; skipped", etcd.url);
        None
    }
}

struct Nats {
    proc: Proc,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    async fn start() -> Option<Self> {
        let bin = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // A connection's pending-bytes limit high enough that 100
        // subscribers behind one connection are not cut as slow consumers.
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\nmax_pending: 1073741824\n"),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let nats = Self {
            proc: Proc(child),
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        };
        for _ in 0..100 {
            if let Ok(c) = async_nats::connect(&nats.url).await {
                if c.flush().await.is_ok() {
                    return Some(nats);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "notice: nats-server did not come up at {}; skipped",
            nats.url
        );
        None
    }
}

// ---------------------------------------------------------------------------
// Cases and what a subscriber records.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Key,
    Topic,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    scope: Scope,
    len: usize,
    subs: usize,
    events: u64,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} sub{}, {}, {}",
            self.subs,
            if self.subs == 1 { "" } else { "s" },
            match self.scope {
                Scope::Key => "one key",
                Scope::Topic => "whole topic",
            },
            if self.len == 8 { "u64" } else { "256 B" },
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Snapstream,
    Etcd,
    Nats,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Snapstream => "snapstream",
            System::Etcd => "etcd watch",
            System::Nats => "NATS core",
        }
    }
}

/// Every value from `base` on once, in order; the receive time of each.
///
/// Values below `base` are an earlier run's writes. Each snapstream run
/// has a topic of its own (`CASE_TOPICS`) so it gets none: were a topic
/// reused within the publisher's 10 s snapshot cache, a new subscriber
/// would be spliced onto the cached snapshot and get the earlier run's
/// writes replayed (as it should), work the peers' subscribers, starting
/// at the live end, do not do. Should one come anyway, it is skipped, not
/// timed: each run writes values from a fresh `base`.
struct Recorder {
    label: &'static str,
    events: u64,
    base: u64,
    recv: Vec<u64>,
    delivered: Arc<AtomicU64>,
}

impl Recorder {
    fn new(label: &'static str, events: u64, base: u64, delivered: Arc<AtomicU64>) -> Self {
        Self {
            label,
            events,
            base,
            recv: Vec::with_capacity(events as usize),
            delivered,
        }
    }

    fn see(&mut self, bytes: &[u8]) {
        let v = value_of(bytes);
        let at = now_ns();
        if v < self.base {
            return;
        }
        assert_eq!(
            v,
            self.base + self.recv.len() as u64,
            "{}: a subscriber got value {v} after {} values: lost or out of order",
            self.label,
            self.recv.len()
        );
        self.recv.push(at);
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&self) -> bool {
        self.recv.len() as u64 == self.events
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    deliveries_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mb: f64,
    cpu_pct: f64,
    /// The bench process's CPU (every system's clients live in it).
    client_cpu_pct: f64,
}

/// The server's and this process's (the clients') CPU ticks.
fn cpu_now(server: u32) -> (u64, u64) {
    (cpu_ticks(server), cpu_ticks(std::process::id()))
}

fn outcome(
    sent: &[u64],
    recvs: &[Vec<u64>],
    cpu: ((u64, u64), (u64, u64)),
    rss_mb: f64,
) -> Outcome {
    let mut lat: Vec<u64> = recvs
        .iter()
        .flat_map(|r| r.iter().zip(sent).map(|(r, s)| r.saturating_sub(*s)))
        .collect();
    lat.sort_unstable();
    let last = recvs
        .iter()
        .filter_map(|r| r.last())
        .max()
        .copied()
        .unwrap();
    let window = (last - sent[0]) as f64 / 1e9;
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1e6;
    Outcome {
        deliveries_per_s: lat.len() as f64 / window,
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        rss_mb,
        cpu_pct: (cpu.1 .0 - cpu.0 .0) as f64 / CLOCK_TICKS_PER_S / window * 100.0,
        client_cpu_pct: (cpu.1 .1 - cpu.0 .1) as f64 / CLOCK_TICKS_PER_S / window * 100.0,
    }
}

/// Waits for every subscriber task, failing loudly when they stall.
async fn collect(
    label: &str,
    tasks: Vec<tokio::task::JoinHandle<Vec<u64>>>,
    delivered: &AtomicU64,
    expected: u64,
) -> Vec<Vec<u64>> {
    let all = futures::future::join_all(tasks);
    match tokio::time::timeout(CASE_TIMEOUT, all).await {
        Ok(r) => r.into_iter().map(|r| r.unwrap()).collect(),
        Err(_) => panic!(
            "{label}: subscribers got {} of {expected} deliveries in {CASE_TIMEOUT:?}",
            delivered.load(Ordering::Relaxed)
        ),
    }
}

/// Waits until `n` subscribers said they are ready.
async fn ready(rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>, n: usize) {
    for _ in 0..n {
        rx.recv()
            .await
            .expect("a subscriber failed before it was ready");
    }
}

// ---------------------------------------------------------------------------
// One case on each system.

async fn run_snapstream(srv: &mut SnapServer, case: Case) -> Outcome {
    // Each run's values start where the last run's ended (see `Recorder`).
    static NEXT_BASE: AtomicU64 = AtomicU64::new(0);
    let base = NEXT_BASE.fetch_add(case.events, Ordering::Relaxed);
    // A topic of its own (see `CASE_TOPICS`).
    static NEXT_TOPIC: AtomicU64 = AtomicU64::new(0);
    let topic = format!(
        "t{}",
        NEXT_TOPIC.fetch_add(1, Ordering::Relaxed) % CASE_TOPICS
    );
    let clients: Vec<Client<Bytes, BinaryCodec>> = (0..case.subs.div_ceil(SUBS_PER_CONNECTION))
        .map(|_| {
            let b = Client::builder([srv.addr.clone()]).multiplex(multiplex());
            match windows_override() {
                Some((stream, conn)) => b.windows(stream, conn),
                None => b,
            }
            .build::<Bytes>()
            .unwrap()
        })
        .collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let subject = match case.scope {
        Scope::Key => Subject::key("k"),
        Scope::Topic => Subject::Wildcard,
    };
    let tasks: Vec<_> = (0..case.subs)
        .map(|s| {
            let mut sub = clients[s / SUBS_PER_CONNECTION]
                .subscribe(RemoteRequest::new(topic.clone(), subject.clone()));
            let ready_tx = ready_tx.clone();
            let mut rec = Recorder::new("snapstream", case.events, base, delivered.clone());
            tokio::spawn(async move {
                loop {
                    match sub.next().await.unwrap().unwrap() {
                        Message::EndOfSnapshot { .. } => break,
                        Message::Events(b) => assert!(b.is_empty(), "an empty snapshot"),
                        Message::NewSnapshotToFollow => {}
                    }
                }
                ready_tx.send(()).unwrap();
                while !rec.done() {
                    match sub.next().await.unwrap().unwrap() {
                        Message::Events(b) => b.iter().for_each(|e| rec.see(e.payload())),
                        m => panic!("snapstream: unexpected {m:?} after the snapshot"),
                    }
                }
                rec.recv
            })
        })
        .collect();
    ready(&mut ready_rx, case.subs).await;
    let pid = srv.proc.pid();
    let cpu0 = cpu_now(pid);
    let mode = if case.scope == Scope::Key {
        "key"
    } else {
        "topic"
    };
    let sent = srv.command(&format!(
        "write {topic} {mode} {} {} {base}",
        case.len, case.events
    ));
    let recvs = collect(
        "snapstream",
        tasks,
        &delivered,
        case.events * case.subs as u64,
    )
    .await;
    let cpu1 = cpu_now(pid);
    outcome(&sent, &recvs, (cpu0, cpu1), rss_mb(pid))
}

async fn run_etcd(etcd: &Etcd, case: Case) -> Outcome {
    let mut clients = Vec::new();
    for _ in 0..case.subs.div_ceil(SUBS_PER_CONNECTION) {
        clients.push(
            etcd_client::Client::connect([&etcd.url], None)
                .await
                .unwrap(),
        );
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..case.subs)
        .map(|s| {
            let mut client = clients[s / SUBS_PER_CONNECTION].clone();
            let ready_tx = ready_tx.clone();
            let mut rec = Recorder::new("etcd", case.events, 0, delivered.clone());
            tokio::spawn(async move {
                let options = match case.scope {
                    Scope::Key => None,
                    Scope::Topic => Some(etcd_client::WatchOptions::new().with_prefix()),
                };
                let key = if case.scope == Scope::Key { "k" } else { "k/" };
                let mut watch = client.watch(key, options).await.unwrap();
                // The first response says the watch was created.
                let created = watch.message().await.unwrap().unwrap();
                assert!(created.created(), "etcd: a created response first");
                ready_tx.send(()).unwrap();
                while !rec.done() {
                    let resp = watch.message().await.unwrap().expect("etcd: watch ended");
                    assert!(!resp.canceled(), "etcd: watch canceled");
                    for e in resp.events() {
                        rec.see(e.kv().unwrap().value());
                    }
                }
                rec.recv
            })
        })
        .collect();
    ready(&mut ready_rx, case.subs).await;
    let pid = etcd.proc.pid();
    let mut writer = etcd_client::Client::connect([&etcd.url], None)
        .await
        .unwrap();
    let cpu0 = cpu_now(pid);
    let mut sent = Vec::with_capacity(case.events as usize);
    let (start, start_ns) = (tokio::time::Instant::now(), now_ns());
    for i in 0..case.events {
        tokio::time::sleep_until(start + write_offset(i)).await;
        let key = match case.scope {
            Scope::Key => "k".to_string(),
            Scope::Topic => format!("k/{}", i % TOPIC_KEYS),
        };
        let value = payload(i, case.len);
        sent.push(start_ns + write_offset(i).as_nanos() as u64);
        writer.put(key, value, None).await.unwrap();
    }
    let recvs = collect("etcd", tasks, &delivered, case.events * case.subs as u64).await;
    let cpu1 = cpu_now(pid);
    outcome(&sent, &recvs, (cpu0, cpu1), rss_mb(pid))
}

async fn run_nats(nats: &Nats, case: Case) -> Outcome {
    let mut clients = Vec::new();
    for _ in 0..case.subs.div_ceil(SUBS_PER_CONNECTION) {
        clients.push(async_nats::connect(&nats.url).await.unwrap());
    }
    let subject = match case.scope {
        Scope::Key => "t.k",
        Scope::Topic => "t.k.>",
    };
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in 0..case.subs {
        let mut sub = clients[s / SUBS_PER_CONNECTION]
            .subscribe(subject)
            .await
            .unwrap();
        let mut rec = Recorder::new("nats", case.events, 0, delivered.clone());
        tasks.push(tokio::spawn(async move {
            while !rec.done() {
                let m = sub.next().await.expect("nats: subscription ended");
                rec.see(&m.payload);
            }
            rec.recv
        }));
    }
    // The server has every subscription once each connection's flush returns.
    for c in &clients {
        c.flush().await.unwrap();
    }
    let pid = nats.proc.pid();
    let writer = async_nats::connect(&nats.url).await.unwrap();
    let cpu0 = cpu_now(pid);
    let mut sent = Vec::with_capacity(case.events as usize);
    let (start, start_ns) = (tokio::time::Instant::now(), now_ns());
    for i in 0..case.events {
        tokio::time::sleep_until(start + write_offset(i)).await;
        let subject = match case.scope {
            Scope::Key => "t.k".to_string(),
            Scope::Topic => format!("t.k.{}", i % TOPIC_KEYS),
        };
        let value = Bytes::from(payload(i, case.len));
        sent.push(start_ns + write_offset(i).as_nanos() as u64);
        writer.publish(subject, value).await.unwrap();
        writer.flush().await.unwrap();
    }
    let recvs = collect("nats", tasks, &delivered, case.events * case.subs as u64).await;
    let cpu1 = cpu_now(pid);
    outcome(&sent, &recvs, (cpu0, cpu1), rss_mb(pid))
}

// ---------------------------------------------------------------------------
// The snapshot storm.

/// `SNAPSTREAM_BENCH_NET_WINDOWS=STREAM_KIB,CONNECTION_KIB` overrides the
/// storm clients' HTTP/2 windows (default: the library's).
fn windows_override() -> Option<(u32, u32)> {
    let v = std::env::var("SNAPSTREAM_BENCH_NET_WINDOWS").ok()?;
    let (s, c) = v.split_once(',')?;
    Some((
        s.trim().parse::<u32>().ok()? << 10,
        c.trim().parse::<u32>().ok()? << 10,
    ))
}

/// `SNAPSTREAM_BENCH_NET_MUX=0` gives every snapstream subscription a
/// `Subscribe` call of its own (default, as the client's: every
/// subscription of a client on its one `Multiplex` call).
fn multiplex() -> bool {
    std::env::var("SNAPSTREAM_BENCH_NET_MUX").map_or(true, |v| v != "0")
}

/// `SNAPSTREAM_BENCH_NET_ONLY=storm,1000` runs only the storm and the
/// listed subscriber counts (default: everything).
fn only() -> Option<Vec<String>> {
    let v = std::env::var("SNAPSTREAM_BENCH_NET_ONLY").ok()?;
    Some(v.split(',').map(|s| s.trim().to_string()).collect())
}

struct Storm {
    subs: usize,
    snapshot_s: f64,
    rss_mb: f64,
    cpu_pct: f64,
    window_s: u64,
}

async fn run_storm(srv: &mut SnapServer, subs: usize, window_s: u64) -> Storm {
    let clients: Vec<Client<Bytes, BinaryCodec>> = (0..subs.div_ceil(SUBS_PER_CONNECTION))
        .map(|_| {
            Client::builder([srv.addr.clone()])
                .multiplex(multiplex())
                .build::<Bytes>()
                .unwrap()
        })
        .collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let tasks: Vec<_> = (0..subs)
        .map(|s| {
            let mut sub = clients[s / SUBS_PER_CONNECTION]
                .subscribe(RemoteRequest::new("storm", Subject::Wildcard));
            let ready_tx = ready_tx.clone();
            let delivered = delivered.clone();
            tokio::spawn(async move {
                let mut items = 0;
                loop {
                    match sub.next().await.unwrap().unwrap() {
                        Message::EndOfSnapshot { .. } => break,
                        Message::Events(b) => items += b.len() as u64,
                        Message::NewSnapshotToFollow => items = 0,
                    }
                }
                assert_eq!(items, STORM_ITEMS, "storm: snapshot items");
                ready_tx.send(()).unwrap();
                // Then every change, in order: values 1, 2, 3, ...
                let mut next = 1;
                while next <= window_s {
                    match sub.next().await.unwrap().unwrap() {
                        Message::Events(b) => {
                            for e in b.iter() {
                                assert_eq!(value_of(e.payload()), next, "storm: change order");
                                next += 1;
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        m => panic!("storm: unexpected {m:?} after the snapshot"),
                    }
                }
                Vec::new()
            })
        })
        .collect();
    tokio::time::timeout(CASE_TIMEOUT, ready(&mut ready_rx, subs))
        .await
        .expect("storm: every subscriber holds its snapshot in time");
    let snapshot_s = start.elapsed().as_secs_f64();
    let pid = srv.proc.pid();
    eprintln!("storm: every subscriber holds its snapshot; server pid {pid}, steady window {window_s} s starts");
    let rss_after_snapshots = rss_mb(pid);
    // Steady state: one change a second.
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    for seq in 1..=window_s {
        tokio::time::sleep_until((t0 + Duration::from_secs(seq - 1)).into()).await;
        srv.command(&format!("storm {seq}"));
    }
    tokio::time::sleep_until((t0 + Duration::from_secs(window_s)).into()).await;
    let cpu1 = cpu_ticks(pid);
    collect("storm", tasks, &delivered, window_s * subs as u64).await;
    Storm {
        subs,
        snapshot_s,
        rss_mb: rss_after_snapshots.max(rss_mb(pid)),
        cpu_pct: (cpu1 - cpu0) as f64 / CLOCK_TICKS_PER_S / window_s as f64 * 100.0,
        window_s,
    }
}

// ---------------------------------------------------------------------------

fn median(mut v: Vec<Outcome>) -> Outcome {
    let mid = v.len() / 2;
    let pick = |v: &mut Vec<Outcome>, f: fn(&Outcome) -> f64| {
        v.sort_by(|a, b| f(a).total_cmp(&f(b)));
        f(&v[mid])
    };
    Outcome {
        deliveries_per_s: pick(&mut v, |o| o.deliveries_per_s),
        p50_ms: pick(&mut v, |o| o.p50_ms),
        p99_ms: pick(&mut v, |o| o.p99_ms),
        rss_mb: pick(&mut v, |o| o.rss_mb),
        cpu_pct: pick(&mut v, |o| o.cpu_pct),
        client_cpu_pct: pick(&mut v, |o| o.client_cpu_pct),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT MET"
    }
}

fn main() {
    if std::env::var_os(SERVER_ENV).is_some() {
        server_main();
        return;
    }
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut snap = SnapServer::start();
        let etcd = Etcd::start().await;
        if etcd.is_none() {
            println!("notice: no etcd binary (Debian: apt-get install etcd-server); etcd skipped");
        }
        let nats = Nats::start().await;
        if nats.is_none() {
            println!("notice: no nats-server binary (Debian: apt-get install nats-server); NATS skipped");
        }
        let only = only();
        let sizes: &[usize] = if quick { &[1, 100] } else { &[1, 100, 1_000, 5_000] };
        let sizes: Vec<usize> = sizes
            .iter()
            .copied()
            .filter(|n| only.as_ref().is_none_or(|o| o.contains(&n.to_string())))
            .collect();
        let mut results: Vec<(Case, Vec<(System, Outcome)>)> = Vec::new();
        for &subs in &sizes {
            for scope in [Scope::Key, Scope::Topic] {
                for len in [8, 256] {
                    let events = if quick {
                        200
                    } else {
                        (200_000 / subs as u64).clamp(200, 2_000)
                    };
                    let case = Case { scope, len, subs, events };
                    let rounds = if quick || subs > 1_000 { 1 } else { 3 };
                    let mut per: Vec<(System, Vec<Outcome>)> = Vec::new();
                    let mut push = |s: System, o: Outcome| match per.iter_mut().find(|p| p.0 == s) {
                        Some(p) => p.1.push(o),
                        None => per.push((s, vec![o])),
                    };
                    for _ in 0..rounds {
                        let o = run_snapstream(&mut snap, case).await;
                        eprintln!(
                            "round: {} snapstream {:.0}/s p99 {:.1} ms; server streams open, calls: {:?}",
                            case.name(),
                            o.deliveries_per_s,
                            o.p99_ms,
                            snap.command("streams")
                        );
                        push(System::Snapstream, o);
                        if let Some(etcd) = &etcd {
                            push(System::Etcd, run_etcd(etcd, case).await);
                        }
                        if let Some(nats) = &nats {
                            push(System::Nats, run_nats(nats, case).await);
                        }
                    }
                    let medians: Vec<_> = per.into_iter().map(|(s, v)| (s, median(v))).collect();
                    eprintln!("done: {} ({rounds} round(s))", case.name());
                    results.push((case, medians));
                }
            }
        }
        let (storm_subs, storm_window) = if quick { (100, 2) } else { (5_000, 10) };
        // `SNAPSTREAM_BENCH_NET_STORM_S=SECS` lengthens the storm's steady
        // window (e.g. to profile the server over it).
        let storm_window = std::env::var("SNAPSTREAM_BENCH_NET_STORM_S")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(storm_window);
        let storm = if only.as_ref().is_none_or(|o| o.iter().any(|s| s == "storm")) {
            Some(run_storm(&mut snap, storm_subs, storm_window).await)
        } else {
            None
        };

        if quick {
            println!("quick mode: every delivery checked, in order; figures are not meaningful");
        }
        println!(
            "\nloopback; writer at a fixed {WRITE_RATE} writes/s, acknowledged one by one; one client connection per {SUBS_PER_CONNECTION} subscribers for every system; medians of {} round(s) per case (1 at 5,000 subscribers)",
            if quick { 1 } else { 3 }
        );
        println!(
            "\n| case | system | deliveries/s | p50 ms | p99 ms | server RSS MB | server CPU % | clients' CPU % |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (case, outcomes) in &results {
            for (s, o) in outcomes {
                println!(
                    "| {} ({} writes) | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} |",
                    case.name(),
                    case.events,
                    s.name(),
                    o.deliveries_per_s,
                    o.p50_ms,
                    o.p99_ms,
                    o.rss_mb,
                    o.cpu_pct,
                    o.client_cpu_pct
                );
            }
        }

        println!("\nTargets");
        let target_subs = if quick { 100 } else { 1_000 };
        if quick {
            println!("(quick mode: judged at 100 subscribers instead of 1,000)");
        }
        for (case, outcomes) in results.iter().filter(|(c, _)| c.subs == target_subs) {
            let get = |s: System| outcomes.iter().find(|o| o.0 == s).map(|o| o.1);
            match (get(System::Snapstream), get(System::Etcd)) {
                (Some(ours), Some(etcd)) => {
                    let ratio = ours.deliveries_per_s / etcd.deliveries_per_s;
                    println!(
                        "- {}: deliveries/s {ratio:.1}× etcd's (target ≥ 3×: {}); p99 {:.2} ms vs etcd's {:.2} ms (target ≤: {})",
                        case.name(),
                        verdict(ratio >= 3.0),
                        ours.p99_ms,
                        etcd.p99_ms,
                        verdict(ours.p99_ms <= etcd.p99_ms)
                    );
                }
                _ => println!("- {}: not judged (etcd skipped)", case.name()),
            }
        }
        if let Some(storm) = storm {
            let (sw, cw) = windows_override().unwrap_or((
                snapstream::net::DEFAULT_STREAM_WINDOW,
                snapstream::net::DEFAULT_CONNECTION_WINDOW,
            ));
            println!(
                "- (storm clients' HTTP/2 windows: {} KiB per stream, {} KiB per connection; {})",
                sw >> 10,
                cw >> 10,
                if multiplex() {
                    "one Multiplex call per client"
                } else {
                    "one Subscribe call per subscription"
                }
            );
            println!(
                "- snapshot storm, {} subscribers × {STORM_ITEMS}-item snapshot: all hold it after {:.2} s; server RSS {:.1} MB (target ≤ 100 MB: {}); steady CPU {:.2}% of a core over {} s at one change/s (target ≤ 2%: {})",
                storm.subs,
                storm.snapshot_s,
                storm.rss_mb,
                verdict(storm.rss_mb <= 100.0),
                storm.cpu_pct,
                storm.window_s,
                verdict(storm.cpu_pct <= 2.0)
            );
        }
        drop(snap);
    });
}
