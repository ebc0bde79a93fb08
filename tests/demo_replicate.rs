//! The main demo (`examples/replicate`) in its short mode: it must report
//! that every view converged and no webhook was lost — and its check must be
//! able to fail, and say why. Its flags are checked (bad ones exit 2 with
//! the flag named), Ctrl-C cleans up, and a rerun on a `--data-dir` checks
//! what the earlier run left.
//!
//! The demo's engine is included from the example's source, so this test
//! runs exactly the code `cargo run --example replicate` runs, in process,
//! from a fresh clone, without a nested cargo.

#[path = "../examples/replicate/demo.rs"]
mod demo;

use std::path::Path;

use clap::Parser;
use snapstream::queue::disk::DiskStore;
use snapstream::queue::{BaseQueue, NewItem, QueueOptions};

/// The value of the summary table's row `name`.
fn row<'a>(summary: &'a str, name: &str) -> &'a str {
    summary
        .lines()
        .find_map(|l| l.strip_prefix(name).filter(|v| v.starts_with("  ")))
        .unwrap_or_else(|| panic!("no {name:?} row in {summary}"))
        .trim()
}

fn config(args: &[&str]) -> demo::Config {
    let mut argv = vec!["replicate", "--quick"];
    argv.extend_from_slice(args);
    demo::Config::parse_from(argv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_converges_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let report = demo::run(config(&["--data-dir", data_dir])).await.unwrap();
    let summary = report.summary();
    println!("{summary}");
    assert!(report.ok(), "{summary}");
    assert!(summary.contains("all views converged"));
    assert!(summary.contains("verdict: OK"));
    assert!(report.published > 0);
    assert!(report.deliveries > 0);
    assert_eq!(report.views.0, 40, "every subscriber converged");
    // The remote subscribers, over loopback gRPC, reported apart.
    let remote = report.remote.as_ref().expect("remote subscribers ran");
    assert_eq!(remote.subscribers, (20, 13, 4, 3), "{summary}");
    assert_eq!(remote.views, (20, Vec::new()), "{summary}");
    assert!(remote.deliveries > 0, "{summary}");
    assert!(remote.latency.1.is_some(), "{summary}");
    let (reconnects, live, snapshot, restarted, _) = remote.reconnects;
    assert!(reconnects > 0, "{summary}");
    // A resume not yet classified (no message after it) when the run ended counts in none.
    assert!(live + snapshot + restarted <= reconnects, "{summary}");
    assert!(
        live > 0,
        "a reconnect resumed without a snapshot: {summary}"
    );
    for row in [
        "remote subscribers",
        "remote deliveries",
        "remote latency p50 / p99",
        "remote reconnects",
    ] {
        assert!(summary.contains(row), "no {row:?} row: {summary}");
    }
    assert_eq!(
        row(&summary, "remote views converged"),
        "yes (20/20, checked key by key against the store)"
    );
    assert_eq!(report.webhooks.lost, 0);
    assert!(report.webhooks.pushed > 0, "webhooks were made");
    assert!(
        report.webhooks.dead_poison > 0,
        "poison webhooks were dead-lettered"
    );
    // The disk queue file lives in the directory it was given.
    assert!(dir.path().join("webhooks.redb").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_reports_a_broken_view() {
    let report = demo::run(config(&["--backend", "memory", "--break-a-view"]))
        .await
        .unwrap();
    let summary = report.summary();
    assert!(!report.ok(), "{summary}");
    assert_eq!(report.views.1.len(), 1, "{summary}");
    assert!(summary.contains("all views converged"));
    // The verdict line says why.
    let verdict = summary.lines().last().unwrap();
    assert!(
        verdict.starts_with("verdict: FAILED - 1 of 40 views did not converge"),
        "{verdict}"
    );
    assert!(verdict.contains("view differs from the store"), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_reports_a_broken_remote_view() {
    let report = demo::run(config(&["--backend", "memory", "--break-a-remote-view"]))
        .await
        .unwrap();
    let summary = report.summary();
    assert!(!report.ok(), "{summary}");
    assert!(
        report.views.1.is_empty(),
        "the local views converged: {summary}"
    );
    let remote = report.remote.as_ref().unwrap();
    assert_eq!(remote.views.0, 19, "{summary}");
    assert_eq!(remote.views.1.len(), 1, "{summary}");
    assert!(
        row(&summary, "remote views converged").starts_with("NO (19/20"),
        "{summary}"
    );
    let verdict = summary.lines().last().unwrap();
    assert!(
        verdict.starts_with("verdict: FAILED - 1 of 20 remote views did not converge"),
        "{verdict}"
    );
    assert!(verdict.contains("view differs from the store"), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_without_remote_subscribers() {
    let report = demo::run(config(&["--backend", "memory", "--remote", "0"]))
        .await
        .unwrap();
    let summary = report.summary();
    assert!(report.ok(), "{summary}");
    assert!(report.remote.is_none());
    assert!(!summary.contains("remote"), "{summary}");
}

// ---------------------------------------------------------------------------
// --serve and --connect

/// A `--serve` run on a free port, its address, and the sender that stops it.
async fn serving(
    args: &[&str],
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<demo::ServeReport>,
) {
    let mut argv = vec!["--serve", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let serving = demo::start_serving(config(&argv)).await.unwrap();
    let addr = serving.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(serving.run(async move {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_connect_checks_views_against_a_serve_run() {
    let (addr, stop, served) = serving(&[]).await;
    let addr = addr.to_string();
    let report = demo::connect(config(&["--connect", &addr]), std::future::pending())
        .await
        .unwrap();
    let summary = report.summary();
    println!("{summary}");
    assert!(report.ok(), "{summary}");
    assert!(report.final_index.is_some_and(|i| i > 16), "{summary}");
    assert_eq!(report.remote.views, (20, Vec::new()), "{summary}");
    assert!(report.remote.deliveries > 0, "{summary}");
    assert_eq!(
        row(&summary, "remote views converged"),
        "yes (20/20, checked key by key against the store read over the network)"
    );
    assert!(summary.contains("verdict: OK - every remote view converged"));
    stop.send(()).unwrap();
    let served = served.await.unwrap();
    assert!(served.ok(), "{}", served.summary());
    assert_eq!(served.final_index, report.final_index.unwrap());
    // 16 keys, then one index per change.
    assert_eq!(served.final_index, served.published + 16);
}

#[tokio::test]
async fn demo_replicate_connect_names_a_refused_connection() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let e = demo::connect(config(&["--connect", &addr]), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            demo::DemoError::Connect(demo::remote::ConnectError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
        ),
        "{e:?}"
    );
    let text = demo::error_text(&e);
    assert!(
        text.contains(&format!("--connect {addr}: cannot connect")),
        "{text}"
    );
    assert!(text.contains("caused by: Connection refused"), "{text}");
}

#[tokio::test]
async fn demo_replicate_connect_names_a_bad_address() {
    let e = demo::connect(
        config(&["--connect", "no such host:1"]),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &e,
            demo::DemoError::Connect(demo::remote::ConnectError::BadAddress { .. })
        ),
        "{e:?}"
    );
    let e = demo::connect(
        config(&["--connect", "host.invalid:7000"]),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &e,
            demo::DemoError::Connect(demo::remote::ConnectError::Resolve { .. })
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_serve_names_an_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    match demo::start_serving(config(&["--serve", &addr])).await {
        Ok(_) => panic!("served on an address in use"),
        Err(e) => {
            assert!(matches!(e, demo::DemoError::Serve { .. }), "{e:?}");
            let text = demo::error_text(&e);
            assert!(
                text.contains(&format!("--serve {addr}: cannot serve there")),
                "{text}"
            );
            assert!(text.contains("caused by: "), "{text}");
        }
    }
}

#[test]
fn demo_replicate_serve_and_connect_flags_are_checked() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["replicate"];
        argv.extend_from_slice(args);
        demo::Config::try_parse_from(argv)
    };
    assert!(parse(&["--serve", "not-an-address"]).is_err());
    assert!(parse(&["--serve", "127.0.0.1:0", "--connect", "127.0.0.1:1"]).is_err());
    assert!(parse(&["--connect", "127.0.0.1:1", "--data-dir", "/tmp/x"]).is_err());
    let zero = parse(&["--connect", "127.0.0.1:1", "--remote", "0"]).unwrap();
    assert!(matches!(
        zero.validate(),
        Err(demo::ConfigError::Zero { flag: "remote", .. })
    ));
}

/// Runs against Redis when `REDIS_URL` is set (CI sets it) and answers.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_converges_on_redis() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("REDIS_URL is unset: skipping the Redis run of the demo");
        return;
    };
    let report = match demo::run(config(&["--redis", &url])).await {
        Ok(r) => r,
        Err(e) => panic!("REDIS_URL is set but the demo could not use it: {e}"),
    };
    let summary = report.summary();
    assert!(report.ok(), "{summary}");
    assert!(summary.contains("redis"));
    assert_eq!(report.webhooks.lost, 0);
}

/// The newest modification time of the files under `dir`.
fn newest_source(dir: &std::path::Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_source(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

/// The example binary `cargo test` built next to this test, if it is there
/// and newer than every source file (a `cargo test --test demo_replicate`
/// alone does not build examples).
fn fresh_example_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir
        .join("examples")
        .join(format!("replicate{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&bin).ok()?.modified().ok()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = newest_source(&root.join("src")).max(newest_source(&root.join("examples")));
    (built >= sources).then_some(bin)
}

/// The binary's exit status says the verdict: 0 converged, 1 not.
#[test]
fn demo_replicate_binary_exit_status() {
    let Some(bin) = fresh_example_binary() else {
        eprintln!("the replicate example is not built (or stale): skipping its exit-status check");
        return;
    };
    let run = |extra: &[&str]| {
        std::process::Command::new(&bin)
            .args(["--quick", "--backend", "memory"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&[]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("verdict: OK"), "{stdout}");
    let broken = run(&["--break-a-view"]);
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert_eq!(broken.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("verdict: FAILED - 1 of 40 views did not converge"),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------
// Flags

/// `demo::start`'s error, which must be one (`Running` has no `Debug`).
async fn start_error(args: &[&str]) -> demo::DemoError {
    match demo::start(config(args)).await {
        Ok(_) => panic!("the demo started with {args:?}"),
        Err(e) => e,
    }
}

/// Counts of 0 used to become 1 silently (and `--lag-limit 0` thrashed).
#[tokio::test]
async fn demo_replicate_rejects_zero_counts() {
    for flag in [
        "workers",
        "nodes",
        "leases-per-node",
        "keys",
        "rate",
        "lag-limit",
    ] {
        let arg = format!("--{flag}");
        let e = start_error(&[&arg, "0"]).await;
        match &e {
            demo::DemoError::Config(demo::ConfigError::Zero { flag: f, .. }) => {
                assert_eq!(*f, flag)
            }
            other => panic!("--{flag} 0: {other:?}"),
        }
        assert!(
            e.to_string().starts_with(&format!("invalid --{flag} 0: ")),
            "{e}"
        );
    }
}

/// `--duration inf` used to panic; negative and NaN durations are refused too.
#[tokio::test]
async fn demo_replicate_rejects_a_duration_out_of_range() {
    for d in ["inf", "NaN", "-1", "1e30"] {
        let arg = format!("--duration={d}");
        let e = start_error(&[&arg]).await;
        assert!(
            matches!(e, demo::DemoError::Config(demo::ConfigError::Duration(_))),
            "{d}: {e:?}"
        );
        assert!(e.to_string().starts_with("invalid --duration "), "{e}");
    }
    let e = start_error(&["--rate", "1000000000"]).await;
    assert!(e.to_string().contains("--rate 1000000000"), "{e}");
}

/// A `--data-dir` that is a file used to say only "File exists (os error 17)".
#[tokio::test]
async fn demo_replicate_names_a_data_dir_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let e = start_error(&["--data-dir", file.to_str().unwrap()]).await;
    assert!(
        matches!(&e, demo::DemoError::DataDirNotADirectory(p) if *p == file),
        "{e:?}"
    );
    let text = demo::error_text(&e);
    assert!(text.contains(file.to_str().unwrap()), "{text}");
    assert!(text.contains("not a directory"), "{text}");
}

/// An error exit prints the error and each of its causes.
#[tokio::test]
async fn demo_replicate_error_prints_its_cause_chain() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let under = file.join("data");
    let e = start_error(&["--data-dir", under.to_str().unwrap()]).await;
    let text = demo::error_text(&e);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("replicate: --data-dir "), "{text}");
    assert!(lines[0].contains(under.to_str().unwrap()), "{text}");
    // The file system's own words, as the cause.
    let io = std::fs::create_dir_all(&under).unwrap_err();
    assert_eq!(lines[1], format!("  caused by: {io}"), "{text}");
}

/// `--data-dir` with a backend that would ignore it.
#[tokio::test]
async fn demo_replicate_rejects_a_data_dir_it_would_ignore() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let e = start_error(&["--backend", "memory", "--data-dir", data_dir]).await;
    assert!(
        matches!(
            e,
            demo::DemoError::Config(demo::ConfigError::DataDirUnused(_))
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------
// Ctrl-C

/// Interrupted (as Ctrl-C does in the binary), the run removes its
/// temporary directory. It used to leave it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_interrupted_removes_its_temporary_directory() {
    let running = demo::start(config(&[])).await.unwrap();
    let dir = running
        .temp_dir()
        .expect("a temporary directory")
        .to_owned();
    assert!(dir.join("webhooks.redb").exists());
    // `finish` polls the run first, so it is under way when this stops it.
    match running.finish(std::future::ready(())).await {
        Err(demo::DemoError::Interrupted { cleanup }) => {
            let said = format!("removed the temporary directory {}", dir.display());
            assert_eq!(cleanup, [said]);
        }
        Err(e) => panic!("{e}"),
        Ok(report) => panic!("not interrupted:\n{}", report.summary()),
    }
    assert!(!dir.exists(), "{} is still there", dir.display());
}

/// Interrupted with `--data-dir`, the run keeps the directory and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_interrupted_keeps_the_data_dir_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let running = demo::start(config(&["--data-dir", data_dir]))
        .await
        .unwrap();
    assert!(running.temp_dir().is_none());
    match running.finish(std::future::ready(())).await {
        Err(demo::DemoError::Interrupted { cleanup }) => {
            assert_eq!(cleanup.len(), 1, "{cleanup:?}");
            let file = dir.path().join("webhooks.redb");
            assert!(
                cleanup[0].starts_with(&format!("kept {}: ", file.display())),
                "{cleanup:?}"
            );
            assert!(cleanup[0].contains("dead letters"), "{cleanup:?}");
        }
        Err(e) => panic!("{e}"),
        Ok(report) => panic!("not interrupted:\n{}", report.summary()),
    }
    assert!(dir.path().join("webhooks.redb").exists());
}

/// Interrupted on Redis, the run deletes its queues. It used to leave them.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_interrupted_deletes_its_redis_queues() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("REDIS_URL is unset: skipping the Redis clean-up check of the demo");
        return;
    };
    let running = match demo::start(config(&["--redis", &url])).await {
        Ok(r) => r,
        Err(e) => panic!("REDIS_URL is set but the demo could not use it: {e}"),
    };
    let names = running.redis_queues();
    assert_eq!(names.len(), 2);
    // Give both queues keys on the server, as a run's pushes would.
    for name in &names {
        let q = snapstream::queue::redis::RedisQueue::connect(
            &url,
            name.clone(),
            QueueOptions::default(),
        )
        .await
        .unwrap();
        q.push(NewItem::new("{}"), std::time::Duration::ZERO)
            .await
            .unwrap();
    }
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = |name: &str| format!("snapstream:{{{name}}}:*");
    for name in &names {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(keys(name))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(!found.is_empty(), "no keys of {name}");
    }
    match running.finish(std::future::ready(())).await {
        Err(demo::DemoError::Interrupted { cleanup }) => {
            let said = format!("deleted the Redis queues {} and {}", names[0], names[1]);
            assert_eq!(cleanup, [said]);
        }
        Err(e) => panic!("{e}"),
        Ok(report) => panic!("not interrupted:\n{}", report.summary()),
    }
    for name in &names {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(keys(name))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(found, Vec::<String>::new(), "keys of {name} left behind");
    }
}

// ---------------------------------------------------------------------------
// The verdict says why

/// A report of a run where everything held (each test then breaks one part).
fn good_report() -> demo::Report {
    let mut r = demo::Report {
        views: (40, Vec::new()),
        side_effects: (100, 0, true),
        leases: (2, 2, 0),
        ..demo::Report::default()
    };
    r.webhooks.pushed = 10;
    r.webhooks.delivered = 10;
    r.webhooks.left = Some(0);
    r
}

fn verdict(report: &demo::Report) -> String {
    let summary = report.summary();
    summary.lines().last().unwrap().to_string()
}

#[test]
fn demo_replicate_verdict_names_failed_pushes() {
    let mut r = good_report();
    assert_eq!(
        verdict(&r),
        "verdict: OK - every view converged, nothing lost"
    );
    r.backend = Some(demo::BackendKind::Redis);
    r.webhooks.push_failed = 2216;
    r.webhooks.push_error = Some("queue backend failed: Connection refused".into());
    assert!(!r.ok());
    assert_eq!(
        verdict(&r),
        "verdict: FAILED - 2,216 failed pushes (queue backend failed: Connection refused)"
    );
}

#[test]
fn demo_replicate_verdict_says_where_lost_webhooks_went() {
    let mut r = good_report();
    r.backend = Some(demo::BackendKind::Redis);
    r.webhooks.lost = 132;
    assert_eq!(
        verdict(&r),
        "verdict: FAILED - 132 lost: the server dropped them"
    );
    r.backend = Some(demo::BackendKind::Disk);
    r.webhooks.left = Some(132);
    r.webhooks.flush_error = Some("timed out with 132 items pending".into());
    assert_eq!(
        verdict(&r),
        "verdict: FAILED - 132 lost: still queued when waiting gave up \
         (timed out with 132 items pending)"
    );
    r.webhooks.left = Some(32);
    assert!(
        verdict(&r).ends_with("100 gone (the queue file no longer holds them)"),
        "{}",
        verdict(&r)
    );
}

#[test]
fn demo_replicate_verdict_names_every_reason() {
    let mut r = good_report();
    r.side_effects = (100, 3, false);
    r.leases = (3, 2, 0);
    r.webhooks.earlier = demo::EarlierFigures {
        found: 24,
        delivered: 20,
        dead_lettered: 1,
        lost: 3,
    };
    r.errors.push("work queue flush: timed out".into());
    let v = verdict(&r);
    for reason in [
        "3 side effects ran out of order",
        "the keyed pool's replica differs from the store",
        "a node ran 3 side effects at once (target 2)",
        "3 of the 24 webhooks earlier runs left were neither delivered nor dead-lettered",
        "work queue flush: timed out",
    ] {
        assert!(v.contains(reason), "{reason:?} missing from {v}");
    }
    assert_eq!(r.failures().len(), 5);
}

// ---------------------------------------------------------------------------
// The crash walk-through's rerun

/// A webhook as an earlier run of the demo pushed it.
fn earlier_webhook(seq: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "run": 42, "seq": seq, "key": "svc-0000", "index": seq * 8, "value": 1
    }))
    .unwrap()
}

/// What a run killed mid-way leaves: webhooks queued (two of them handed out
/// and never acknowledged) and dead letters.
fn seed_earlier_run(dir: &Path, webhooks: u64, dead_letters: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = DiskStore::open(dir.join("webhooks.redb")).unwrap();
        let base = store.queue("webhooks", QueueOptions::default()).unwrap();
        let dead = store
            .queue("webhooks.dead", QueueOptions::default())
            .unwrap();
        for seq in 0..webhooks {
            let item = NewItem::new(earlier_webhook(seq));
            base.push(item, std::time::Duration::ZERO).await.unwrap();
        }
        let handed_out = base.pop(2, std::time::Duration::ZERO).await.unwrap();
        assert_eq!(handed_out.len(), 2);
        for i in 0..dead_letters {
            let item = NewItem::new(format!("dead letter {i} of an earlier run"));
            dead.push(item, std::time::Duration::ZERO).await.unwrap();
        }
    });
}

/// The rerun of the crash walk-through delivers (or dead-letters) every
/// webhook the earlier run left, checks each, and says that the dead letters
/// it found are kept from earlier runs. They used to be acknowledged unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_rerun_checks_what_an_earlier_run_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    // Sequence number 7 is a poison webhook: it is dead-lettered.
    tokio::task::spawn_blocking(move || seed_earlier_run(&path, 10, 3))
        .await
        .unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let report = demo::run(config(&["--data-dir", data_dir])).await.unwrap();
    let summary = report.summary();
    println!("{summary}");
    assert!(report.ok(), "{summary}");
    assert_eq!(
        report.webhooks.earlier,
        demo::EarlierFigures {
            found: 10,
            delivered: 9,
            dead_lettered: 1,
            lost: 0
        },
        "{summary}"
    );
    assert_eq!(report.webhooks.dead_kept, 3);
    assert!(
        summary.contains("10 found at start, each checked: 9 delivered, 1 dead-lettered, 0 lost"),
        "{summary}"
    );
    assert!(
        summary.contains("3 from earlier runs, still stored"),
        "{summary}"
    );
    assert!(
        report.cleanup[0].contains("0 webhooks queued"),
        "{:?}",
        report.cleanup
    );
}

// ---------------------------------------------------------------------------
// The binary

#[test]
fn demo_replicate_binary_rejects_bad_flags() {
    let Some(bin) = fresh_example_binary() else {
        eprintln!("the replicate example is not built (or stale): skipping its flag checks");
        return;
    };
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(["--quick"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for flag in [
        "--workers",
        "--nodes",
        "--leases-per-node",
        "--keys",
        "--rate",
        "--lag-limit",
    ] {
        let (code, stderr) = run(&[flag, "0"]);
        assert_eq!(code, Some(2), "{flag} 0: {stderr}");
        assert!(stderr.contains(&format!("invalid {flag} 0: ")), "{stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let (code, stderr) = run(&["--data-dir", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    let under = file.join("data");
    let (code, stderr) = run(&["--data-dir", under.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(under.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("\n  caused by: "), "{stderr}");
}

/// Ctrl-C (SIGINT) removes the temporary directory, says so, and exits 130.
#[cfg(unix)]
#[test]
fn demo_replicate_binary_ctrl_c_removes_its_temporary_directory() {
    use std::io::{BufRead, BufReader, Read};
    let Some(bin) = fresh_example_binary() else {
        eprintln!("the replicate example is not built (or stale): skipping its Ctrl-C check");
        return;
    };
    // Long enough that the signal comes while the store is changing.
    let mut child = std::process::Command::new(&bin)
        .args(["--duration", "600", "--subscribers", "4", "--keys", "4"])
        .args(["--rate", "100", "--no-progress"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // The header names the directory once the queue is open in it.
    let mut header = String::new();
    stderr.read_line(&mut header).unwrap();
    let dir = header
        .split("work queue: disk, in ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(" (temporary)\n"))
        .unwrap_or_else(|| panic!("no temporary directory in {header:?}"));
    let dir = std::path::PathBuf::from(dir);
    assert!(dir.join("webhooks.redb").exists());
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("replicate: interrupted\n"), "{rest}");
    assert!(
        rest.contains(&format!(
            "removed the temporary directory {}",
            dir.display()
        )),
        "{rest}"
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
}

/// The two-terminal run: `--serve` prints its address and serves until
/// Ctrl-C (then exits 0); `--connect` checks its views against it and exits
/// 0; `--connect` to a port nothing listens on exits 2 and says why.
#[cfg(unix)]
#[test]
fn demo_replicate_binary_serve_and_connect() {
    use std::io::{BufRead, BufReader, Read};
    let Some(bin) = fresh_example_binary() else {
        eprintln!("the replicate example is not built (or stale): skipping its --serve check");
        return;
    };
    let mut server = std::process::Command::new(&bin)
        .args(["--quick", "--serve", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("serving on ")
        .map(str::trim)
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let client = std::process::Command::new(&bin)
        .args(["--quick", "--connect", &addr])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&client.stdout);
    assert_eq!(client.status.code(), Some(0), "{table}");
    assert!(
        row(&table, "remote views converged").starts_with("yes (20/20"),
        "{table}"
    );
    let kill = std::process::Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(server.wait().unwrap().code(), Some(0), "{rest}");
    assert!(
        rest.contains("verdict: OK - served until stopped"),
        "{rest}"
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = std::process::Command::new(&bin)
        .args(["--quick", "--connect", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(stderr.contains("caused by: Connection refused"), "{stderr}");
}
