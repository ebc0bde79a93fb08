//! A node restarted from its checkpoint resumes after it: nothing lost, nothing
//! applied or delivered twice — after a clean shutdown and after a crash
//! (the node dropped, its follower aborted without a last checkpoint).

mod cluster_support;

use std::sync::{Arc, Mutex};

use cluster_support::{
    delete_log, open_log, start_durable as start, Disk, Kv, Model, View, PATIENCE,
};
use snapstream::cluster::{JsonCodec, Node};
use snapstream::event::Subject;
use snapstream::publisher::SubscribeRequest;

/// The client resumes on the (re)started `node` where its view ended, and
/// follows it to `last`: nothing lost, every live event once, never older
/// than the resume index.
async fn resume(node: &Node<String, Kv>, view: &View, model: &Model) -> View {
    let seen = view.last_index;
    let last = model.last();
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard).index(seen))
        .await
        .unwrap();
    let mut resumed = View::resumed(view.data.clone(), seen);
    resumed.follow_to(&mut sub, last).await.unwrap();
    assert_eq!(resumed.data, model.at("services", last), "nothing lost");
    for (at, snapshot) in &resumed.snapshots {
        assert!(*at >= seen, "never older than the resume index");
        assert_eq!(*snapshot, model.at("services", *at));
    }
    let after = resumed.snapshots.last().map_or(seen, |s| s.0);
    assert_eq!(
        resumed.live,
        model.after("services", after),
        "live events once each, in order"
    );
    node.wait_for_index(last, PATIENCE).await.unwrap();
    let stats = node.stats();
    assert_eq!(
        (stats.rebuilds, stats.gaps),
        (0, 0),
        "resumed from the checkpoint, not rebuilt"
    );
    resumed
}

async fn restart_from_checkpoint(test: &str, crash: bool) {
    let Some((_client, log)) = open_log(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("node-a.checkpoint");
    let disk = Arc::new(Mutex::new(Disk::default()));
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    for i in 0..20 {
        model
            .put(
                &writer,
                "services",
                &format!("k{}", i % 6),
                &format!("a{i}"),
            )
            .await;
    }

    // First life: rebuilt from the log, stopped cleanly.
    let node = start(&log, &disk, &checkpoint).await;
    let mut sub = node
        .subscribe(SubscribeRequest::new("services", Subject::Wildcard))
        .await
        .unwrap();
    let mut view = View::fresh();
    view.follow_to(&mut sub, model.last()).await.unwrap();
    assert_eq!(view.data, model.at("services", model.last()));
    drop(sub);
    node.shutdown().await;
    assert_eq!(
        disk.lock().unwrap().persisted_at,
        model.last(),
        "clean stop: checkpoint at the last applied"
    );
    assert!(checkpoint.exists());

    // Changes while the node is down; second life resumes from the checkpoint.
    for i in 20..45 {
        model
            .put(
                &writer,
                "services",
                &format!("k{}", i % 9),
                &format!("b{i}"),
            )
            .await;
    }
    let node = start(&log, &disk, &checkpoint).await;
    let view = resume(&node, &view, &model).await;
    let all: Vec<u64> = (1..=model.last()).collect();
    node.read(|kv, _| {
        assert_eq!(
            kv.applied, all,
            "each change applied once across the restart"
        )
    })
    .await;
    if crash {
        // Killed: no last checkpoint; the last one written may be older.
        drop(node);
    } else {
        node.shutdown().await;
    }
    let persisted = disk.lock().unwrap().clone();

    // More changes while it is down; third life.
    for i in 45..60 {
        model
            .put(
                &writer,
                "services",
                &format!("k{}", i % 11),
                &format!("c{i}"),
            )
            .await;
    }
    let node = start(&log, &disk, &checkpoint).await;
    resume(&node, &view, &model).await;
    let last = model.last();
    let all: Vec<u64> = (1..=last).collect();
    node.read(|kv, applied| {
        assert_eq!(applied, last);
        assert_eq!(kv.resets, 0);
        assert_eq!(kv.topic("services"), model.at("services", last));
        if crash {
            // Replayed from the last checkpoint (at or before what the state
            // had persisted): every later index applied once, in order.
            let replayed = &kv.applied[persisted.applied.len()..];
            let first = replayed[0];
            assert!(first <= persisted.persisted_at + 1);
            assert_eq!(replayed, &all[(first - 1) as usize..]);
        } else {
            assert_eq!(
                kv.applied, all,
                "each change applied once across the restarts"
            );
        }
    })
    .await;
    node.shutdown().await;
    delete_log(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_resumes_from_the_checkpoint() {
    restart_from_checkpoint("clean_restart", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_node_resumes_from_its_last_checkpoint() {
    restart_from_checkpoint("crash_restart", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_another_stream_is_not_resumed_from() {
    let Some((_client, log)) = open_log("foreign_checkpoint").await else {
        return;
    };
    let Some((_client2, other)) = open_log("foreign_checkpoint_other").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("node.checkpoint");
    let disk = Arc::new(Mutex::new(Disk::default()));
    let mut model = Model::default();
    let w_other = other.writer::<String, _>(JsonCodec);
    for i in 0..5 {
        Model::default()
            .put(&w_other, "services", "x", &format!("o{i}"))
            .await;
    }
    let node = start(&other, &disk, &checkpoint).await;
    node.wait_for_index(5, PATIENCE).await.unwrap();
    node.shutdown().await;

    let writer = log.writer::<String, _>(JsonCodec);
    for i in 0..8 {
        model.put(&writer, "services", &format!("k{i}"), "v").await;
    }
    // The same checkpoint file, another stream: rebuilt, not resumed at 5.
    let node = start(&log, &Arc::new(Mutex::new(Disk::default())), &checkpoint).await;
    node.wait_for_index(model.last(), PATIENCE).await.unwrap();
    assert_eq!(node.stats().rebuilds, 1);
    node.read(|kv, _| assert_eq!(kv.topic("services"), model.at("services", model.last())))
        .await;
    node.shutdown().await;
    delete_log(&log).await;
    delete_log(&other).await;
}
