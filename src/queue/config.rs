//! Queue configuration: shared defaults with per-queue overrides.
//!
//! # Format
//!
//! [`QueuesConfig`] deserializes with serde from any format; in TOML:
//!
//! ```toml
//! [defaults]
//! backend = "disk"
//! path = "/var/lib/app/queues.redb"
//! max_workers = 4
//!
//! [queues.mail]
//! batch_length = 1
//!
//! [queues.indexer]
//! backend = "redis"
//! connection = "redis://10.0.0.5:6379"
//! length = 1000000
//! ```
//!
//! A queue's value for each field is its own override, else the shared
//! default in `[defaults]`, else the built-in default below.
//!
//! # Fields and built-in defaults
//!
//! | field | meaning | built-in default |
//! |---|---|---|
//! | `backend` | `"memory"`, `"disk"` or `"redis"` | [`DEFAULT_BACKEND`] (`"memory"`) |
//! | `path` | database file of the disk backend | none: required for `disk` |
//! | `connection` | URL of the Redis backend | [`DEFAULT_CONNECTION`] |
//! | `length` | capacity of the base queue | [`DEFAULT_LENGTH`] (100 000) |
//! | `unique` | reject duplicate items | `false` |
//! | `batch_length` | items per handler call | [`DEFAULT_BATCH_LENGTH`] (20) |
//! | `max_workers` | most concurrent handler calls | [`DEFAULT_MAX_WORKERS`] (4) |
//! | `max_attempts` | failures before dead-lettering | [`DEFAULT_MAX_ATTEMPTS`] (5) |
//! | `batch_delay_ms` | wait for a partial batch | 10 |
//! | `idle_timeout_ms` | idle time before a worker retires | 1 000 |
//! | `push_timeout_ms` | push wait for room | 5 000 |
//! | `visibility_timeout_ms` | lease length | 30 000 |
//! | `max_item_bytes` | largest item a push accepts (payload + key) | [`DEFAULT_MAX_ITEM_BYTES`] (1 MiB) |
//! | `backoff_base_ms` / `backoff_max_ms` | retry back-off | 1 000 / 300 000 |
//!
//! # Errors
//!
//! Unknown fields and values of the wrong type are rejected by the
//! deserializer. [`QueuesConfig::resolve`] rejects an unknown backend, a
//! backend not compiled in, a missing `path`, and zero or inconsistent
//! numbers with a [`ConfigError`] naming the field (`queues.mail.length` or
//! `defaults.length`). Nothing falls back silently.
//!
//! The dead-letter queue of queue `name` is `name.dead` on the same backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::base::{Backend, QueueOptions};
use super::work::WorkQueueOptions;

/// Built-in default `backend`.
pub const DEFAULT_BACKEND: &str = "memory";
/// Built-in default `connection` of the Redis backend.
pub const DEFAULT_CONNECTION: &str = "redis://127.0.0.1:6379";
/// Built-in default `length` (base queue capacity).
pub const DEFAULT_LENGTH: u64 = 100_000;
/// Built-in default `batch_length`.
pub const DEFAULT_BATCH_LENGTH: usize = WorkQueueOptions::DEFAULT_BATCH_LEN;
/// Built-in default `max_workers`.
pub const DEFAULT_MAX_WORKERS: usize = WorkQueueOptions::DEFAULT_MAX_WORKERS;
/// Built-in default `max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = WorkQueueOptions::DEFAULT_MAX_ATTEMPTS;
/// Built-in default `max_item_bytes`.
pub const DEFAULT_MAX_ITEM_BYTES: usize = QueueOptions::DEFAULT_MAX_ITEM_BYTES;

/// The configuration of every queue: shared defaults and per-queue overrides.
///
/// See the [module docs](self) for the fields and their defaults.
///
/// # Examples
///
/// ```
/// use snapstream::queue::config::{QueueSettings, QueuesConfig};
///
/// let mut cfg = QueuesConfig::default();
/// cfg.defaults.max_workers = Some(8);
/// cfg.queues.insert("mail".into(), QueueSettings { batch_length: Some(1), ..Default::default() });
/// let mail = cfg.resolve("mail").unwrap();
/// assert_eq!((mail.work.batch_len, mail.work.max_workers), (1, 8));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct QueuesConfig {
    /// Values every queue gets unless it overrides them.
    #[serde(default)]
    pub defaults: QueueSettings,
    /// Per-queue overrides, by queue name.
    #[serde(default)]
    pub queues: BTreeMap<String, QueueSettings>,
}

/// One layer of settings; every field is optional. See the
/// [module docs](self) for meanings and defaults.
///
/// Build one with `..Default::default()` so that new fields do not break you.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// `"memory"`, `"disk"` or `"redis"`.
    pub backend: Option<String>,
    /// Database file of the disk backend.
    pub path: Option<PathBuf>,
    /// URL of the Redis backend.
    pub connection: Option<String>,
    /// Capacity of the base queue.
    pub length: Option<u64>,
    /// Reject duplicate items.
    pub unique: Option<bool>,
    /// Items per handler call.
    pub batch_length: Option<usize>,
    /// Most concurrent handler calls.
    pub max_workers: Option<usize>,
    /// Failures before an item is dead-lettered.
    pub max_attempts: Option<u32>,
    /// Wait for a partial batch, in milliseconds.
    pub batch_delay_ms: Option<u64>,
    /// Idle time before a worker retires, in milliseconds.
    pub idle_timeout_ms: Option<u64>,
    /// Push wait for room, in milliseconds.
    pub push_timeout_ms: Option<u64>,
    /// Lease length, in milliseconds.
    pub visibility_timeout_ms: Option<u64>,
    /// Largest item a push accepts (payload and key), in bytes.
    pub max_item_bytes: Option<usize>,
    /// First retry back-off, in milliseconds.
    pub backoff_base_ms: Option<u64>,
    /// Longest retry back-off, in milliseconds.
    pub backoff_max_ms: Option<u64>,
}

/// Where a resolved queue is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendConfig {
    /// In process memory.
    Memory,
    /// A database file on local disk.
    Disk {
        /// The database file.
        path: PathBuf,
    },
    /// A Redis server.
    Redis {
        /// The server URL.
        url: String,
    },
}

impl BackendConfig {
    /// The backend kind.
    pub fn kind(&self) -> Backend {
        match self {
            BackendConfig::Memory => Backend::Memory,
            BackendConfig::Disk { .. } => Backend::Disk,
            BackendConfig::Redis { .. } => Backend::Redis,
        }
    }
}

/// The settings of one queue with every layer applied and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueConfig {
    /// The queue's name.
    pub name: String,
    /// Its storage.
    pub backend: BackendConfig,
    /// Options of its base queue.
    pub base: QueueOptions,
    /// Options of its work queue.
    pub work: WorkQueueOptions,
}

impl QueueConfig {
    /// The name of its dead-letter queue: `<name>.dead`.
    pub fn dead_letter_name(&self) -> String {
        format!("{}.dead", self.name)
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue config `{field}`: {problem}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The field's path, e.g. `queues.mail.length` or `defaults.backend`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl QueuesConfig {
    /// Resolves queue `name` (listed or not) and checks every value.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad field.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::config::QueuesConfig;
    ///
    /// let mut cfg = QueuesConfig::default();
    /// cfg.defaults.backend = Some("carrier-pigeon".into());
    /// let err = cfg.resolve("mail").unwrap_err();
    /// assert_eq!(err.field, "defaults.backend");
    /// ```
    pub fn resolve(&self, name: &str) -> Result<QueueConfig, ConfigError> {
        let own = self.queues.get(name);
        let layers = Layers {
            name,
            own,
            defaults: &self.defaults,
        };
        if name.is_empty() {
            return Err(ConfigError {
                field: "queues".into(),
                problem: "queue name is empty".into(),
            });
        }

        let (backend, at) = layers.pick(|s| s.backend.clone());
        let backend = backend.unwrap_or_else(|| DEFAULT_BACKEND.to_owned());
        let backend = match backend.as_str() {
            "memory" => BackendConfig::Memory,
            "disk" => {
                if !cfg!(feature = "disk") {
                    return Err(layers.err(
                        at,
                        "backend",
                        "disk support is not compiled in (feature `disk`)",
                    ));
                }
                match layers.pick(|s| s.path.clone()) {
                    (Some(path), _) if !path.as_os_str().is_empty() => BackendConfig::Disk { path },
                    (Some(_), at) => return Err(layers.err(at, "path", "is empty")),
                    (None, _) => {
                        return Err(layers.err(
                            Some(own.is_some()),
                            "path",
                            "is required for the disk backend",
                        ))
                    }
                }
            }
            "redis" => {
                if !cfg!(feature = "redis") {
                    return Err(layers.err(
                        at,
                        "backend",
                        "redis support is not compiled in (feature `redis`)",
                    ));
                }
                let (url, at) = layers.pick(|s| s.connection.clone());
                let url = url.unwrap_or_else(|| DEFAULT_CONNECTION.to_owned());
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("redis+unix://")
                    || url.starts_with("unix://"))
                {
                    return Err(layers.err(at, "connection", "must be a redis:// URL"));
                }
                BackendConfig::Redis { url }
            }
            other => {
                return Err(layers.err(
                    at,
                    "backend",
                    &format!("unknown backend {other:?} (expected memory, disk or redis)"),
                ))
            }
        };

        let length = layers.positive(|s| s.length, "length", DEFAULT_LENGTH)?;
        let batch_len =
            layers.positive(|s| s.batch_length, "batch_length", DEFAULT_BATCH_LENGTH)?;
        let max_workers = layers.positive(|s| s.max_workers, "max_workers", DEFAULT_MAX_WORKERS)?;
        let max_attempts =
            layers.positive(|s| s.max_attempts, "max_attempts", DEFAULT_MAX_ATTEMPTS)?;
        let ms = |v: u64| Duration::from_millis(v);
        let d = WorkQueueOptions::default();
        let batch_delay = layers
            .pick(|s| s.batch_delay_ms)
            .0
            .map_or(d.batch_delay, ms);
        let idle_timeout = ms(layers.positive(
            |s| s.idle_timeout_ms,
            "idle_timeout_ms",
            d.idle_timeout.as_millis() as u64,
        )?);
        let push_timeout = layers
            .pick(|s| s.push_timeout_ms)
            .0
            .map_or(d.push_timeout, ms);
        let visibility_timeout = ms(layers.positive(
            |s| s.visibility_timeout_ms,
            "visibility_timeout_ms",
            QueueOptions::DEFAULT_VISIBILITY_TIMEOUT.as_millis() as u64,
        )?);
        let backoff_base = layers
            .pick(|s| s.backoff_base_ms)
            .0
            .map_or(d.backoff_base, ms);
        let (max_ms, at) = layers.pick(|s| s.backoff_max_ms);
        let backoff_max = max_ms.map_or(d.backoff_max, ms);
        if backoff_max < backoff_base {
            return Err(layers.err(at, "backoff_max_ms", "must not be below backoff_base_ms"));
        }
        let unique = layers.pick(|s| s.unique).0.unwrap_or(false);
        let max_item_bytes = layers.positive(
            |s| s.max_item_bytes,
            "max_item_bytes",
            DEFAULT_MAX_ITEM_BYTES,
        )?;

        Ok(QueueConfig {
            name: name.to_owned(),
            backend,
            base: QueueOptions::default()
                .capacity(length)
                .unique(unique)
                .visibility_timeout(visibility_timeout)
                .max_item_bytes(max_item_bytes),
            work: WorkQueueOptions::default()
                .batch_len(batch_len)
                .batch_delay(batch_delay)
                .max_workers(max_workers)
                .idle_timeout(idle_timeout)
                .push_timeout(push_timeout)
                .max_attempts(max_attempts)
                .backoff(backoff_base, backoff_max),
        })
    }

    /// Resolves every listed queue, checking the whole configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad field.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::config::QueuesConfig;
    ///
    /// assert!(QueuesConfig::default().resolve_all().unwrap().is_empty());
    /// ```
    pub fn resolve_all(&self) -> Result<Vec<QueueConfig>, ConfigError> {
        self.queues.keys().map(|n| self.resolve(n)).collect()
    }
}

struct Layers<'a> {
    name: &'a str,
    own: Option<&'a QueueSettings>,
    defaults: &'a QueueSettings,
}

impl Layers<'_> {
    /// The value and where it came from: `Some(true)` the queue's own
    /// section, `Some(false)` the defaults, `None` built in.
    fn pick<V>(&self, get: impl Fn(&QueueSettings) -> Option<V>) -> (Option<V>, Option<bool>) {
        if let Some(v) = self.own.and_then(&get) {
            return (Some(v), Some(true));
        }
        match get(self.defaults) {
            Some(v) => (Some(v), Some(false)),
            None => (None, None),
        }
    }

    fn err(&self, at: Option<bool>, field: &str, problem: &str) -> ConfigError {
        let field = match at {
            Some(true) | None => format!("queues.{}.{field}", self.name),
            Some(false) => format!("defaults.{field}"),
        };
        ConfigError {
            field,
            problem: problem.to_owned(),
        }
    }

    fn positive<V: Copy + PartialEq + Default>(
        &self,
        get: impl Fn(&QueueSettings) -> Option<V>,
        field: &str,
        default: V,
    ) -> Result<V, ConfigError> {
        match self.pick(get) {
            (Some(v), at) if v == V::default() => Err(self.err(at, field, "must be at least 1")),
            (Some(v), _) => Ok(v),
            (None, _) => Ok(default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults() {
        let c = QueuesConfig::default().resolve("q").unwrap();
        assert_eq!(c.backend, BackendConfig::Memory);
        assert_eq!(c.base.capacity, Some(DEFAULT_LENGTH));
        assert_eq!(c.work, WorkQueueOptions::default());
        assert_eq!(c.base.max_item_bytes, DEFAULT_MAX_ITEM_BYTES);
        assert!(c.base.validate().is_ok());
        assert_eq!(c.dead_letter_name(), "q.dead");
    }

    #[test]
    fn max_item_bytes_is_set_and_zero_is_rejected() {
        let mut cfg = QueuesConfig::default();
        cfg.defaults.max_item_bytes = Some(4096);
        assert_eq!(cfg.resolve("q").unwrap().base.max_item_bytes, 4096);
        cfg.queues.insert(
            "q".into(),
            QueueSettings {
                max_item_bytes: Some(0),
                ..Default::default()
            },
        );
        let err = cfg.resolve("q").unwrap_err();
        assert_eq!(err.field, "queues.q.max_item_bytes");
    }

    #[test]
    fn override_beats_default() {
        let mut cfg = QueuesConfig::default();
        cfg.defaults.length = Some(10);
        cfg.defaults.max_workers = Some(2);
        cfg.queues.insert(
            "a".into(),
            QueueSettings {
                length: Some(5),
                ..Default::default()
            },
        );
        let a = cfg.resolve("a").unwrap();
        assert_eq!((a.base.capacity, a.work.max_workers), (Some(5), 2));
        let b = cfg.resolve("b").unwrap();
        assert_eq!(b.base.capacity, Some(10));
    }

    #[test]
    fn zero_names_the_layer_it_came_from() {
        let mut cfg = QueuesConfig::default();
        cfg.defaults.batch_length = Some(0);
        assert_eq!(cfg.resolve("x").unwrap_err().field, "defaults.batch_length");
        cfg.queues.insert(
            "x".into(),
            QueueSettings {
                max_workers: Some(0),
                batch_length: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(cfg.resolve("x").unwrap_err().field, "queues.x.max_workers");
    }
}
