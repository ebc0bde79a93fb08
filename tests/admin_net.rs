//! The network-stream figures (features `admin` and `net`): a real gRPC
//! server on a loopback socket, raw subscribe calls that end each way a
//! stream can end, and the admin's `/metrics` and `api/servers` over a
//! real socket counting them.

mod admin_support;
mod net_common;

use std::time::Duration;

use admin_support::serve;
use net_common::until;
use snapstream::event::Event;
use snapstream::net::proto::subscribe_request::Subject as WireSubject;
use snapstream::net::proto::subscriber_client::SubscriberClient;
use snapstream::net::proto::SubscribeRequest as WireRequest;
use snapstream::net::{BinaryCodec, Server, ServerStats};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
use tonic::Code;

fn req(topic: &str, token: &str) -> WireRequest {
    WireRequest {
        topic: topic.into(),
        subject: Some(WireSubject::Key("k".into())),
        index: 0,
        token: token.into(),
        resnapshot_on_lag: false,
    }
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn stream_figures_count_each_way_a_stream_ends() {
    let mut b = Publisher::<u64>::builder();
    b.lag_limit(Some(2));
    b.register(
        "keys",
        |r: SnapshotRequest, mut s: SnapshotSink<u64>| async move {
            s.append(vec![Event::new("keys", r.subject().clone(), 1, 1)])?;
            Ok(1)
        },
    )
    .unwrap();
    b.register("bad", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Err::<u64, _>("no snapshot today".into())
    })
    .unwrap();
    let publisher = b.build();
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .progress_interval(Some(Duration::from_millis(20)))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let stats = server.stats_handle();
    let admin = snapstream::admin::Admin::builder()
        .publisher(&publisher)
        .net_server("grpc", server.stats_handle())
        .build()
        .unwrap();
    let admin_addr = serve(admin.router()).await;
    assert_eq!(server.stats(), ServerStats::default());
    let mut c = SubscriberClient::connect(format!("http://{}", server.local_addr()))
        .await
        .unwrap();

    // 1. A stream that gets its snapshot and a progress mark, then the
    //    client goes away.
    let mut gone = c.subscribe(req("keys", "")).await.unwrap().into_inner();
    let first = gone.message().await.unwrap().unwrap();
    assert!(!first.frames.is_empty());
    let s = stats.stats();
    assert_eq!((s.open_streams, s.streams_opened), (1, 1));
    assert!(s.messages_sent >= 1 && s.bytes_sent > 0, "{s:?}");
    // Quiet: the next message is a progress mark.
    gone.message().await.unwrap().unwrap();
    let s = until(&stats, |s| s.progress_marks_sent >= 1).await;
    assert!(s.messages_sent >= 2, "{s:?}");
    drop(gone);
    let s = until(&stats, |s| s.open_streams == 0).await;
    assert_eq!(s.streams_ended.client_gone, 1, "{s:?}");
    assert_eq!(s.streams_ended.total(), 1);

    // 2. Force-closed by token.
    let mut revoked = c
        .subscribe(req("keys", "revoked"))
        .await
        .unwrap()
        .into_inner();
    revoked.message().await.unwrap().unwrap();
    assert_eq!(publisher.force_close_token("revoked"), 1);
    let status = loop {
        match revoked.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Aborted);
    drop(revoked);
    let s = until(&stats, |s| s.streams_ended.total() == 2).await;
    assert_eq!(s.streams_ended.force_closed, 1, "{s:?}");

    // 3. Lagged: more batches than the lag limit published while the
    //    client reads nothing (the publishes run before the server's
    //    stream task can read them).
    let mut lagging = c.subscribe(req("keys", "")).await.unwrap().into_inner();
    lagging.message().await.unwrap().unwrap();
    until(&stats, |s| s.open_streams == 1).await;
    for i in 2..20 {
        publisher
            .publish(vec![Event::new("keys", "k", i, i)])
            .unwrap();
    }
    let status = loop {
        match lagging.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    drop(lagging);
    let s = until(&stats, |s| s.streams_ended.total() == 3).await;
    assert_eq!(s.streams_ended.lagged, 1, "{s:?}");

    // 4. An error: the snapshot handler fails.
    let mut bad = c.subscribe(req("bad", "")).await.unwrap().into_inner();
    let status = bad.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    drop(bad);
    let s = until(&stats, |s| s.streams_ended.total() == 4).await;
    assert_eq!(s.streams_ended.error, 1, "{s:?}");

    // 5. Shutdown with one stream open.
    let mut open = c.subscribe(req("keys", "")).await.unwrap().into_inner();
    open.message().await.unwrap().unwrap();
    assert_eq!(stats.stats().open_streams, 1);
    let shutdown = tokio::spawn(server.shutdown());
    let status = loop {
        match open.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    drop(open);
    drop(c);
    shutdown.await.unwrap().unwrap();
    let s = until(&stats, |s| s.streams_ended.total() == 5).await;
    assert_eq!(s.streams_ended.shutdown, 1, "{s:?}");
    assert_eq!((s.open_streams, s.streams_opened), (0, 5));

    // The admin shows the same figures, on /metrics and api/servers.
    let text = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let l = "{server=\"grpc\"}";
    assert_eq!(
        sample(&text, &format!("snapstream_net_open_streams{l}")),
        0.0
    );
    assert_eq!(
        sample(&text, &format!("snapstream_net_streams_opened_total{l}")),
        5.0
    );
    for reason in ["client_gone", "force_closed", "shutdown", "lagged", "error"] {
        // The exporter sorts labels by name or keeps them as given.
        let a =
            format!("snapstream_net_streams_ended_total{{server=\"grpc\",reason=\"{reason}\"}}");
        let b =
            format!("snapstream_net_streams_ended_total{{reason=\"{reason}\",server=\"grpc\"}}");
        let series = if text.contains(&a) { a } else { b };
        assert_eq!(sample(&text, &series), 1.0, "{reason}");
    }
    assert_eq!(
        sample(&text, &format!("snapstream_net_messages_sent_total{l}")),
        s.messages_sent as f64
    );
    assert_eq!(
        sample(&text, &format!("snapstream_net_sent_bytes_total{l}")),
        s.bytes_sent as f64
    );
    assert!(
        sample(
            &text,
            &format!("snapstream_net_progress_marks_sent_total{l}")
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("snapstream_net_connections_closed_idle_total{l}")
        ),
        s.connections_closed_idle as f64
    );
    let servers: serde_json::Value = reqwest::get(format!("http://{admin_addr}/api/servers"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(servers[0]["name"], "grpc");
    assert_eq!(servers[0]["streams_opened"], 5);
    assert_eq!(servers[0]["ended_lagged"], 1);
    assert_eq!(servers[0]["bytes_sent"], s.bytes_sent);
    assert_eq!(
        servers[0]["connections_closed_idle"],
        s.connections_closed_idle
    );
}
