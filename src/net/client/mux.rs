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
//!
//! The driver leaves each item encoded: it reads only the id, and the
//! subscription's own task decodes the rest. So the decoding of a message
//! for a hundred subscriptions is spread over the runtime's threads, and
//! what a task allocates while decoding it frees itself (the driver
//! allocating every item for other threads to free was two thirds of the
//! client's CPU in the allocator, measured).
//!
//! The driver asks the server for shared items
//! ([`MUX_SHARED_METADATA`]): a response that is the next of many
//! subscriptions of the call comes once, listing them all, and is handed to
//! each as one [`SharedItem`], which the first of them to read it decodes
//! for all (see [`SharedItem::decoded`]).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes};
use futures::Stream;
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::net::error::{LAG_LIMIT_METADATA, MAX_REQUEST_METADATA, MUX_SHARED_METADATA};
use crate::net::proto;
use crate::sync::Mutex;

/// What the driver hands one subscription.
enum MuxEvent {
    /// One `MuxItem` of this subscription alone, still encoded.
    Item(Bytes),
    /// One `MuxItem` for several subscriptions, this one among them.
    Shared(Arc<SharedItem>),
    /// The call ended, or the open was refused here.
    End(Status),
}

/// A `MuxItem` that is the next response of several subscriptions (its
/// `id` and `also`), still encoded; decoded once, by the first of them to
/// read it, for all.
pub(in crate::net) struct SharedItem {
    bytes: Bytes,
    decoded: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl SharedItem {
    fn new(bytes: Bytes) -> Self {
        Self {
            bytes,
            decoded: OnceLock::new(),
        }
    }

    /// The item decoded: by `decode`, the first time any of its
    /// subscriptions asks, and kept for the others. `None` when what was
    /// kept is not a `T` (another subscription decoded it another way): the
    /// caller decodes [`bytes`](Self::bytes) itself.
    pub(in crate::net) fn decoded<T: Any + Send + Sync>(
        &self,
        decode: impl FnOnce(&Bytes) -> T,
    ) -> Option<&T> {
        self.decoded
            .get_or_init(|| Box::new(decode(&self.bytes)))
            .downcast_ref()
    }

    /// The encoded `MuxItem`.
    pub(in crate::net) fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// A subscription's next response, as [`MuxSub::next`] returns it.
pub(in crate::net) enum MuxFrames {
    /// Its own, decoded.
    Own(Vec<proto::Frame>),
    /// Shared with other subscriptions of the call.
    Shared(Arc<SharedItem>),
}

/// A `MuxResponse` as the client reads it: wire-compatible (a message
/// field and a bytes field are both length-delimited), each item kept as
/// a slice of the received buffer.
#[derive(Clone, PartialEq, prost::Message)]
struct LazyMuxResponse {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    items: Vec<Bytes>,
}

/// The id of an encoded `MuxItem`, and the ids of the other subscriptions
/// it is for (`also`, packed or not). Its frames are skipped by their
/// lengths, not read.
fn item_ids(mut item: &[u8], also: &mut Vec<u64>) -> Result<u64, prost::DecodeError> {
    also.clear();
    let mut id = 0;
    while item.has_remaining() {
        let (tag, wire_type) = decode_key(&mut item)?;
        match (tag, wire_type) {
            (1, WireType::Varint) => id = decode_varint(&mut item)?,
            (4, _) => prost::encoding::uint64::merge_repeated(
                wire_type,
                also,
                &mut item,
                DecodeContext::default(),
            )?,
            _ => skip_field(wire_type, tag, &mut item, DecodeContext::default())?,
        }
    }
    Ok(id)
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
        let grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(max_message_size);
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
    pub(super) async fn next(&mut self) -> Result<MuxFrames, Status> {
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
            Some(MuxEvent::Shared(item)) => {
                self.taken += 1;
                Ok(MuxFrames::Shared(item))
            }
            Some(MuxEvent::Item(bytes)) => match proto::MuxItem::decode(bytes) {
                Ok(proto::MuxItem {
                    end: None, frames, ..
                }) => {
                    self.taken += 1;
                    Ok(MuxFrames::Own(frames))
                }
                Ok(proto::MuxItem { end: Some(end), .. }) => {
                    // Its last item: the server sends nothing more under
                    // this id, and ids are not reused.
                    self.ended = true;
                    self.conn.subs.lock().map.remove(&self.id);
                    Err(end_status(end))
                }
                Err(e) => Err(self.undecodable(&e.to_string())),
            },
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

    /// Ends the subscription over a response that did not decode: what
    /// `Subscribe` does with one (tonic's INTERNAL: reconnect and resume).
    /// Closing it here keeps the server from sending more.
    pub(super) fn undecodable(&mut self, why: &str) -> Status {
        if !self.ended {
            self.ended = true;
            self.conn.subs.lock().map.remove(&self.id);
            let _ = self.conn.send(proto::mux_request::Kind::Close(self.id));
        }
        Status::internal(format!("a multiplexed response did not decode: {why}"))
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
    grpc: tonic::client::Grpc<Channel>,
    rx: mpsc::UnboundedReceiver<proto::MuxRequest>,
    subs: Arc<Mutex<Subs>>,
    unimplemented: impl FnOnce(),
) {
    let (forward, forwarded) = mpsc::unbounded_channel();
    let status = match call(grpc, requests(forwarded)).await {
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
                    request = request => match (request, &forward) {
                        (Some(request), Some(forward)) => send(&subs, forward, limit, request),
                        _ => {
                            rx = None;
                            forward = None;
                        }
                    },
                    message = stream.message() => match message {
                        Ok(Some(response)) => {
                            if let Err(status) = deliver(&subs, response) {
                                break status;
                            }
                        }
                        Ok(None) => break Status::unavailable("multiplexed stream ended"),
                        Err(status) => break status,
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

/// Starts the `Multiplex` call (the generated stub's, decoding responses
/// as [`LazyMuxResponse`]).
async fn call(
    mut grpc: tonic::client::Grpc<Channel>,
    requests: impl Stream<Item = proto::MuxRequest> + Send + 'static,
) -> Result<tonic::Response<tonic::Streaming<LazyMuxResponse>>, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
    let path = PathAndQuery::from_static("/snapstream.v1.Subscriber/Multiplex");
    let codec = proto::SnapCodec::<proto::MuxRequest, LazyMuxResponse>::default();
    let mut request = tonic::Request::new(requests);
    request
        .metadata_mut()
        .insert(MUX_SHARED_METADATA, MetadataValue::from_static("1"));
    grpc.streaming(request, path, codec).await
}

/// Hands each item of `response` to its subscription (or, shared, to each
/// of its subscriptions), still encoded. An item whose ids cannot be read
/// fails the call (its subscriptions would miss it): every subscription
/// reconnects and resumes.
fn deliver(subs: &Mutex<Subs>, response: LazyMuxResponse) -> Result<(), Status> {
    let subs = subs.lock();
    let mut also = Vec::new();
    for item in response.items {
        let id = item_ids(&item, &mut also)
            .map_err(|e| Status::internal(format!("a multiplexed item did not decode: {e}")))?;
        if also.is_empty() {
            if let Some(tx) = subs.map.get(&id) {
                let _ = tx.send(MuxEvent::Item(item));
            }
            continue;
        }
        // Each listed subscription gets the item once, even from a server
        // that lists one twice.
        also.push(id);
        also.sort_unstable();
        also.dedup();
        let shared = Arc::new(SharedItem::new(item));
        for &id in &also {
            if let Some(tx) = subs.map.get(&id) {
                let _ = tx.send(MuxEvent::Shared(shared.clone()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lazy_response_reads_the_items_a_full_decode_reads() {
        let event = |i: u64| proto::Frame {
            kind: Some(proto::frame::Kind::Events(proto::Batch {
                events: vec![proto::Event {
                    key: format!("k{i}"),
                    index: i,
                    payload: Bytes::from(vec![i as u8; i as usize]),
                }],
                partial: false,
            })),
        };
        let response = proto::MuxResponse {
            items: vec![
                // Id 0 is not on the wire at all (proto3's default).
                proto::MuxItem {
                    id: 0,
                    frames: vec![event(1)],
                    end: None,
                    also: vec![],
                },
                proto::MuxItem {
                    id: 300,
                    frames: vec![event(2), event(3)],
                    end: None,
                    also: vec![],
                },
                proto::MuxItem {
                    id: u64::MAX,
                    frames: vec![],
                    end: None,
                    also: vec![],
                },
                proto::MuxItem {
                    id: 7,
                    frames: vec![],
                    end: Some(proto::MuxEnd {
                        code: 14,
                        message: "bye".into(),
                        lag_limit: None,
                    }),
                    also: vec![],
                },
                proto::MuxItem {
                    id: 4,
                    frames: vec![event(4)],
                    end: None,
                    also: vec![0, 5, 300, u64::MAX],
                },
            ],
        };
        let lazy = LazyMuxResponse::decode(response.encode_to_vec().as_slice()).unwrap();
        assert_eq!(lazy.items.len(), response.items.len());
        let mut also = vec![99];
        for (raw, item) in lazy.items.iter().zip(&response.items) {
            assert_eq!(item_ids(raw, &mut also).unwrap(), item.id);
            assert_eq!(also, item.also);
            assert_eq!(&proto::MuxItem::decode(raw.clone()).unwrap(), item);
        }
        // `also` unpacked (as a proto2 writer would send it) reads the same:
        // id 4, then 5 and 300 as separate fields.
        let unpacked = [0x08, 4, 0x20, 5, 0x20, 0xac, 0x02];
        assert_eq!(item_ids(&unpacked, &mut also).unwrap(), 4);
        assert_eq!(also, [5, 300]);
    }

    #[test]
    fn an_unreadable_item_is_an_error_not_an_id() {
        let mut also = Vec::new();
        // A key with wire type 7 (none such), then a length past the end.
        assert!(item_ids(&[0x0f], &mut also).is_err());
        assert!(item_ids(&[0x12, 0x05, 0x00], &mut also).is_err());
        assert!(item_ids(&[0x08], &mut also).is_err());
        // Packed ids longer than the item, or cut in the middle of one.
        assert!(item_ids(&[0x22, 0x05, 0x01], &mut also).is_err());
        assert!(item_ids(&[0x22, 0x01, 0x80], &mut also).is_err());
        assert_eq!(item_ids(&[], &mut also).unwrap(), 0);
        assert!(also.is_empty());
    }

    #[test]
    fn a_shared_item_is_decoded_once() {
        let item = SharedItem::new(Bytes::from_static(b"x"));
        let calls = std::cell::Cell::new(0);
        let decode = |b: &Bytes| {
            calls.set(calls.get() + 1);
            b.len()
        };
        assert_eq!(item.decoded(decode), Some(&1usize));
        assert_eq!(item.decoded(decode), Some(&1usize));
        assert_eq!(calls.get(), 1);
        // Kept as another type: the caller decodes by itself.
        assert_eq!(item.decoded(|_| 0u8), None);
        assert_eq!(item.bytes(), &Bytes::from_static(b"x"));
    }

    #[test]
    fn a_shared_item_reaches_each_listed_subscription_once() {
        let subs = Mutex::new(Subs::default());
        let mut rxs = Vec::new();
        for id in 0..3u64 {
            let (tx, rx) = mpsc::unbounded_channel();
            subs.lock().map.insert(id, tx);
            rxs.push(rx);
        }
        // Id 1, with 1 listed again and 2 twice; 9 is no subscription here.
        let item = proto::MuxItem {
            id: 1,
            frames: vec![],
            end: None,
            also: vec![2, 1, 2, 9],
        };
        let response = LazyMuxResponse {
            items: vec![item.encode_to_vec().into()],
        };
        deliver(&subs, response).unwrap();
        let counts: Vec<usize> = rxs
            .iter_mut()
            .map(|rx| std::iter::from_fn(|| rx.try_recv().ok()).count())
            .collect();
        assert_eq!(counts, [0, 1, 1]);
    }

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
