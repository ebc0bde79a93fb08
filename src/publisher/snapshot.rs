//! Snapshot handlers, the sink they stream into, and the build task.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use tracing::Instrument;

use super::chain::{Buf, Cur, Item};
use super::error::{BoxError, SinkError, SnapshotError};
use super::Inner;
use crate::event::{Event, EventBatch, Subject, Topic};
use crate::sync::Mutex;

/// What a snapshot handler is asked for.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::SnapshotRequest;
/// fn describe(req: &SnapshotRequest) -> String {
///     format!("{}/{} from {}", req.topic(), req.subject(), req.index())
/// }
/// # let _ = describe;
/// ```
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub(crate) topic: Topic,
    pub(crate) subject: Subject,
    pub(crate) index: u64,
    pub(crate) token: Option<Arc<str>>,
}

impl SnapshotRequest {
    /// The topic to snapshot.
    ///
    /// # Examples
    ///
    /// See [`SnapshotRequest`].
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The key to snapshot, or [`Subject::Wildcard`] for every key.
    ///
    /// # Examples
    ///
    /// See [`SnapshotRequest`].
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The index the first subscriber asked for (0 for a fresh subscriber).
    /// Informational: the handler always delivers the full current state.
    ///
    /// # Examples
    ///
    /// See [`SnapshotRequest`].
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The token of the subscriber that triggered the build, if any.
    /// A snapshot may be shared with later subscribers of the same key.
    ///
    /// # Examples
    ///
    /// ```
    /// fn t(req: &snapstream::publisher::SnapshotRequest) -> Option<&str> { req.token() }
    /// # let _ = t;
    /// ```
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// Builds the snapshot of one (topic, subject): streams the current state into
/// the [`SnapshotSink`] and returns the index it reflects (0 is reported as 1).
///
/// Implemented for every `Fn(SnapshotRequest, SnapshotSink<P>) -> impl Future<Output
/// = Result<u64, BoxError>>`, so an async closure is a handler.
///
/// # Obligations
///
/// - Everything appended must reflect the state at the returned index, and
///   that index must be the index of the newest change already published for
///   this key (or newer), so that live events after it are exactly the
///   changes the snapshot does not contain.
/// - On failure, return the error: subscribers receive what was appended,
///   then the error, and nothing is cached. A panic is caught and reported as
///   a failure ([`HandlerPanicked`](super::HandlerPanicked)).
///
/// # Examples
///
/// ```
/// use snapstream::event::Event;
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
///
/// let mut b = Publisher::<String>::builder();
/// b.register("users", |req: SnapshotRequest, mut sink: SnapshotSink<String>| async move {
///     // e.g. read from disk…
///     sink.append(vec![Event::new("users", req.subject().clone(), 3, "alice".to_string())])?;
///     Ok(3)
/// })
/// .unwrap();
/// ```
pub trait SnapshotHandler<P>: Send + Sync + 'static {
    /// Streams the snapshot for `request` into `sink`; returns its index.
    ///
    /// # Errors
    ///
    /// Whatever the state store reports; delivered to the subscribers.
    ///
    /// # Cancel safety
    ///
    /// The returned future is dropped (cancelled) when every subscriber of
    /// the key left, or the publisher shut down.
    fn snapshot(
        &self,
        request: SnapshotRequest,
        sink: SnapshotSink<P>,
    ) -> BoxFuture<'static, Result<u64, BoxError>>;
}

impl<P, F, Fut> SnapshotHandler<P> for F
where
    F: Fn(SnapshotRequest, SnapshotSink<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, BoxError>> + Send + 'static,
{
    fn snapshot(
        &self,
        request: SnapshotRequest,
        sink: SnapshotSink<P>,
    ) -> BoxFuture<'static, Result<u64, BoxError>> {
        Box::pin(self(request, sink))
    }
}

/// Where a snapshot handler streams the snapshot. Subscribers already waiting
/// receive each append immediately (no need to hold the whole snapshot in
/// memory before delivery).
///
/// # Examples
///
/// See [`SnapshotHandler`].
pub struct SnapshotSink<P> {
    buf: Arc<Mutex<Option<Buf<P>>>>,
}

impl<P> SnapshotSink<P> {
    /// Appends one chunk of the snapshot; subscribers receive it as one
    /// [`EventBatch`]. An empty `Vec` appends nothing.
    ///
    /// # Errors
    ///
    /// [`SinkError`] (handing the events back) when the snapshot is already
    /// finished — the handler returned and kept the sink.
    ///
    /// # Examples
    ///
    /// See [`SnapshotHandler`].
    pub fn append(&mut self, events: Vec<Event<P>>) -> Result<(), SinkError<P>> {
        if events.is_empty() {
            return Ok(());
        }
        match &mut *self.buf.lock() {
            Some(buf) => {
                buf.append_one(Item::Batch(EventBatch::new(events)));
                Ok(())
            }
            None => Err(SinkError::closed(events)),
        }
    }

    /// Appends one event as its own chunk.
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::Event;
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    ///
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", |_r: SnapshotRequest, mut sink: SnapshotSink<u8>| async move {
    ///     sink.append_one(Event::new("t", "k", 1, 0))?;
    ///     Ok(1)
    /// })
    /// .unwrap();
    /// ```
    pub fn append_one(&mut self, event: Event<P>) -> Result<(), SinkError<P>> {
        self.append(vec![event])
    }
}

impl<P> std::fmt::Debug for SnapshotSink<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSink").finish_non_exhaustive()
    }
}

/// Runs one snapshot build: the handler streams into `snap`; on success
/// `EndOfSnapshot` is appended and the snapshot spliced onto `live_pos` (the
/// live buffer's head captured before the handler started); on failure the
/// snapshot buffer ends with the error. Then the cache entry `id` is marked
/// ready (and expired after the TTL) or removed — only if it is still the
/// entry of that key (identity check).
pub(crate) async fn build<P: Send + Sync + 'static>(
    inner: Arc<Inner<P>>,
    topic: usize,
    subject: Subject,
    id: u64,
    snap: Buf<P>,
    live_pos: Cur<P>,
    request: SnapshotRequest,
) {
    let span = tracing::debug_span!("snapshot", topic = %request.topic, subject = %subject, id);
    async move {
        let handler = inner.topics[topic].handler.clone();
        let started = std::time::Instant::now();
        let slot = Arc::new(Mutex::new(Some(snap)));
        let sink = SnapshotSink { buf: slot.clone() };
        let result = AssertUnwindSafe(handler.snapshot(request, sink))
            .catch_unwind()
            .await;
        inner.topics[topic]
            .counters
            .build_times
            .record_duration(started.elapsed());
        let Some(mut snap) = slot.lock().take() else {
            return;
        };
        let outcome = match result {
            Ok(Ok(index)) => Ok(index.max(1)),
            Ok(Err(e)) => Err(SnapshotError::new(e)),
            Err(_) => Err(SnapshotError::panicked()),
        };
        match outcome {
            Ok(index) => {
                snap.append_one(Item::EndOfSnapshot(index));
                // The live buffer is always older than the snapshot buffer.
                if let Err(e) = tracing::debug_span!("splice").in_scope(|| snap.splice(&live_pos)) {
                    tracing::error!("snapshot spliced onto a newer buffer");
                    e.0.fail(SnapshotError::new(
                        "snapshot spliced onto a newer buffer".into(),
                    ));
                    inner.forget_snapshot(topic, &subject, id);
                    return;
                }
                drop(live_pos);
                tracing::debug!(index, "snapshot built");
                let ttl = inner.ttl;
                if !inner.snapshot_built(topic, &subject, id, index) {
                    return;
                }
                tokio::time::sleep(ttl).await;
                inner.expire_snapshot(topic, &subject, id);
            }
            Err(e) => {
                tracing::debug!(error = %e.inner(), "snapshot failed");
                snap.fail(e);
                inner.forget_snapshot(topic, &subject, id);
            }
        }
    }
    .instrument(span)
    .await
}
