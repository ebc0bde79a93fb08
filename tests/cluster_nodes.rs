//! Two and three nodes fed from one JetStream log: every node's subscribers
//! see the writer's changes with the writer's indexes, and every node's state
//! converges to what the writer got acknowledged.

mod cluster_support;

use cluster_support::{delete_log, open_log, Kv, Model, View, PATIENCE};
use snapstream::cluster::{JsonCodec, Node};
use snapstream::event::Subject;
use snapstream::publisher::SubscribeRequest;

async fn nodes_agree_with_the_writer(test: &str, n: usize) {
    let Some((_client, log)) = open_log(test).await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    // Changes before any node starts; keys that need escaping.
    for i in 0..10 {
        model
            .put(
                &writer,
                "services",
                &format!("web.{}", i % 4),
                &format!("v{i}"),
            )
            .await;
    }
    model.put(&writer, "nodes", "rack 1/host*>", "up").await;

    let mut nodes = Vec::new();
    for _ in 0..n {
        let mut b = Node::builder(&log, Kv::default(), JsonCodec);
        b.wildcard_topic("services").topic("nodes");
        nodes.push(b.start().await.unwrap());
    }
    let mut subs = Vec::new();
    let mut key_subs = Vec::new();
    for node in &nodes {
        let sub = node
            .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
            .await
            .unwrap();
        subs.push(sub);
        let sub = node
            .subscribe(SubscribeRequest::new(
                "nodes",
                Subject::key("rack 1/host*>"),
            ))
            .await
            .unwrap();
        key_subs.push(sub);
    }
    // Changes while every node has subscribers.
    for i in 10..60 {
        model
            .put(
                &writer,
                "services",
                &format!("web.{}", i % 7),
                &format!("v{i}"),
            )
            .await;
        if i % 10 == 0 {
            model
                .put(&writer, "nodes", "rack 1/host*>", &format!("load {i}"))
                .await;
        }
    }
    let last = model.last();

    let mut views = Vec::new();
    for ((node, sub), key_sub) in nodes.iter().zip(&mut subs).zip(&mut key_subs) {
        let mut view = View::fresh();
        view.follow_to(sub, last).await.unwrap();
        assert_eq!(view.snapshots.len(), 1, "one snapshot, then live events");
        let (at, snapshot) = &view.snapshots[0];
        assert_eq!(
            *snapshot,
            model.at("services", *at),
            "snapshot agrees with the log at its index"
        );
        assert_eq!(
            view.live,
            model.after("services", *at),
            "live events: the log after the snapshot"
        );
        assert_eq!(view.data, model.at("services", last));

        let mut key_view = View::fresh();
        key_view
            .follow_to(key_sub, model.at("nodes", last)["rack 1/host*>"].0)
            .await
            .unwrap();
        assert_eq!(key_view.data, model.at("nodes", last));

        assert_eq!(node.wait_for_index(last, PATIENCE).await.unwrap(), last);
        node.read(|kv, applied| {
            assert_eq!(applied, last);
            assert_eq!(kv.topic("services"), model.at("services", last));
            assert_eq!(kv.topic("nodes"), model.at("nodes", last));
            assert_eq!(kv.resets, 1, "one rebuild: the start without a checkpoint");
        })
        .await;
        let stats = node.stats();
        assert_eq!(
            (stats.quarantined, stats.gaps, stats.publish_errors),
            (0, 0, 0)
        );
        assert_eq!(stats.applied, last);
        views.push(view);
    }
    // Past the newest snapshot of all, every node delivered the same events
    // with the same indexes.
    let newest = views.iter().map(|v| v.snapshots[0].0).max().unwrap();
    let tail = |v: &View| {
        v.live
            .iter()
            .filter(|e| e.0 > newest)
            .cloned()
            .collect::<Vec<_>>()
    };
    let expected = tail(&views[0]);
    assert_eq!(expected, model.after("services", newest));
    for v in &views[1..] {
        assert_eq!(tail(v), expected);
    }

    for node in nodes {
        node.shutdown().await;
    }
    delete_log(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_agree_with_the_writer() {
    nodes_agree_with_the_writer("two_nodes", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_with_the_writer() {
    nodes_agree_with_the_writer("three_nodes", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_before_anything_is_sent() {
    let Some((_client, log)) = open_log("bad_keys").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let err = writer
        .put("services", "", &"x".to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, snapstream::cluster::WriteError::Subject(_)));
    assert!(!err.may_be_in_log());
    let long = "k".repeat(snapstream::cluster::MAX_SUBJECT_LEN);
    let err = writer
        .put("services", &long, &"x".to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, snapstream::cluster::WriteError::Subject(_)));
    let info = log
        .jetstream()
        .get_stream(log.stream_name())
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 0, "nothing reached the log");
    delete_log(&log).await;
}

/// A node holds one consumer of the log: the one its start-up replay read
/// the log with goes on to deliver the live changes (it is not deleted and
/// replaced by another once the replay is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_its_replay_consumer_to_follow() {
    use futures::TryStreamExt;

    let Some((_client, log)) = open_log("one_consumer").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    for i in 0..5 {
        model
            .put(&writer, "services", &format!("k{i}"), &format!("v{i}"))
            .await;
    }
    let mut b = Node::builder(&log, Kv::default(), JsonCodec);
    b.wildcard_topic("services");
    let node = b.start().await.unwrap();
    node.wait_for_index(model.last(), PATIENCE).await.unwrap();
    // A live change, after the replay.
    model.put(&writer, "services", "k0", "live").await;
    let last = model.last();
    node.wait_for_index(last, PATIENCE).await.unwrap();

    let stream = log.jetstream().get_stream(log.stream_name()).await.unwrap();
    let consumers: Vec<_> = stream.consumers().try_collect().await.unwrap();
    assert_eq!(consumers.len(), 1, "one consumer: {consumers:?}");
    let delivered = &consumers[0].delivered;
    assert_eq!(
        (delivered.consumer_sequence, delivered.stream_sequence),
        (last, last),
        "the consumer that replayed the log delivered the live change too"
    );
    assert_eq!(node.stats().rebuilds, 1);
    node.shutdown().await;
    delete_log(&log).await;
}
