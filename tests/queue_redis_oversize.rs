//! A push the Redis server refuses for its size fails alone.
//!
//! A `redis-server` of its own, started with `proto-max-bulk-len 2mb`, gets
//! one item above that while 50 small pushes are in flight on the same
//! `RedisQueue`, then a large item within the limit. The server refuses
//! such a command with a protocol error and drops the connection; before the
//! fix the big item shared a script call and a connection with the small ones,
//! and 46 of them failed too ("connection reset", "invalid bulk length").
//!
//! Needs `redis-server` on `PATH`; without it the test prints a notice and
//! returns.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use snapstream::queue::redis::RedisQueue;
use snapstream::queue::{BaseQueue, NewItem, PushError, QueueOptions};
use tokio::process::Child;

/// Guards against a hang: generous, only ever reached on failure.
mod redis_support;

const HANG: Duration = Duration::from_secs(60);
const MB: usize = 1024 * 1024;

/// Starts a throw-away `redis-server` (no persistence) on `port` with
/// `proto-max-bulk-len 2mb`; returns once it accepts connections.
async fn start_server(port: u16) -> Option<Child> {
    let bin = redis_support::find_server()?;
    let args = [
        "--save",
        "",
        "--appendonly",
        "no",
        "--proto-max-bulk-len",
        "2mb",
    ];
    Some(redis_support::start_server(&bin, port, args, HANG).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_refused_by_the_server_fails_alone() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(_server) = start_server(port).await else {
        eprintln!("notice: redis-server is not on PATH; skipping the oversize test");
        return;
    };
    let url = format!("redis://127.0.0.1:{port}");
    // The queue's own limit (4 MiB) is above the server's (2 MiB): the size
    // check lets a 3 MiB item through and the server refuses it.
    let opts = QueueOptions::default().max_item_bytes(4 * MB);
    let queue = Arc::new(RedisQueue::connect(&url, "oversize", opts).await.unwrap());

    for round in 0..3 {
        let small = (0..50).map(|i| {
            let q = Arc::clone(&queue);
            tokio::spawn(async move { q.push(NewItem::new(format!("{round}-{i}")), HANG).await })
        });
        let small: Vec<_> = small.collect();
        let big = {
            let q = Arc::clone(&queue);
            tokio::spawn(async move { q.push(NewItem::new(vec![7u8; 3 * MB]), HANG).await })
        };
        match big.await.unwrap() {
            Err(PushError::Backend { item, source }) => {
                assert_eq!(item.payload.len(), 3 * MB, "the item is handed back");
                eprintln!("round {round}: the big push failed: {source}");
            }
            other => panic!("round {round}: expected the server to refuse it, got {other:?}"),
        }
        let mut failed = Vec::new();
        for (i, t) in small.into_iter().enumerate() {
            if let Err(e) = t.await.unwrap() {
                failed.push(format!("{i}: {e} ({:?})", std::error::Error::source(&e)));
            }
        }
        assert!(
            failed.is_empty(),
            "round {round}: {} small pushes failed with the big one: {failed:?}",
            failed.len()
        );
        // The next large push (sent alone too) is not hurt by the refused one.
        queue
            .push(NewItem::new(vec![8u8; 3 * MB / 2]), HANG)
            .await
            .unwrap_or_else(|e| {
                let source = std::error::Error::source(&e).map(ToString::to_string);
                panic!("round {round}: a valid large push after the refused one: {e} ({source:?})")
            });
    }
    // Everything small and the valid large items are stored, nothing refused.
    assert_eq!(queue.len().await.unwrap().ready, 153);
    let got = queue.pop(1_000, Duration::ZERO).await.unwrap();
    let large: Vec<usize> = got
        .iter()
        .map(|d| d.payload.len())
        .filter(|&n| n > 16)
        .collect();
    assert_eq!((got.len(), large), (153, vec![3 * MB / 2; 3]));
    queue.delete().await.unwrap();
}
