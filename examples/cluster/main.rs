//! The cluster demo: several snapstream nodes in one machine fed from one
//! NATS JetStream log, remote clients spread over them (each given every
//! node's address), one node killed mid-run. It prints, per node, the events
//! applied and its subscribers before and after the kill; per client, whether
//! it failed over, how many events and snapshots it got, and whether its view
//! converged — checked key by key against the writer's state.
//!
//! ```text
//! cargo run --release --features jetstream,net --example cluster -- --nodes 3
//! NATS_URL=nats://10.0.0.5:4222 cargo run --release --features jetstream,net --example cluster
//! cargo run --release --features jetstream,net --example cluster -- --help
//! ```
//!
//! Exits with 0 when every view converged and every client of the killed
//! node failed over, 1 when not, 2 when it could not run (no NATS, …).

mod demo;

use clap::Parser;

#[tokio::main]
async fn main() {
    let config = demo::Config::parse();
    match demo::run(config).await {
        Ok(report) => {
            println!("{}", report.summary());
            std::process::exit(if report.ok() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("cluster demo could not run: {e}");
            std::process::exit(2);
        }
    }
}
