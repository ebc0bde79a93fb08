//! A compacted log (the newest message of each key, deletes as tombstones):
//! a node rebuilds its state from one change per key, and a node resuming
//! from an old checkpoint passes over the holes compaction made instead of
//! taking them for gaps — its state ends equal to the writer's either way.

mod cluster_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cluster_support::{delete_log, open_log_with, start_durable, Disk, Model, View, PATIENCE};
use snapstream::cluster::{JsonCodec, Node, NodeState};
use snapstream::event::{Event, Subject, Topic};
use snapstream::publisher::SubscribeRequest;

/// Each key's newest value and the index that set it; an empty value is a
/// tombstone (the key is deleted). Records every index it applied.
#[derive(Default)]
struct Tombstoned {
    data: BTreeMap<String, (u64, String)>,
    applied: Vec<u64>,
    resets: usize,
}

impl NodeState<String> for Tombstoned {
    fn apply(&mut self, event: &Event<String>) {
        let key = event.subject().as_key().expect("a key").to_string();
        if event.payload().is_empty() {
            self.data.remove(&key);
        } else {
            self.data
                .insert(key, (event.index(), event.payload().clone()));
        }
        self.applied.push(event.index());
    }

    fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
        self.data
            .iter()
            .filter(|(k, _)| subject.is_wildcard() || subject.as_key() == Some(k.as_str()))
            .map(|(k, (i, v))| Event::new(topic.clone(), k.as_str(), *i, v.clone()))
            .collect()
    }

    fn reset(&mut self) {
        self.data.clear();
        self.resets += 1;
    }
}

/// The stream's message count, as JetStream reports it.
async fn messages_in(log: &snapstream::cluster::Log) -> u64 {
    let mut stream = log.jetstream().get_stream(log.stream_name()).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rebuilds_a_compacted_log_from_one_change_per_key() {
    let Some((_client, log)) = open_log_with("compacted_rebuild", |c| c.compacted(true)).await
    else {
        return;
    };
    assert!(log.is_compacted());
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    const KEYS: usize = 8;
    for round in 0..25 {
        for k in 0..KEYS {
            model
                .put(&writer, "services", &format!("k{k}"), &format!("v{round}"))
                .await;
        }
    }
    // Deletes are tombstones: k3's newest change says it is gone.
    model.put(&writer, "services", "k3", "").await;
    let last = model.last();
    assert_eq!(last, 25 * KEYS as u64 + 1);
    assert_eq!(
        messages_in(&log).await,
        KEYS as u64,
        "the log keeps one message per key, the tombstone among them"
    );
    let mut want = model.at("services", last);
    assert_eq!(want.remove("k3").map(|(_, v)| v).as_deref(), Some(""));

    let mut b = Node::builder(&log, Tombstoned::default(), JsonCodec);
    b.wildcard_topic("services");
    let node = b.start().await.unwrap();
    node.wait_for_index(last, PATIENCE).await.unwrap();
    let stats = node.stats();
    assert_eq!((stats.rebuilds, stats.gaps), (1, 0), "holes are not gaps");
    node.read(|state, applied| {
        assert_eq!(applied, last);
        assert_eq!(state.applied.len(), KEYS, "one change applied per key");
        assert_eq!(state.data, want, "the writer's state, k3 deleted");
    })
    .await;

    // A subscriber gets that state as its snapshot, then live changes.
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
        .await
        .unwrap();
    let mut view = View::fresh();
    view.follow_to(&mut sub, last).await.unwrap();
    assert_eq!(view.data, want);
    let next = model.put(&writer, "services", "k3", "back").await;
    view.follow_to(&mut sub, next).await.unwrap();
    want.insert("k3".into(), (next, "back".into()));
    assert_eq!(view.data, want);
    assert_eq!(
        view.live,
        vec![(next, "k3".to_string(), "back".to_string())]
    );
    node.shutdown().await;
    delete_log(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resuming_behind_a_compacted_log_passes_over_its_holes() {
    let Some((_client, log)) = open_log_with("compacted_resume", |c| c.compacted(true)).await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("node.checkpoint");
    let disk = Arc::new(Mutex::new(Disk::default()));
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    for k in 0..5 {
        model.put(&writer, "services", &format!("k{k}"), "a").await;
    }
    let node = start_durable(&log, &disk, &checkpoint).await;
    node.wait_for_index(5, PATIENCE).await.unwrap();
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
        .await
        .unwrap();
    let mut view = View::fresh();
    view.follow_to(&mut sub, 5).await.unwrap();
    node.shutdown().await;
    assert_eq!(disk.lock().unwrap().persisted_at, 5);

    // While the node is down, keys change again and again: the log keeps
    // only each key's newest change, so sequences 6, 7 and 8 are gone.
    for (key, value) in [
        ("k1", "b"),
        ("k1", "c"),
        ("k2", "b"),
        ("k1", "d"),
        ("k2", "c"),
        ("k9", "a"),
    ] {
        model.put(&writer, "services", key, value).await;
    }
    let last = model.last();
    assert_eq!(last, 11);
    let surviving = vec![9, 10, 11];

    let node = start_durable(&log, &disk, &checkpoint).await;
    node.wait_for_index(last, PATIENCE).await.unwrap();
    let stats = node.stats();
    assert_eq!(
        (stats.rebuilds, stats.gaps, stats.compacted),
        (0, 0, 3),
        "resumed from the checkpoint; the three compacted sequences passed over"
    );
    node.read(|kv, applied| {
        assert_eq!(applied, last);
        assert_eq!(kv.resets, 0);
        assert_eq!(kv.applied[5..], surviving, "each key's newest change once");
        assert_eq!(kv.topic("services"), model.at("services", last));
    })
    .await;

    // The client resumes on the restarted node where its view ended (5):
    // its view ends equal to the writer's state, never older than 5.
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard).index(view.last_index))
        .await
        .unwrap();
    let mut resumed = View::resumed(view.data.clone(), view.last_index);
    resumed.follow_to(&mut sub, last).await.unwrap();
    assert_eq!(resumed.data, model.at("services", last), "nothing lost");
    for (at, _) in &resumed.snapshots {
        assert!(*at >= 5, "never older than the resume index");
    }
    node.shutdown().await;
    delete_log(&log).await;
}
