//! # snapstream
//!
//! Pub/sub event streaming around one shared broadcast buffer.
//!
//! A state-replication service embeds snapstream next to its state store: the
//! store publishes every change; clients subscribe to a topic (and a key inside
//! it), receive a consistent snapshot followed by live changes — nothing lost,
//! nothing twice — and can resume from the last index they saw. Work caused by
//! those changes runs in keyed ordered worker pools, lease pools and durable
//! work queues, all fed by the same stream.
//!
//! ```text
//!            publish(events)                         subscribe(topic, subject, index)
//!   state ─────────────────► Publisher ──────────────────────────────────► Subscription (Stream)
//!   store                      │  per-(topic, subject) EventBuffer                │
//!                              │  snapshot handlers, snapshot cache               ▼
//!                              │                                    KeyedPool / LeasePool /
//!                              ▼                                    WorkQueue (consumers)
//!                       EventBuffer (core)                                        │
//!                                                                                 ▼
//!                                                           BaseQueue: memory | disk | Redis
//! ```
//!
//! ## Concepts
//!
//! - **[`buffer`]** — the core: an unbounded, lock-free, single-writer linked
//!   list of blocks of batches. Publishing is O(1) whatever the number of
//!   readers; one notification per append wakes every waiting reader; each
//!   reader holds a [`Cursor`](buffer::Cursor) and reads at its own pace;
//!   blocks nobody holds are freed; a terminal error ends every reader.
//!   Snapshots are built in their own buffer and
//!   [spliced](buffer::EventBuffer::splice) onto the live one.
//! - **[`event`], [`publisher`], [`subscription`]** — topics and keys, each
//!   key with its own buffer while someone subscribes; snapshot handlers per
//!   topic; a snapshot cache per key; [`Subscription`](subscription::Subscription)
//!   is a `futures::Stream` that can be force-closed (permissions changed),
//!   resumed by index, and is bounded in lag.
//! - **[`workpool`]** — a keyed ordered worker pool: each item handled once,
//!   in order within its key, keys never blocking each other, O(1) dispatch,
//!   no memory for idle keys.
//! - **[`lease`]** — a target number of concurrent leases per key, changeable
//!   at run time; leases released on drop.
//! - **[`queue`]** — batching work queues over pluggable
//!   [`BaseQueue`](queue::BaseQueue)s (memory, embedded disk, Redis) with
//!   leases, retries with back-off, dead letters and a manager.
//!
//! ## Delivery guarantees
//!
//! | part | guarantee |
//! |---|---|
//! | buffer | every cursor sees every batch appended after its start, once, in order; a slow reader never slows the writer; dropping a pending `next()` loses nothing |
//! | publisher | snapshot then live with nothing lost and nothing twice; resume by index; a lagging subscriber is told (`Lagged` or a re-snapshot), never silently skipped |
//! | keyed pool | every accepted item handled exactly once, in order per key; `stop` drains or hands back what is pending |
//! | lease pool | at most `target` active leases per key once `set` returns; release on drop, idempotent |
//! | work queue | at least once on every backend: an item is leased until acknowledged and comes back after a crash or a visibility timeout; unhandled items retry with back-off, then dead-letter |
//!
//! ## Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `disk` | yes | `queue::disk`: the embedded, crash-safe base queue (redb) |
//! | `redis` | no | `queue::redis`: the Redis base queue, shared by many processes |
//! | `admin` | no | `admin`: metrics through the `metrics` facade, `/metrics`, an axum admin router and live page |
//! | `net` | no | `net`: a gRPC subscribe service over a publisher (tonic), a resuming remote subscriber and client-side views |
//! | `net-tls` | no | TLS (rustls) for `net`'s server and client |
//! | `jetstream` | no | `cluster`: several nodes, each with its own publisher, fed from one NATS JetStream log |

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]
#![doc(test(attr(deny(warnings))))]

pub(crate) mod sync;

/// The hasher of the crate's internal maps on hot paths (the keyed pool's
/// key index, the lease pool's maps): `foldhash`, seeded per map, several
/// times faster than std's SipHash on short keys (see the README's pool
/// section).
pub(crate) type FastHasher = foldhash::fast::RandomState;

#[cfg(feature = "admin")]
pub mod admin;
pub mod buffer;
#[cfg(feature = "jetstream")]
pub mod cluster;
#[cfg(any(feature = "net", feature = "jetstream"))]
pub mod codec;
pub mod event;
pub mod histogram;
pub mod lease;
#[cfg(feature = "net")]
pub mod net;
pub mod publisher;
pub mod queue;
pub mod subscription;
pub mod workpool;

/// The README's sections live in `docs/*.md`; compiling them here as doctests
/// keeps every example in the README building against the real API.
#[cfg(doctest)]
#[doc(test(attr(allow(dead_code, unused_variables))))]
mod readme_examples {
    #[cfg(feature = "disk")]
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/publisher.md")]
    struct Publisher;
    #[doc = include_str!("../docs/pools.md")]
    struct Pools;
    #[doc = include_str!("../docs/workqueue.md")]
    struct WorkQueue;
    #[cfg(feature = "disk")]
    #[doc = include_str!("../docs/queue-disk.md")]
    struct QueueDisk;
    #[cfg(feature = "redis")]
    #[doc = include_str!("../docs/queue-redis.md")]
    struct QueueRedis;
    #[cfg(feature = "net")]
    #[doc = include_str!("../docs/net.md")]
    struct Net;
    #[cfg(feature = "jetstream")]
    #[doc = include_str!("../docs/cluster.md")]
    struct Cluster;
}
