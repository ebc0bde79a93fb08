//! Read-your-index: a subscriber resuming with an index newer than its node
//! has applied waits until the node catches up, then continues; with the
//! wait bounded it gets a typed error — never older state.

mod cluster_support;

use std::sync::Arc;
use std::time::Duration;

use cluster_support::{delete_log, open_log, Gate, Kv, Model, View, PATIENCE};
use snapstream::cluster::{JsonCodec, Log, Node, NodeSubscribeError};
use snapstream::event::Subject;
use snapstream::publisher::SubscribeRequest;

async fn start(log: &Log, state: Kv, wait: Duration) -> Node<String, Kv> {
    let mut b = Node::builder(log, state, JsonCodec);
    b.wildcard_topic("services").catch_up_timeout(wait);
    b.start().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_ahead_of_a_lagging_node_waits_then_continues() {
    let Some((_client, log)) = open_log("ryi_wait").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    let gate = Arc::new(Gate::default());
    let fast = start(&log, Kv::default(), PATIENCE).await;
    let slow = start(&log, Kv::gated(gate.clone()), PATIENCE).await;
    for i in 0..5 {
        model.put(&writer, "services", &format!("k{i}"), "a").await;
    }
    slow.wait_for_index(5, PATIENCE).await.unwrap();
    gate.close_from(6);
    for i in 0..5 {
        model.put(&writer, "services", &format!("k{i}"), "b").await;
    }
    let seen = model.last();

    // A client's view on the fast node reaches the newest index…
    let mut sub = fast
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
        .await
        .unwrap();
    let mut view = View::fresh();
    view.follow_to(&mut sub, seen).await.unwrap();
    drop(sub);
    // …and resumes on the slow node, which is stuck before index 6.
    assert_eq!(slow.applied(), 5);
    let request = SubscribeRequest::new("services", Subject::Wildcard).index(view.last_index);
    let mut subscribing = Box::pin(slow.subscribe(request));
    assert!(
        futures::poll!(&mut subscribing).is_pending(),
        "waits for the node"
    );
    assert_eq!(
        slow.publisher().stats().subscribers(),
        0,
        "nothing subscribed while waiting"
    );
    gate.open();
    let mut sub = subscribing.await.unwrap();
    assert!(slow.applied() >= seen, "subscribed only once caught up");

    model.put(&writer, "services", "k9", "c").await;
    let mut resumed = View::resumed(view.data.clone(), view.last_index);
    resumed.follow_to(&mut sub, model.last()).await.unwrap();
    for (at, snapshot) in &resumed.snapshots {
        assert!(*at >= seen, "never older than the resume index");
        assert_eq!(*snapshot, model.at("services", *at));
    }
    assert_eq!(resumed.data, model.at("services", model.last()));

    fast.shutdown().await;
    slow.shutdown().await;
    delete_log(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_wait_returns_a_typed_error_never_stale_data() {
    let Some((_client, log)) = open_log("ryi_bound").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    let gate = Arc::new(Gate::default());
    gate.close_from(3);
    let slow = start(&log, Kv::gated(gate.clone()), Duration::from_millis(50)).await;
    for i in 0..5 {
        model.put(&writer, "services", &format!("k{i}"), "a").await;
    }
    slow.wait_for_index(2, PATIENCE).await.unwrap();

    // The builder's bound.
    let request = SubscribeRequest::new("services", Subject::Wildcard).index(5);
    let err = slow.subscribe(request.clone()).await.unwrap_err();
    assert_eq!(
        err,
        NodeSubscribeError::NotCaughtUp {
            requested: 5,
            applied: 2,
            waited: Duration::from_millis(50)
        }
    );
    // A bound of the call's own.
    let err = slow
        .subscribe_within(request.clone(), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        NodeSubscribeError::NotCaughtUp {
            requested: 5,
            applied: 2,
            ..
        }
    ));
    assert_eq!(
        slow.publisher().stats().subscribers(),
        0,
        "no subscription made"
    );

    gate.open();
    let mut sub = slow.subscribe_within(request, PATIENCE).await.unwrap();
    // A client that held the state at index 5 (resuming there with an empty
    // view would be a lie: the node may rightly continue live from 5).
    let mut view = View::resumed(model.at("services", 5), 5);
    model.put(&writer, "services", "k0", "b").await;
    view.follow_to(&mut sub, model.last()).await.unwrap();
    assert!(view.snapshots.iter().all(|(at, _)| *at >= 5));
    assert_eq!(view.data, model.at("services", model.last()));

    slow.shutdown().await;
    delete_log(&log).await;
}
