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
//! ## Concepts
//!
//! - **[`buffer`]** — the core: an unbounded, lock-free, single-writer linked
//!   list of batches. Publishing is O(1) whatever the number of readers; one
//!   notification per append wakes every waiting reader; each reader holds a
//!   [`Cursor`](buffer::Cursor) and reads at its own pace; nodes nobody holds
//!   are freed; a terminal error ends every reader.
//! - **[`queue`]** — durable work queues over pluggable
//!   [`BaseQueue`](queue::BaseQueue)s.
//!
//! ## Delivery guarantees of the buffer
//!
//! | property | guarantee |
//! |---|---|
//! | order | every cursor sees batches in append order |
//! | completeness | a cursor sees every batch appended after its start, each once |
//! | isolation | a slow reader never slows the writer or other readers |
//! | cancellation | dropping a pending `next()` loses nothing |
//! | end | a terminal error (or a dropped writer) is seen by every reader, repeatedly |
//!
//! ## Feature flags
//!
//! None yet; optional backends arrive behind features.

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]
#![doc(test(attr(deny(warnings))))]

pub(crate) mod sync;

pub mod buffer;
pub mod event;
pub mod lease;
pub mod publisher;
pub mod queue;
pub mod subscription;
pub mod workpool;
