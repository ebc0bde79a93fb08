//! Bad input on the log: a message that does not decode is quarantined and
//! the follower goes on; a sequence gap is detected and triggers a rebuild.

mod cluster_support;

use std::sync::{Arc, Mutex};

use cluster_support::{delete_log, open_log, start_durable, Disk, Kv, Model, View, PATIENCE};
use snapstream::cluster::{JsonCodec, Node};
use snapstream::event::Subject;
use snapstream::publisher::SubscribeRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_quarantined_and_the_follower_goes_on() {
    let Some((_client, log)) = open_log("quarantine").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    let mut b = Node::builder(&log, Kv::default(), JsonCodec);
    b.wildcard_topic("services");
    let node = b.start().await.unwrap();
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
        .await
        .unwrap();
    model.put(&writer, "services", "a", "1").await;

    let raw = |subject: String, payload: &'static [u8]| {
        let js = log.jetstream().clone();
        async move {
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    let prefix = log.prefix().to_string();
    let bad = [
        raw(log.subject("services", "b").unwrap(), b"not json").await, // payload
        raw(format!("{prefix}.services.a.b"), b"\"x\"").await,         // three tokens
        raw(format!("{prefix}.services"), b"\"x\"").await,             // no key
        raw(format!("{prefix}.services.%zz"), b"\"x\"").await,         // bad escape
    ];
    model.put(&writer, "services", "c", "3").await;
    let last = model.last();

    let mut view = View::fresh();
    view.follow_to(&mut sub, last).await.unwrap();
    assert_eq!(
        view.data,
        model.at("services", last),
        "only the decodable changes"
    );
    node.wait_for_index(last, PATIENCE).await.unwrap();
    let stats = node.stats();
    assert_eq!(stats.quarantined, bad.len() as u64);
    assert_eq!(stats.last_quarantined, Some(bad[bad.len() - 1]));
    assert_eq!((stats.gaps, stats.rebuilds), (0, 1));
    node.read(|kv, applied| {
        assert_eq!(applied, last);
        assert_eq!(kv.topic("services"), model.at("services", last));
    })
    .await;
    node.shutdown().await;
    delete_log(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_triggers_a_rebuild() {
    let Some((_client, log)) = open_log("gap").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("node.checkpoint");
    let disk = Arc::new(Mutex::new(Disk::default()));
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    for i in 0..5 {
        model.put(&writer, "services", &format!("k{i}"), "a").await;
    }
    let node = start_durable(&log, &disk, &checkpoint).await;
    node.wait_for_index(5, PATIENCE).await.unwrap();
    node.shutdown().await;
    assert_eq!(disk.lock().unwrap().persisted_at, 5);

    // While the node is down, a change reaches the log and is lost from it.
    let lost = model.put(&writer, "services", "gone", "lost").await;
    model.put(&writer, "services", "k1", "b").await;
    model.put(&writer, "services", "k7", "b").await;
    let stream = log.jetstream().get_stream(log.stream_name()).await.unwrap();
    assert!(stream.delete_message(lost).await.unwrap());
    model.changes.retain(|c| c.0 != lost);
    let last = model.last();

    let node = start_durable(&log, &disk, &checkpoint).await;
    node.wait_for_index(last, PATIENCE).await.unwrap();
    let stats = node.stats();
    assert_eq!(
        (stats.gaps, stats.rebuilds),
        (1, 1),
        "the gap is seen and rebuilt from"
    );
    node.read(|kv, applied| {
        assert_eq!(applied, last);
        assert_eq!(kv.resets, 1);
        assert_eq!(
            kv.topic("services"),
            model.at("services", last),
            "the log as it stands"
        );
    })
    .await;
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
        .await
        .unwrap();
    let mut view = View::fresh();
    view.follow_to(&mut sub, last).await.unwrap();
    assert_eq!(view.data, model.at("services", last));
    node.shutdown().await;
    assert_eq!(
        disk.lock().unwrap().persisted_at,
        last,
        "checkpointed after the rebuild"
    );
    delete_log(&log).await;
}
