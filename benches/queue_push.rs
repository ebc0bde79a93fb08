//! Durable pushes through `WorkQueue` at 4 and 64 producer tasks, on disk and
//! on Redis, next to their floors and ceilings, in one run (issue #14, item 4).
//!
//! Every producer task awaits each push before the next one, so the only way
//! past one commit (or one round trip) per push is the backends' group commit:
//! pushes waiting at the same moment share one redb transaction (disk) or one
//! push script call (Redis). The work queue's workers run at the same time
//! (batches of 64, a no-op handler, 4 workers) and every item is handled and
//! acknowledged before a run ends.
//!
//! Two rates per row: **push** = items ÷ time until the last push returned
//! (each `Ok` is durable: disk committed with `fsync`; Redis the script
//! returned), **end to end** = items ÷ time until the last item was handled.
//! The targets (≥ 25 000 items/s with 4 producers, ≥ 50 000 with 64) are
//! checked on both.
//!
//! Peers, same run, interleaved round by round:
//! - disk: redb used directly, one durable commit per item (the floor), and
//!   one per 64 items (what a group of 64 costs at best);
//! - Redis: a plain `LPUSH` per item from the same number of tasks, each
//!   awaiting its reply on one shared connection, and one task sending
//!   pipelines of 256 `LPUSH`es (the ceiling of one round trip per group).
//!
//! Redis rows run against `REDIS_URL` (default 127.0.0.1:6379, skipped with a
//! notice when nothing answers), whose persistence settings are printed, and
//! against a `redis-server` the bench starts on its own port with
//! `appendonly yes, appendfsync everysec` (skipped with a notice when there is
//! no `redis-server` binary).
//!
//! ```text
//! cargo bench --features redis --bench queue_push
//! SNAPSTREAM_BENCH_QUICK=1 cargo bench --features redis --bench queue_push   # checks only
//! SNAPSTREAM_BENCH_FILTER=disk cargo bench ...   # the cases whose label contains "disk"
//! SNAPSTREAM_BENCH_FILTER='=WorkQueue disk, 4 producers, push' cargo bench ...   # that case only
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, TableDefinition};
use snapstream::queue::disk::DiskStore;
use snapstream::queue::redis::RedisQueue;
use snapstream::queue::{BaseQueue, Item, QueueOptions, WorkQueue, WorkQueueOptions};
use tokio::sync::Notify;

/// Items per `push_batch` call in the batch rows.
const PUSH_BATCH: usize = 256;
/// The targets, items/s, by producer count.
fn target(producers: usize) -> Option<f64> {
    match producers {
        4 => Some(25_000.0),
        64 => Some(50_000.0),
        _ => None,
    }
}

#[derive(Clone, Copy)]
struct Sample {
    push: f64,
    e2e: Option<f64>,
}

/// `producers` tasks push `n` items through a `WorkQueue` over `base`, one
/// awaited push at a time (or `push_batch` of [`PUSH_BATCH`] when `batch`).
async fn work_run(
    base: Arc<dyn BaseQueue>,
    dead: Arc<dyn BaseQueue>,
    producers: usize,
    n: usize,
    batch: bool,
) -> Sample {
    let per = n / producers;
    let n = per * producers;
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(Notify::new());
    let (h, a) = (Arc::clone(&handled), Arc::clone(&all));
    let opts = WorkQueueOptions::default()
        .batch_len(64)
        .batch_delay(Duration::from_millis(1))
        .push_timeout(Duration::from_secs(60));
    let q = WorkQueue::new(base, dead, opts, move |b: Vec<Item<u64>>| {
        if h.fetch_add(b.len(), Ordering::AcqRel) + b.len() == n {
            a.notify_one();
        }
        async { Vec::new() }
    })
    .unwrap();
    let finished = all.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let q = q.clone();
            tokio::spawn(async move {
                let first = (p * per) as u64;
                if batch {
                    let mut i = 0;
                    while i < per {
                        let k = PUSH_BATCH.min(per - i);
                        let values = (i..i + k).map(|j| first + j as u64).collect();
                        for r in q.push_batch(values).await {
                            r.expect("push_batch");
                        }
                        i += k;
                    }
                } else {
                    for j in 0..per {
                        q.push(first + j as u64).await.expect("push");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let pushed = start.elapsed();
    finished.await;
    let done = start.elapsed();
    assert_eq!(
        handled.load(Ordering::Acquire),
        n,
        "every item handled once"
    );
    q.shutdown(Duration::from_secs(10)).await;
    assert_eq!(q.len().await.unwrap().total(), 0, "every item acked");
    Sample {
        push: n as f64 / pushed.as_secs_f64(),
        e2e: Some(n as f64 / done.as_secs_f64()),
    }
}

/// redb used directly: one durable commit per `group` items, one thread,
/// for `n` items or one second, whichever ends first.
fn redb_direct(n: usize, group: usize) -> Sample {
    const T: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("items");
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("direct.redb")).unwrap();
    let payload = [7u8; 8];
    let start = Instant::now();
    let mut done = 0;
    while done < n && start.elapsed() < Duration::from_secs(1) {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for _ in 0..group {
                t.insert(done as u64, &payload[..]).unwrap();
                done += 1;
            }
        }
        txn.commit().unwrap();
    }
    Sample {
        push: done as f64 / start.elapsed().as_secs_f64(),
        e2e: None,
    }
}

/// A multiplexed connection with the response timeout `RedisQueue` uses
/// (10 s; the client's default is far shorter, and a loaded machine
/// exceeds it).
async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// `producers` tasks each awaiting one `LPUSH` at a time on one shared
/// (multiplexed) connection, `n` items in all.
async fn lpush_each(url: &str, key: &str, producers: usize, n: usize) -> Sample {
    let conn = connect(url).await;
    let per = n / producers;
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let (mut conn, key) = (conn.clone(), key.to_owned());
            tokio::spawn(async move {
                for i in 0..per {
                    let _: i64 = redis::cmd("LPUSH")
                        .arg(&key)
                        .arg(i as u64)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let mut conn = conn;
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    Sample {
        push: (per * producers) as f64 / secs,
        e2e: None,
    }
}

/// One task sending pipelines of 256 `LPUSH`es, `n` items in all.
async fn lpush_pipelined(url: &str, key: &str, n: usize) -> Sample {
    let mut conn = connect(url).await;
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = PUSH_BATCH.min(n - sent);
        let mut pipe = redis::pipe();
        for i in 0..k {
            pipe.cmd("LPUSH").arg(key).arg((sent + i) as u64).ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        sent += k;
    }
    let secs = start.elapsed().as_secs_f64();
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    Sample {
        push: n as f64 / secs,
        e2e: None,
    }
}

/// The persistence settings of the server at `url`, for the table.
async fn persistence(url: &str) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let get = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            let v: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            v.get(1).cloned().unwrap_or_else(|| "?".into())
        }
    };
    let aof = get("appendonly").await;
    let fsync = get("appendfsync").await;
    let save = get("save").await;
    let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    Some(format!(
        "appendonly {aof}{}, save \"{save}\"",
        if aof == "yes" {
            format!(", appendfsync {fsync}")
        } else {
            String::new()
        }
    ))
}

/// A `redis-server` this bench starts with AOF on; killed when dropped.
struct OwnServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_own_server() -> Option<OwnServer> {
    let path = std::env::var_os("PATH")?;
    let bin = std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file());
    let Some(bin) = bin else {
        println!("notice: no redis-server on PATH; skipping the appendfsync everysec rows");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let child = std::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let server = OwnServer {
        child,
        url: format!("redis://127.0.0.1:{port}"),
        _dir: dir,
    };
    for _ in 0..100 {
        if persistence(&server.url).await.is_some() {
            return Some(server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("notice: the bench's own redis-server did not answer; skipping its rows");
    None
}

#[derive(Clone)]
enum Case {
    RedbDirect {
        group: usize,
    },
    DiskWork {
        producers: usize,
        batch: bool,
    },
    Lpush {
        server: usize,
        producers: usize,
    },
    LpushPipelined {
        server: usize,
    },
    RedisWork {
        server: usize,
        producers: usize,
        batch: bool,
    },
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let rounds = if quick { 1 } else { 5 };
    let n_disk = if quick { 256 } else { 10_240 };
    let n_redis = if quick { 256 } else { 40_960 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path().join("bench.redb")).unwrap();
    let (servers, own) = rt.block_on(async {
        let url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let mut servers = Vec::new();
        match persistence(&url).await {
            Some(p) => servers.push((url, p)),
            None => println!("notice: nothing answers at {url} (REDIS_URL); skipping its rows"),
        }
        let own = start_own_server().await;
        if let Some(s) = &own {
            let p = persistence(&s.url).await.unwrap();
            servers.push((s.url.clone(), format!("{p} (started by the bench)")));
        }
        (servers, own)
    });

    let mut cases = vec![
        (
            "redb, one commit per item".to_owned(),
            Case::RedbDirect { group: 1 },
        ),
        (
            "redb, one commit per 64 items".to_owned(),
            Case::RedbDirect { group: 64 },
        ),
    ];
    for producers in [4, 64] {
        cases.push((
            format!("WorkQueue disk, {producers} producers, push"),
            Case::DiskWork {
                producers,
                batch: false,
            },
        ));
    }
    cases.push((
        format!("WorkQueue disk, 4 producers, push_batch of {PUSH_BATCH}"),
        Case::DiskWork {
            producers: 4,
            batch: true,
        },
    ));
    for (s, _) in servers.iter().enumerate() {
        let tag = if s == 0 { "redis A" } else { "redis B" };
        for producers in [4, 64] {
            cases.push((
                format!("{tag}: LPUSH per item, {producers} tasks"),
                Case::Lpush {
                    server: s,
                    producers,
                },
            ));
        }
        cases.push((
            format!("{tag}: pipelined LPUSH, {PUSH_BATCH} per round trip"),
            Case::LpushPipelined { server: s },
        ));
        for producers in [4, 64] {
            cases.push((
                format!("{tag}: WorkQueue, {producers} producers, push"),
                Case::RedisWork {
                    server: s,
                    producers,
                    batch: false,
                },
            ));
        }
        cases.push((
            format!("{tag}: WorkQueue, 4 producers, push_batch of {PUSH_BATCH}"),
            Case::RedisWork {
                server: s,
                producers: 4,
                batch: true,
            },
        ));
    }
    if let Ok(f) = std::env::var("SNAPSTREAM_BENCH_FILTER") {
        // `=label` keeps that one case; anything else, the cases containing it.
        match f.strip_prefix('=') {
            Some(exact) => cases.retain(|c| c.0 == exact),
            None => cases.retain(|c| c.0.contains(&f)),
        }
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); cases.len()];
    rt.block_on(async {
        for round in 0..rounds {
            for (idx, (_, case)) in cases.iter().enumerate() {
                let tag = format!("bench-push-{}-{round}-{idx}", std::process::id());
                let s = match case.clone() {
                    Case::RedbDirect { group } => {
                        tokio::task::spawn_blocking(move || redb_direct(n_disk, group))
                            .await
                            .unwrap()
                    }
                    Case::DiskWork { producers, batch } => {
                        let b = store.queue(&tag, QueueOptions::default()).unwrap();
                        let d = store
                            .queue(&format!("{tag}.dead"), QueueOptions::default())
                            .unwrap();
                        work_run(Arc::new(b), Arc::new(d), producers, n_disk, batch).await
                    }
                    Case::Lpush { server, producers } => {
                        lpush_each(&servers[server].0, &tag, producers, n_redis).await
                    }
                    Case::LpushPipelined { server } => {
                        lpush_pipelined(&servers[server].0, &tag, n_redis).await
                    }
                    Case::RedisWork {
                        server,
                        producers,
                        batch,
                    } => {
                        let url = &servers[server].0;
                        let b = RedisQueue::connect(url, tag.clone(), QueueOptions::default())
                            .await
                            .unwrap();
                        let d = RedisQueue::connect(
                            url,
                            format!("{tag}.dead"),
                            QueueOptions::default(),
                        )
                        .await
                        .unwrap();
                        let s = work_run(Arc::new(b), Arc::new(d), producers, n_redis, batch).await;
                        let b = RedisQueue::connect(url, tag.clone(), QueueOptions::default())
                            .await
                            .unwrap();
                        b.delete().await.unwrap();
                        s
                    }
                };
                samples[idx].push(s);
            }
        }
    });
    drop(own);

    println!();
    for (s, (url, p)) in servers.iter().enumerate() {
        println!("redis {}: {url}: {p}", if s == 0 { "A" } else { "B" });
    }
    println!(
        "disk: redb file in {} (fsync on every commit)",
        dir.path().display()
    );
    println!();
    println!("| case | push items/s (median of {rounds}) | end to end items/s | target | met |");
    println!("|---|---:|---:|---:|---|");
    for ((label, case), got) in cases.iter().zip(&samples) {
        let mut push: Vec<f64> = got.iter().map(|s| s.push).collect();
        let push = median(&mut push);
        let mut e2e: Vec<f64> = got.iter().filter_map(|s| s.e2e).collect();
        let e2e = (!e2e.is_empty()).then(|| median(&mut e2e));
        let producers = match case {
            Case::DiskWork {
                producers,
                batch: false,
            }
            | Case::RedisWork {
                producers,
                batch: false,
                ..
            } => Some(*producers),
            _ => None,
        };
        let (t, met) = match producers.and_then(target) {
            Some(t) => {
                let ok = |v: f64| if v >= t { "met" } else { "**not met**" };
                (
                    format!("≥ {t:.0}"),
                    format!("push {}, end to end {}", ok(push), e2e.map_or("-", ok)),
                )
            }
            None => ("".into(), "".into()),
        };
        println!(
            "| {label} | {push:.0} | {} | {t} | {met} |",
            e2e.map_or("".into(), |v| format!("{v:.0}"))
        );
    }
    if quick {
        println!("quick mode: sizes are tiny, numbers are not meaningful");
    }
}
