//! Manager: queues built from config, figures, flush all, resize, remove all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapstream::queue::config::QueuesConfig;
use snapstream::queue::{Backend, Item, Manager, ManagerError};

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn lists_figures_flushes_resizes_and_removes() {
    let cfg: QueuesConfig = toml::from_str(
        r#"
        [defaults]
        max_workers = 2
        [queues.b]
        max_workers = 3
        max_attempts = 1
        "#,
    )
    .unwrap();
    let m = Manager::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let a = m
        .create("a", &cfg, move |b: Vec<Item<u32>>| {
            s.lock().unwrap().extend(b.iter().map(|i| *i.value()));
            async { Vec::new() }
        })
        .await
        .unwrap();
    // Queue b fails everything once: with max_attempts 1 it dead-letters.
    let b = m
        .create("b", &cfg, |b: Vec<Item<String>>| async move { b })
        .await
        .unwrap();
    assert!(matches!(
        m.create("a", &cfg, |_b: Vec<Item<u32>>| async { Vec::new() })
            .await,
        Err(ManagerError::Duplicate(_))
    ));
    for i in 0..10 {
        a.push(i).await.unwrap();
    }
    b.push("x".into()).await.unwrap();
    m.flush_all(LONG).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 10);

    let info = m.queues().await;
    assert_eq!(info.len(), 2);
    assert_eq!(
        (info[0].name.as_str(), info[0].backend),
        ("a", Backend::Memory)
    );
    assert_eq!(info[0].max_workers, 2);
    assert_eq!(info[0].length.unwrap().total(), 0);
    assert_eq!(info[1].max_workers, 3);
    assert_eq!(info[1].dead_letters, Some(1));
    assert_eq!(info[0].dead_letters, Some(0));

    m.resize("a", 7).unwrap();
    assert_eq!(a.max_workers(), 7);
    assert!(matches!(m.resize("zzz", 1), Err(ManagerError::NotFound(_))));

    m.resize("a", 0).unwrap();
    a.push(1).await.unwrap();
    a.push(2).await.unwrap();
    assert_eq!(m.remove_all("a").await.unwrap(), 2);
    assert_eq!(a.len().await.unwrap().total(), 0);

    m.shutdown_all(LONG).await;
    assert!(m.names().is_empty());
    assert!(a.push(3).await.is_err());
}

#[tokio::test]
async fn bad_config_is_reported_before_anything_opens() {
    let cfg: QueuesConfig = toml::from_str("[queues.a]\nbackend = \"nope\"").unwrap();
    let err = Manager::new()
        .create("a", &cfg, |_b: Vec<Item<u32>>| async { Vec::new() })
        .await
        .unwrap_err();
    match err {
        ManagerError::Config(e) => assert_eq!(e.field, "queues.a.backend"),
        other => panic!("{other:?}"),
    }
}

#[cfg(feature = "disk")]
#[tokio::test]
async fn disk_queues_share_a_store_and_keep_items_over_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let cfg: QueuesConfig = toml::from_str(&format!(
        "[defaults]\nbackend = \"disk\"\npath = {:?}\n[queues.b]\nmax_workers = 1",
        path.to_str().unwrap()
    ))
    .unwrap();
    let m = Manager::new();
    // Paused (max_workers 0 via resize) so items stay stored.
    let a = m
        .create("a", &cfg, |_b: Vec<Item<u32>>| async { Vec::new() })
        .await
        .unwrap();
    m.resize("a", 0).unwrap();
    let b = m
        .create("b", &cfg, |_b: Vec<Item<u32>>| async { Vec::new() })
        .await
        .unwrap();
    assert_eq!(b.backend(), Backend::Disk);
    for i in 0..5 {
        a.push(i).await.unwrap();
    }
    m.shutdown_all(Duration::from_secs(5)).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let a2 = m
        .create("a", &cfg, move |b: Vec<Item<u32>>| {
            for i in &b {
                tx.send(*i.value()).unwrap();
            }
            async { Vec::new() }
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(rx.recv().await.unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, [0, 1, 2, 3, 4]);
    m.shutdown_all(Duration::from_secs(5)).await;
    drop(a2);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_queue_from_config_when_available() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("REDIS_URL unset: skipping the Redis manager test");
        return;
    };
    let name = format!("snapstream-mgr-{}", std::process::id());
    let cfg: QueuesConfig = toml::from_str(&format!(
        "[defaults]\nbackend = \"redis\"\nconnection = {url:?}\nbatch_length = 4"
    ))
    .unwrap();
    let m = Manager::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let q = m
        .create(&name, &cfg, move |b: Vec<Item<u32>>| {
            for i in &b {
                tx.send(*i.value()).unwrap();
            }
            async { Vec::new() }
        })
        .await
        .unwrap();
    q.remove_all().await.unwrap();
    for i in 0..10 {
        q.push(i).await.unwrap();
    }
    q.flush(Duration::from_secs(30)).await.unwrap();
    let mut got = Vec::new();
    while let Ok(v) = rx.try_recv() {
        got.push(v);
    }
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    assert_eq!(m.queues().await[0].backend, Backend::Redis);
    m.shutdown_all(Duration::from_secs(5)).await;
}

/// A dead-letter record is several times larger than its item; the manager's
/// `<name>.dead` queue is sized so that an item at the base queue's
/// `max_item_bytes` still reaches it (instead of being retried for ever
/// because the dead-letter push is refused).
#[tokio::test(start_paused = true)]
async fn dead_letter_of_an_item_at_the_size_limit_fits() {
    // The default max_item_bytes (1 MiB) on the base and dead queues alike
    // would refuse the record (about 4 MiB).
    let cfg: QueuesConfig = toml::from_str(
        r#"
        [queues.big]
        max_attempts = 1
        "#,
    )
    .unwrap();
    let m = Manager::new();
    let q = m
        .create("big", &cfg, |b: Vec<Item<String>>| async move { b })
        .await
        .unwrap();
    let value = "x".repeat(1024 * 1024 - 2); // 1 MiB of JSON
    q.push(value.clone()).await.unwrap();
    q.flush(LONG).await.expect("dead-lettered, not retried");
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, serde_json::to_vec(&value).unwrap());
    assert_eq!(q.retries(), 0);
    m.shutdown_all(LONG).await;
}

/// `flush_all` waits for the queues' own pushes, `drain_all` / `drain` for
/// the base queues to run dry whoever pushed.
#[tokio::test(start_paused = true)]
async fn drain_all_waits_for_the_base_queues_flush_all_does_not() {
    let cfg = QueuesConfig::default();
    let m = Manager::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let q = m
        .create("a", &cfg, move |b: Vec<Item<u32>>| {
            s.lock().unwrap().extend(b.iter().map(|i| *i.value()));
            async { Vec::new() }
        })
        .await
        .unwrap();
    m.resize("a", 0).unwrap();
    for i in 0..5u32 {
        q.base()
            .push(
                snapstream::queue::NewItem::new(serde_json::to_vec(&i).unwrap()),
                LONG,
            )
            .await
            .unwrap();
    }
    m.flush_all(LONG).await.unwrap();
    m.flush("a", LONG).await.unwrap();
    assert!(seen.lock().unwrap().is_empty(), "flush did not wait");
    match m.drain("a", Duration::from_secs(1)).await {
        Err(ManagerError::Work { queue, .. }) => assert_eq!(queue, "a"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    m.resize("a", 2).unwrap();
    m.drain_all(LONG).await.unwrap();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert!(matches!(
        m.drain("nope", LONG).await,
        Err(ManagerError::NotFound(_))
    ));
    m.shutdown_all(LONG).await;
}
