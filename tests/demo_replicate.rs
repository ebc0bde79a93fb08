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
