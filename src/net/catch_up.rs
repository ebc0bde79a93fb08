//! Read-your-index on a server: what a [`Server`](super::Server) waits for
//! before it subscribes a request that resumes from an index.
//!
//! A server over one publisher alone never waits: its publisher is the
//! source of every index it serves. A server over one node of several fed
//! from one log (the `cluster` module) may be asked, by a client that failed
//! over from a node further ahead, for an index it has not applied yet. Its
//! publisher would then answer with a new snapshot of *older* state. A
//! [`CatchUp`] given to [`ServerBuilder::catch_up`](super::ServerBuilder::catch_up)
//! closes that hole: the server first waits until the source has applied the
//! requested index, and when it gives up ends the call with `UNAVAILABLE`,
//! so the client tries again — at the next address — and resumes there.

use futures::future::BoxFuture;

/// A source did not reach a requested index within its bound.
///
/// # Examples
///
/// ```
/// use snapstream::net::NotCaughtUp;
/// let e = NotCaughtUp { requested: 9, applied: 4 };
/// assert_eq!(e.to_string(), "not caught up with index 9 (applied 4)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not caught up with index {requested} (applied {applied})")]
pub struct NotCaughtUp {
    /// The index the request resumes from.
    pub requested: u64,
    /// The newest index the source had applied when it gave up.
    pub applied: u64,
}

/// What a server waits on before subscribing a resume from a non-zero
/// index: the source of its publisher's events reaching that index.
///
/// # Obligations
///
/// - [`wait_for`](Self::wait_for) resolves `Ok` only once every event up to
///   `index` has been published into the server's publisher;
/// - it is bounded: it resolves `Err` when the source does not get there in
///   reasonable time (the server then answers `UNAVAILABLE`).
///
/// # Examples
///
/// ```
/// use futures::future::BoxFuture;
/// use futures::FutureExt;
/// use snapstream::net::{CatchUp, NotCaughtUp};
///
/// /// A source that has applied index 10 and never moves.
/// struct AtTen;
///
/// impl CatchUp for AtTen {
///     fn wait_for(&self, index: u64) -> BoxFuture<'static, Result<(), NotCaughtUp>> {
///         async move {
///             if index <= 10 { Ok(()) } else { Err(NotCaughtUp { requested: index, applied: 10 }) }
///         }
///         .boxed()
///     }
/// }
///
/// # futures::executor::block_on(async {
/// assert!(AtTen.wait_for(7).await.is_ok());
/// assert!(AtTen.wait_for(11).await.is_err());
/// # });
/// ```
pub trait CatchUp: Send + Sync + 'static {
    /// Resolves once the source has applied `index` (`Ok`), or gave up
    /// waiting for it (`Err`).
    ///
    /// # Errors
    ///
    /// [`NotCaughtUp`] when the bound passed.
    ///
    /// # Cancel safety
    ///
    /// The returned future must be cancel-safe: the server drops it when it
    /// shuts down mid-wait.
    fn wait_for(&self, index: u64) -> BoxFuture<'static, Result<(), NotCaughtUp>>;
}

/// The default [`CatchUp`]: never waits (the publisher is the source).
///
/// # Examples
///
/// ```
/// use snapstream::net::{CatchUp, NoWait};
/// # futures::executor::block_on(async {
/// assert!(NoWait.wait_for(u64::MAX).await.is_ok());
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoWait;

impl CatchUp for NoWait {
    fn wait_for(&self, _index: u64) -> BoxFuture<'static, Result<(), NotCaughtUp>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
