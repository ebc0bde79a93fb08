//! Subscriptions: a [`Stream`] of one key's snapshot and live events.
//!
//! # Reading
//!
//! A [`Subscription`] has one consumer. Read it with the inherent
//! [`next`](Subscription::next) (`Result<Message, SubscriptionError>`) or as a
//! [`futures::Stream`] of the same results. Both are cancel-safe: dropping a
//! pending read loses nothing.
//!
//! # Closing
//!
//! A subscription ends for one of these reasons, and the **first one wins and
//! sticks** (later reasons are ignored; every later [`next`](Subscription::next)
//! returns the same error):
//!
//! - [`SubscriptionError::ForceClosed`] — its token's permissions changed
//!   ([`Publisher::force_close_token`]) or its topic was refreshed
//!   ([`Publisher::refresh_topic`]); re-subscribe to continue;
//! - [`SubscriptionError::Unsubscribed`] — [`unsubscribe`](Subscription::unsubscribe) was called;
//! - [`SubscriptionError::ShuttingDown`] — the publisher shut down;
//! - [`SubscriptionError::Lagged`] — it fell further behind than the lag limit
//!   (with [`LagPolicy::Error`]);
//! - [`SubscriptionError::Snapshot`] — the snapshot handler failed (after the
//!   events it streamed were delivered).
//!
//! A close beats an event that arrives at the same moment: once closed, no
//! further event is yielded. The stream yields the error once, then ends
//! ([`FusedStream::is_terminated`] turns true).
//!
//! Dropping a subscription (or closing it) releases its reference to the
//! key's buffer exactly once; the last reference frees the buffer and the
//! key's cached snapshot.
//!
//! [`Publisher::force_close_token`]: crate::publisher::Publisher::force_close_token
//! [`LagPolicy::Resnapshot`]: crate::publisher::LagPolicy::Resnapshot
//! [`Stream`]: futures::Stream
//! [`FusedStream::is_terminated`]: futures::stream::FusedStream::is_terminated
//! [`Publisher::refresh_topic`]: crate::publisher::Publisher::refresh_topic

//!
//! # Where it lives
//!
//! Subscriptions are part of the [publisher](crate::publisher), which owns
//! every subscription's shared state; this module re-exports their types so
//! that `snapstream::subscription::*` and `snapstream::publisher::*` name the
//! same items.

pub use crate::publisher::{LagPolicy, SubscribeRequest, Subscription, SubscriptionError};
