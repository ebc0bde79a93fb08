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
//!
//! When the client asks for it (request metadata
//! [`MUX_SHARED_METADATA`]), a response that is the next of several
//! subscriptions in one message is sent once, as one item listing them all
//! (`MuxItem.also`): the legs encode a change through one [`EncodeCache`],
//! so their responses to it hold the same frames (the same bytes, which is
//! how they are recognised, by pointer), and the client decodes the item
//! once for all of them.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::SelectAll;
use futures::task::AtomicWaker;
use futures::{FutureExt, Stream, StreamExt};
use tonic::{Status, Streaming};

use super::wire::{self, Item};
use super::{EncodeCache, ServerStream, StreamStop, SubscribeService};
use crate::codec::PayloadCodec;
use crate::net::error::LAG_LIMIT_METADATA;
#[cfg(doc)]
use crate::net::error::MUX_SHARED_METADATA;
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
        also: Vec::new(),
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
                                item: Item::response(this.id, response),
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
    carry: Option<Item>,
    /// The events the legs encoded last, shared among them.
    encoded: Arc<EncodeCache<P>>,
    fill: usize,
    max: usize,
    done: bool,
    /// The message being built.
    pack: Pack,
}

/// One `MuxResponse` being built: its items and their size. When the
/// client reads shared items, a response joins an earlier item holding the
/// same frames (listed in its `also`) instead of being added at the end.
struct Pack {
    items: Vec<Item>,
    size: usize,
    /// The client reads shared items (see the [module docs](self)).
    shared: bool,
    max: usize,
    /// The items holding frames, by their frames' identity (see
    /// [`frames_key`]).
    by_frames: HashMap<(usize, usize), usize, crate::FastHasher>,
    /// The place of each subscription's last item. A response joins a
    /// shared item only after that place, so that each subscription's
    /// responses keep their order.
    last_at: HashMap<u64, usize, crate::FastHasher>,
}

impl Pack {
    fn new(shared: bool, max: usize) -> Self {
        Self {
            items: Vec::new(),
            size: 0,
            shared,
            max,
            by_frames: HashMap::default(),
            last_at: HashMap::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `item`: into an earlier item holding the same frames when the
    /// client reads shared items and the order of the item's subscription
    /// allows, else at the end.
    fn add(&mut self, item: Item) {
        let (true, Some(id), Some(frames)) = (self.shared, item.response_id(), item.frames())
        else {
            self.size += item.len();
            self.items.push(item);
            return;
        };
        let key = frames_key(frames);
        let after = self.last_at.get(&id).copied();
        if let Some(&at) = self.by_frames.get(&key) {
            let fits = self.size + wire::SHARE_GROWTH <= self.max;
            let same = self.items[at]
                .frames()
                .is_some_and(|f| same_frames(f, frames));
            if fits && same && after.is_none_or(|a| a < at) {
                self.last_at.insert(id, at);
                self.size += self.items[at].share(id);
                return;
            }
        }
        let at = self.items.len();
        self.by_frames.insert(key, at);
        self.last_at.insert(id, at);
        self.size += item.len();
        self.items.push(item);
    }

    /// The message, and the pack emptied for the next one.
    fn finish(&mut self) -> proto::EncodedMuxResponse {
        let message = wire::mux_response(&self.items, self.size);
        self.items.clear();
        self.size = 0;
        self.by_frames.clear();
        self.last_at.clear();
        message
    }
}

/// What identifies a response's frames within one message: the first
/// frame's bytes (their address, which the encode cache shares among the
/// legs) and how many frames there are. Equal keys are then compared
/// frame by frame.
fn frames_key(frames: &[Bytes]) -> (usize, usize) {
    (frames[0].as_ptr() as usize, frames.len())
}

/// Whether two responses hold the very same frames (the same bytes, not
/// only equal ones).
fn same_frames(a: &[Bytes], b: &[Bytes]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.as_ptr() == y.as_ptr() && x.len() == y.len())
}

impl<P, C> MuxStream<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    /// `shared`: the client reads shared items.
    pub(super) fn new(
        service: SubscribeService<P, C>,
        requests: Streaming<proto::MuxRequest>,
        conn: Option<Arc<ConnActivity>>,
        shared: bool,
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
            pack: Pack::new(shared, max),
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
        let pack = &mut this.pack;
        if let Some(item) = this.carry.take() {
            pack.add(item);
        }
        // Refusals are a few bytes each, but a burst of opens may make many:
        // what does not fit this message waits for the next.
        let mut refused = this.refused.drain(..).peekable();
        while let Some(item) =
            refused.next_if(|i| pack.is_empty() || pack.size + i.len() <= this.max)
        {
            pack.add(item);
        }
        let rest: Vec<_> = refused.collect();
        this.refused = rest;
        while pack.size < this.fill {
            let Poll::Ready(Some(LegItem { item, end })) = this.legs.poll_next_unpin(cx) else {
                break;
            };
            if let Some(id) = end {
                this.open.remove(&id);
            }
            if !pack.is_empty() && pack.size + item.len() > this.max {
                this.carry = Some(item);
                break;
            }
            pack.add(item);
        }
        if !pack.is_empty() {
            return Poll::Ready(Some(Ok(pack.finish())));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;
    use crate::net::server::wire::{batch_frame, EncodedEvent, Response};

    /// The changes each subscription got from the message, in order.
    fn decoded(message: &proto::EncodedMuxResponse) -> (usize, BTreeMap<u64, Vec<u64>>) {
        let message = proto::MuxResponse::decode(message.as_bytes()).unwrap();
        let mut per_id: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for item in &message.items {
            let ids: Vec<u64> = std::iter::once(item.id).chain(item.also.clone()).collect();
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), ids.len(), "an id twice in one item: {ids:?}");
            for id in ids {
                for f in &item.frames {
                    let Some(proto::frame::Kind::Events(b)) = &f.kind else {
                        panic!("a batch")
                    };
                    per_id
                        .entry(id)
                        .or_default()
                        .extend(b.events.iter().map(|e| e.index));
                }
            }
        }
        (message.items.len(), per_id)
    }

    proptest! {
        /// Whatever order the legs' responses come in, each subscription
        /// reads its own responses in its own order, each once; shared, a
        /// message holds no more items than unshared.
        #[test]
        fn a_pack_keeps_each_subscriptions_order(
            takes in prop::collection::vec(prop::collection::vec(any::<bool>(), 12), 1..6),
            pairs in prop::collection::vec(any::<bool>(), 12),
            order in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let changes: Vec<EncodedEvent> = (0..13u64)
                .map(|i| EncodedEvent::new(&proto::Event { key: "k".into(), index: i, payload: Bytes::new() }))
                .collect();
            // Each leg's responses: the changes it takes, some as two
            // frames (the change and the next).
            let legs: Vec<Vec<Vec<u64>>> = takes
                .iter()
                .map(|take| {
                    let mut responses = Vec::new();
                    let mut c = 0;
                    while c < 12 {
                        if take[c] {
                            if pairs[c] {
                                responses.push(vec![c as u64, c as u64 + 1]);
                                c += 2;
                                continue;
                            }
                            responses.push(vec![c as u64]);
                        }
                        c += 1;
                    }
                    responses
                })
                .collect();
            let mut counts = Vec::new();
            for shared in [false, true] {
                let mut pack = Pack::new(shared, 4 << 20);
                let mut next = vec![0; legs.len()];
                let mut order = order.iter().copied().cycle();
                let mut total = 0;
                loop {
                    let live: Vec<usize> = (0..legs.len()).filter(|&l| next[l] < legs[l].len()).collect();
                    if live.is_empty() {
                        break;
                    }
                    let l = live[usize::from(order.next().unwrap_or(0)) % live.len()];
                    let mut response = Response::default();
                    for &c in &legs[l][next[l]] {
                        response.push(batch_frame(&[changes[c as usize].clone()], false));
                    }
                    next[l] += 1;
                    total += 1;
                    pack.add(Item::response(l as u64, response));
                }
                if total == 0 {
                    return Ok(());
                }
                let size = pack.size;
                let message = pack.finish();
                prop_assert_eq!(message.as_bytes().len(), size);
                prop_assert!(pack.is_empty());
                let (items, per_id) = decoded(&message);
                for (l, responses) in legs.iter().enumerate() {
                    let want: Vec<u64> = responses.iter().flatten().copied().collect();
                    let got = per_id.get(&(l as u64)).cloned().unwrap_or_default();
                    prop_assert_eq!(got, want, "leg {}, shared {}", l, shared);
                }
                if !shared {
                    prop_assert_eq!(items, total);
                }
                counts.push(items);
            }
            prop_assert!(counts[1] <= counts[0]);
        }
    }

    /// The case the order rule is for: a subscription behind another gets,
    /// in one message, the change the other got first: it must come after
    /// its own earlier response, not join the other's item before it.
    #[test]
    fn a_response_joins_no_item_before_its_subscriptions_last() {
        let ev = |i| {
            EncodedEvent::new(&proto::Event {
                key: "k".into(),
                index: i,
                payload: Bytes::new(),
            })
        };
        let (e0, e1) = (ev(0), ev(1));
        let one = |e: &EncodedEvent| {
            let mut r = Response::default();
            r.push(batch_frame(std::slice::from_ref(e), false));
            r
        };
        let mut pack = Pack::new(true, 4 << 20);
        pack.add(Item::response(1, one(&e1))); // subscription 1 is ahead
        pack.add(Item::response(2, one(&e0))); // subscription 2 behind
        pack.add(Item::response(2, one(&e1)));
        pack.add(Item::response(3, one(&e1))); // joins an item: no fourth
        let (items, per_id) = decoded(&pack.finish());
        assert_eq!(items, 3);
        assert_eq!(per_id[&1], [1]);
        assert_eq!(per_id[&2], [0, 1]);
        assert_eq!(per_id[&3], [1]);
    }
}
