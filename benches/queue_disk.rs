//! Raw disk base-queue throughput: push → pop → ack, full durability.
//!
//! Every push waits for its durable (fsync'd) group commit; consumers pop
//! `batch` items at a time and ack them (also durable). Reports items/s end
//! to end and push latency percentiles, for batch 1 and 64, next to a peer:
//! plain redb with one durable commit per push and one per pop+ack (what the
//! queue would cost without group commit). Runs interleaved in one process.
//!
//! `cargo bench --bench queue_disk`; `SNAPSTREAM_BENCH_QUICK=1` for a
//! seconds-long check run (tiny sizes; the numbers mean nothing).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use redb::{Database, ReadableTable, TableDefinition};
use snapstream::queue::disk::DiskStore;
use snapstream::queue::{BaseQueue, NewItem, QueueOptions};

/// Pushes in flight at once (each waits for its commit).
const IN_FLIGHT: usize = 256;
const CONSUMERS: usize = 4;
const PAYLOAD: usize = 16;

struct Row {
    name: String,
    items: usize,
    secs: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

async fn disk_run(items: usize, batch: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path().join("bench.redb")).unwrap();
    let q = Arc::new(store.queue("bench", QueueOptions::default()).unwrap());
    let received = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let q = Arc::clone(&q);
        let received = Arc::clone(&received);
        consumers.push(tokio::spawn(async move {
            while received.load(Ordering::Relaxed) < items {
                let got = q.pop(batch, Duration::from_millis(50)).await.unwrap();
                if got.is_empty() {
                    continue;
                }
                received.fetch_add(got.len(), Ordering::Relaxed);
                let ids: Vec<_> = got.iter().map(|d| d.id).collect();
                q.ack(&ids).await.unwrap();
            }
        }));
    }
    let producer = {
        let q = Arc::clone(&q);
        tokio::spawn(async move {
            futures::stream::iter(0..items)
                .map(|i| {
                    let q = Arc::clone(&q);
                    async move {
                        let mut payload = vec![0u8; PAYLOAD];
                        payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
                        let t = Instant::now();
                        q.push(NewItem::new(payload), Duration::from_secs(60))
                            .await
                            .unwrap();
                        t.elapsed()
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .collect::<Vec<Duration>>()
                .await
        })
    };
    let mut lat = producer.await.unwrap();
    for c in consumers {
        c.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(q.len().await.unwrap().total(), 0, "everything was acked");
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Row {
        name: format!("snapstream disk, batch {batch}"),
        items,
        secs,
        p50_us: Some(pct(0.50)),
        p99_us: Some(pct(0.99)),
    }
}

/// The peer: redb used directly, one durable commit per push and one per
/// pop + ack, single thread.
fn redb_naive(items: usize) -> Row {
    const T: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("items");
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("naive.redb")).unwrap();
    let payload = [7u8; PAYLOAD];
    let start = Instant::now();
    let mut lat = Vec::with_capacity(items);
    for i in 0..items as u64 {
        let t = Instant::now();
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(i, &payload[..]).unwrap();
        txn.commit().unwrap();
        lat.push(t.elapsed());
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(T).unwrap();
            let first = table.first().unwrap().map(|(k, _)| k.value());
            table.remove(first.unwrap()).unwrap();
        }
        txn.commit().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Row {
        name: "peer: redb, 1 commit per push + 1 per pop/ack".into(),
        items,
        secs,
        p50_us: Some(pct(0.50)),
        p99_us: Some(pct(0.99)),
    }
}

fn main() {
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let (items, naive_items, rounds) = if quick {
        (500, 50, 1)
    } else {
        (100_000, 1_000, 2)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for _ in 0..rounds {
        rows.push(redb_naive(naive_items));
        rows.push(rt.block_on(disk_run(items / 4, 1)));
        rows.push(rt.block_on(disk_run(items, 64)));
    }
    println!("| scenario | items | items/s | push p50 | push p99 |\n|---|---:|---:|---:|---:|");
    for r in &rows {
        let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0} µs", v));
        println!(
            "| {} | {} | {:.0} | {} | {} |",
            r.name,
            r.items,
            r.items as f64 / r.secs,
            us(r.p50_us),
            us(r.p99_us)
        );
    }
    if quick {
        println!("(quick mode: sizes too small for the numbers to mean anything)");
    }
}
