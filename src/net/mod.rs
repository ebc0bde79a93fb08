//! Subscribing over the network: a gRPC subscribe service, a resuming
//! client and client-side views (feature `net`).
//!
//! ```text
//!  node: Publisher ──► Server (tonic) ══ HTTP/2 ══► Client ──► RemoteSubscriber ──► View
//!                      authorizer, limits,           one connection   reconnect +        get, wait(min_index),
//!                      progress marks                per address      resume by index    shared by local readers
//! ```
//!
//! # The wire
//!
//! `proto/snapstream.proto` defines one server-streaming call,
//! `Subscribe(topic, key or wildcard, index, token)`. Its responses carry
//! exactly the local framing — snapshot batches, `EndOfSnapshot`,
//! `NewSnapshotToFollow`, live batches — plus progress marks. Payloads are
//! bytes made by a [`PayloadCodec`] ([`BinaryCodec`] by default). Frames are
//! packed into messages of at most the server's max message size; a batch
//! larger than that is split across messages and joined again by the
//! client, so a large snapshot never makes one giant frame.
//!
//! # Status codes
//!
//! The end of a stream is a gRPC status, and each has one meaning:
//!
//! | status | cause | what the client does |
//! |---|---|---|
//! | `NOT_FOUND` | unknown topic | ends: [`RemoteError::UnknownTopic`] |
//! | `INVALID_ARGUMENT` | malformed request; wildcard on a topic without wildcard support | ends: [`RemoteError::InvalidRequest`] |
//! | `OUT_OF_RANGE` | request larger than the server's limit | ends: [`RemoteError::Rejected`] |
//! | `PERMISSION_DENIED` | the [`Authorizer`] refused | ends: [`RemoteError::PermissionDenied`] |
//! | `ABORTED` | force-closed ([`Publisher::force_close_token`], [`Publisher::refresh_topic`]) | ends: [`RemoteError::ForceClosed`]; a [`View`] drops its state and resubscribes from 0 |
//! | `RESOURCE_EXHAUSTED` | lagged (with the limit in metadata) / too many streams | ends: [`RemoteError::Lagged`] / retries |
//! | `UNAVAILABLE` | server or publisher shutting down; the server's [`CatchUp`] gave up waiting for the resume index | reconnects (next address) and resumes |
//! | `INTERNAL` | the snapshot handler failed | ends: [`RemoteError::Snapshot`] |
//!
//! # Progress marks
//!
//! A stream quiet for the server's
//! [`progress_interval`](ServerBuilder::progress_interval) gets a progress
//! mark: the index its view is complete up to — the topic's newest index
//! when the key provably did not change since
//! ([`Publisher::quiet_index`]). It moves the client's resume point without
//! yielding a message, and shows an idle stream is alive. A reconnect at
//! that point continues live without a snapshot while the publisher's
//! [resume window](crate::publisher::PublisherBuilder::resume_window) covers
//! it, even if nobody watched the key meanwhile.
//!
//! # Back-pressure
//!
//! The server reads a subscription only when HTTP/2 flow control lets it
//! send; a remote subscriber buffers at most
//! [`buffer`](ClientBuilder::buffer) messages ahead of its reader. A client
//! that stops reading therefore stops the server reading for it, and the
//! publisher's lag limit bounds what the key's buffer keeps.
//!
//! [`Publisher::force_close_token`]: crate::publisher::Publisher::force_close_token
//! [`Publisher::quiet_index`]: crate::publisher::Publisher::quiet_index
//! [`Publisher::refresh_topic`]: crate::publisher::Publisher::refresh_topic

mod catch_up;
mod client;
mod coalesce;
mod error;
mod idle;
pub mod proto;
mod server;
mod stats;
mod view;

pub use crate::codec::{BinaryCodec, CodecError, JsonCodec, PayloadCodec, WireFormat};
pub use catch_up::{CatchUp, NoWait, NotCaughtUp};
pub use client::{
    Client, ClientBuilder, RemoteRequest, RemoteSubscriber, DEFAULT_BACKOFF_MAX,
    DEFAULT_BACKOFF_MIN, DEFAULT_CLIENT_KEEPALIVE_INTERVAL, DEFAULT_CLIENT_KEEPALIVE_TIMEOUT,
    DEFAULT_CLIENT_MAX_MESSAGE_SIZE, DEFAULT_CONNECTION_WINDOW, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STREAM_WINDOW, DEFAULT_SUBSCRIBER_BUFFER,
};
pub use error::{ClientError, RemoteError, ServeError};
pub use server::{
    AllowAll, Authorizer, Server, ServerBuilder, ServerStatsHandle, SubscribeService,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_REQUEST_SIZE, DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_CONNECTION, DEFAULT_MESSAGE_FILL, DEFAULT_PROGRESS_INTERVAL,
};
pub use stats::{ServerStats, StreamsEnded};
pub use view::{
    KeyValue, View, ViewError, ViewState, Views, ViewsBuilder, DEFAULT_VIEW_IDLE_TIMEOUT,
};
