//! Bad input over a real loopback socket: each answer is a typed status, no
//! panic, and nothing is left subscribed on the server.

use std::time::Duration;

use futures::StreamExt;
use snapstream::event::{Event, Subject, Topic};
use snapstream::net::proto::subscribe_request::Subject as WireSubject;
use snapstream::net::proto::subscriber_client::SubscriberClient;
use snapstream::net::proto::SubscribeRequest as WireRequest;
use snapstream::net::{BinaryCodec, Client, RemoteError, RemoteRequest, Server};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
use tonic::Code;

fn publisher() -> Publisher<u64> {
    let mut b = Publisher::<u64>::builder();
    b.register(
        "keys",
        |r: SnapshotRequest, mut s: SnapshotSink<u64>| async move {
            s.append(vec![Event::new("keys", r.subject().clone(), 1, 1)])?;
            Ok(1)
        },
    )
    .unwrap();
    b.register_with_wildcard("all", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    b.build()
}

async fn start() -> (Publisher<u64>, Server) {
    let publisher = publisher();
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .max_request_size(1024)
        .authorizer(|token: Option<&str>, _t: &Topic, _s: &Subject| token != Some("denied"))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (publisher, server)
}

fn req(topic: &str, subject: Option<WireSubject>) -> WireRequest {
    WireRequest {
        topic: topic.into(),
        subject,
        index: 0,
        token: String::new(),
        resnapshot_on_lag: false,
    }
}

/// The status a raw call ends with (at the call or as the stream's first item).
async fn status_of(addr: std::net::SocketAddr, request: WireRequest) -> tonic::Status {
    let mut c = SubscriberClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    match c.subscribe(request).await {
        Err(s) => s,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            match stream.message().await {
                Err(s) => s,
                Ok(m) => panic!("expected a status, got {m:?}"),
            }
        }
    }
}

#[tokio::test]
async fn bad_requests_get_their_status_codes() {
    let (publisher, server) = start().await;
    let addr = server.local_addr();
    let key = || Some(WireSubject::Key("k".into()));

    assert_eq!(
        status_of(addr, req("nope", key())).await.code(),
        Code::NotFound
    );
    assert_eq!(
        status_of(addr, req("", key())).await.code(),
        Code::InvalidArgument
    );
    assert_eq!(
        status_of(addr, req("keys", None)).await.code(),
        Code::InvalidArgument
    );
    assert_eq!(
        status_of(addr, req("keys", Some(WireSubject::Key(String::new()))))
            .await
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        status_of(addr, req("keys", Some(WireSubject::Wildcard(false))))
            .await
            .code(),
        Code::InvalidArgument
    );
    // Wildcard on a topic registered without wildcard support.
    assert_eq!(
        status_of(addr, req("keys", Some(WireSubject::Wildcard(true))))
            .await
            .code(),
        Code::InvalidArgument
    );
    // Oversized: rejected before decoding.
    let big = req(&"x".repeat(64 * 1024), key());
    assert_eq!(status_of(addr, big).await.code(), Code::OutOfRange);
    // Denied by the authorizer.
    let mut denied = req("keys", key());
    denied.token = "denied".into();
    assert_eq!(status_of(addr, denied).await.code(), Code::PermissionDenied);

    // Nothing stayed subscribed or open; the server still serves.
    assert_eq!(publisher.stats().subscribers(), 0);
    assert_eq!(server.active_streams(), 0);
    let mut c = SubscriberClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut ok = c.subscribe(req("keys", key())).await.unwrap().into_inner();
    let first = ok.message().await.unwrap().unwrap();
    assert!(!first.frames.is_empty());
    drop(ok);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn remote_subscriber_reports_terminal_errors() {
    let (_publisher, server) = start().await;
    let client = Client::builder([format!("http://{}", server.local_addr())])
        .backoff(Duration::from_millis(1), Duration::from_millis(10))
        .build::<u64>()
        .unwrap();

    let mut s = client.subscribe(RemoteRequest::new("nope", Subject::key("k")));
    assert!(matches!(
        s.next().await,
        Some(Err(RemoteError::UnknownTopic(_)))
    ));
    assert!(s.next().await.is_none(), "the stream ends after its error");

    let mut s = client.subscribe(RemoteRequest::new("keys", Subject::Wildcard));
    assert!(matches!(
        s.next().await,
        Some(Err(RemoteError::InvalidRequest(_)))
    ));

    let mut s = client.subscribe(RemoteRequest::new("keys", Subject::key("k")).token("denied"));
    assert!(matches!(
        s.next().await,
        Some(Err(RemoteError::PermissionDenied(_)))
    ));

    let mut s = client.subscribe(RemoteRequest::new("keys", Subject::key("x".repeat(4096))));
    assert!(matches!(
        s.next().await,
        Some(Err(RemoteError::Rejected {
            code: Code::OutOfRange,
            ..
        }))
    ));
    assert_eq!(s.reconnects(), 0, "terminal answers are not retried");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn streams_beyond_the_server_limit_are_refused_until_one_ends() {
    let publisher = publisher();
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .max_streams(2)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    let key = || Some(WireSubject::Key("k".into()));
    let mut c = SubscriberClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut first = c.subscribe(req("keys", key())).await.unwrap().into_inner();
    let _second = c.subscribe(req("keys", key())).await.unwrap().into_inner();
    assert!(first.message().await.unwrap().is_some());
    assert_eq!(server.active_streams(), 2);
    assert_eq!(
        status_of(addr, req("keys", key())).await.code(),
        Code::ResourceExhausted
    );

    // A remote subscriber refused for capacity retries, and gets in once a
    // stream ends.
    let client = Client::builder([format!("http://{addr}")])
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .build::<u64>()
        .unwrap();
    let mut waiting = client.subscribe(RemoteRequest::new("keys", Subject::key("k")));
    drop(first);
    let m = waiting.next().await.unwrap().unwrap();
    assert!(
        m.events().is_some(),
        "the snapshot, once a stream slot was free"
    );
    server.shutdown().await.unwrap();
}
