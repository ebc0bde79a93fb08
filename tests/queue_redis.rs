//! The Redis base queue against a live server (`REDIS_URL`, or 127.0.0.1:6379).
//! Without a server every test prints a notice and returns.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use snapstream::queue::redis::{RedisQueue, RedisQueueError};
use snapstream::queue::{BaseQueue, ItemId, NewItem, PushError, QueueError, QueueOptions};

const LONG: Duration = Duration::from_secs(30);

mod redis_support;
use redis_support::{unique_name, url};

async fn open(test: &str, options: QueueOptions) -> Option<(String, RedisQueue)> {
    let url = url().await?;
    let name = unique_name(test);
    let queue = RedisQueue::connect(&url, name.clone(), options)
        .await
        .expect("connect");
    Some((url, queue))
}

/// A raw connection, to look at the queue's keys from outside.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until the queue announced a waiting pop (`popwait`) or push
/// (`pushwait`) on the server: the signal that the other task is now asleep.
async fn until_flag(url: &str, queue: &RedisQueue, flag: &str) {
    let mut conn = raw(url).await;
    let key = format!("snapstream:{{{}}}:{flag}", queue.name());
    for _ in 0..3_000 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{flag} never appeared");
}

fn payloads(batch: &[snapstream::queue::Delivery]) -> Vec<Vec<u8>> {
    batch.iter().map(|d| d.payload.clone()).collect()
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<RedisQueue>();
    check::<RedisQueueError>();
    fn future_is_send<F: std::future::Future + Send>(_: F) {}
    // Built but never awaited: only their types are checked.
    future_is_send(RedisQueue::connect("", "x", QueueOptions::default()));
    let none: Option<&RedisQueue> = None;
    if let Some(q) = none {
        future_is_send(q.delete());
    }
}

#[tokio::test]
async fn bad_options_are_typed_errors() {
    let source = |e: QueueError| match e {
        QueueError::Backend(source) => source.downcast::<RedisQueueError>().ok().map(|b| *b),
        other => panic!("unexpected {other:?}"),
    };
    let e = RedisQueue::connect("redis://127.0.0.1:1", "", QueueOptions::default())
        .await
        .unwrap_err();
    assert_eq!(source(e), Some(RedisQueueError::EmptyName));
    // Bad options are refused before connecting (nothing listens on port 1),
    // in the shape every backend uses.
    let opts = QueueOptions::default().visibility_timeout(Duration::ZERO);
    let e = RedisQueue::connect("redis://127.0.0.1:1", "q", opts)
        .await
        .unwrap_err();
    match e {
        QueueError::InvalidOption(e) => assert_eq!(e.field, "visibility_timeout"),
        other => panic!("expected InvalidOption, got {other:?}"),
    }
    let e = RedisQueue::connect("not a url", "q", QueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Backend(_)));
}

#[tokio::test]
async fn fifo_leases_and_ack() {
    let Some((_, q)) = open("fifo", QueueOptions::default()).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..10u8 {
        ids.push(q.push(NewItem::new(vec![i]), LONG).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let batch = q.pop(4, LONG).await.unwrap();
    assert_eq!(payloads(&batch), vec![vec![0], vec![1], vec![2], vec![3]]);
    assert!(batch.iter().all(|d| d.attempts == 0 && d.key.is_none()));
    let len = q.len().await.unwrap();
    assert_eq!((len.ready, len.delayed, len.leased), (6, 0, 4));
    let acked: Vec<ItemId> = batch.iter().map(|d| d.id).collect();
    q.ack(&acked).await.unwrap();
    q.ack(&acked).await.unwrap(); // twice: ignored
    q.ack(&[ItemId(u64::MAX)]).await.unwrap(); // unknown: ignored
    assert_eq!(q.len().await.unwrap().total(), 6);
    let rest = q.pop(100, LONG).await.unwrap();
    assert_eq!(
        payloads(&rest),
        (4..10u8).map(|i| vec![i]).collect::<Vec<_>>()
    );
    q.delete().await.unwrap();
}

#[tokio::test]
async fn two_handles_share_one_queue() {
    let Some((url, a)) = open("share", QueueOptions::default()).await else {
        return;
    };
    let b = RedisQueue::connect(&url, a.name(), QueueOptions::default())
        .await
        .unwrap();
    a.push(NewItem::new("from a"), LONG).await.unwrap();
    let got = b.pop(1, LONG).await.unwrap();
    assert_eq!(got[0].payload, b"from a");
    assert_eq!(a.len().await.unwrap().leased, 1);
    b.ack(&[got[0].id]).await.unwrap();
    assert_eq!(a.len().await.unwrap().total(), 0);
    a.delete().await.unwrap();
}

#[tokio::test]
async fn pop_times_out_empty() {
    let Some((_, q)) = open("timeout", QueueOptions::default()).await else {
        return;
    };
    assert!(q
        .pop(8, Duration::from_millis(20))
        .await
        .unwrap()
        .is_empty());
    assert!(q.pop(8, Duration::ZERO).await.unwrap().is_empty());
    q.delete().await.unwrap();
}

#[tokio::test]
async fn waiting_pop_wakes_on_push_from_another_handle() {
    let Some((url, q)) = open("wake", QueueOptions::default()).await else {
        return;
    };
    let q = Arc::new(q);
    let other = RedisQueue::connect(&url, q.name(), QueueOptions::default())
        .await
        .unwrap();
    let waiter = tokio::spawn({
        let q = Arc::clone(&q);
        async move { q.pop(1, LONG).await }
    });
    until_flag(&url, &q, "popwait").await;
    other.push(NewItem::new("wake up"), LONG).await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(payloads(&got), vec![b"wake up".to_vec()]);
    q.delete().await.unwrap();
}

#[tokio::test]
async fn expired_lease_comes_back_with_attempts_raised() {
    let opts = QueueOptions::default().visibility_timeout(Duration::from_millis(100));
    let Some((_, q)) = open("lease", opts).await else {
        return;
    };
    let id = q.push(NewItem::new("job"), LONG).await.unwrap();
    let first = q.pop(1, LONG).await.unwrap();
    assert_eq!((first[0].id, first[0].attempts), (id, 0));
    // Not acked: the waiting pop sleeps until the lease deadline, then gets it.
    let again = q.pop(1, LONG).await.unwrap();
    assert_eq!((again[0].id, again[0].attempts), (id, 1));
    q.ack(&[id]).await.unwrap();
    assert_eq!(q.len().await.unwrap().total(), 0);
    q.delete().await.unwrap();
}

#[tokio::test]
async fn nack_requeues_behind_ready_items_and_after_delay() {
    let Some((_, q)) = open("nack", QueueOptions::default()).await else {
        return;
    };
    let a = q.push(NewItem::new("a"), LONG).await.unwrap();
    q.push(NewItem::new("b"), LONG).await.unwrap();
    let got = q.pop(1, LONG).await.unwrap();
    assert_eq!(got[0].id, a);
    q.nack(&[a], Duration::ZERO).await.unwrap();
    let both = q.pop(2, LONG).await.unwrap();
    assert_eq!(payloads(&both), vec![b"b".to_vec(), b"a".to_vec()]);
    assert_eq!(both[1].attempts, 1);
    q.ack(&[both[0].id]).await.unwrap();
    q.nack(&[a], Duration::from_millis(150)).await.unwrap();
    let len = q.len().await.unwrap();
    assert_eq!((len.ready, len.delayed, len.leased), (0, 1, 0));
    // The waiting pop's sleep is capped by the due time: no push needed.
    let back = q.pop(1, LONG).await.unwrap();
    assert_eq!((back[0].id, back[0].attempts), (a, 2));
    q.delete().await.unwrap();
}

#[tokio::test]
async fn full_queue_push_fails_after_timeout_and_hands_item_back() {
    let Some((_, q)) = open("full", QueueOptions::default().capacity(2)).await else {
        return;
    };
    q.push(NewItem::new("1"), LONG).await.unwrap();
    q.push(NewItem::new("2"), LONG).await.unwrap();
    let leased = q.pop(1, LONG).await.unwrap(); // leased still counts
    let item = NewItem::with_key("3", "k");
    match q.push(item.clone(), Duration::from_millis(30)).await {
        Err(PushError::Full(back)) => assert_eq!(back, item),
        other => panic!("expected Full, got {other:?}"),
    }
    match q.push(item.clone(), Duration::ZERO).await {
        Err(PushError::Full(back)) => assert_eq!(back, item),
        other => panic!("expected Full, got {other:?}"),
    }
    q.ack(&[leased[0].id]).await.unwrap();
    q.push(item, Duration::ZERO).await.unwrap();
    q.delete().await.unwrap();
}

#[tokio::test]
async fn waiting_push_succeeds_when_room_appears() {
    let Some((url, q)) = open("room", QueueOptions::default().capacity(1)).await else {
        return;
    };
    let q = Arc::new(q);
    q.push(NewItem::new("first"), LONG).await.unwrap();
    let pusher = tokio::spawn({
        let q = Arc::clone(&q);
        async move { q.push(NewItem::new("second"), LONG).await }
    });
    until_flag(&url, &q, "pushwait").await;
    let got = q.pop(1, LONG).await.unwrap();
    q.ack(&[got[0].id]).await.unwrap();
    pusher.await.unwrap().unwrap();
    assert_eq!(
        payloads(&q.pop(1, LONG).await.unwrap()),
        vec![b"second".to_vec()]
    );
    q.delete().await.unwrap();
}

#[tokio::test]
async fn unique_queue_rejects_duplicates_until_acked() {
    let Some((_, q)) = open("unique", QueueOptions::default().unique(true)).await else {
        return;
    };
    assert!(q.is_unique());
    q.push(NewItem::new("x"), LONG).await.unwrap();
    match q.push(NewItem::new("x"), LONG).await {
        Err(PushError::AlreadyQueued(item)) => assert_eq!(item.payload, b"x"),
        other => panic!("expected AlreadyQueued, got {other:?}"),
    }
    assert!(q.has(b"x").await.unwrap());
    assert!(!q.has(b"y").await.unwrap());
    let got = q.pop(1, LONG).await.unwrap();
    assert!(
        q.has(b"x").await.unwrap(),
        "leased items stay in the dedup set"
    );
    q.ack(&[got[0].id]).await.unwrap();
    assert!(!q.has(b"x").await.unwrap());
    q.push(NewItem::new("x"), LONG).await.unwrap();
    q.delete().await.unwrap();
}

#[tokio::test]
async fn racing_unique_pushes_one_wins() {
    let Some((_, q)) = open("race", QueueOptions::default().unique(true)).await else {
        return;
    };
    let q = Arc::new(q);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.push(NewItem::new("same"), LONG).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(PushError::AlreadyQueued(_)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(q.len().await.unwrap().total(), 1);
    q.delete().await.unwrap();
}

#[tokio::test]
async fn simple_queue_keeps_duplicates_and_has_scans() {
    let Some((_, q)) = open("simple", QueueOptions::default()).await else {
        return;
    };
    for _ in 0..3 {
        q.push(NewItem::new("dup"), LONG).await.unwrap();
    }
    q.push(NewItem::new(Vec::new()), LONG).await.unwrap();
    assert!(q.has(b"dup").await.unwrap());
    assert!(q.has(b"").await.unwrap());
    assert!(!q.has(b"nope").await.unwrap());
    let got = q.pop(10, LONG).await.unwrap();
    assert_eq!(
        payloads(&got),
        vec![b"dup".to_vec(), b"dup".to_vec(), b"dup".to_vec(), vec![]]
    );
    q.delete().await.unwrap();
}

#[tokio::test]
async fn remove_all_deletes_every_state_and_the_dedup_set() {
    let opts = QueueOptions::default().unique(true);
    let Some((_, q)) = open("remove", opts).await else {
        return;
    };
    for p in ["a", "b", "c", "d"] {
        q.push(NewItem::with_key(p, "k"), LONG).await.unwrap();
    }
    let a = q.pop(4, LONG).await.unwrap(); // a leased, b..d parked behind it
    assert_eq!(payloads(&a), vec![b"a".to_vec()]);
    q.push(NewItem::new("e"), LONG).await.unwrap();
    let e = q.pop(1, LONG).await.unwrap();
    q.nack(&[e[0].id], Duration::from_secs(60)).await.unwrap(); // delayed
    assert_eq!(q.remove_all().await.unwrap(), 5);
    assert_eq!(q.len().await.unwrap().total(), 0);
    assert!(!q.has(b"a").await.unwrap());
    q.push(NewItem::with_key("a", "k"), LONG).await.unwrap();
    let fresh = q.pop(1, LONG).await.unwrap();
    assert_eq!(payloads(&fresh), vec![b"a".to_vec()], "key k was released");
    q.delete().await.unwrap();
}

#[tokio::test]
async fn per_key_order_holds_items_behind_a_leased_one() {
    let Some((_, q)) = open("keys", QueueOptions::default()).await else {
        return;
    };
    q.push(NewItem::with_key("a1", "a"), LONG).await.unwrap();
    q.push(NewItem::with_key("a2", "a"), LONG).await.unwrap();
    q.push(NewItem::with_key("b1", "b"), LONG).await.unwrap();
    q.push(NewItem::new("n1"), LONG).await.unwrap();
    q.push(NewItem::with_key("a3", "a"), LONG).await.unwrap();
    let first = q.pop(10, LONG).await.unwrap();
    assert_eq!(
        payloads(&first),
        vec![b"a1".to_vec(), b"b1".to_vec(), b"n1".to_vec()]
    );
    assert_eq!(first[0].key.as_deref(), Some("a"));
    assert_eq!(
        q.len().await.unwrap().ready,
        2,
        "parked items count as ready"
    );
    assert!(q.pop(10, Duration::ZERO).await.unwrap().is_empty());
    // A nacked holder keeps the key: a2 still waits.
    q.nack(&[first[0].id], Duration::ZERO).await.unwrap();
    let retry = q.pop(10, LONG).await.unwrap();
    assert_eq!(payloads(&retry), vec![b"a1".to_vec()]);
    q.ack(&[retry[0].id]).await.unwrap();
    let next = q.pop(10, LONG).await.unwrap();
    assert_eq!(payloads(&next), vec![b"a2".to_vec()]);
    q.ack(&[next[0].id]).await.unwrap();
    let last = q.pop(10, LONG).await.unwrap();
    assert_eq!(payloads(&last), vec![b"a3".to_vec()]);
    q.delete().await.unwrap();
}

#[tokio::test]
async fn close_wakes_waiters_and_fails_pushes_but_keeps_items() {
    let Some((url, q)) = open("close", QueueOptions::default()).await else {
        return;
    };
    let q = Arc::new(q);
    let waiter = tokio::spawn({
        let q = Arc::clone(&q);
        async move { q.pop(1, LONG).await }
    });
    until_flag(&url, &q, "popwait").await;
    let other = RedisQueue::connect(&url, q.name(), QueueOptions::default())
        .await
        .unwrap();
    q.close();
    q.close(); // idempotent
    assert!(matches!(waiter.await.unwrap(), Err(QueueError::Closed)));
    match q.push(NewItem::new("late"), LONG).await {
        Err(PushError::Closed(item)) => assert_eq!(item.payload, b"late"),
        other => panic!("expected Closed, got {other:?}"),
    }
    // Close is local: the other handle still works, and ready items still drain.
    other.push(NewItem::new("kept"), LONG).await.unwrap();
    let got = q.pop(1, LONG).await.unwrap();
    assert_eq!(payloads(&got), vec![b"kept".to_vec()]);
    q.ack(&[got[0].id]).await.unwrap();
    assert!(matches!(q.pop(1, LONG).await, Err(QueueError::Closed)));
    other.delete().await.unwrap();
}

#[tokio::test]
async fn cancelled_pop_leaves_nothing_leased() {
    let opts = QueueOptions::default().visibility_timeout(Duration::from_secs(600));
    let Some((_, q)) = open("cancel", opts).await else {
        return;
    };
    for round in 0..20u8 {
        let id = q.push(NewItem::new(vec![round]), LONG).await.unwrap();
        // Polled once and dropped: its script is sent but its reply unseen.
        let first = futures::FutureExt::now_or_never(q.pop(1, LONG));
        assert!(first.is_none(), "a pop cannot finish without the server");
        // The item is handed back untouched long before its 600 s lease ends.
        let got = q.pop(1, LONG).await.unwrap();
        assert_eq!((got[0].id, got[0].attempts), (id, 0));
        q.ack(&[id]).await.unwrap();
    }
    assert_eq!(q.len().await.unwrap().total(), 0);
    q.delete().await.unwrap();
}

#[tokio::test]
async fn empty_payload_and_empty_key_round_trip() {
    let Some((_, q)) = open("empty", QueueOptions::default()).await else {
        return;
    };
    q.push(NewItem::with_key(Vec::new(), ""), LONG)
        .await
        .unwrap();
    let got = q.pop(1, LONG).await.unwrap();
    assert_eq!(got[0].payload, Vec::<u8>::new());
    assert_eq!(got[0].key.as_deref(), Some(""));
    q.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_consumers_keep_the_multiset() {
    const PRODUCERS: u32 = 4;
    const CONSUMERS: usize = 4;
    const PER: u32 = 1_000;
    let Some((url, q)) = open("mpmc", QueueOptions::default()).await else {
        return;
    };
    let q = Arc::new(q);
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let q = Arc::clone(&q);
        producers.push(tokio::spawn(async move {
            for i in 0..PER {
                q.push(NewItem::new(format!("{p}-{i}")), LONG)
                    .await
                    .unwrap();
            }
        }));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        // Each consumer has its own connection, like another process would.
        let c = RedisQueue::connect(&url, q.name(), QueueOptions::default())
            .await
            .unwrap();
        let tx = tx.clone();
        consumers.push(tokio::spawn(async move {
            loop {
                match c.pop(32, LONG).await {
                    Ok(batch) if batch.is_empty() => return,
                    Ok(batch) => {
                        let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
                        for d in batch {
                            tx.send(d.payload).unwrap();
                        }
                        c.ack(&ids).await.unwrap();
                    }
                    Err(QueueError::Closed) => return,
                    Err(e) => panic!("{e:?}"),
                }
            }
        }));
    }
    drop(tx);
    for p in producers {
        p.await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < (PRODUCERS * PER) as usize {
        seen.push(rx.recv().await.expect("consumers stopped early"));
    }
    let expected: BTreeSet<Vec<u8>> = (0..PRODUCERS)
        .flat_map(|p| (0..PER).map(move |i| format!("{p}-{i}").into_bytes()))
        .collect();
    let got: BTreeSet<Vec<u8>> = seen.iter().cloned().collect();
    assert_eq!(got, expected);
    assert_eq!(seen.len(), expected.len(), "nothing delivered twice");
    for c in consumers {
        c.abort();
    }
    q.delete().await.unwrap();
}
