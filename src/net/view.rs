//! Client-side views: one remote subscription per (topic, subject) keeps a
//! store that every local reader shares (Consul's materialized view,
//! kube-rs' reflector store).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::client::{Client, RemoteRequest};
use super::error::RemoteError;
use crate::codec::PayloadCodec;
use crate::event::{Event, Message, SharedPayload, Subject, Topic};
use crate::publisher::LagPolicy;

/// Default time a view nobody holds keeps its subscription: 60 s. A reader
/// coming back within it finds the view warm.
pub const DEFAULT_VIEW_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The state a [`View`] keeps, built from the events of its subscription.
///
/// Obligations: `reset` forgets everything; after `reset` and the
/// snapshot's events, the state reflects the snapshot's index. The view
/// calls `reset` then `apply` for every snapshot event when a snapshot
/// completes (readers never see half a snapshot), then `apply` for every
/// live event, in order, each exactly once.
///
/// # Examples
///
/// ```
/// use snapstream::event::Event;
/// use snapstream::net::ViewState;
///
/// #[derive(Default)]
/// struct Sum(u64);
///
/// impl ViewState<u64> for Sum {
///     fn reset(&mut self) {
///         self.0 = 0;
///     }
///     fn apply(&mut self, event: &Event<u64>) {
///         self.0 += event.payload();
///     }
/// }
///
/// let mut s = Sum::default();
/// s.apply(&Event::new("t", "k", 1, 5));
/// assert_eq!(s.0, 5);
/// ```
pub trait ViewState<P>: Send + Sync + 'static {
    /// Forgets everything: a new snapshot follows.
    fn reset(&mut self);
    /// Applies one event (of the snapshot or live).
    fn apply(&mut self, event: &Event<P>);
}

/// The default view state: the newest event of each key (for a one-key
/// view, at most one entry).
///
/// # Examples
///
/// ```
/// use snapstream::event::Event;
/// use snapstream::net::{KeyValue, ViewState};
///
/// let mut kv = KeyValue::default();
/// kv.apply(&Event::new("t", "a", 1, 10u64));
/// kv.apply(&Event::new("t", "a", 2, 11u64));
/// assert_eq!(kv.get("a"), Some(&11));
/// assert_eq!(kv.iter().count(), 1);
/// ```
pub struct KeyValue<P> {
    entries: BTreeMap<Arc<str>, Event<P>>,
}

impl<P> Default for KeyValue<P> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<P> fmt::Debug for KeyValue<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("len", &self.entries.len())
            .finish()
    }
}

impl<P> KeyValue<P> {
    /// The payload of `key`, if the view holds it.
    ///
    /// # Examples
    ///
    /// See [`KeyValue`].
    pub fn get(&self, key: &str) -> Option<&P> {
        self.entries.get(key).map(|e| e.payload())
    }

    /// The newest event of `key` (with its index).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::Event;
    /// use snapstream::net::{KeyValue, ViewState};
    /// let mut kv = KeyValue::default();
    /// kv.apply(&Event::new("t", "a", 4, ()));
    /// assert_eq!(kv.event("a").map(|e| e.index()), Some(4));
    /// ```
    pub fn event(&self, key: &str) -> Option<&Event<P>> {
        self.entries.get(key)
    }

    /// Every (key, payload), in key order.
    ///
    /// # Examples
    ///
    /// See [`KeyValue`].
    pub fn iter(&self) -> impl Iterator<Item = (&str, &P)> + '_ {
        self.entries.iter().map(|(k, e)| (&**k, e.payload()))
    }

    /// How many keys the view holds.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(snapstream::net::KeyValue::<u8>::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the view holds no key.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(snapstream::net::KeyValue::<u8>::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<P: Send + Sync + 'static> ViewState<P> for KeyValue<P> {
    fn reset(&mut self) {
        self.entries.clear();
    }

    fn apply(&mut self, event: &Event<P>) {
        if let Subject::Key(k) = event.subject() {
            self.entries.insert(k.clone(), event.clone());
        }
    }
}

/// A view stopped for good.
///
/// # Examples
///
/// ```
/// use snapstream::net::{RemoteError, ViewError};
/// let e = ViewError::Failed(RemoteError::PermissionDenied("no".into()));
/// assert_eq!(e.to_string(), "view failed");
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// Its subscription ended with an error retrying cannot fix.
    #[error("view failed")]
    Failed(#[source] RemoteError),
}

#[derive(Debug, Clone, Default)]
struct Status {
    /// The index the state reflects; 0 until the first snapshot completes.
    index: u64,
    failed: Option<RemoteError>,
}

struct Core<S> {
    state: RwLock<S>,
    status: watch::Sender<Status>,
    /// Live batches at or below the view's index, skipped (never expected).
    duplicates: AtomicU64,
    /// Snapshots applied (the first one included).
    snapshots: AtomicU64,
    task: Mutex<Option<AbortHandle>>,
}

type Key = (Topic, Subject);

struct Entry<S> {
    core: Arc<Core<S>>,
    handles: usize,
    /// Bumped on every hand-out, so an old idle timer does nothing.
    generation: u64,
}

struct Registry<P, C, S> {
    client: Client<P, C>,
    make: Box<dyn Fn() -> S + Send + Sync>,
    idle_timeout: Duration,
    token: Option<Arc<str>>,
    runtime: Handle,
    entries: Mutex<HashMap<Key, Entry<S>>>,
}

/// Builds [`Views`].
///
/// | option | default |
/// |---|---|
/// | [`idle_timeout`](Self::idle_timeout) | [`DEFAULT_VIEW_IDLE_TIMEOUT`] (60 s) |
/// | [`token`](Self::token) | none |
///
/// # Examples
///
/// See [`Views`].
pub struct ViewsBuilder<P, C, S> {
    client: Client<P, C>,
    make: Box<dyn Fn() -> S + Send + Sync>,
    idle_timeout: Duration,
    token: Option<Arc<str>>,
}

impl<P, C, S> fmt::Debug for ViewsBuilder<P, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewsBuilder")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<P, C, S> ViewsBuilder<P, C, S>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
    S: ViewState<P>,
{
    /// Sets how long a view nobody holds keeps its subscription.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the token the views subscribe with.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn token(mut self, token: impl Into<Arc<str>>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Builds the registry.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn build(self) -> Views<P, C, S> {
        Views {
            registry: Arc::new(Registry {
                client: self.client,
                make: self.make,
                idle_timeout: self.idle_timeout,
                token: self.token,
                runtime: Handle::current(),
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// The views of one client, by (topic, subject): asking twice for the same
/// one gives two handles on one store kept by one remote subscription.
/// Cheap to clone.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::event::{Event, Subject};
/// use snapstream::net::{BinaryCodec, Client, KeyValue, Server, Views};
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
///
/// # #[tokio::main] async fn main() {
/// let mut b = Publisher::<u64>::builder();
/// b.register("t", |r: SnapshotRequest, mut s: SnapshotSink<u64>| async move {
///     s.append(vec![Event::new("t", r.subject().clone(), 1, 10)])?;
///     Ok(1)
/// })
/// .unwrap();
/// let publisher = b.build();
/// let server = Server::builder(publisher.clone(), BinaryCodec)
///     .bind("127.0.0.1:0".parse().unwrap())
///     .await
///     .unwrap();
/// let client = Client::builder([format!("http://{}", server.local_addr())]).build::<u64>().unwrap();
/// let views = Views::builder(client, KeyValue::<u64>::default)
///     .idle_timeout(Duration::from_secs(5))
///     .build();
///
/// let view = views.view("t", Subject::key("k"));
/// // A blocking read: returns once the view is past index 0 (its snapshot).
/// assert_eq!(view.wait(0, Duration::from_secs(30)).await, Ok(1));
/// assert_eq!(view.read(|kv| kv.get("k").copied()), Some(10));
///
/// publisher.publish(vec![Event::new("t", "k", 2, 11)]).unwrap();
/// assert_eq!(view.wait(1, Duration::from_secs(30)).await, Ok(2));
/// assert_eq!(view.read(|kv| kv.get("k").copied()), Some(11));
/// // Another reader shares the same store.
/// assert_eq!(views.view("t", Subject::key("k")).index(), 2);
/// # server.shutdown().await.unwrap();
/// # }
/// ```
pub struct Views<P, C, S> {
    registry: Arc<Registry<P, C, S>>,
}

impl<P, C, S> Clone for Views<P, C, S> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<P, C, S> fmt::Debug for Views<P, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Views")
            .field("idle_timeout", &self.registry.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<P, C, S> Views<P, C, S>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
    S: ViewState<P>,
{
    /// A builder over `client`; `make` gives each view its empty state.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn builder(
        client: Client<P, C>,
        make: impl Fn() -> S + Send + Sync + 'static,
    ) -> ViewsBuilder<P, C, S> {
        ViewsBuilder {
            client,
            make: Box::new(make),
            idle_timeout: DEFAULT_VIEW_IDLE_TIMEOUT,
            token: None,
        }
    }

    /// The view of `subject` of `topic`: the running one, or a new one
    /// whose subscription starts now.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn view(&self, topic: impl Into<Topic>, subject: impl Into<Subject>) -> View<S> {
        let key = (topic.into(), subject.into());
        let reg = &self.registry;
        let mut entries = reg.entries.lock().expect("views lock");
        let entry = entries.entry(key.clone()).or_insert_with(|| {
            let core = Arc::new(Core {
                state: RwLock::new((reg.make)()),
                status: watch::channel(Status::default()).0,
                duplicates: AtomicU64::new(0),
                snapshots: AtomicU64::new(0),
                task: Mutex::new(None),
            });
            let mut request =
                RemoteRequest::new(key.0.clone(), key.1.clone()).on_lag(LagPolicy::Resnapshot);
            if let Some(t) = &reg.token {
                request = request.token(t.clone());
            }
            let task = reg
                .runtime
                .spawn(maintain(reg.client.clone(), request, core.clone()));
            *core.task.lock().expect("task lock") = Some(task.abort_handle());
            Entry {
                core,
                handles: 0,
                generation: 0,
            }
        });
        entry.handles += 1;
        entry.generation += 1;
        let core = entry.core.clone();
        drop(entries);
        View {
            core,
            release: Some(Arc::new(Release {
                key,
                registry: self.registry.clone(),
            })),
        }
    }

    /// How many views have a running subscription (held or idle).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::net::{Client, KeyValue, Views};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let client = Client::builder(["http://127.0.0.1:1"]).build::<u64>().unwrap();
    /// let views = Views::builder(client, KeyValue::<u64>::default).build();
    /// assert_eq!(views.open_views(), 0);
    /// # }
    /// ```
    pub fn open_views(&self) -> usize {
        self.registry.entries.lock().expect("views lock").len()
    }
}

/// What a handle's drop reaches: the registry, without its type parameters.
trait Releaser: Send + Sync {
    fn retain(&self);
    fn release(&self);
}

struct Release<P, C, S> {
    key: Key,
    registry: Arc<Registry<P, C, S>>,
}

impl<P, C, S> Releaser for Release<P, C, S>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
    S: ViewState<P>,
{
    fn retain(&self) {
        let mut entries = self.registry.entries.lock().expect("views lock");
        if let Some(e) = entries.get_mut(&self.key) {
            e.handles += 1;
            e.generation += 1;
        }
    }

    fn release(&self) {
        let reg = &self.registry;
        let generation = {
            let mut entries = reg.entries.lock().expect("views lock");
            let Some(e) = entries.get_mut(&self.key) else {
                return;
            };
            e.handles -= 1;
            if e.handles > 0 {
                return;
            }
            e.generation
        };
        let registry = reg.clone();
        let key = self.key.clone();
        reg.runtime.spawn(async move {
            tokio::time::sleep(registry.idle_timeout).await;
            let mut entries = registry.entries.lock().expect("views lock");
            if entries
                .get(&key)
                .is_some_and(|e| e.handles == 0 && e.generation == generation)
            {
                let e = entries.remove(&key).expect("present");
                if let Some(task) = e.core.task.lock().expect("task lock").take() {
                    task.abort();
                }
                tracing::debug!(topic = %key.0, subject = %key.1, "idle view closed");
            }
        });
    }
}

/// A handle on a client-side view. Clones share the view; when the last
/// handle goes, the view's subscription stays open for the idle timeout,
/// then closes.
///
/// # Examples
///
/// See [`Views`].
pub struct View<S> {
    core: Arc<Core<S>>,
    release: Option<Arc<dyn Releaser>>,
}

impl<S> fmt::Debug for View<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("index", &self.core.status.borrow().index)
            .finish_non_exhaustive()
    }
}

impl<S> View<S> {
    /// Reads the state under the view's read lock (hold it briefly: the
    /// subscription waits for it to apply events).
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        let state = self.core.state.read().unwrap_or_else(|e| e.into_inner());
        f(&state)
    }

    /// The index the state reflects (0 before the first snapshot completed).
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn index(&self) -> u64 {
        self.core.status.borrow().index
    }

    /// Snapshots applied so far (more than one after resets).
    ///
    /// # Examples
    ///
    /// See [`duplicates`](Self::duplicates).
    pub fn snapshots(&self) -> u64 {
        self.core.snapshots.load(Ordering::Relaxed)
    }

    /// Live batches that arrived at or below the view's index and were
    /// skipped. Always 0 unless the wire misbehaves: a guard, counted.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::net::{Client, KeyValue, Views};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let client = Client::builder(["http://127.0.0.1:1"]).build::<u64>().unwrap();
    /// # let views = Views::builder(client, KeyValue::<u64>::default).build();
    /// let view = views.view("t", Subject::key("k"));
    /// assert_eq!((view.duplicates(), view.snapshots(), view.index()), (0, 0, 0));
    /// # }
    /// ```
    pub fn duplicates(&self) -> u64 {
        self.core.duplicates.load(Ordering::Relaxed)
    }

    /// A blocking read (Consul's blocking query): waits until the view is
    /// past `min_index` or `timeout` passed, and returns the view's index
    /// then (at or below `min_index` on a timeout). Wait with the index the
    /// previous call returned to see every change.
    ///
    /// # Errors
    ///
    /// [`ViewError::Failed`] when the view's subscription ended for good
    /// (unknown topic, permission denied, ...).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub async fn wait(&self, min_index: u64, timeout: Duration) -> Result<u64, ViewError> {
        let mut rx = self.core.status.subscribe();
        let ready = async {
            rx.wait_for(|s| s.failed.is_some() || s.index > min_index)
                .await
                .map(|s| s.clone())
        };
        let status = match tokio::time::timeout(timeout, ready).await {
            Ok(Ok(status)) => status,
            // Timed out (or the view was dropped meanwhile): the view as it is.
            _ => self.core.status.borrow().clone(),
        };
        match status.failed {
            Some(e) => Err(ViewError::Failed(e)),
            None => Ok(status.index),
        }
    }
}

impl<S> Clone for View<S> {
    fn clone(&self) -> Self {
        // A clone is one more handle: count it in the registry.
        if let Some(r) = &self.release {
            r.retain();
        }
        Self {
            core: self.core.clone(),
            release: self.release.clone(),
        }
    }
}

impl<S> Drop for View<S> {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            r.release();
        }
    }
}

impl<P: Send + Sync + 'static> View<KeyValue<P>> {
    /// The payload of `key` (shared, not copied).
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn get(&self, key: &str) -> Option<SharedPayload<P>> {
        self.read(|kv| kv.event(key).map(|e| e.shared_payload()))
    }

    /// Every (key, payload) the view holds, in key order.
    ///
    /// # Examples
    ///
    /// See [`Views`].
    pub fn entries(&self) -> Vec<(Arc<str>, SharedPayload<P>)> {
        self.read(|kv| {
            kv.entries
                .iter()
                .map(|(k, e)| (k.clone(), e.shared_payload()))
                .collect()
        })
    }
}

/// Keeps a view's state: the one remote subscription of its (topic, subject).
async fn maintain<P, C, S>(client: Client<P, C>, request: RemoteRequest, core: Arc<Core<S>>)
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
    S: ViewState<P>,
{
    let mut index = 0;
    let mut from = request.requested_index();
    loop {
        let mut sub = client.subscribe(request.clone().index(from));
        // Snapshot events wait here until their EndOfSnapshot.
        let mut snapshot: Option<Vec<Event<P>>> = (from == 0).then(Vec::new);
        loop {
            match sub.recv().await {
                Ok(Message::NewSnapshotToFollow) => snapshot = Some(Vec::new()),
                Ok(Message::Events(batch)) => match &mut snapshot {
                    Some(events) => events.extend(batch.iter().cloned()),
                    None if batch.index() <= index => {
                        core.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        let mut state = core.state.write().unwrap_or_else(|e| e.into_inner());
                        for e in batch.iter() {
                            state.apply(e);
                        }
                        drop(state);
                        index = batch.index();
                        core.status.send_modify(|s| s.index = index);
                    }
                },
                Ok(Message::EndOfSnapshot { index: at }) => {
                    let events = snapshot.take().unwrap_or_default();
                    let mut state = core.state.write().unwrap_or_else(|e| e.into_inner());
                    state.reset();
                    for e in &events {
                        state.apply(e);
                    }
                    drop(state);
                    index = at;
                    core.snapshots.fetch_add(1, Ordering::Relaxed);
                    core.status.send_modify(|s| s.index = index);
                }
                Err(RemoteError::ForceClosed) => {
                    // Drop the view and start over from a fresh snapshot.
                    core.state
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .reset();
                    index = 0;
                    from = 0;
                    core.status.send_modify(|s| s.index = 0);
                    break;
                }
                Err(e) => {
                    core.status.send_modify(|s| s.failed = Some(e));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Client;

    #[tokio::test(start_paused = true)]
    async fn an_idle_view_closes_after_its_timeout_unless_a_reader_returns() {
        // Nothing listens there: the view's subscription just retries.
        let client = Client::builder(["http://127.0.0.1:1"])
            .backoff(Duration::from_secs(1), Duration::from_secs(1))
            .build::<u64>()
            .unwrap();
        let views = Views::builder(client, KeyValue::<u64>::default)
            .idle_timeout(Duration::from_secs(60))
            .build();
        let sleep = |s| tokio::time::sleep(Duration::from_secs(s));

        let v = views.view("t", Subject::key("k"));
        let v2 = v.clone();
        drop(v);
        sleep(120).await;
        assert_eq!(views.open_views(), 1, "a clone still holds it");

        drop(v2); // idle from t0
        sleep(30).await;
        assert_eq!(views.open_views(), 1);
        let v3 = views.view("t", Subject::key("k"));
        assert!(Arc::ptr_eq(
            &v3.core,
            &views.view("t", Subject::key("k")).core
        ));
        drop(v3); // idle again from t0 + 30
        sleep(40).await; // past t0 + 60: the first timer must do nothing
        assert_eq!(views.open_views(), 1);
        sleep(30).await; // past t0 + 90
        assert_eq!(views.open_views(), 0, "idle for the whole timeout: closed");
    }
}
