//! `replicate --admin ADDR` serves the admin page during the run and the
//! run still converges.

#[path = "../examples/replicate/demo.rs"]
#[allow(dead_code)] // the demo's helpers that only tests/demo_replicate.rs uses
mod demo;

use clap::Parser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicate_with_the_admin_page_converges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo::Config::parse_from([
        "replicate",
        "--quick",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
    ]);
    assert!(cfg.admin.is_some());
    let report = demo::run(cfg).await.unwrap();
    assert!(report.ok(), "{}", report.summary());
}

#[test]
fn a_bad_admin_address_is_refused_by_the_command_line() {
    let r = demo::Config::try_parse_from(["replicate", "--admin", "localhost"]);
    assert!(r.is_err());
}
