//! The client's side of the `Multiplex` call: one stream per server
//! address carries every subscription of the [`Client`](super::Client)
//! there.
//!
//! A driver task owns the call: it sends the subscriptions' requests (open,
//! close, credit) and hands each received item to its subscription's
//! channel. Each subscription gives the server credit for a number of
//! responses, and gives more only as its reader takes them, so a reader
//! that stops reading stops its own subscription on the server without
//! holding up the others on the stream. When the call fails every
//! subscription on it gets the failure and reconnects on its own (with
//! back-off, resuming from its index), over a new call.

use std::collections::HashMap;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use prost::Message as _;

use crate::net::error::{LAG_LIMIT_METADATA, MAX_REQUEST_METADATA};
use crate::net::proto;
use crate::sync::Mutex;

/// What the driver hands one subscription.
enum MuxEvent {
    Response(Vec<proto::Frame>),
    End(Status),
}

#[derive(Default)]
struct Subs {
    /// The call failed: no more subscriptions on it.
    dead: bool,
    next_id: u64,
    map: HashMap<u64, mpsc::UnboundedSender<MuxEvent>>,
}

/// One multiplexed call to one address.
pub(super) struct MuxConn {
    requests: mpsc::UnboundedSender<proto::MuxRequest>,
    subs: Arc<Mutex<Subs>>,
}

impl MuxConn {
    /// Starts a call over `channel` (on a spawned task). `unimplemented`
    /// is called when the server does not know `Multiplex`.
    pub(super) fn start(
        channel: Channel,
        max_message_size: usize,
        unimplemented: impl FnOnce() + Send + 'static,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let subs = Arc::new(Mutex::new(Subs::default()));
        let grpc = proto::subscriber_client::SubscriberClient::new(channel)
            .max_decoding_message_size(max_message_size);
        tokio::spawn(drive(grpc, rx, subs.clone(), unimplemented));
        Arc::new(Self { requests: tx, subs })
    }

    /// Whether the call failed (a new one is needed).
    pub(super) fn is_dead(&self) -> bool {
        self.subs.lock().dead || self.requests.is_closed()
    }

    /// Opens a subscription on the call: `None` when the call failed.
    pub(super) fn open(
        self: &Arc<Self>,
        request: proto::SubscribeRequest,
        credit: u32,
    ) -> Option<MuxSub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut subs = self.subs.lock();
            if subs.dead {
                return None;
            }
            let id = subs.next_id;
            subs.next_id += 1;
            subs.map.insert(id, tx);
            id
        };
        let open = proto::MuxOpen {
            id,
            request: Some(request),
            credit,
        };
        if self.send(proto::mux_request::Kind::Open(open)).is_err() {
            self.subs.lock().map.remove(&id);
            return None;
        }
        Some(MuxSub {
            id,
            rx,
            conn: self.clone(),
            credit,
            taken: 0,
            ended: false,
        })
    }

    fn send(&self, kind: proto::mux_request::Kind) -> Result<(), ()> {
        self.requests
            .send(proto::MuxRequest { kind: Some(kind) })
            .map_err(|_| ())
    }
}

/// One subscription on a multiplexed call.
pub(super) struct MuxSub {
    id: u64,
    rx: mpsc::UnboundedReceiver<MuxEvent>,
    conn: Arc<MuxConn>,
    /// The credit given at open; more is given per half of it taken.
    credit: u32,
    /// Responses taken since credit was last given.
    taken: u32,
    ended: bool,
}

impl MuxSub {
    /// The subscription's next response, or the status it ended with. Each
    /// call first gives back credit for the responses taken before it.
    pub(super) async fn next(&mut self) -> Result<Vec<proto::Frame>, Status> {
        if self.taken >= (self.credit / 2).max(1) {
            let credit = proto::MuxCredit {
                id: self.id,
                responses: self.taken,
            };
            // A failed send means the call failed: `recv` tells.
            let _ = self.conn.send(proto::mux_request::Kind::Credit(credit));
            self.taken = 0;
        }
        match self.rx.recv().await {
            Some(MuxEvent::Response(frames)) => {
                self.taken += 1;
                Ok(frames)
            }
            Some(MuxEvent::End(status)) => {
                self.ended = true;
                Err(status)
            }
            None => {
                self.ended = true;
                Err(Status::unavailable("multiplexed stream ended"))
            }
        }
    }
}

impl Drop for MuxSub {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.conn.subs.lock().map.remove(&self.id);
        let _ = self.conn.send(proto::mux_request::Kind::Close(self.id));
    }
}

/// The status a subscription's `end` item carries.
fn end_status(end: proto::MuxEnd) -> Status {
    let code = match Code::from_i32(end.code) {
        // A server never ends a subscription with OK: treat it as a break.
        Code::Ok => Code::Unavailable,
        code => code,
    };
    let mut status = Status::new(code, end.message);
    if let Some(limit) = end.lag_limit {
        if let Ok(v) = MetadataValue::try_from(limit.to_string()) {
            status.metadata_mut().insert(LAG_LIMIT_METADATA, v);
        }
    }
    status
}

/// The request stream of the call.
fn requests(
    mut rx: mpsc::UnboundedReceiver<proto::MuxRequest>,
) -> impl Stream<Item = proto::MuxRequest> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The status of an open that the server's request size limit refuses:
/// what the server itself would answer to a `Subscribe` that large.
fn too_large(size: usize, limit: usize) -> Status {
    Status::out_of_range(format!(
        "a request of {size} bytes exceeds the server's limit of {limit} bytes"
    ))
}

/// Runs one call until it fails, then fails every subscription on it.
///
/// The driver forwards the subscriptions' requests to the call only once
/// the server's response headers are in: they carry its request size limit,
/// and an open over it ends that one subscription here (`OUT_OF_RANGE`, as
/// a `Subscribe` would) instead of breaking the call every other
/// subscription shares.
async fn drive(
    mut grpc: proto::subscriber_client::SubscriberClient<Channel>,
    rx: mpsc::UnboundedReceiver<proto::MuxRequest>,
    subs: Arc<Mutex<Subs>>,
    unimplemented: impl FnOnce(),
) {
    let (forward, forwarded) = mpsc::unbounded_channel();
    let status = match grpc.multiplex(requests(forwarded)).await {
        Err(status) => {
            if status.code() == Code::Unimplemented {
                unimplemented();
            }
            status
        }
        Ok(response) => {
            let limit = response
                .metadata()
                .get(MAX_REQUEST_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            let mut stream = response.into_inner();
            // `None` once every handle is gone: the call is half-closed.
            let mut rx = Some(rx);
            let mut forward = Some(forward);
            loop {
                let request = async {
                    match rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    message = stream.message() => match message {
                        Ok(Some(response)) => deliver(&subs, response),
                        Ok(None) => break Status::unavailable("multiplexed stream ended"),
                        Err(status) => break status,
                    },
                    request = request => match (request, &forward) {
                        (Some(request), Some(forward)) => send(&subs, forward, limit, request),
                        _ => {
                            rx = None;
                            forward = None;
                        }
                    },
                }
            }
        }
    };
    let map = {
        let mut subs = subs.lock();
        subs.dead = true;
        std::mem::take(&mut subs.map)
    };
    for tx in map.into_values() {
        let _ = tx.send(MuxEvent::End(status.clone()));
    }
}

/// Sends `request` on the call, unless it is an open larger than the
/// server's `limit`: that one subscription ends here instead.
fn send(
    subs: &Mutex<Subs>,
    forward: &mpsc::UnboundedSender<proto::MuxRequest>,
    limit: Option<usize>,
    request: proto::MuxRequest,
) {
    let size = request.encoded_len();
    match (&request.kind, limit) {
        (Some(proto::mux_request::Kind::Open(open)), Some(limit)) if size > limit => {
            if let Some(tx) = subs.lock().map.remove(&open.id) {
                let _ = tx.send(MuxEvent::End(too_large(size, limit)));
            }
        }
        // A failed send means the call ended: the loop learns it from the
        // response stream.
        _ => {
            let _ = forward.send(request);
        }
    }
}

/// Hands each item of `response` to its subscription.
fn deliver(subs: &Mutex<Subs>, response: proto::MuxResponse) {
    let mut subs = subs.lock();
    for item in response.items {
        match item.end {
            Some(end) => {
                if let Some(tx) = subs.map.remove(&item.id) {
                    let _ = tx.send(MuxEvent::End(end_status(end)));
                }
            }
            None => {
                if let Some(tx) = subs.map.get(&item.id) {
                    let _ = tx.send(MuxEvent::Response(item.frames));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_status_keeps_the_code_and_the_lag_limit() {
        let s = end_status(proto::MuxEnd {
            code: Code::ResourceExhausted as i32,
            message: "lagged".into(),
            lag_limit: Some(128),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.message(), "lagged");
        assert_eq!(
            s.metadata()
                .get(LAG_LIMIT_METADATA)
                .unwrap()
                .to_str()
                .unwrap(),
            "128"
        );
        let ok = end_status(proto::MuxEnd {
            code: 0,
            message: String::new(),
            lag_limit: None,
        });
        assert_eq!(ok.code(), Code::Unavailable);
        assert!(ok.metadata().get(LAG_LIMIT_METADATA).is_none());
    }
}
