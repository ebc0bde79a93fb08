//! Two OS processes share one Redis queue: this test binary re-runs itself as
//! the second process (the ignored test `child_process`, selected with
//! `--exact --ignored` and steered by environment variables).
//!
//! Without a Redis server (`REDIS_URL`, or 127.0.0.1:6379) the tests print a
//! notice and return.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use snapstream::queue::redis::RedisQueue;
use snapstream::queue::{BaseQueue, Delivery, NewItem, QueueOptions};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const LONG: Duration = Duration::from_secs(30);
const ITEMS: usize = 2_000;
const ENV_URL: &str = "SNAPSTREAM_CHILD_REDIS_URL";
const ENV_QUEUE: &str = "SNAPSTREAM_CHILD_QUEUE";
const ENV_MODE: &str = "SNAPSTREAM_CHILD_MODE";
const ENV_VISIBILITY_MS: &str = "SNAPSTREAM_CHILD_VISIBILITY_MS";

mod redis_support;
use redis_support::{unique_name, url};

fn spawn_child(url: &str, queue: &str, mode: &str, visibility_ms: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_process", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(ENV_URL, url)
        .env(ENV_QUEUE, queue)
        .env(ENV_MODE, mode)
        .env(ENV_VISIBILITY_MS, visibility_ms.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child process")
}

/// The child's next protocol line (libtest's own output is skipped; it may
/// share a line with ours, as in `test child_process ... CHILD got item-7`).
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<String> {
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(at) = line.find("CHILD ") {
            return Some(line[at + "CHILD ".len()..].to_owned());
        }
    }
    None
}

/// Pops, handles and acks until the queue is empty and nothing is leased.
async fn consume(queue: &RedisQueue, mut handled: impl FnMut(&Delivery)) {
    loop {
        let batch = queue.pop(16, Duration::from_millis(200)).await.unwrap();
        if batch.is_empty() {
            if queue.len().await.unwrap().total() == 0 {
                return;
            }
            continue;
        }
        for d in &batch {
            handled(d);
        }
        let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
        queue.ack(&ids).await.unwrap();
    }
}

/// The second process. Ignored in normal runs; the tests below start it.
#[tokio::test]
#[ignore = "helper process started by the tests in this file"]
async fn child_process() {
    let url = std::env::var(ENV_URL).expect("started by a parent test");
    let name = std::env::var(ENV_QUEUE).unwrap();
    let ms: u64 = std::env::var(ENV_VISIBILITY_MS).unwrap().parse().unwrap();
    let opts = QueueOptions::default().visibility_timeout(Duration::from_millis(ms));
    let queue = RedisQueue::connect(&url, name, opts).await.unwrap();
    match std::env::var(ENV_MODE).unwrap().as_str() {
        "consume" => {
            consume(&queue, |d| {
                println!("CHILD got {}", String::from_utf8_lossy(&d.payload));
            })
            .await;
            println!("CHILD done");
        }
        "lease-and-hang" => {
            let batch = queue.pop(10, LONG).await.unwrap();
            println!("CHILD leased {}", batch.len());
            // Never acks: the parent kills this process.
            std::future::pending::<()>().await;
        }
        other => panic!("unknown mode {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_queue_without_handling_an_item_twice() {
    let Some(url) = url().await else {
        return;
    };
    let name = unique_name("processes");
    let queue = RedisQueue::connect(&url, name.clone(), QueueOptions::default())
        .await
        .unwrap();
    let expected: BTreeSet<String> = (0..ITEMS).map(|i| format!("item-{i}")).collect();
    for p in &expected {
        queue.push(NewItem::new(p.as_str()), LONG).await.unwrap();
    }
    // The parent takes a first batch before the child starts, so both take part.
    let mut mine = Vec::new();
    let first = queue.pop(16, LONG).await.unwrap();
    mine.extend(
        first
            .iter()
            .map(|d| String::from_utf8(d.payload.clone()).unwrap()),
    );

    let mut child = spawn_child(&url, &name, "consume", 30_000);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut theirs = Vec::new();
    let line = next_line(&mut lines).await.expect("child handled an item");
    theirs.push(line.strip_prefix("got ").unwrap().to_owned());

    let ids: Vec<_> = first.iter().map(|d| d.id).collect();
    queue.ack(&ids).await.unwrap();
    consume(&queue, |d| {
        mine.push(String::from_utf8(d.payload.clone()).unwrap());
    })
    .await;

    loop {
        match next_line(&mut lines).await.as_deref() {
            Some("done") => break,
            Some(line) => theirs.push(line.strip_prefix("got ").unwrap().to_owned()),
            None => panic!("child exited without finishing"),
        }
    }
    assert!(child.wait().await.unwrap().success());

    let mine_set: BTreeSet<_> = mine.iter().cloned().collect();
    let theirs_set: BTreeSet<_> = theirs.iter().cloned().collect();
    assert_eq!(
        mine_set.len(),
        mine.len(),
        "the parent handled an item twice"
    );
    assert_eq!(
        theirs_set.len(),
        theirs.len(),
        "the child handled an item twice"
    );
    let both: Vec<_> = mine_set.intersection(&theirs_set).collect();
    assert!(both.is_empty(), "handled by both processes: {both:?}");
    let all: BTreeSet<_> = mine_set.union(&theirs_set).cloned().collect();
    assert_eq!(all, expected, "an item was lost");
    eprintln!(
        "parent handled {}, child handled {}",
        mine.len(),
        theirs.len()
    );
    queue.delete().await.unwrap();
}

#[tokio::test]
async fn items_leased_by_a_killed_process_come_back() {
    let Some(url) = url().await else {
        return;
    };
    let name = unique_name("killed");
    let queue = RedisQueue::connect(&url, name.clone(), QueueOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        queue
            .push(NewItem::new(format!("job-{i}")), LONG)
            .await
            .unwrap();
    }
    let mut child = spawn_child(&url, &name, "lease-and-hang", 300);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("leased 10"));
    child.kill().await.unwrap(); // SIGKILL

    let mut back = Vec::new();
    while back.len() < 10 {
        let batch = queue.pop(10, LONG).await.unwrap();
        assert!(!batch.is_empty(), "leased items never came back");
        back.extend(batch);
    }
    let payloads: Vec<_> = back.iter().map(|d| d.payload.clone()).collect();
    let expected: Vec<_> = (0..10).map(|i| format!("job-{i}").into_bytes()).collect();
    assert_eq!(payloads, expected, "back in their order");
    assert!(back.iter().all(|d| d.attempts == 1));
    queue.delete().await.unwrap();
}
