//! The server's responses, encoded by hand into the bytes prost would write
//! for the messages of `proto/snapstream.proto`, so that an event going to
//! many subscriptions is encoded once and each response is a few slices of
//! shared bytes, not a tree of structs built, measured, encoded and freed
//! per subscription.
//!
//! The messages involved, with their field tags (field number and wire
//! type in one byte):
//!
//! | message | field | tag |
//! |---|---|---|
//! | `SubscribeResponse` | `frames = 1` (Frame) | `0x0A` |
//! | `MuxResponse` | `items = 1` (MuxItem) | `0x0A` |
//! | `MuxItem` | `id = 1` (varint), `frames = 2` (Frame), `also = 4` (packed varints) | `0x08`, `0x12`, `0x22` |
//! | `Frame` | `events = 1` (Batch) | `0x0A` |
//! | `Batch` | `events = 1` (Event), `partial = 2` (bool) | `0x0A`, `0x10` |
//!
//! Every other frame (end of snapshot, new snapshot, progress) and a
//! subscription's end are rare and encoded by prost. Like prost, an item's
//! id of 0 (proto3's default) is left out. Each message is then one buffer:
//! the frames are copied into it once (and tonic's encoder copies it into
//! its own buffer).

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message as _;

use crate::net::proto;

const RESPONSE_FRAMES: u8 = 0x0A;
const MUX_ITEMS: u8 = 0x0A;
const ITEM_ID: u8 = 0x08;
const ITEM_FRAMES: u8 = 0x12;
const ITEM_ALSO: u8 = 0x22;
const FRAME_EVENTS: u8 = 0x0A;
const BATCH_EVENTS: u8 = 0x0A;
const BATCH_PARTIAL: u8 = 0x10;

/// The bytes a length-delimited field with a `len`-byte body takes.
pub(super) fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn put_field(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    encode_varint(body.len() as u64, buf);
    buf.put_slice(body);
}

/// One event, encoded: its entry in a `Batch` (tag, length, `Event`), inside
/// the body of the frame that holds just that event — what a live change
/// usually is — in one allocation.
#[derive(Clone, Debug)]
pub(super) struct EncodedEvent {
    frame: Bytes,
    entry_at: usize,
}

impl EncodedEvent {
    pub(super) fn new(ev: &proto::Event) -> Self {
        let body = ev.encoded_len();
        let entry = field_len(body);
        let mut buf = BytesMut::with_capacity(field_len(entry));
        buf.put_u8(FRAME_EVENTS);
        encode_varint(entry as u64, &mut buf);
        let entry_at = buf.len();
        buf.put_u8(BATCH_EVENTS);
        encode_varint(body as u64, &mut buf);
        ev.encode_raw(&mut buf);
        Self {
            frame: buf.freeze(),
            entry_at,
        }
    }

    /// The bytes the event takes in a batch.
    pub(super) fn entry_len(&self) -> usize {
        self.frame.len() - self.entry_at
    }

    fn entry(&self) -> &[u8] {
        &self.frame[self.entry_at..]
    }

    /// The event, decoded again (for tests).
    #[cfg(test)]
    pub(super) fn event(&self) -> proto::Event {
        let mut entry = self.entry();
        prost::encoding::decode_key(&mut entry).unwrap();
        proto::Event::decode_length_delimited(entry).unwrap()
    }
}

/// The body of a frame carrying `events` (a fragment of a batch when
/// `partial`).
pub(super) fn batch_frame(events: &[EncodedEvent], partial: bool) -> Bytes {
    if let ([one], false) = (events, partial) {
        return one.frame.clone();
    }
    // `partial = true` takes its tag and one byte.
    let partial_len = if partial { 2 } else { 0 };
    let body = events.iter().map(EncodedEvent::entry_len).sum::<usize>() + partial_len;
    let mut buf = BytesMut::with_capacity(field_len(body));
    buf.put_u8(FRAME_EVENTS);
    encode_varint(body as u64, &mut buf);
    for e in events {
        buf.put_slice(e.entry());
    }
    if partial {
        buf.put_u8(BATCH_PARTIAL);
        buf.put_u8(1);
    }
    buf.freeze()
}

/// The body of any other frame.
pub(super) fn frame(f: &proto::Frame) -> Bytes {
    f.encode_to_vec().into()
}

/// One response of one subscription: its frames' bodies, in order.
#[derive(Debug, Default)]
pub(super) struct Response {
    pub(super) frames: Vec<Bytes>,
    /// The bytes the frames take in a message (each with tag and length).
    pub(super) len: usize,
}

impl Response {
    pub(super) fn push(&mut self, frame: Bytes) {
        self.len += field_len(frame.len());
        self.frames.push(frame);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// As the response of a `Subscribe` call.
    pub(super) fn into_subscribe(self) -> proto::EncodedSubscribeResponse {
        let mut buf = BytesMut::with_capacity(self.len);
        for f in &self.frames {
            put_field(&mut buf, RESPONSE_FRAMES, f);
        }
        proto::EncodedSubscribeResponse(buf.freeze())
    }
}

/// The other subscriptions an item's response is sent for (`MuxItem.also`).
#[derive(Debug, Default)]
pub(super) struct Also {
    ids: Vec<u64>,
    /// The bytes the packed ids take (without the field's tag and length).
    len: usize,
}

impl Also {
    /// The bytes the field takes in the item (none when empty).
    fn field_len(&self) -> usize {
        if self.ids.is_empty() {
            0
        } else {
            field_len(self.len)
        }
    }
}

/// One item of a `Multiplex` response: a subscription's response (perhaps
/// shared with others), or its end (a `MuxItem` encoded by prost).
#[derive(Debug)]
pub(super) enum Item {
    Response {
        id: u64,
        response: Response,
        also: Also,
    },
    End(Bytes),
}

impl Item {
    pub(super) fn response(id: u64, response: Response) -> Self {
        Self::Response {
            id,
            response,
            also: Also::default(),
        }
    }

    pub(super) fn end(item: &proto::MuxItem) -> Self {
        Self::End(item.encode_to_vec().into())
    }

    /// The subscription of a response (not of an end).
    pub(super) fn response_id(&self) -> Option<u64> {
        match self {
            Self::Response { id, .. } => Some(*id),
            Self::End(_) => None,
        }
    }

    /// The response's frames, if this is a response with any.
    pub(super) fn frames(&self) -> Option<&[Bytes]> {
        match self {
            Self::Response { response, .. } if !response.is_empty() => Some(&response.frames),
            _ => None,
        }
    }

    /// Sends this item's response for subscription `id` too; returns the
    /// bytes this adds to the item in a message (at most
    /// [`SHARE_GROWTH`]). Only for responses.
    pub(super) fn share(&mut self, with: u64) -> usize {
        let before = self.len();
        if let Self::Response { also, .. } = self {
            also.len += encoded_len_varint(with);
            also.ids.push(with);
        }
        self.len() - before
    }

    /// The `MuxItem`'s length.
    fn body_len(&self) -> usize {
        match self {
            Self::Response { id, response, also } => {
                let id_len = if *id == 0 {
                    0
                } else {
                    1 + encoded_len_varint(*id)
                };
                id_len + response.len + also.field_len()
            }
            Self::End(b) => b.len(),
        }
    }

    /// The bytes the item takes in a `MuxResponse`.
    pub(super) fn len(&self) -> usize {
        field_len(self.body_len())
    }

    fn put(&self, buf: &mut BytesMut) {
        buf.put_u8(MUX_ITEMS);
        encode_varint(self.body_len() as u64, buf);
        match self {
            Self::Response { id, response, also } => {
                if *id != 0 {
                    buf.put_u8(ITEM_ID);
                    encode_varint(*id, buf);
                }
                for f in &response.frames {
                    put_field(buf, ITEM_FRAMES, f);
                }
                if !also.ids.is_empty() {
                    buf.put_u8(ITEM_ALSO);
                    encode_varint(also.len as u64, buf);
                    for &id in &also.ids {
                        encode_varint(id, buf);
                    }
                }
            }
            Self::End(b) => buf.put_slice(b),
        }
    }
}

/// The most bytes one [`Item::share`] adds to an item: an id (at most 10
/// bytes), and the field's tag and the growth of its length and of the
/// item's length (a byte or two each).
pub(super) const SHARE_GROWTH: usize = 16;

/// Encodes `items` (whose lengths add up to `len`) as one `MuxResponse`.
pub(super) fn mux_response(items: &[Item], len: usize) -> proto::EncodedMuxResponse {
    let mut buf = BytesMut::with_capacity(len);
    for item in items {
        item.put(&mut buf);
    }
    proto::EncodedMuxResponse(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, index: u64, payload: &'static [u8]) -> proto::Event {
        proto::Event {
            key: key.into(),
            index,
            payload: Bytes::from_static(payload),
        }
    }

    fn batch(events: Vec<proto::Event>, partial: bool) -> proto::Frame {
        proto::Frame {
            kind: Some(proto::frame::Kind::Events(proto::Batch { events, partial })),
        }
    }

    /// Every shape of frame and response decodes as the message prost
    /// would have written, byte for byte.
    #[test]
    fn hand_encoded_responses_are_the_messages_prost_writes() {
        let evs = [
            event("a", 1, b"x"),
            event("", 0, b""),
            event(&"k".repeat(300), u64::MAX, &[7; 200]),
        ];
        let enc: Vec<_> = evs.iter().map(EncodedEvent::new).collect();
        for (e, p) in enc.iter().zip(&evs) {
            assert_eq!(e.entry_len(), field_len(p.encoded_len()));
        }
        let cases = [
            (vec![0], false),
            (vec![2], false),
            (vec![0, 1, 2], false),
            (vec![2], true),
            (vec![0, 2], true),
            (vec![], false),
        ];
        let mut frames = Vec::new();
        let mut response = Response::default();
        for (which, partial) in cases {
            let chosen: Vec<_> = which.iter().map(|&i| enc[i].clone()).collect();
            let body = batch_frame(&chosen, partial);
            let want = batch(which.iter().map(|&i| evs[i].clone()).collect(), partial);
            assert_eq!(&body[..], &want.encode_to_vec()[..], "{which:?} {partial}");
            frames.push(want);
            response.push(body);
        }
        let marks = [
            proto::frame::Kind::EndOfSnapshot(9),
            proto::frame::Kind::NewSnapshotToFollow(proto::NewSnapshotToFollow {}),
            proto::frame::Kind::Progress(1 << 40),
        ];
        for kind in marks {
            let f = proto::Frame { kind: Some(kind) };
            response.push(frame(&f));
            frames.push(f);
        }
        let want = proto::SubscribeResponse {
            frames: frames.clone(),
        };
        assert_eq!(response.len, want.encoded_len());
        let mux_frames = response.frames.clone();
        let mux_len = response.len;
        let sub = response.into_subscribe();
        assert_eq!(sub.as_bytes(), &want.encode_to_vec()[..]);
        assert_eq!(sub, proto::EncodedSubscribeResponse::from(&want));

        let end = proto::MuxItem {
            id: 3,
            frames: Vec::new(),
            end: Some(proto::MuxEnd {
                code: 14,
                message: "gone".into(),
                lag_limit: Some(5),
            }),
            also: Vec::new(),
        };
        let mut shared = Item::response(
            9,
            Response {
                frames: mux_frames.clone(),
                len: mux_len,
            },
        );
        // Ids of every varint length, 0 (left out as `id`, not in `also`)
        // and a repeat of `id` included.
        let also = vec![0, 1, 127, 128, 1 << 20, 9, u64::MAX];
        for &id in &also {
            let grew = shared.share(id);
            assert!(grew <= SHARE_GROWTH, "{id}: {grew}");
        }
        assert_eq!(shared.frames().map(<[_]>::len), Some(mux_frames.len()));
        let mut items = vec![
            Item::response(
                300,
                Response {
                    frames: mux_frames,
                    len: mux_len,
                },
            ),
            Item::end(&end),
            Item::response(0, Response::default()),
            shared,
        ];
        // Enough ids that the packed field's length takes two bytes.
        let mut many = Item::response(0, Response::default());
        for id in 0..100 {
            many.share(id);
        }
        items.push(many);
        assert!(items[1].frames().is_none() && items[2].frames().is_none());
        let len = items.iter().map(Item::len).sum();
        let mux = mux_response(&items, len);
        assert_eq!(mux.as_bytes().len(), len);
        let want = proto::MuxResponse {
            items: vec![
                proto::MuxItem {
                    id: 300,
                    frames: frames.clone(),
                    end: None,
                    also: Vec::new(),
                },
                end,
                proto::MuxItem::default(),
                proto::MuxItem {
                    id: 9,
                    frames,
                    end: None,
                    also,
                },
                proto::MuxItem {
                    also: (0..100).collect(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(mux.as_bytes(), &want.encode_to_vec()[..]);
    }
}
