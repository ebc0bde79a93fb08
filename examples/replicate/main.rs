//! The main demo: a state-replication service, end to end.
//!
//! A toy key-value store applies a steady stream of changes and publishes
//! each with an increasing index; hundreds of subscribers (per-key and
//! wildcard) materialize views from snapshot + live events (some read slowly,
//! some disconnect and resume); a keyed ordered worker pool applies per-key
//! side effects under a lease pool; a durable work queue delivers webhooks to
//! a flaky endpoint. At the end every view is checked against the store.
//!
//! ```text
//! cargo run --release --example replicate                 # disk queue in a temp dir
//! cargo run --release --example replicate -- --help
//! cargo run --release --example replicate -- --data-dir ./demo-data
//! cargo run --release --features admin --example replicate -- --admin 127.0.0.1:8080
//! cargo run --release --features redis --example replicate -- --redis redis://127.0.0.1:6379
//! ```
//!
//! Exits with 0 when every view converged and no webhook was lost, 1 when
//! not, 2 when the demo could not start.

mod demo;

use clap::Parser;

#[tokio::main]
async fn main() {
    let cfg = demo::Config::parse();
    match demo::run(cfg).await {
        Ok(report) => {
            print!("{}", report.summary());
            std::process::exit(if report.ok() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("replicate: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            std::process::exit(2);
        }
    }
}
