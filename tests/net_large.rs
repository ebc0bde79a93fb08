//! A snapshot far larger than the server's max message size arrives whole:
//! frames are packed into messages below the limit and one big batch is
//! split into fragments and joined again. An event that cannot fit any
//! message ends the stream with a typed error.

use futures::StreamExt;
use prost::Message as _;
use snapstream::event::{Event, Message, Subject};
use snapstream::net::proto::subscribe_request::Subject as WireSubject;
use snapstream::net::proto::subscriber_client::SubscriberClient;
use snapstream::net::proto::SubscribeRequest as WireRequest;
use snapstream::net::{BinaryCodec, Client, RemoteError, RemoteRequest, Server};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};

const ITEMS: usize = 2_000;
const PAYLOAD: usize = 1_000;
const MAX_MESSAGE: usize = 64 * 1024;

fn publisher() -> Publisher<Vec<u8>> {
    let mut b = Publisher::<Vec<u8>>::builder();
    // One batch of 2,000 events of 1 kB: about 2 MB, 30 x the message limit.
    b.register_with_wildcard(
        "big",
        |_r: SnapshotRequest, mut s: SnapshotSink<Vec<u8>>| async move {
            let events = (0..ITEMS)
                .map(|i| Event::new("big", format!("k{i:04}"), 7, vec![(i % 251) as u8; PAYLOAD]))
                .collect();
            s.append(events)?;
            Ok(7)
        },
    )
    .unwrap();
    b.register(
        "huge",
        |r: SnapshotRequest, mut s: SnapshotSink<Vec<u8>>| async move {
            s.append(vec![Event::new(
                "huge",
                r.subject().clone(),
                1,
                vec![0; 2 * MAX_MESSAGE],
            )])?;
            Ok(1)
        },
    )
    .unwrap();
    b.build()
}

#[tokio::test]
async fn a_large_snapshot_is_split_below_the_message_limit_and_joined() {
    let server = Server::builder(publisher(), BinaryCodec)
        .max_message_size(MAX_MESSAGE)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = format!("http://{}", server.local_addr());

    // On the wire: many messages, none above the limit.
    let mut raw = SubscriberClient::connect(addr.clone()).await.unwrap();
    let mut stream = raw
        .subscribe(WireRequest {
            topic: "big".into(),
            subject: Some(WireSubject::Wildcard(true)),
            index: 0,
            token: String::new(),
            resnapshot_on_lag: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    let mut fragments = 0;
    loop {
        let m = stream.message().await.unwrap().unwrap();
        assert!(m.encoded_len() <= MAX_MESSAGE, "{} bytes", m.encoded_len());
        messages += 1;
        let mut done = false;
        for f in &m.frames {
            match &f.kind {
                Some(snapstream::net::proto::frame::Kind::Events(b)) => {
                    fragments += usize::from(b.partial)
                }
                Some(snapstream::net::proto::frame::Kind::EndOfSnapshot(7)) => done = true,
                other => panic!("unexpected frame {other:?}"),
            }
        }
        if done {
            break;
        }
    }
    assert!(
        messages >= (ITEMS * PAYLOAD) / MAX_MESSAGE,
        "{messages} messages"
    );
    assert!(fragments > 0);
    drop(stream);

    // Through the client: one batch of every event, then EndOfSnapshot.
    let client = Client::builder([addr]).build::<Vec<u8>>().unwrap();
    let mut sub = client.subscribe(RemoteRequest::new("big", Subject::Wildcard));
    let batch = match sub.next().await.unwrap().unwrap() {
        Message::Events(b) => b,
        other => panic!("expected the snapshot batch, got {other:?}"),
    };
    assert_eq!(batch.len(), ITEMS);
    for (i, e) in batch.iter().enumerate() {
        assert_eq!(e.subject(), &Subject::key(format!("k{i:04}")));
        assert_eq!(e.payload(), &vec![(i % 251) as u8; PAYLOAD]);
    }
    assert_eq!(
        sub.next().await.unwrap(),
        Ok(Message::EndOfSnapshot { index: 7 })
    );

    // One event larger than any message: a typed end, no panic.
    let mut huge = client.subscribe(RemoteRequest::new("huge", Subject::key("k")));
    assert!(matches!(
        huge.next().await,
        Some(Err(RemoteError::Rejected {
            code: tonic::Code::OutOfRange,
            ..
        }))
    ));
    server.shutdown().await.unwrap();
}

/// The frames of one subscription's snapshot, message by message, up to its
/// `EndOfSnapshot`: (encoded length, events in it) per message.
async fn snapshot_messages(addr: String, topic: &str, subject: WireSubject) -> Vec<(usize, usize)> {
    let mut raw = SubscriberClient::connect(addr).await.unwrap();
    let mut stream = raw
        .subscribe(WireRequest {
            topic: topic.into(),
            subject: Some(subject),
            index: 0,
            token: String::new(),
            resnapshot_on_lag: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        let m = stream.message().await.unwrap().unwrap();
        let mut events = 0;
        let mut done = false;
        for f in &m.frames {
            match &f.kind {
                Some(snapstream::net::proto::frame::Kind::Events(b)) => events += b.events.len(),
                Some(snapstream::net::proto::frame::Kind::EndOfSnapshot(_)) => done = true,
                other => panic!("unexpected frame {other:?}"),
            }
        }
        out.push((m.encoded_len(), events));
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn messages_are_filled_to_message_fill_and_a_larger_event_goes_alone() {
    const FILL: usize = 8 * 1024;
    let server = Server::builder(publisher(), BinaryCodec)
        .message_fill(FILL)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = format!("http://{}", server.local_addr());

    // 2 MB of 1 kB events in messages of at most FILL (plus frame headers),
    // each but the last holding as many events as fit.
    let messages = snapshot_messages(addr.clone(), "big", WireSubject::Wildcard(true)).await;
    let events: usize = messages.iter().map(|m| m.1).sum();
    assert_eq!(events, ITEMS);
    for (len, _) in &messages {
        assert!(*len <= FILL + 64, "a message of {len} bytes");
    }
    assert!(
        messages.len() >= ITEMS * PAYLOAD / FILL,
        "{} messages",
        messages.len()
    );
    for (len, n) in &messages[..messages.len() - 1] {
        assert!(
            *n >= 1 && *len + PAYLOAD + 64 > FILL,
            "{n} events in {len} bytes"
        );
    }

    // One event larger than the fill (but below the max message size) is
    // sent alone in one message.
    let messages = snapshot_messages(addr, "huge", WireSubject::Key("k".into())).await;
    assert!(
        messages
            .iter()
            .any(|&(len, n)| n == 1 && len > 2 * MAX_MESSAGE),
        "{messages:?}"
    );
    server.shutdown().await.unwrap();
}
