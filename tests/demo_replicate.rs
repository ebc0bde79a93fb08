//! The main demo (`examples/replicate`) in its short mode: it must report
//! that every view converged and no webhook was lost — and its check must be
//! able to fail.
//!
//! The demo's engine is included from the example's source, so this test
//! runs exactly the code `cargo run --example replicate` runs, in process,
//! from a fresh clone, without a nested cargo.

#[path = "../examples/replicate/demo.rs"]
mod demo;

use clap::Parser;

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
    assert!(summary.contains("verdict: FAILED"));
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
    assert!(stdout.contains("verdict: FAILED"), "{stdout}");
}
