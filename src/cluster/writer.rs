//! The log writer: a change is accepted once JetStream acknowledges it.

use std::marker::PhantomData;
use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;

use super::error::WriteError;
use super::subject::subject_for;
use super::Log;
use crate::codec::PayloadCodec;

/// Writes changes into the log. Cheap to clone; every clone writes to the
/// same stream.
///
/// A change of `key` in `topic` goes to the subject
/// `<prefix>.<topic>.<key>` (escaped, see [`subject_for`]) with the header
/// that makes JetStream refuse it unless it lands in this log's stream. It is
/// accepted only once JetStream acknowledges it — for a replicated stream,
/// once a majority of the stream's servers stored it — and the
/// acknowledgement's stream sequence is the change's index on every node.
///
/// # Examples
///
/// ```no_run
/// # #![allow(dead_code)]
/// use snapstream::cluster::{JsonCodec, Log, LogConfig};
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let log = Log::open(client, &LogConfig::new("STATE", "state")).await?;
/// let writer = log.writer::<String, _>(JsonCodec);
/// let index = writer.put("services", "web", &"up".to_string()).await?;
/// assert!(index >= 1);
/// # Ok(()) }
/// ```
pub struct LogWriter<P, C> {
    js: jetstream::Context,
    stream: Arc<str>,
    prefix: Arc<str>,
    codec: Arc<C>,
    _payload: PhantomData<fn(&P)>,
}

impl<P, C> Clone for LogWriter<P, C> {
    fn clone(&self) -> Self {
        Self {
            js: self.js.clone(),
            stream: self.stream.clone(),
            prefix: self.prefix.clone(),
            codec: self.codec.clone(),
            _payload: PhantomData,
        }
    }
}

impl<P, C> std::fmt::Debug for LogWriter<P, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl<P, C: PayloadCodec<P>> LogWriter<P, C> {
    pub(crate) fn new(log: &Log, codec: C) -> Self {
        Self {
            js: log.js.clone(),
            stream: log.stream.clone(),
            prefix: log.prefix.clone(),
            codec: Arc::new(codec),
            _payload: PhantomData,
        }
    }

    /// Writes one change and waits for JetStream's acknowledgement; returns
    /// the change's index (its stream sequence).
    ///
    /// # Errors
    ///
    /// [`WriteError::Subject`] or [`WriteError::Encode`] before anything is
    /// sent; [`WriteError::Send`] when the message could not be sent (not in
    /// the log); [`WriteError::Refused`] when JetStream answered that it did
    /// not store it; [`WriteError::Ack`] when it was sent but not acknowledged —
    /// the change counts as not accepted, yet may be in the log (see
    /// [`WriteError::may_be_in_log`]).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a dropped call may have sent the change, which is
    /// then in the log or not, as after [`WriteError::Ack`].
    ///
    /// # Examples
    ///
    /// See [`LogWriter`].
    pub async fn put(
        &self,
        topic: impl AsRef<str>,
        key: impl AsRef<str>,
        payload: &P,
    ) -> Result<u64, WriteError> {
        let subject = subject_for(&self.prefix, topic.as_ref(), key.as_ref())?;
        let mut buf = Vec::new();
        self.codec
            .encode(payload, &mut buf)
            .map_err(WriteError::Encode)?;
        let message = PublishMessage::build()
            .payload(buf.into())
            .expected_stream(&*self.stream);
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|e| WriteError::Send(Box::new(e)))?;
        let ack = ack.await.map_err(|e| {
            use async_nats::jetstream::context::PublishErrorKind as K;
            match e.kind() {
                K::StreamNotFound
                | K::WrongLastMessageId
                | K::WrongLastSequence
                | K::MaxPayloadExceeded => WriteError::Refused(Box::new(e)),
                _ => WriteError::Ack(Box::new(e)),
            }
        })?;
        Ok(ack.sequence)
    }
}
