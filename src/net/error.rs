//! Errors of the network path.

use tonic::Code;

use crate::publisher::SubscriptionError;

/// The metadata key of a lag status carrying the server's lag limit.
pub(crate) const LAG_LIMIT_METADATA: &str = "snapstream-lag-limit";

/// The metadata key of a `Multiplex` response's headers carrying the
/// server's request size limit, so that the client can end an open that
/// is too large on its own instead of breaking the call it shares.
pub(crate) const MAX_REQUEST_METADATA: &str = "snapstream-max-request-size";

/// The metadata key of a `Multiplex` request's headers by which the client
/// asks for shared items: one `MuxItem` for every subscription whose next
/// response it is (`MuxItem.also`), rather than one each.
pub(crate) const MUX_SHARED_METADATA: &str = "snapstream-mux-shared";

/// Starting or stopping a [`Server`](super::Server) failed.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use snapstream::net::{BinaryCodec, ServeError, Server};
/// use snapstream::publisher::Publisher;
///
/// let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let taken = first.local_addr().unwrap();
/// let err = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec)
///     .bind(taken)
///     .await
///     .unwrap_err();
/// assert!(matches!(err, ServeError::Bind(_)));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address could not be bound (or read back).
    #[error("cannot bind the server address")]
    Bind(#[source] std::io::Error),
    /// The HTTP/2 server failed.
    #[error("gRPC transport failed")]
    Transport(#[source] tonic::transport::Error),
    /// The server's task panicked or was cancelled.
    #[error("server task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Building a [`Client`](super::Client) failed.
///
/// # Examples
///
/// ```
/// use snapstream::net::{Client, ClientError};
///
/// let err = Client::builder(Vec::<String>::new()).build::<u64>().unwrap_err();
/// assert!(matches!(err, ClientError::NoAddress));
/// let err = Client::builder(["not a uri with spaces"]).build::<u64>().unwrap_err();
/// assert!(matches!(err, ClientError::BadAddress { .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address list is empty.
    #[error("no server address given")]
    NoAddress,
    /// An address is not a valid URI.
    #[error("invalid server address {address}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS configuration could not be applied to an address.
    #[error("cannot use TLS with {address}")]
    Tls {
        /// The address as given.
        address: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Why a [`RemoteSubscriber`](super::RemoteSubscriber) ended. Transport
/// failures and server shutdowns are not here: the subscriber reconnects
/// and resumes on its own; these are the answers retrying cannot change.
///
/// # Examples
///
/// ```
/// use snapstream::net::RemoteError;
/// use snapstream::publisher::SubscriptionError;
///
/// assert!(RemoteError::ForceClosed.is_reset());
/// assert_eq!(RemoteError::ForceClosed.as_subscription_error(), Some(SubscriptionError::ForceClosed));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// Force-closed by the server (`ABORTED`): the token's permissions
    /// changed or the topic was refreshed. Drop the view and resubscribe
    /// from index 0.
    #[error("subscription force-closed")]
    ForceClosed,
    /// Fell further behind than the server's lag limit (`RESOURCE_EXHAUSTED`).
    #[error("subscriber lagged more than {limit} batches behind")]
    Lagged {
        /// The server's lag limit.
        limit: u64,
    },
    /// The topic is unknown to the server (`NOT_FOUND`).
    #[error("unknown topic: {0}")]
    UnknownTopic(String),
    /// The request is malformed, or a wildcard on a topic without wildcard
    /// support (`INVALID_ARGUMENT`).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The authorizer refused (`PERMISSION_DENIED`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The snapshot handler failed on the server (`INTERNAL`).
    #[error("snapshot failed on the server: {0}")]
    Snapshot(String),
    /// The server rejected the call otherwise (e.g. `OUT_OF_RANGE` for an
    /// oversized request).
    #[error("rejected by the server ({code:?}): {message}")]
    Rejected {
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// A message from the server could not be decoded (payload codec or
    /// framing mismatch).
    #[error("cannot decode a message from the server: {0}")]
    Decode(String),
    /// Closed by its owner.
    #[error("unsubscribed")]
    Unsubscribed,
}

impl RemoteError {
    /// Whether the client should drop its view and resubscribe from 0.
    ///
    /// # Examples
    ///
    /// See [`RemoteError`].
    pub fn is_reset(&self) -> bool {
        matches!(self, RemoteError::ForceClosed)
    }

    /// The local [`SubscriptionError`] this corresponds to, if any.
    ///
    /// # Examples
    ///
    /// See [`RemoteError`].
    pub fn as_subscription_error(&self) -> Option<SubscriptionError> {
        match self {
            RemoteError::ForceClosed => Some(SubscriptionError::ForceClosed),
            RemoteError::Lagged { limit } => Some(SubscriptionError::Lagged { limit: *limit }),
            RemoteError::Unsubscribed => Some(SubscriptionError::Unsubscribed),
            _ => None,
        }
    }

    /// Classifies a status: `Ok(())` when retrying (elsewhere) may help,
    /// else the terminal error.
    pub(crate) fn from_status(status: &tonic::Status) -> Result<(), RemoteError> {
        let msg = status.message().to_string();
        Err(match status.code() {
            Code::Aborted => RemoteError::ForceClosed,
            Code::NotFound => RemoteError::UnknownTopic(msg),
            Code::InvalidArgument => RemoteError::InvalidRequest(msg),
            Code::PermissionDenied | Code::Unauthenticated => RemoteError::PermissionDenied(msg),
            Code::ResourceExhausted => match status
                .metadata()
                .get(LAG_LIMIT_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                Some(limit) => RemoteError::Lagged { limit },
                // Too many streams there: try again (maybe elsewhere).
                None => return Ok(()),
            },
            Code::Internal if msg.starts_with("snapshot failed") => RemoteError::Snapshot(msg),
            Code::OutOfRange | Code::Unimplemented | Code::FailedPrecondition => {
                RemoteError::Rejected {
                    code: status.code(),
                    message: msg,
                }
            }
            // Unavailable, Cancelled, Unknown, DeadlineExceeded, DataLoss,
            // transport errors...: reconnect and resume.
            _ => return Ok(()),
        })
    }
}
