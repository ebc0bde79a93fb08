//! [`Manager`]: every work queue of a program in one place.
//!
//! # What it does
//!
//! A manager builds work queues from a [`QueuesConfig`] (opening the base
//! queue and its `<name>.dead` dead-letter queue on the configured backend),
//! or adopts queues built by hand, and then lists them with their figures,
//! flushes or drains them, resizes them and empties them by name.
//!
//! # Flush and drain
//!
//! [`flush_all`](Manager::flush_all) / [`flush`](Manager::flush) wait for
//! the items pushed through the queues' own handles
//! ([`WorkQueue::flush`]); [`drain_all`](Manager::drain_all) /
//! [`drain`](Manager::drain) wait until the base queues hold nothing ready
//! or leased, whoever pushed it ([`WorkQueue::drain`], what Gitea calls
//! flush).
//!
//! # Disk stores
//!
//! Queues configured on the same disk `path` share one open database file
//! (one [`DiskStore`](super::disk::DiskStore) per path, kept by the manager).
//!
//! # Lifetime
//!
//! The manager keeps a handle to every queue it holds, so they run until
//! [`shutdown_all`](Manager::shutdown_all) (or until the manager and every
//! other handle are dropped).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::base::{Backend, BaseQueue, InvalidOption, QueueError, QueueLen};
use super::config::{BackendConfig, ConfigError, QueueConfig, QueuesConfig};
use super::memory::MemoryQueue;
use super::work::{Item, WorkError, WorkQueue};

/// The figures of one managed queue, from [`Manager::queues`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Its storage.
    pub backend: Backend,
    /// Workers running (busy or idle).
    pub workers: usize,
    /// Workers running a handler.
    pub active: usize,
    /// Most workers allowed.
    pub max_workers: usize,
    /// Items in the base queue, by state; `None` when the backend failed.
    pub length: Option<QueueLen>,
    /// Retries this process scheduled.
    pub retries: u64,
    /// Items in the dead-letter queue; `None` when the backend failed.
    pub dead_letters: Option<u64>,
}

/// Why a manager operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// No queue has this name.
    #[error("no queue named {0:?}")]
    NotFound(String),
    /// A queue with this name is already managed.
    #[error("a queue named {0:?} is already managed")]
    Duplicate(String),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The work queue options are invalid.
    #[error(transparent)]
    Options(#[from] InvalidOption),
    /// A base queue could not be opened or failed.
    #[error("queue {queue:?} failed")]
    Queue {
        /// The queue's name.
        queue: String,
        /// What the base queue reported.
        #[source]
        source: QueueError,
    },
    /// The disk store could not be opened.
    #[cfg(feature = "disk")]
    #[error("disk store for queue {queue:?} could not be opened")]
    Disk {
        /// The queue's name.
        queue: String,
        /// What the store reported.
        #[source]
        source: super::disk::DiskError,
    },
    /// A work queue operation failed.
    #[error("work queue {queue:?} failed")]
    Work {
        /// The queue's name.
        queue: String,
        /// What the work queue reported.
        #[source]
        source: WorkError,
    },
}

/// The type-erased view of a [`WorkQueue`] the manager holds.
trait Managed: Send + Sync {
    fn name(&self) -> &str;
    fn backend(&self) -> Backend;
    fn workers(&self) -> usize;
    fn active(&self) -> usize;
    fn max_workers(&self) -> usize;
    fn set_max_workers(&self, n: usize);
    fn retries(&self) -> u64;
    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>>;
    fn dead_count(&self) -> BoxFuture<'_, Result<u64, QueueError>>;
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, Result<(), WorkError>>;
    fn drain(&self, timeout: Duration) -> BoxFuture<'_, Result<(), WorkError>>;
    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>>;
    fn shutdown(&self, timeout: Duration) -> BoxFuture<'_, ()>;
}

impl<T: Send + 'static> Managed for WorkQueue<T> {
    fn name(&self) -> &str {
        WorkQueue::name(self)
    }
    fn backend(&self) -> Backend {
        WorkQueue::backend(self)
    }
    fn workers(&self) -> usize {
        WorkQueue::workers(self)
    }
    fn active(&self) -> usize {
        self.active_workers()
    }
    fn max_workers(&self) -> usize {
        WorkQueue::max_workers(self)
    }
    fn set_max_workers(&self, n: usize) {
        WorkQueue::set_max_workers(self, n)
    }
    fn retries(&self) -> u64 {
        WorkQueue::retries(self)
    }
    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>> {
        Box::pin(WorkQueue::len(self))
    }
    fn dead_count(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(self.dead_letter_count())
    }
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, Result<(), WorkError>> {
        Box::pin(WorkQueue::flush(self, timeout))
    }
    fn drain(&self, timeout: Duration) -> BoxFuture<'_, Result<(), WorkError>> {
        Box::pin(WorkQueue::drain(self, timeout))
    }
    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(WorkQueue::remove_all(self))
    }
    fn shutdown(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(WorkQueue::shutdown(self, timeout))
    }
}

#[derive(Default)]
struct State {
    queues: BTreeMap<String, Arc<dyn Managed>>,
    #[cfg(feature = "disk")]
    stores: std::collections::HashMap<std::path::PathBuf, super::disk::DiskStore>,
}

/// Holds every work queue of a program; cheap to clone.
///
/// See the [module docs](self).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::queue::config::QueuesConfig;
/// use snapstream::queue::{Item, Manager};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let manager = Manager::new();
/// let cfg: QueuesConfig = QueuesConfig::default(); // memory backend
/// let mail = manager
///     .create("mail", &cfg, |batch: Vec<Item<String>>| async move {
///         let _ = batch;
///         Vec::new()
///     })
///     .await
///     .unwrap();
/// mail.push("hi".to_string()).await.unwrap();
/// manager.flush_all(Duration::from_secs(5)).await.unwrap();
/// let info = manager.queues().await;
/// assert_eq!(info[0].name, "mail");
/// assert_eq!(info[0].length.unwrap().total(), 0);
/// manager.shutdown_all(Duration::from_secs(5)).await;
/// # });
/// ```
#[derive(Clone, Default)]
pub struct Manager {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("queues", &self.names())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// An empty manager.
    ///
    /// # Examples
    /// See [`Manager`].
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the base queue and the dead-letter queue `config` describes.
    ///
    /// # Errors
    /// [`ManagerError::Queue`] or `Disk` when the backend cannot be opened.
    ///
    /// # Cancel safety
    /// Dropping it may leave a Redis connection half set up; nothing is stored.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::config::QueuesConfig;
    /// use snapstream::queue::{Backend, Manager};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let cfg = QueuesConfig::default().resolve("jobs").unwrap();
    /// let (base, dead) = Manager::new().open_base(&cfg).await.unwrap();
    /// assert_eq!((base.name(), dead.name()), ("jobs", "jobs.dead"));
    /// assert_eq!(base.backend(), Backend::Memory);
    /// # });
    /// ```
    pub async fn open_base(
        &self,
        config: &QueueConfig,
    ) -> Result<(Arc<dyn BaseQueue>, Arc<dyn BaseQueue>), ManagerError> {
        let name = config.name.clone();
        let dead_name = config.dead_letter_name();
        let dead_opts = config.base.for_dead_letters();
        match &config.backend {
            BackendConfig::Memory => Ok((
                Arc::new(MemoryQueue::new(name, config.base.clone())?),
                Arc::new(MemoryQueue::new(dead_name, dead_opts)?),
            )),
            #[cfg(feature = "disk")]
            BackendConfig::Disk { path } => {
                let store = {
                    let mut st = self.lock();
                    match st.stores.get(path) {
                        Some(s) => s.clone(),
                        None => {
                            let s = super::disk::DiskStore::open(path).map_err(|source| {
                                ManagerError::Disk {
                                    queue: name.clone(),
                                    source,
                                }
                            })?;
                            st.stores.insert(path.clone(), s.clone());
                            s
                        }
                    }
                };
                let q = |n: &str, o| {
                    store.queue(n, o).map_err(|source| ManagerError::Queue {
                        queue: n.to_owned(),
                        source,
                    })
                };
                let base = q(&name, config.base.clone())?;
                let dead = q(&dead_name, dead_opts)?;
                Ok((Arc::new(base), Arc::new(dead)))
            }
            #[cfg(feature = "redis")]
            BackendConfig::Redis { url } => {
                let open = |n: String, o| async move {
                    super::redis::RedisQueue::connect(url, n.clone(), o)
                        .await
                        .map_err(|source| ManagerError::Queue { queue: n, source })
                };
                let base = open(name, config.base.clone()).await?;
                let dead = open(dead_name, dead_opts).await?;
                Ok((Arc::new(base), Arc::new(dead)))
            }
            #[allow(unreachable_patterns)]
            other => Err(ManagerError::Config(ConfigError {
                field: format!("queues.{}.backend", config.name),
                problem: format!("{} support is not compiled in", other.kind()),
            })),
        }
    }

    /// Builds queue `name` from `config`, starts it with `handler`, and
    /// manages it.
    ///
    /// # Errors
    /// [`ManagerError::Config`] naming a bad field,
    /// [`ManagerError::Duplicate`], or a backend error.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    ///
    /// # Cancel safety
    /// Dropping it before it completes manages nothing.
    ///
    /// # Examples
    /// See [`Manager`].
    pub async fn create<T, F, Fut>(
        &self,
        name: &str,
        config: &QueuesConfig,
        handler: F,
    ) -> Result<WorkQueue<T>, ManagerError>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(Vec<Item<T>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Item<T>>> + Send + 'static,
    {
        let resolved = config.resolve(name)?;
        if self.lock().queues.contains_key(name) {
            return Err(ManagerError::Duplicate(name.to_owned()));
        }
        let (base, dead) = self.open_base(&resolved).await?;
        let q = WorkQueue::new(base, dead, resolved.work, handler)?;
        self.add(&q)?;
        Ok(q)
    }

    /// Manages a queue built by hand.
    ///
    /// # Errors
    /// [`ManagerError::Duplicate`] when the name is taken.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use snapstream::queue::{Item, Manager, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let base = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
    /// let dead = Arc::new(MemoryQueue::new("q.dead", QueueOptions::default()).unwrap());
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<Item<u8>>| async {
    ///     Vec::new()
    /// })
    /// .unwrap();
    /// let m = Manager::new();
    /// m.add(&q).unwrap();
    /// assert!(m.add(&q).is_err());
    /// # });
    /// ```
    pub fn add<T: Send + 'static>(&self, queue: &WorkQueue<T>) -> Result<(), ManagerError> {
        let mut st = self.lock();
        let name = queue.name().to_owned();
        if st.queues.contains_key(&name) {
            return Err(ManagerError::Duplicate(name));
        }
        st.queues.insert(name, Arc::new(queue.clone()));
        Ok(())
    }

    /// The names of the managed queues, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().queues.keys().cloned().collect()
    }

    fn all(&self) -> Vec<Arc<dyn Managed>> {
        self.lock().queues.values().cloned().collect()
    }

    fn get(&self, name: &str) -> Result<Arc<dyn Managed>, ManagerError> {
        self.lock()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(name.to_owned()))
    }

    /// The figures of every managed queue, sorted by name.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    ///
    /// # Examples
    /// See [`Manager`].
    pub async fn queues(&self) -> Vec<QueueInfo> {
        let mut out = Vec::new();
        for q in self.all() {
            out.push(QueueInfo {
                name: q.name().to_owned(),
                backend: q.backend(),
                workers: q.workers(),
                active: q.active(),
                max_workers: q.max_workers(),
                length: q.len().await.ok(),
                retries: q.retries(),
                dead_letters: q.dead_count().await.ok(),
            });
        }
        out
    }

    /// [Flushes](WorkQueue::flush) every managed queue at once, all within
    /// `timeout`: waits for the items pushed through the queues' handles.
    /// [`drain_all`](Self::drain_all) waits for the base queues to run dry.
    ///
    /// # Errors
    /// The first [`ManagerError::Work`] by queue name.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    ///
    /// # Examples
    /// See [`Manager`].
    pub async fn flush_all(&self, timeout: Duration) -> Result<(), ManagerError> {
        let all = self.all();
        let results = futures::future::join_all(all.iter().map(|q| q.flush(timeout))).await;
        Self::first_error(&all, results)
    }

    /// [Drains](WorkQueue::drain) every managed queue at once, all within
    /// `timeout`: waits until no base queue holds anything ready or leased,
    /// whoever pushed it (items waiting out a retry back-off excepted).
    ///
    /// # Errors
    /// The first [`ManagerError::Work`] by queue name.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use snapstream::queue::config::QueuesConfig;
    /// use snapstream::queue::{Item, Manager};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let manager = Manager::new();
    /// let q = manager
    ///     .create("jobs", &QueuesConfig::default(), |_b: Vec<Item<u32>>| async { Vec::new() })
    ///     .await
    ///     .unwrap();
    /// q.push(1).await.unwrap();
    /// manager.drain_all(Duration::from_secs(5)).await.unwrap();
    /// assert_eq!(manager.queues().await[0].length.unwrap().total(), 0);
    /// manager.shutdown_all(Duration::from_secs(5)).await;
    /// # });
    /// ```
    pub async fn drain_all(&self, timeout: Duration) -> Result<(), ManagerError> {
        let all = self.all();
        let results = futures::future::join_all(all.iter().map(|q| q.drain(timeout))).await;
        Self::first_error(&all, results)
    }

    /// [Flushes](WorkQueue::flush) queue `name`.
    ///
    /// # Errors
    /// [`ManagerError::NotFound`], [`ManagerError::Work`].
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    pub async fn flush(&self, name: &str, timeout: Duration) -> Result<(), ManagerError> {
        let q = self.get(name)?;
        let result = q.flush(timeout).await;
        Self::first_error(&[q], [result])
    }

    /// [Drains](WorkQueue::drain) queue `name`.
    ///
    /// # Errors
    /// [`ManagerError::NotFound`], [`ManagerError::Work`].
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use snapstream::queue::{Manager, ManagerError};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let err = Manager::new().drain("nope", Duration::from_secs(1)).await.unwrap_err();
    /// assert!(matches!(err, ManagerError::NotFound(_)));
    /// # });
    /// ```
    pub async fn drain(&self, name: &str, timeout: Duration) -> Result<(), ManagerError> {
        let q = self.get(name)?;
        let result = q.drain(timeout).await;
        Self::first_error(&[q], [result])
    }

    fn first_error(
        queues: &[Arc<dyn Managed>],
        results: impl IntoIterator<Item = Result<(), WorkError>>,
    ) -> Result<(), ManagerError> {
        for (q, r) in queues.iter().zip(results) {
            if let Err(source) = r {
                return Err(ManagerError::Work {
                    queue: q.name().to_owned(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Sets the most workers of queue `name`.
    ///
    /// # Errors
    /// [`ManagerError::NotFound`].
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::Manager;
    ///
    /// assert!(Manager::new().resize("nope", 3).is_err());
    /// ```
    pub fn resize(&self, name: &str, max_workers: usize) -> Result<(), ManagerError> {
        self.get(name)?.set_max_workers(max_workers);
        Ok(())
    }

    /// Deletes every item of queue `name`'s base queue; returns how many.
    ///
    /// # Errors
    /// [`ManagerError::NotFound`], [`ManagerError::Queue`].
    ///
    /// # Cancel safety
    /// Dropping it either removed the items or did not.
    pub async fn remove_all(&self, name: &str) -> Result<u64, ManagerError> {
        self.get(name)?
            .remove_all()
            .await
            .map_err(|source| ManagerError::Queue {
                queue: name.to_owned(),
                source,
            })
    }

    /// Shuts every managed queue down (see [`WorkQueue::shutdown`]), all
    /// within `timeout`, and forgets them.
    ///
    /// # Cancel safety
    /// Dropping it leaves the queues stopping.
    ///
    /// # Examples
    /// See [`Manager`].
    pub async fn shutdown_all(&self, timeout: Duration) {
        let all: Vec<_> = std::mem::take(&mut self.lock().queues)
            .into_values()
            .collect();
        futures::future::join_all(all.iter().map(|q| q.shutdown(timeout))).await;
    }
}
