//! The `Multiplex` call: many subscriptions of one client over one stream.
//!
//! Each subscription is a [`ServerStream`] (the same as a `Subscribe`
//! call's) wrapped in a [`Leg`] that tags its responses with the client's id
//! and holds them back once the client's credit is spent. All the legs of a
//! stream live in one [`SelectAll`], polled by the one task HTTP/2 gives the
//! stream: only legs that were woken are polled, and whatever they have
//! ready goes out in one message. So a change delivered to every
//! subscription of a client is one message and, usually, one socket write,
//! where `Subscribe` makes one HTTP/2 stream's worth of work (a task wake-up,
//! a frame, a flush) per subscription.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::SelectAll;
use futures::task::AtomicWaker;
use futures::{FutureExt, Stream, StreamExt};
use tonic::{Status, Streaming};

use super::wire::{self, Item};
use super::{EncodeCache, ServerStream, StreamStop, SubscribeService};
use crate::codec::PayloadCodec;
use crate::net::error::LAG_LIMIT_METADATA;
use crate::net::idle::ConnActivity;
use crate::net::proto;

/// The size a multiplexed message is filled to (at least the service's
/// message fill): 64 KiB.
const MUX_FILL: usize = 64 << 10;

/// Responses a leg may still send, and the waker of a leg waiting for more.
#[derive(Default)]
struct Credit {
    responses: AtomicU32,
    /// Set when the client closed the subscription.
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl Credit {
    fn grant(&self, n: u32) {
        let _ = self
            .responses
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_add(n))
            });
        self.waker.wake();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }
}

enum LegState<P, C> {
    /// Waiting for the node to catch up, then validated and subscribed.
    Opening(BoxFuture<'static, Result<ServerStream<P, C>, Status>>),
    Open(Box<ServerStream<P, C>>),
    Done,
}

/// One subscription of a multiplexed stream.
struct Leg<P, C> {
    id: u64,
    state: LegState<P, C>,
    credit: Arc<Credit>,
}

/// The item ending subscription `id` with `status`.
fn end_item(id: u64, status: &Status) -> Item {
    let lag_limit = status
        .metadata()
        .get(LAG_LIMIT_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Item::end(&proto::MuxItem {
        id,
        frames: Vec::new(),
        end: Some(proto::MuxEnd {
            code: status.code() as i32,
            message: status.message().to_string(),
            lag_limit,
        }),
    })
}

/// A leg's next item, and whether it is the leg's last.
struct LegItem {
    item: Item,
    /// The subscription ended: its id is free again.
    end: Option<u64>,
}

impl<P, C> Stream for Leg<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    type Item = LegItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Woken by a close (and by credit) whatever the leg waits on: a
        // subscription closed while its key is quiet ends now, not at its
        // next message.
        this.credit.waker.register(cx.waker());
        if this.credit.closed.load(Ordering::Acquire) {
            // Dropping the stream ends the publisher's subscription.
            this.state = LegState::Done;
            return Poll::Ready(None);
        }
        loop {
            match &mut this.state {
                LegState::Done => return Poll::Ready(None),
                LegState::Opening(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(stream)) => this.state = LegState::Open(Box::new(stream)),
                    Poll::Ready(Err(status)) => {
                        this.state = LegState::Done;
                        return Poll::Ready(Some(LegItem {
                            item: end_item(this.id, &status),
                            end: Some(this.id),
                        }));
                    }
                },
                LegState::Open(stream) => {
                    if this.credit.responses.load(Ordering::Acquire) == 0 {
                        // The waker is registered (above): a grant or a
                        // close after this load wakes the leg.
                        return Poll::Pending;
                    }
                    return match stream.poll_step(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Some(Ok(response))) => {
                            this.credit.responses.fetch_sub(1, Ordering::AcqRel);
                            Poll::Ready(Some(LegItem {
                                item: Item::Response {
                                    id: this.id,
                                    response,
                                },
                                end: None,
                            }))
                        }
                        Poll::Ready(Some(Err(status))) => {
                            this.state = LegState::Done;
                            Poll::Ready(Some(LegItem {
                                item: end_item(this.id, &status),
                                end: Some(this.id),
                            }))
                        }
                        Poll::Ready(None) => {
                            this.state = LegState::Done;
                            Poll::Ready(None)
                        }
                    };
                }
            }
        }
    }
}

/// The response stream of one `Multiplex` call.
pub(super) struct MuxStream<P, C> {
    service: SubscribeService<P, C>,
    requests: Streaming<proto::MuxRequest>,
    /// The client half-closed: no more requests.
    requests_done: bool,
    legs: SelectAll<Leg<P, C>>,
    /// End items of opens refused before they became legs (a duplicate id:
    /// its end must not close the open leg of that id).
    refused: Vec<Item>,
    /// The open legs' credits, by id.
    open: HashMap<u64, Arc<Credit>>,
    conn: Option<Arc<ConnActivity>>,
    /// This stream's key in the service's stop signals, and its signal.
    stop_id: u64,
    stop: Arc<StreamStop>,
    /// An item that did not fit the last message.
    carry: Option<(Item, usize)>,
    /// The events the legs encoded last, shared among them.
    encoded: Arc<EncodeCache<P>>,
    fill: usize,
    max: usize,
    done: bool,
}

impl<P, C> MuxStream<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    pub(super) fn new(
        service: SubscribeService<P, C>,
        requests: Streaming<proto::MuxRequest>,
        conn: Option<Arc<ConnActivity>>,
    ) -> Self {
        let inner = &service.inner;
        inner.counters.multiplexed();
        let stop_id = inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(StreamStop::default());
        inner.stops.lock().insert(stop_id, stop.clone());
        // A shutdown that began before the insert did not see this stream.
        if *inner.shutdown.borrow() {
            stop.stop();
        }
        let max = inner.max_message_size;
        let fill = MUX_FILL.max(inner.message_fill).min(max);
        Self {
            service,
            requests,
            requests_done: false,
            legs: SelectAll::new(),
            refused: Vec::new(),
            open: HashMap::new(),
            conn,
            stop_id,
            stop,
            carry: None,
            encoded: Arc::new(EncodeCache::new()),
            fill,
            max,
            done: false,
        }
    }

    /// Acts on one request from the client.
    fn request(&mut self, request: proto::MuxRequest) {
        use proto::mux_request::Kind;
        match request.kind {
            None => {}
            Some(Kind::Open(open)) => self.open(open),
            Some(Kind::Close(id)) => {
                if let Some(credit) = self.open.remove(&id) {
                    credit.close();
                }
            }
            Some(Kind::Credit(c)) => {
                if let Some(credit) = self.open.get(&c.id) {
                    credit.grant(c.responses);
                }
            }
        }
    }

    fn open(&mut self, open: proto::MuxOpen) {
        let id = open.id;
        let credit = Arc::new(Credit::default());
        credit.grant(open.credit.max(1));
        if self.open.contains_key(&id) {
            // The duplicate ends at once; the open one goes on.
            let status = Status::invalid_argument(format!("subscription id {id} is already open"));
            self.refused.push(end_item(id, &status));
            return;
        }
        if self.open.len() >= self.service.inner.max_streams_per_connection {
            let status = Status::resource_exhausted("too many subscriptions on this stream");
            self.refused.push(end_item(id, &status));
            return;
        }
        let state = {
            let service = self.service.clone();
            let conn = self.conn.clone();
            let encoded = self.encoded.clone();
            LegState::Opening(
                async move {
                    let Some(req) = open.request else {
                        return Err(Status::invalid_argument("open without a request"));
                    };
                    let token = (!req.token.is_empty()).then(|| req.token.clone());
                    if req.index > 0 {
                        service.caught_up(req.index).await?;
                    }
                    let mut stream = service.open(token.as_deref(), req, conn)?;
                    stream.share_encoding(encoded);
                    Ok(stream)
                }
                .boxed(),
            )
        };
        self.open.insert(id, credit.clone());
        self.legs.push(Leg { id, state, credit });
    }
}

impl<P, C> Stream for MuxStream<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    type Item = Result<proto::EncodedMuxResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        while !this.requests_done {
            match this.requests.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(request))) => this.request(request),
                Poll::Ready(Some(Err(status))) => {
                    // A request that could not be read (too large, or not a
                    // request at all) ends the call with why: the stream of
                    // requests cannot be read past it. The client ends
                    // oversized opens itself (it knows the limit from the
                    // response headers), so this is a broken client or link.
                    tracing::debug!(code = ?status.code(), "multiplexed request stream failed");
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => this.requests_done = true,
                Poll::Pending => break,
            }
        }
        let mut items = Vec::new();
        let mut size = 0;
        if let Some((item, n)) = this.carry.take() {
            size += n;
            items.push(item);
        }
        // Refusals are a few bytes each, but a burst of opens may make many:
        // what does not fit this message waits for the next.
        let mut refused = this.refused.drain(..).peekable();
        while let Some(item) = refused.next_if(|i| items.is_empty() || size + i.len() <= this.max) {
            size += item.len();
            items.push(item);
        }
        let rest: Vec<_> = refused.collect();
        this.refused = rest;
        while size < this.fill {
            let Poll::Ready(Some(LegItem { item, end })) = this.legs.poll_next_unpin(cx) else {
                break;
            };
            if let Some(id) = end {
                this.open.remove(&id);
            }
            let n = item.len();
            if !items.is_empty() && size + n > this.max {
                this.carry = Some((item, n));
                break;
            }
            size += n;
            items.push(item);
        }
        if !items.is_empty() {
            return Poll::Ready(Some(Ok(wire::mux_response(&items, size))));
        }
        if this.legs.is_empty() {
            if this.stop.is_stopped() {
                this.done = true;
                return Poll::Ready(Some(Err(Status::unavailable("server shutting down"))));
            }
            if this.requests_done {
                this.done = true;
                return Poll::Ready(None);
            }
        }
        this.stop.waker.register(cx.waker());
        if this.stop.is_stopped() && this.legs.is_empty() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<P, C> Drop for MuxStream<P, C> {
    fn drop(&mut self) {
        self.service.inner.stops.lock().remove(&self.stop_id);
    }
}
