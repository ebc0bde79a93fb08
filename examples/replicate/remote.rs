//! The demo's remote subscribers: client-side views over gRPC (feature
//! `net`), in the default run over loopback, and the `--serve` /
//! `--connect` modes that split the store and its clients between two
//! terminals.
//!
//! Remote subscribers, by id (`--remote N`):
//!
//! | id | what | how |
//! |---|---|---|
//! | 0, 5 mod 10 | wildcard view | a [`View`] of every key, one `Views` registry each |
//! | 1 mod 10, 6 mod 20 | reconnecting (keyed; wildcard for 6 mod 20) | a [`RemoteSubscriber`] on a connection of its own, which it drops every 0.3-1.5 s and opens again, resuming from the subscriber's last index |
//! | the rest | keyed view | a [`View`] of one key |
//!
//! Every view shares one HTTP/2 connection; each reconnecting subscriber has
//! its own, so dropping it really closes a TCP connection and the resume is
//! a new `Subscribe` call with the index the client last saw (moved on by
//! progress marks).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snapstream::codec::{CodecError, PayloadCodec};
use snapstream::event::{Event, Message, Subject};
use snapstream::net::{
    Client, ClientError, RemoteError, RemoteRequest, RemoteSubscriber, Server, View, ViewState,
    Views,
};
use snapstream::publisher::{LagPolicy, Publisher};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{thousands, Change, Final, Hist, CONVERGE_TIMEOUT, TOPIC};

/// How often a quiet remote stream gets a progress mark in the demo (the
/// library's default is 10 s, longer than the whole run).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How long `--connect` waits for the server to answer at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The demo's payload on the wire: 1 byte of flags (1: a value, 2: live),
/// the value (u64, little-endian) and when it was published (nanoseconds
/// since the Unix epoch, little-endian), so latency is measured across
/// processes on one machine too.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChangeCodec;

/// The encoded length of a [`Change`].
const CHANGE_LEN: usize = 17;

impl PayloadCodec<Change> for ChangeCodec {
    fn encode(&self, change: &Change, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let flags = u8::from(change.value.is_some()) | (u8::from(change.live) << 1);
        out.push(flags);
        out.extend_from_slice(&change.value.unwrap_or(0).to_le_bytes());
        let wall = SystemTime::now()
            .checked_sub(change.at.elapsed())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        out.extend_from_slice(&wall.to_le_bytes());
        Ok(())
    }

    fn decode(&self, bytes: bytes::Bytes) -> Result<Change, CodecError> {
        if bytes.len() != CHANGE_LEN {
            return Err(CodecError::Length {
                expected: CHANGE_LEN,
                found: bytes.len(),
            });
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let flags = bytes[0];
        if flags > 3 {
            return Err(CodecError::Other(
                format!("unknown flags {flags:#x}").into(),
            ));
        }
        let wall = UNIX_EPOCH + Duration::from_nanos(word(9));
        let age = SystemTime::now().duration_since(wall).unwrap_or_default();
        let now = Instant::now();
        Ok(Change {
            value: (flags & 1 == 1).then(|| word(1)),
            live: flags & 2 == 2,
            at: now.checked_sub(age).unwrap_or(now),
        })
    }
}

/// `--connect`'s address as a URI: `host:port` gets `http://`.
fn uri(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

fn client(address: &str) -> Result<Client<Change, ChangeCodec>, ClientError> {
    Client::builder([uri(address)])
        .backoff(Duration::from_millis(20), Duration::from_millis(500))
        .connect_timeout(CONNECT_TIMEOUT)
        .build_with(ChangeCodec)
}

// ---------------------------------------------------------------------------
// The subscribers

/// What one remote subscriber is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client-side [`View`] of one key.
    KeyedView,
    /// A client-side [`View`] of every key.
    WildcardView,
    /// A [`RemoteSubscriber`] that drops its connection now and then.
    Reconnecting,
}

#[derive(Debug, Clone)]
pub struct RemoteSpec {
    id: usize,
    subject: Subject,
    kind: Kind,
}

impl RemoteSpec {
    pub fn of(id: usize, keys: &[Arc<str>]) -> Self {
        let key = || Subject::Key(keys[(id * 7919 + 3) % keys.len()].clone());
        let (subject, kind) = match (id % 10, id % 20) {
            (0 | 5, _) => (Subject::Wildcard, Kind::WildcardView),
            (_, 6) => (Subject::Wildcard, Kind::Reconnecting),
            (1, _) => (key(), Kind::Reconnecting),
            _ => (key(), Kind::KeyedView),
        };
        RemoteSpec { id, subject, kind }
    }
}

/// A view's state: the store as its events say, and what it measured.
#[derive(Debug)]
pub struct Replica {
    entries: HashMap<Arc<str>, u64>,
    hist: Hist,
    applied: u64,
}

impl Default for Replica {
    fn default() -> Self {
        Replica {
            entries: HashMap::new(),
            hist: Hist::new(),
            applied: 0,
        }
    }
}

impl Replica {
    fn apply_change(&mut self, key: &str, change: &Change) {
        match change.value {
            Some(v) => {
                self.entries.insert(Arc::from(key), v);
            }
            None => {
                self.entries.remove(key);
            }
        }
        self.applied += 1;
        if change.live {
            self.hist.record(change.at.elapsed());
        }
    }
}

impl ViewState<Change> for Replica {
    fn reset(&mut self) {
        self.entries.clear();
    }

    fn apply(&mut self, event: &Event<Change>) {
        if let Some(key) = event.subject().as_key() {
            self.apply_change(key, event.payload());
        }
    }
}

/// Counters of the reconnecting subscribers.
#[derive(Debug, Default)]
struct Reconnects {
    total: AtomicU64,
    live: AtomicU64,
    snapshot: AtomicU64,
    restarted: AtomicU64,
    progress_marks: AtomicU64,
}

#[derive(Debug)]
struct RemoteResult {
    spec: RemoteSpec,
    converged: bool,
    reason: Option<String>,
    hist: Hist,
    deliveries: u64,
}

/// The remote subscribers' figures, reported apart from the local ones.
#[derive(Debug, Default, Clone)]
pub struct RemoteFigures {
    /// Where they subscribed (`127.0.0.1:port`, or `--connect`'s address).
    pub address: String,
    /// (total, keyed views, wildcard views, reconnecting).
    pub subscribers: (usize, usize, usize, usize),
    /// HTTP/2 connections opened: one shared by the views, one per
    /// reconnecting subscriber and reconnect.
    pub connections: u64,
    /// Events applied to their views (snapshot and live).
    pub deliveries: u64,
    /// Seconds they ran, for the rate.
    pub secs: f64,
    /// Publish-to-view latency p50 / p99, live events only.
    pub latency: (Option<Duration>, Option<Duration>),
    /// Reconnects: total, resumed live, with a new snapshot, restarted
    /// (dropped mid-snapshot); then progress marks received.
    pub reconnects: (u64, u64, u64, u64, u64),
    /// Views that equal the store key by key, and the reasons of those not.
    pub views: (usize, Vec<String>),
    /// What the views were checked against.
    pub checked_against: &'static str,
}

impl RemoteFigures {
    /// Why the remote part failed, if it did.
    pub fn failures(&self) -> Vec<String> {
        let (converged, not) = &self.views;
        match not.first() {
            Some(first) => vec![format!(
                "{} of {} remote views did not converge (first: {first})",
                not.len(),
                converged + not.len()
            )],
            None if *converged == 0 && self.subscribers.0 > 0 => {
                vec!["no remote view was checked".to_string()]
            }
            None => Vec::new(),
        }
    }

    /// The table rows.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let n = |v: u64| thousands(v);
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.2} ms", d.as_secs_f64() * 1e3)
            })
        };
        let (total, keyed, wild, reconn) = self.subscribers;
        let (re, live, snap, restarted, marks) = self.reconnects;
        let views_total = self.views.0 + self.views.1.len();
        vec![
            (
                "remote subscribers",
                format!(
                    "{total} over gRPC at {} ({keyed} keyed views, {wild} wildcard views, \
                     {reconn} reconnecting; {} connections)",
                    self.address,
                    n(self.connections)
                ),
            ),
            (
                "remote deliveries",
                format!(
                    "{} ({}/s)",
                    n(self.deliveries),
                    n((self.deliveries as f64 / self.secs.max(1e-9)) as u64)
                ),
            ),
            (
                "remote latency p50 / p99",
                format!("{} / {}", ms(self.latency.0), ms(self.latency.1)),
            ),
            (
                "remote reconnects",
                format!(
                    "{} ({} resumed live, {} with a new snapshot, {} mid-snapshot restarts; \
                     {} progress marks)",
                    n(re),
                    n(live),
                    n(snap),
                    n(restarted),
                    n(marks)
                ),
            ),
            (
                "remote views converged",
                format!(
                    "{} ({}/{views_total}, checked key by key against {})",
                    if self.views.1.is_empty() && self.views.0 > 0 {
                        "yes"
                    } else {
                        "NO"
                    },
                    self.views.0,
                    self.checked_against
                ),
            ),
        ]
    }
}

/// The remote subscribers of a run, started and then checked.
pub struct Remotes {
    address: String,
    started: Instant,
    /// Dropped (a run interrupted), it aborts them.
    tasks: tokio::task::JoinSet<RemoteResult>,
    specs: (usize, usize, usize, usize),
    reconnects: Arc<Reconnects>,
    checked_against: &'static str,
}

impl Remotes {
    /// Starts `count` remote subscribers of the server at `address`. Each
    /// runs until `end` holds the store's final state, then reads up to it
    /// and compares.
    pub fn start(
        address: &str,
        count: usize,
        keys: &[Arc<str>],
        end: watch::Receiver<Option<Arc<Final>>>,
        seed: u64,
        checked_against: &'static str,
        mut break_a_view: bool,
    ) -> Result<Self, ClientError> {
        let shared = client(address)?;
        let reconnects = Arc::new(Reconnects::default());
        let mut tasks = tokio::task::JoinSet::new();
        let mut specs = (count, 0, 0, 0);
        for id in 0..count {
            let spec = RemoteSpec::of(id, keys);
            let end = end.clone();
            match spec.kind {
                Kind::KeyedView | Kind::WildcardView => {
                    if spec.kind == Kind::KeyedView {
                        specs.1 += 1;
                    } else {
                        specs.2 += 1;
                    }
                    // A registry each: two views of one subject stay two
                    // subscriptions (on the one shared connection).
                    let views = Views::builder(shared.clone(), Replica::default).build();
                    let view = views.view(TOPIC, spec.subject.clone());
                    let broken = std::mem::take(&mut break_a_view);
                    tasks.spawn(watch_view(spec, views, view, end, broken));
                }
                Kind::Reconnecting => {
                    specs.3 += 1;
                    tasks.spawn(reconnecting(
                        spec,
                        address.to_string(),
                        end,
                        reconnects.clone(),
                        seed,
                    ));
                }
            }
        }
        Ok(Remotes {
            address: address.to_string(),
            started: Instant::now(),
            tasks,
            specs,
            reconnects,
            checked_against,
        })
    }

    /// Waits for every remote subscriber's verdict (they end once `end`
    /// was signalled and they read up to it, or their deadline passed).
    pub async fn finish(mut self) -> RemoteFigures {
        let mut hist = Hist::new();
        let mut deliveries = 0;
        let mut converged = 0;
        let mut not_converged = Vec::new();
        let mut results = Vec::with_capacity(self.tasks.len());
        while let Some(joined) = self.tasks.join_next().await {
            results.push(joined.map_err(|_| ()));
        }
        results.sort_by_key(|r| r.as_ref().map_or(usize::MAX, |r| r.spec.id));
        for joined in results {
            match joined {
                Ok(r) => {
                    hist.merge(&r.hist);
                    deliveries += r.deliveries;
                    if r.converged {
                        converged += 1;
                    } else {
                        not_converged.push(format!(
                            "remote subscriber {} ({:?}, {}): {}",
                            r.spec.id,
                            r.spec.kind,
                            r.spec.subject,
                            r.reason.unwrap_or_default()
                        ));
                    }
                }
                Err(_) => not_converged.push("a remote subscriber task panicked".to_string()),
            }
        }
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = &self.reconnects;
        RemoteFigures {
            address: self.address.clone(),
            subscribers: self.specs,
            connections: u64::from(self.specs.1 + self.specs.2 > 0)
                + self.specs.3 as u64
                + c(&r.total),
            deliveries,
            secs: self.started.elapsed().as_secs_f64(),
            latency: (hist.quantile(0.5), hist.quantile(0.99)),
            reconnects: (
                c(&r.total),
                c(&r.live),
                c(&r.snapshot),
                c(&r.restarted),
                c(&r.progress_marks),
            ),
            views: (converged, not_converged),
            checked_against: self.checked_against,
        }
    }
}

/// What a keyed view must have seen: the key's last change, or — for a key
/// the final state lacks and whose deletion index is unknown (`--connect`
/// learns the state from a snapshot) — nothing: such a view is compared
/// until it matches or the deadline passes.
fn known_target(fin: &Final, subject: &Subject) -> Option<u64> {
    match subject.as_key() {
        Some(k) => fin.changed_at.get(k).copied(),
        None => Some(fin.index),
    }
}

/// One client-side view: waits for the end, then until the view reached the
/// final state's index, then compares it key by key.
async fn watch_view(
    spec: RemoteSpec,
    views: Views<Change, ChangeCodec, Replica>,
    view: View<Replica>,
    mut end: watch::Receiver<Option<Arc<Final>>>,
    break_view: bool,
) -> RemoteResult {
    let fin = match end.wait_for(Option::is_some).await {
        Ok(f) => f.clone().expect("waited for it"),
        Err(_) => {
            return RemoteResult {
                spec,
                converged: false,
                reason: Some("the run ended before the store's final state".to_string()),
                hist: Hist::new(),
                deliveries: 0,
            }
        }
    };
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut reason = None;
    if let Some(target) = known_target(&fin, &spec.subject) {
        match view.wait(target.saturating_sub(1), left()).await {
            Ok(at) if at >= target => {}
            Ok(at) => {
                reason = Some(format!(
                    "reached index {at} of {target} before the deadline"
                ))
            }
            Err(e) => reason = Some(format!("view failed: {}", super::chain(&e))),
        }
    }
    let mut converged = false;
    if reason.is_none() {
        loop {
            if view.read(|r| fin.matches(&spec.subject, &r.entries)) {
                converged = true;
                break;
            }
            if left().is_zero() {
                break;
            }
            let _ = view
                .wait(view.index(), left().min(Duration::from_millis(200)))
                .await;
        }
        if converged && break_view {
            // Corrupted after it matched: the check below must see it.
            converged = view.read(|r| {
                let mut wrong = r.entries.clone();
                wrong.insert(Arc::from("not-a-key"), 0);
                fin.matches(&spec.subject, &wrong)
            });
        }
        if !converged {
            reason = Some(format!(
                "view differs from the store ({} entries)",
                view.read(|r| r.entries.len())
            ));
        }
    }
    if view.duplicates() > 0 {
        converged = false;
        reason = Some(format!("{} duplicate batches", view.duplicates()));
    }
    let (hist, deliveries) = view.read(|r| (r.hist.clone(), r.applied));
    drop(view);
    drop(views);
    RemoteResult {
        spec,
        converged,
        reason,
        hist,
        deliveries,
    }
}

/// One reconnecting subscriber: a [`RemoteSubscriber`] on its own
/// connection, read into a view; every 0.3-1.5 s it drops both and opens a
/// new connection, resuming from the subscriber's last index. After the end
/// it reads up to the final index (a progress mark moves it for a key that
/// did not change) and compares.
async fn reconnecting(
    spec: RemoteSpec,
    address: String,
    mut end: watch::Receiver<Option<Arc<Final>>>,
    counters: Arc<Reconnects>,
    seed: u64,
) -> RemoteResult {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (spec.id as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut hist = Hist::new();
    let mut replica = Replica::default();
    let mut deliveries = 0u64;
    let fail = |spec: RemoteSpec, hist: Hist, deliveries: u64, reason: String| RemoteResult {
        spec,
        converged: false,
        reason: Some(reason),
        hist,
        deliveries,
    };
    let subject = spec.subject.clone();
    let request = |index: u64| {
        RemoteRequest::new(TOPIC, subject.clone())
            .index(index)
            .on_lag(LagPolicy::Resnapshot)
    };
    let open = |index: u64| client(&address).map(|c| (c.subscribe(request(index)), c));
    let (mut sub, mut conn): (RemoteSubscriber<Change>, _) = match open(0) {
        Ok(s) => s,
        Err(e) => return fail(spec, hist, 0, super::chain(&e)),
    };
    let mut every = || Duration::from_millis(rng.gen_range(300..1_500));
    let mut next_disconnect = Some(Instant::now() + every());
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut deadline: Option<Instant> = None;
    // (complete, in a snapshot, the newest index seen)
    let (mut complete, mut in_snapshot, mut seen) = (false, true, 0u64);
    let mut just_resumed = false;
    let mut check = tokio::time::interval(Duration::from_millis(100));
    loop {
        if let Some(fin) = end.borrow().as_ref() {
            let at = seen.max(sub.last_index().unwrap_or(0));
            let done = match known_target(fin, &spec.subject) {
                Some(target) => at >= target,
                // A key the final state lacks: complete up to the final index.
                None => at >= fin.index,
            };
            if complete && done {
                break;
            }
        }
        tokio::select! {
            msg = sub.recv() => {
                if std::mem::take(&mut just_resumed) {
                    if matches!(msg, Ok(Message::NewSnapshotToFollow)) {
                        counters.snapshot.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counters.live.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match msg {
                    Ok(Message::NewSnapshotToFollow) => {
                        replica.reset();
                        (complete, in_snapshot, seen) = (false, true, 0);
                    }
                    Ok(Message::EndOfSnapshot { index }) => {
                        (complete, in_snapshot, seen) = (true, false, index);
                    }
                    Ok(Message::Events(batch)) => {
                        for e in batch.iter() {
                            let Some(key) = e.subject().as_key() else { continue };
                            replica.apply_change(key, e.payload());
                            if !in_snapshot {
                                seen = seen.max(e.index());
                            }
                        }
                        deliveries += batch.len() as u64;
                    }
                    Err(e) => {
                        let reason = format!("subscription ended: {}", super::chain(&e));
                        hist.merge(&replica.hist);
                        return fail(spec, hist, deliveries, reason);
                    }
                }
            }
            _ = tokio::time::sleep_until(next_disconnect.unwrap_or(far)), if next_disconnect.is_some() => {
                // Drop the subscription and its connection; open a new one
                // from the last index the client saw.
                let from = if complete { sub.last_index().unwrap_or(seen).max(seen) } else { 0 };
                counters.progress_marks.fetch_add(sub.progress_marks(), Ordering::Relaxed);
                drop(sub);
                drop(conn);
                counters.total.fetch_add(1, Ordering::Relaxed);
                if from == 0 {
                    counters.restarted.fetch_add(1, Ordering::Relaxed);
                    replica.reset();
                    (complete, in_snapshot, seen) = (false, true, 0);
                } else {
                    seen = from;
                    just_resumed = true;
                }
                (sub, conn) = match open(from) {
                    Ok(s) => s,
                    Err(e) => {
                        hist.merge(&replica.hist);
                        return fail(spec, hist, deliveries, super::chain(&e));
                    }
                };
                next_disconnect = Some(Instant::now() + every());
            }
            changed = end.changed(), if deadline.is_none() => {
                if changed.is_err() {
                    hist.merge(&replica.hist);
                    return fail(spec, hist, deliveries, "the run ended before the store's final state".into());
                }
                next_disconnect = None;
                deadline = Some(Instant::now() + CONVERGE_TIMEOUT);
            }
            // Progress marks move `sub.last_index()` without a message.
            _ = check.tick(), if deadline.is_some() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                let at = seen.max(sub.last_index().unwrap_or(0));
                hist.merge(&replica.hist);
                return fail(spec, hist, deliveries, format!("reached index {at} before the deadline"));
            }
        }
    }
    counters
        .progress_marks
        .fetch_add(sub.progress_marks(), Ordering::Relaxed);
    drop(sub);
    drop(conn);
    let fin = end.borrow().clone().expect("the end was signalled");
    let converged = fin.matches(&spec.subject, &replica.entries);
    hist.merge(&replica.hist);
    RemoteResult {
        reason: (!converged).then(|| {
            format!(
                "view differs from the store ({} entries)",
                replica.entries.len()
            )
        }),
        spec,
        converged,
        hist,
        deliveries,
    }
}

// ---------------------------------------------------------------------------
// The server, in the default run and for `--serve`

/// Starts the gRPC server over `publisher` on `addr`.
pub async fn serve(
    publisher: &Publisher<Change>,
    addr: SocketAddr,
) -> Result<Server, snapstream::net::ServeError> {
    Server::builder(publisher.clone(), ChangeCodec)
        .progress_interval(Some(PROGRESS_INTERVAL))
        .bind(addr)
        .await
}

// ---------------------------------------------------------------------------
// `--connect`

/// Why `--connect` could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The address is not one a client can use.
    #[error("--connect {address}: not a usable address")]
    BadAddress {
        /// As given.
        address: String,
        /// What the client said.
        #[source]
        source: ClientError,
    },
    /// The host name did not resolve.
    #[error("--connect {address}: cannot resolve it")]
    Resolve {
        /// As given.
        address: String,
        /// What the resolver said.
        #[source]
        source: std::io::Error,
    },
    /// Nothing answered (refused, unreachable, or no answer in time).
    #[error("--connect {address}: cannot connect (is `replicate --serve {address}` running?)")]
    Connect {
        /// As given.
        address: String,
        /// What the connection attempt said.
        #[source]
        source: std::io::Error,
    },
    /// It answered, but not as a replicate server.
    #[error("--connect {address}: the server refused a subscription to topic {TOPIC:?}")]
    Subscribe {
        /// As given.
        address: String,
        /// What the server said.
        #[source]
        source: RemoteError,
    },
    /// It answered gRPC but sent no snapshot in time.
    #[error("--connect {address}: no snapshot within {} s", CONNECT_TIMEOUT.as_secs())]
    NoSnapshot {
        /// As given.
        address: String,
    },
}

/// `host:port` of `address` (a URI or `host:port`).
fn authority(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// A wildcard snapshot over the network (perhaps a cached one, of an
/// earlier index): (index, key → (value, index)).
async fn fresh_snapshot(
    client: &Client<Change, ChangeCodec>,
) -> Result<(u64, HashMap<Arc<str>, (u64, u64)>), RemoteError> {
    let mut sub = client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard));
    let mut entries = HashMap::new();
    loop {
        match sub.recv().await? {
            Message::NewSnapshotToFollow => entries.clear(),
            Message::Events(batch) => {
                for e in batch.iter() {
                    if let (Some(k), Some(v)) = (e.subject().as_key(), e.payload().value) {
                        entries.insert(Arc::from(k), (v, e.index()));
                    }
                }
            }
            Message::EndOfSnapshot { index } => return Ok((index, entries)),
        }
    }
}

/// Checks that a replicate server answers at `address`: resolves it,
/// connects, and reads a fresh snapshot. Returns the keys it holds.
async fn probe(address: &str) -> Result<Vec<Arc<str>>, ConnectError> {
    let bad = |source| ConnectError::BadAddress {
        address: address.to_string(),
        source,
    };
    let c = client(address).map_err(bad)?;
    let host = authority(address);
    let resolved = tokio::net::lookup_host(host)
        .await
        .and_then(|mut a| {
            a.next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
        })
        .map_err(|source| ConnectError::Resolve {
            address: address.to_string(),
            source,
        })?;
    let connect_error = |source| ConnectError::Connect {
        address: address.to_string(),
        source,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(resolved)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(connect_error(e)),
        Err(_) => {
            return Err(connect_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )))
        }
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, fresh_snapshot(&c)).await {
        Ok(Ok((_, entries))) => {
            let mut keys: Vec<Arc<str>> = entries.into_keys().collect();
            keys.sort();
            Ok(keys)
        }
        Ok(Err(source)) => Err(ConnectError::Subscribe {
            address: address.to_string(),
            source,
        }),
        Err(_) => Err(ConnectError::NoSnapshot {
            address: address.to_string(),
        }),
    }
}

/// How long a wildcard subscription must stay quiet, after a progress mark,
/// for `--connect` to take the store as holding still.
const QUIET_FOR: Duration = Duration::from_secs(2);

/// Follows the whole store over one wildcard subscription until it holds
/// still — no event for [`QUIET_FOR`] and a progress mark since the last
/// one, which says the subscription is complete up to the server's current
/// index — and returns that state, or `None` if it kept changing until the
/// deadline. (A snapshot alone is not enough: the server may hand out a
/// cached snapshot of an earlier index, followed by the live events since.)
async fn quiet_state(client: &Client<Change, ChangeCodec>) -> Option<Final> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut sub = client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard));
    let mut entries: HashMap<Arc<str>, (u64, u64)> = HashMap::new();
    let mut in_snapshot = true;
    let mut last_event = Instant::now();
    let mut marks_then = sub.progress_marks();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
            Err(_) => {
                let quiet = last_event.elapsed() >= QUIET_FOR && sub.progress_marks() > marks_then;
                if let (false, true, Some(index)) = (in_snapshot, quiet, sub.last_index()) {
                    // Every key present carries the index it last changed
                    // at; a key absent was deleted at an index the state
                    // does not say.
                    return Some(Final {
                        index,
                        changed_at: entries.iter().map(|(k, (_, i))| (k.clone(), *i)).collect(),
                        entries: entries.into_iter().map(|(k, (v, _))| (k, v)).collect(),
                    });
                }
            }
            Ok(Err(_)) => return None,
            Ok(Ok(msg)) => {
                last_event = Instant::now();
                marks_then = sub.progress_marks();
                match msg {
                    Message::NewSnapshotToFollow => {
                        entries.clear();
                        in_snapshot = true;
                    }
                    Message::EndOfSnapshot { .. } => in_snapshot = false,
                    Message::Events(batch) => {
                        for e in batch.iter() {
                            let Some(k) = e.subject().as_key() else {
                                continue;
                            };
                            match e.payload().value {
                                Some(v) => {
                                    entries.insert(Arc::from(k), (v, e.index()));
                                }
                                None => {
                                    entries.remove(k);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    None
}

/// What `--connect` found.
#[derive(Debug, Default)]
pub struct ConnectReport {
    /// The remote subscribers' figures.
    pub remote: RemoteFigures,
    /// The index the server's store held still at (`None`: it never did).
    pub final_index: Option<u64>,
}

impl ConnectReport {
    /// Whether every remote view converged.
    pub fn ok(&self) -> bool {
        self.failures().is_empty()
    }

    /// Why not, one reason each.
    pub fn failures(&self) -> Vec<String> {
        let mut why = self.remote.failures();
        if self.final_index.is_none() {
            why.insert(
                0,
                format!(
                    "the server's store kept changing for {} s after the clients' run",
                    CONVERGE_TIMEOUT.as_secs()
                ),
            );
        }
        why
    }

    /// The table.
    pub fn summary(&self) -> String {
        let mut rows = vec![(
            "server's final index",
            self.final_index
                .map_or("- (still changing)".to_string(), thousands),
        )];
        rows.extend(self.remote.rows());
        let mut s = String::new();
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let _ = writeln!(s, "{:-<1$}", "", width + 50);
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<width$}  {v}");
        }
        let _ = writeln!(s, "{:-<1$}", "", width + 50);
        for reason in self.remote.views.1.iter().take(10) {
            let _ = writeln!(s, "not converged: {reason}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(s, "verdict: OK - every remote view converged");
        } else {
            let _ = writeln!(s, "verdict: FAILED - {}", failures.join("; "));
        }
        s
    }
}

/// `--connect ADDR`: remote subscribers only, against a `--serve` run.
/// They run for `duration`, then wait for the server's store to hold still
/// and compare every view, key by key, with the store's state read over the
/// network (a wildcard subscription followed until it holds still).
///
/// # Errors
///
/// A [`ConnectError`] when no replicate server answers at `address`.
pub async fn connect(
    address: &str,
    count: usize,
    duration: Duration,
    seed: u64,
) -> Result<ConnectReport, ConnectError> {
    let keys = probe(address).await?;
    if keys.is_empty() {
        return Err(ConnectError::NoSnapshot {
            address: address.to_string(),
        });
    }
    eprintln!(
        "replicate: {count} remote subscribers of {} keys at {address} for {:.1} s",
        keys.len(),
        duration.as_secs_f64()
    );
    let (end_tx, end_rx) = watch::channel::<Option<Arc<Final>>>(None);
    let bad = |source| ConnectError::BadAddress {
        address: address.to_string(),
        source,
    };
    let remotes = Remotes::start(
        address,
        count,
        &keys,
        end_rx,
        seed,
        "the store read over the network",
        false,
    )
    .map_err(bad)?;
    tokio::time::sleep(duration).await;
    let checker = client(address).map_err(bad)?;
    let fin = quiet_state(&checker).await;
    let final_index = fin.as_ref().map(|f| f.index);
    match fin {
        Some(fin) => {
            let _ = end_tx.send(Some(Arc::new(fin)));
        }
        // The views cannot be checked: end them.
        None => drop(end_tx),
    }
    let remote = remotes.finish().await;
    Ok(ConnectReport {
        remote,
        final_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_codec_round_trips_and_rejects_bad_bytes() {
        let at = Instant::now();
        let mut buf = Vec::new();
        let c = Change {
            value: Some(42),
            live: true,
            at,
        };
        ChangeCodec.encode(&c, &mut buf).unwrap();
        let back = ChangeCodec.decode(bytes::Bytes::from(buf)).unwrap();
        assert_eq!((back.value, back.live), (Some(42), true));
        assert!(ChangeCodec.decode(bytes::Bytes::from_static(b"x")).is_err());
        assert!(ChangeCodec
            .decode(bytes::Bytes::from(vec![9u8; 17]))
            .is_err());
    }
}
