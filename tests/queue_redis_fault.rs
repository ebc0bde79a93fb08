//! Fault test: a Redis server with `appendfsync always` is killed with SIGKILL
//! while pushes run, then restarted on the same port and directory.
//!
//! 64 producer tasks push, half of them one push at a time (so concurrent
//! pushes share script calls) and half in `push_batch`es.
//!
//! Checks: every push that returned `Ok` is still stored (0 lost), a batch is
//! stored or failed as a whole (one script call), calls made
//! while the server is down fail with typed `Backend` errors (no panic, no
//! hang), and the same `RedisQueue` value (commands and its wake-up
//! subscription) works again after the restart.
//!
//! Needs `redis-server` on `PATH` (CI installs it); without it the test prints
//! a notice and returns.
#![cfg(feature = "redis")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapstream::queue::redis::RedisQueue;
use snapstream::queue::{BaseQueue, NewItem, PushError, QueueError, QueueOptions};
use tokio::process::Child;
use tokio::sync::mpsc;

/// Guards against a hang: generous, only ever reached on failure.
mod redis_support;

const HANG: Duration = Duration::from_secs(60);
const PRODUCERS: usize = 64;
/// Items per `push_batch` of the batching producers.
const BATCH: usize = 16;
const BEFORE_KILL: usize = 1_000;
const ERRORS_WHILE_DOWN: usize = 200;
const AFTER_RESTART: usize = 1_000;

/// Starts `redis-server` and returns once it logged that it accepts connections.
async fn start_server(bin: &Path, port: u16, dir: &Path) -> Child {
    let mut args: Vec<&std::ffi::OsStr> = ["--appendonly", "yes", "--appendfsync", "always"]
        .iter()
        .chain(&["--save", "", "--dir"])
        .map(|a| a.as_ref())
        .collect();
    args.push(dir.as_os_str());
    redis_support::start_server(bin, port, args, HANG).await
}

enum Outcome {
    Stored(Vec<u8>),
    Unsure(Vec<u8>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_under_load_loses_no_acknowledged_push() {
    let Some(bin) = redis_support::find_server() else {
        eprintln!("notice: redis-server is not on PATH; skipping the Redis fault test");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!(
        "snapstream-redis-fault-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("redis://127.0.0.1:{port}");

    let mut server = start_server(&bin, port, &dir).await;
    let queue = Arc::new(
        RedisQueue::connect(&url, "fault", QueueOptions::default())
            .await
            .unwrap(),
    );

    // Producers push distinct payloads and report each outcome: half of
    // them one awaited push at a time (concurrent pushes share script
    // calls), half in `push_batch`es of BATCH items (one call each).
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (queue, stop, tx) = (Arc::clone(&queue), Arc::clone(&stop), tx.clone());
        producers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = if p % 2 == 0 { 1 } else { BATCH };
                let payloads: Vec<Vec<u8>> = (i..i + n as u64)
                    .map(|j| format!("{p}-{j}").into_bytes())
                    .collect();
                i += n as u64;
                let results = if n == 1 {
                    let item = NewItem::new(payloads[0].clone());
                    vec![queue.push(item, Duration::ZERO).await]
                } else {
                    let items = payloads.iter().cloned().map(NewItem::new).collect();
                    queue.push_batch(items, Duration::ZERO).await
                };
                assert_eq!(results.len(), n, "one result per item");
                let failed = results.iter().filter(|r| r.is_err()).count();
                assert!(
                    failed == 0 || failed == n,
                    "a batch is one script call: all stored or all failed, got {failed} of {n} failed"
                );
                for (payload, result) in payloads.into_iter().zip(results) {
                    match result {
                        Ok(_) => tx.send(Outcome::Stored(payload)).unwrap(),
                        Err(PushError::Backend { item, .. }) => {
                            assert_eq!(item.payload, payload, "the item is handed back");
                            tx.send(Outcome::Unsure(payload)).unwrap();
                        }
                        Err(e) => panic!("unexpected push error {e:?}"),
                    }
                }
                if failed > 0 {
                    // Pace retries while the server is away.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    drop(tx);

    let mut stored = BTreeSet::new();
    let mut unsure = BTreeSet::new();
    let mut record = |o: Outcome, stored: &mut BTreeSet<Vec<u8>>| match o {
        Outcome::Stored(p) => {
            stored.insert(p);
            true
        }
        Outcome::Unsure(p) => {
            unsure.insert(p);
            false
        }
    };

    // Phase 1: load, then SIGKILL mid-load.
    let mut ok = 0;
    while ok < BEFORE_KILL {
        let o = tokio::time::timeout(HANG, rx.recv())
            .await
            .unwrap()
            .unwrap();
        ok += usize::from(record(o, &mut stored));
    }
    server.kill().await.unwrap(); // SIGKILL

    // Phase 2: calls fail with typed errors, promptly, while it is down.
    let mut errors = 0;
    while errors < ERRORS_WHILE_DOWN {
        let o = tokio::time::timeout(HANG, rx.recv())
            .await
            .unwrap()
            .unwrap();
        errors += usize::from(!record(o, &mut stored));
    }
    let pop = tokio::time::timeout(HANG, queue.pop(1, Duration::from_secs(1)))
        .await
        .expect("pop hung while the server was down");
    assert!(matches!(pop, Err(QueueError::Backend(_))), "{pop:?}");
    let len = tokio::time::timeout(HANG, queue.len()).await.unwrap();
    assert!(matches!(len, Err(QueueError::Backend(_))), "{len:?}");

    // Phase 3: restart on the same port and directory; the same value recovers.
    let mut server = start_server(&bin, port, &dir).await;
    let mut ok_after = 0;
    while ok_after < AFTER_RESTART {
        let o = tokio::time::timeout(HANG, rx.recv())
            .await
            .unwrap()
            .unwrap();
        ok_after += usize::from(record(o, &mut stored));
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    while let Some(o) = rx.recv().await {
        record(o, &mut stored);
    }

    // Every acknowledged push is there; nothing else but unsure ones; no twins.
    let mut counts: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    loop {
        let batch = queue.pop(1_000, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            break;
        }
        let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
        for d in batch {
            *counts.entry(d.payload).or_default() += 1;
        }
        queue.ack(&ids).await.unwrap();
    }
    let lost: Vec<_> = stored.iter().filter(|p| !counts.contains_key(*p)).collect();
    let unsure_kept = unsure.iter().filter(|p| counts.contains_key(*p)).count();
    eprintln!(
        "fault test: {} acknowledged pushes, {} lost, {} failed pushes of which {} were stored anyway",
        stored.len(),
        lost.len(),
        unsure.len(),
        unsure_kept
    );
    assert!(lost.is_empty(), "lost acknowledged pushes: {lost:?}");
    assert!(counts.values().all(|&n| n == 1), "an item was stored twice");
    assert!(counts
        .keys()
        .all(|p| stored.contains(p) || unsure.contains(p)));

    // The subscriber came back too: a waiting pop is woken by another handle.
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = "snapstream:{fault}:wake";
    for attempt in 0.. {
        let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut raw)
            .await
            .unwrap();
        if subscribers == 1 {
            break;
        }
        assert!(attempt < 6_000, "the subscriber never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = tokio::spawn({
        let queue = Arc::clone(&queue);
        async move { queue.pop(1, Duration::from_secs(30)).await }
    });
    for attempt in 0.. {
        let waiting: bool = redis::cmd("EXISTS")
            .arg("snapstream:{fault}:popwait")
            .query_async(&mut raw)
            .await
            .unwrap();
        if waiting {
            break;
        }
        assert!(attempt < 6_000, "the pop never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = RedisQueue::connect(&url, "fault", QueueOptions::default())
        .await
        .unwrap();
    other
        .push(NewItem::new("after"), Duration::ZERO)
        .await
        .unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"after");

    server.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
