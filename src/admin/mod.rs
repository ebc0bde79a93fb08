//! The operator's view: metrics, a JSON admin API and a live HTML page.
//!
//! Enabled by the `admin` cargo feature.
//!
//! # What it does
//!
//! An [`Admin`] holds handles to the parts of a service an operator wants to
//! watch — a [`Publisher`], [`KeyedPool`]s, [`LeasePool`]s and
//! [`WorkQueue`]s — and reads them only through their public figures
//! (`stats()`, queue lengths, counters). Nothing is added to a hot path: the
//! figures are read when someone asks.
//!
//! - [`Admin::collect`] reads every figure once and records it through the
//!   [`metrics`] facade (gauges, and absolute counters for the monotonic
//!   figures), so the service picks its exporter. With no recorder
//!   installed the calls do nothing.
//! - [`Admin::router`] is an axum [`Router`](axum::Router) the service mounts
//!   where it likes (for example under `/admin`): `GET /metrics` in Prometheus
//!   text format, JSON endpoints under `api/`, a server-sent-event stream and
//!   one HTML page at the root that updates live.
//!
//! # Metrics
//!
//! Every name is prefixed `snapstream_`; counters end in `_total`.
//!
//! | metric | type | labels | figure |
//! |---|---|---|---|
//! | `topic_subscribers` | gauge | `topic` | [`TopicStats::subscribers`](crate::publisher::TopicStats::subscribers) |
//! | `topic_keys` | gauge | `topic` | keys with a live buffer |
//! | `topic_max_lag_batches` | gauge | `topic` | the furthest-behind subscriber's lag over the topic's keys |
//! | `topic_retained_batches` | gauge | `topic` | live batches held in memory |
//! | `topic_snapshots_cached` | gauge | `topic` | keys with a cached snapshot chain |
//! | `topic_snapshot_builds_running` | gauge | `topic` | keys with a snapshot build running |
//! | `topic_published_batches_total` | counter | `topic` | batches appended to watched keys, as seen by the scrapes |
//! | `topic_deliveries_total` | counter | `topic` | [`TopicStats::delivered`](crate::publisher::TopicStats::delivered): events delivered to its subscribers |
//! | `topic_lagged_subscribers_total`, `topic_resnapshotted_subscribers_total` | counter | `topic` | subscribers closed for lag / detached to re-snapshot |
//! | `topic_publish_batch_events` | histogram | `topic` | events per publish call |
//! | `topic_snapshot_build_seconds` | histogram | `topic` | snapshot handler run time |
//! | `queue_push_duration_seconds` | histogram | `queue` | time the base queue took to store a push |
//! | `snapshot_builds_total` | counter | | snapshot builds started (cache misses) |
//! | `snapshot_cache_hits_total` | counter | | subscribers served without a build |
//! | `pool_pending`, `pool_in_flight`, `pool_keys`, `pool_workers` | gauge | `pool` | [`workpool::Stats`](crate::workpool::Stats) |
//! | `pool_handled_total`, `pool_panics_total` | counter | `pool` | [`workpool::Stats`](crate::workpool::Stats) |
//! | `lease_keys` | gauge | `pool` | [`LeasePool::keys`] |
//! | `lease_target`, `lease_active` | gauge | `pool`, `key` | [`LeasePool::get`] for the watched keys |
//! | `queue_ready`, `queue_delayed`, `queue_leased` | gauge | `queue` | [`WorkQueue::len`] |
//! | `queue_dead_letters` | gauge | `queue` | [`WorkQueue::dead_letter_count`] |
//! | `queue_workers`, `queue_active_workers`, `queue_max_workers` | gauge | `queue` | the queue's workers |
//! | `queue_pushes_total`, `queue_acks_total` | counter | `queue` | [`WorkQueue::pushed`], [`WorkQueue::acked`] |
//! | `queue_retries_total`, `queue_dead_lettered_total` | counter | `queue` | [`WorkQueue::retries`], [`WorkQueue::dead_lettered`] |
//! | `net_open_streams` | gauge | `server` | [`net::ServerStats::open_streams`](crate::net::ServerStats::open_streams) (feature `net`) |
//! | `net_streams_opened_total` | counter | `server` | streams opened |
//! | `net_streams_ended_total` | counter | `server`, `reason` | streams ended: `client_gone`, `force_closed`, `shutdown`, `lagged`, `error` |
//! | `net_messages_sent_total`, `net_sent_bytes_total` | counter | `server` | response messages and their protobuf bytes |
//! | `net_progress_marks_sent_total` | counter | `server` | progress marks sent to quiet streams |
//! | `net_connections_closed_idle_total` | counter | `server` | connections closed after carrying no stream for the [idle timeout](crate::net::ServerBuilder::idle_timeout) |
//!
//! # Endpoints
//!
//! Paths are relative to where the router is mounted. Lists take
//! `?offset=N&limit=N` (limit 1 to 1000, default 50) and answer
//! `{"total", "offset", "limit", "items"}`.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /` | the HTML page (live over `api/events`) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/overview` | [`Overview`] |
//! | `GET /api/events` | server-sent `overview` events: the overview and each queue's first 50 dead letters |
//! | `GET /api/topics`, `GET /api/topics/{topic}` | [`TopicView`]s; one with its keys (`key_list`, paged) |
//! | `GET /api/pools` | `{"keyed": [PoolView], "lease": [LeasePoolView]}` |
//! | `GET /api/servers` | [`ServerView`]s (empty without feature `net`) |
//! | `GET /api/queues`, `GET /api/queues/{name}` | [`QueueView`]s |
//! | `GET /api/queues/{name}/dead` | its dead letters, oldest first, paged, each decoded as the item type |
//! | `GET /api/queues/{name}/dead/{id}` | one dead letter |
//! | `POST /api/queues/{name}/dead/{id}/requeue`, `POST .../dead/requeue` | requeue one / all: `{"count"}` |
//! | `DELETE /api/queues/{name}/dead/{id}`, `DELETE .../dead` | delete one / all: `{"count"}` |
//! | `POST /api/queues/{name}/flush` | body `{"timeout_ms"}` (optional, at most 60000): waits for the queue's pushes |
//! | `PUT /api/queues/{name}/max_workers` | body `{"max_workers"}` (at most 65536) |
//! | `DELETE /api/queues/{name}/items` | deletes every item of the base queue: `{"count"}` |
//!
//! Listing, requeueing and deleting dead letters lease all of a queue's dead
//! letters for a moment (as [`WorkQueue::dead_letters`] does); the admin runs
//! them one at a time per queue.
//!
//! # Access
//!
//! Reading is open to whoever reaches the router (mount it behind the
//! service's own access control). Mutating endpoints (requeue, delete, flush,
//! remove all, set max workers) need `Authorization: Bearer <token>` with the
//! token given to [`AdminBuilder::token`]; without a token the admin is
//! read-only and they answer `403`. They also refuse cross-site requests: a
//! `Sec-Fetch-Site` other than `same-origin` / `none`, or an `Origin` whose
//! host is not the request's `Host`. Bad input gets a `4xx` JSON error
//! `{"error": "...", "code": "..."}`; request bodies are limited to
//! [`AdminBuilder::DEFAULT_BODY_LIMIT`] bytes by default.
//!
//! # Examples
//!
//! ```
//! use std::sync::Arc;
//! use snapstream::admin::Admin;
//! use snapstream::publisher::Publisher;
//! use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let publisher = Publisher::<String>::builder().build();
//! let base = Arc::new(MemoryQueue::new("mail", QueueOptions::default()).unwrap());
//! let dead = Arc::new(MemoryQueue::new("mail.dead", QueueOptions::default()).unwrap());
//! let mail = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<Item<String>>| async {
//!     Vec::new()
//! })
//! .unwrap();
//!
//! let admin = Admin::builder()
//!     .token("s3cret")
//!     .publisher(&publisher)
//!     .queue(&mail)
//!     .build()
//!     .unwrap();
//! let app: axum::Router = axum::Router::new().nest("/admin", admin.router());
//! # let _ = app;
//! assert!(admin.render_metrics().await.contains("snapstream_queue_ready{queue=\"mail\"} 0"));
//! # });
//! ```

mod collect;
mod http;
mod sources;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::lease::LeasePool;
use crate::publisher::Publisher;
use crate::queue::WorkQueue;
use crate::workpool::KeyedPool;

pub use collect::{
    HistogramView, KeyView, LagBucket, LeaseKeyView, LeasePoolView, Overview, PoolView, QueueView,
    ServerView, TopicView,
};
use sources::{AdminQueue, LeaseSource, PoolSource, PublisherSource};

/// Why [`AdminBuilder::build`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminBuildError {
    /// Two pools (keyed or lease) were given one name.
    #[error("two pools are named {0:?}")]
    DuplicatePool(String),
    /// Two work queues have one name.
    #[error("two queues are named {0:?}")]
    DuplicateQueue(String),
    /// Two network servers were given one name.
    #[error("two servers are named {0:?}")]
    DuplicateServer(String),
    /// The token is empty.
    #[error("the admin token is empty")]
    EmptyToken,
    /// The body limit is zero.
    #[error("the body limit must be at least one byte")]
    ZeroBodyLimit,
    /// The refresh interval is zero.
    #[error("the refresh interval must be above zero")]
    ZeroRefresh,
}

/// Builds an [`Admin`]; see the [module docs](self).
///
/// | setting | default |
/// |---|---|
/// | `token` | none: read-only |
/// | `body_limit` | [`DEFAULT_BODY_LIMIT`](Self::DEFAULT_BODY_LIMIT) (16 KiB) |
/// | `refresh` | [`DEFAULT_REFRESH`](Self::DEFAULT_REFRESH) (1 s) |
/// | `prometheus` | an exporter of the admin's own |
#[must_use]
pub struct AdminBuilder {
    token: Option<String>,
    body_limit: usize,
    refresh: Duration,
    publisher: Option<Arc<dyn PublisherSource>>,
    pools: Vec<(String, Arc<dyn PoolSource>)>,
    leases: Vec<(String, Arc<dyn LeaseSource>)>,
    queues: Vec<Arc<dyn AdminQueue>>,
    #[cfg(feature = "net")]
    servers: Vec<(String, crate::net::ServerStatsHandle)>,
    prometheus: Option<PrometheusHandle>,
}

impl fmt::Debug for AdminBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminBuilder")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("body_limit", &self.body_limit)
            .field("refresh", &self.refresh)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl AdminBuilder {
    /// The default request body limit, in bytes.
    pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
    /// The default interval of the live event stream.
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

    /// The bearer token mutating endpoints need. Without one the admin is
    /// read-only.
    ///
    /// # Examples
    ///
    /// ```
    /// let admin = snapstream::admin::Admin::builder().token("s3cret").build().unwrap();
    /// assert!(!admin.is_read_only());
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The largest request body accepted, in bytes (larger ones get `413`).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::admin::{Admin, AdminBuildError};
    /// assert_eq!(Admin::builder().body_limit(0).build().unwrap_err(), AdminBuildError::ZeroBodyLimit);
    /// ```
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// How often the live event stream (`api/events`) sends the figures.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let admin = snapstream::admin::Admin::builder().refresh(Duration::from_millis(250)).build();
    /// assert!(admin.is_ok());
    /// ```
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every;
        self
    }

    /// Renders `/metrics` from `handle` (a Prometheus recorder the service
    /// installed globally) after recording through the global recorder.
    /// Without it, `/metrics` records into an exporter of the admin's own,
    /// and the global recorder only sees [`Admin::collect`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
    ///     .install_recorder()
    ///     .unwrap();
    /// let admin = snapstream::admin::Admin::builder().prometheus(handle).build().unwrap();
    /// # let _ = admin;
    /// ```
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// Watches `publisher`'s topics. The admin keeps a handle to it (as to
    /// every part it watches): stop or shut the parts down explicitly.
    ///
    /// # Examples
    ///
    /// See the [module docs](self).
    pub fn publisher<P: Send + Sync + 'static>(mut self, publisher: &Publisher<P>) -> Self {
        self.publisher = Some(Arc::new(publisher.clone()));
        self
    }

    /// Watches a keyed pool under `name`.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::admin::{Admin, AdminBuildError};
    /// use snapstream::workpool::KeyedPool;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let pool = KeyedPool::builder().build(|_k: u8, _v: u8| async {}).unwrap();
    /// let err = Admin::builder().keyed_pool("p", &pool).keyed_pool("p", &pool).build().unwrap_err();
    /// assert_eq!(err, AdminBuildError::DuplicatePool("p".into()));
    /// # });
    /// ```
    pub fn keyed_pool<K, T>(mut self, name: impl Into<String>, pool: &KeyedPool<K, T>) -> Self
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        T: Send + 'static,
        KeyedPool<K, T>: Send + Sync,
    {
        self.pools.push((name.into(), Arc::new(pool.clone())));
        self
    }

    /// Watches a lease pool under `name`, with the counts of `keys`.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let leases = snapstream::lease::LeasePool::new();
    /// leases.set("db", 2);
    /// let admin = snapstream::admin::Admin::builder().lease_pool("conns", &leases, ["db"]).build().unwrap();
    /// let view = admin.overview().await;
    /// assert_eq!((view.lease_pools[0].watched[0].target, view.lease_pools[0].watched[0].active), (2, 0));
    /// # });
    /// ```
    pub fn lease_pool<K>(
        mut self,
        name: impl Into<String>,
        pool: &LeasePool<K>,
        keys: impl IntoIterator<Item = K>,
    ) -> Self
    where
        K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
    {
        let source = sources::Leases {
            pool: pool.clone(),
            keys: keys.into_iter().collect(),
        };
        self.leases.push((name.into(), Arc::new(source)));
        self
    }

    /// Watches a work queue and its dead letters (under its name).
    ///
    /// # Examples
    ///
    /// See the [module docs](self).
    pub fn queue<T>(mut self, queue: &WorkQueue<T>) -> Self
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.queues
            .push(Arc::new(sources::Queue::new(queue.clone())));
        self
    }

    /// Watches a network subscribe server under `name` (feature `net`):
    /// its streams and what it sent, through
    /// [`Server::stats_handle`](crate::net::Server::stats_handle) or
    /// [`SubscribeService::stats_handle`](crate::net::SubscribeService::stats_handle).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::admin::{Admin, AdminBuildError};
    /// use snapstream::net::{BinaryCodec, Server};
    /// use snapstream::publisher::Publisher;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let service = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).service();
    /// let admin = Admin::builder().net_server("grpc", service.stats_handle()).build().unwrap();
    /// assert_eq!(admin.overview().await.servers[0].open_streams, 0);
    /// let twice = Admin::builder()
    ///     .net_server("grpc", service.stats_handle())
    ///     .net_server("grpc", service.stats_handle())
    ///     .build();
    /// assert_eq!(twice.unwrap_err(), AdminBuildError::DuplicateServer("grpc".into()));
    /// # });
    /// ```
    #[cfg(feature = "net")]
    pub fn net_server(
        mut self,
        name: impl Into<String>,
        stats: crate::net::ServerStatsHandle,
    ) -> Self {
        self.servers.push((name.into(), stats));
        self
    }

    /// The admin.
    ///
    /// # Errors
    /// See [`AdminBuildError`].
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::admin::{Admin, AdminBuildError};
    /// assert_eq!(Admin::builder().token("").build().unwrap_err(), AdminBuildError::EmptyToken);
    /// ```
    pub fn build(self) -> Result<Admin, AdminBuildError> {
        if self.token.as_deref() == Some("") {
            return Err(AdminBuildError::EmptyToken);
        }
        if self.body_limit == 0 {
            return Err(AdminBuildError::ZeroBodyLimit);
        }
        if self.refresh.is_zero() {
            return Err(AdminBuildError::ZeroRefresh);
        }
        let mut pool_names = std::collections::BTreeSet::new();
        for name in self
            .pools
            .iter()
            .map(|p| &p.0)
            .chain(self.leases.iter().map(|l| &l.0))
        {
            if !pool_names.insert(name.clone()) {
                return Err(AdminBuildError::DuplicatePool(name.clone()));
            }
        }
        let mut queues = BTreeMap::new();
        for q in self.queues {
            let name = q.name().to_owned();
            if queues.insert(name.clone(), q).is_some() {
                return Err(AdminBuildError::DuplicateQueue(name));
            }
        }
        #[cfg(feature = "net")]
        {
            let mut names = std::collections::BTreeSet::new();
            for (name, _) in &self.servers {
                if !names.insert(name) {
                    return Err(AdminBuildError::DuplicateServer(name.clone()));
                }
            }
        }
        let exporter = match self.prometheus {
            Some(handle) => Exporter::Global(handle),
            None => {
                let recorder = PrometheusBuilder::new().build_recorder();
                metrics::with_local_recorder(&recorder, collect::describe);
                Exporter::Own(recorder)
            }
        };
        collect::describe();
        Ok(Admin {
            inner: Arc::new(Inner {
                token: self.token,
                body_limit: self.body_limit,
                refresh: self.refresh,
                publisher: self.publisher,
                pools: self.pools,
                leases: self.leases,
                queues,
                #[cfg(feature = "net")]
                servers: self.servers,
                exporter,
                seen: std::sync::Mutex::new(collect::Seen::default()),
            }),
        })
    }
}

enum Exporter {
    Global(PrometheusHandle),
    Own(PrometheusRecorder),
}

struct Inner {
    token: Option<String>,
    body_limit: usize,
    refresh: Duration,
    publisher: Option<Arc<dyn PublisherSource>>,
    pools: Vec<(String, Arc<dyn PoolSource>)>,
    leases: Vec<(String, Arc<dyn LeaseSource>)>,
    queues: BTreeMap<String, Arc<dyn AdminQueue>>,
    #[cfg(feature = "net")]
    servers: Vec<(String, crate::net::ServerStatsHandle)>,
    exporter: Exporter,
    /// What the scrapes saw of each key's published count.
    seen: std::sync::Mutex<collect::Seen>,
}

/// The operator's view over a service's parts; cheap to clone.
///
/// See the [module docs](self).
#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("read_only", &self.is_read_only())
            .field("queues", &self.inner.queues.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// A builder with the defaults of [`AdminBuilder`].
    ///
    /// # Examples
    ///
    /// ```
    /// let admin = snapstream::admin::Admin::builder().build().unwrap();
    /// assert!(admin.is_read_only());
    /// ```
    pub fn builder() -> AdminBuilder {
        AdminBuilder {
            token: None,
            body_limit: AdminBuilder::DEFAULT_BODY_LIMIT,
            refresh: AdminBuilder::DEFAULT_REFRESH,
            publisher: None,
            pools: Vec::new(),
            leases: Vec::new(),
            queues: Vec::new(),
            #[cfg(feature = "net")]
            servers: Vec::new(),
            prometheus: None,
        }
    }

    /// Whether no token was configured (mutating endpoints answer `403`).
    ///
    /// # Examples
    ///
    /// See [`Admin::builder`].
    pub fn is_read_only(&self) -> bool {
        self.inner.token.is_none()
    }

    /// Reads every figure once.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    ///
    /// # Examples
    ///
    /// See [`AdminBuilder::lease_pool`].
    pub async fn overview(&self) -> Overview {
        collect::overview(&self.inner).await
    }

    /// Reads every figure and records it through the global `metrics`
    /// recorder (a no-op when none is installed).
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads and records.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// // Without a recorder installed this records nothing, at no cost.
    /// snapstream::admin::Admin::builder().build().unwrap().collect().await;
    /// # });
    /// ```
    pub async fn collect(&self) {
        let view = self.overview().await;
        collect::record(&self.inner, &view);
    }

    /// Reads every figure and renders them in Prometheus text format, as
    /// `GET /metrics` answers.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads and records.
    ///
    /// # Examples
    /// See the [module docs](self).
    pub async fn render_metrics(&self) -> String {
        let view = self.overview().await;
        let mut text = match &self.inner.exporter {
            Exporter::Global(handle) => {
                collect::record(&self.inner, &view);
                handle.render()
            }
            Exporter::Own(recorder) => {
                metrics::with_local_recorder(recorder, || collect::record(&self.inner, &view));
                recorder.handle().render()
            }
        };
        collect::render_histograms(&self.inner, &view, &mut text);
        text
    }

    /// The router: the page at `/`, `GET /metrics`, and the JSON API under
    /// `api/` (see the [module docs](self)).
    ///
    /// # Examples
    ///
    /// See the [module docs](self).
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }
}
