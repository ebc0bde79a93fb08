//! The main demo: a state-replication service, end to end.
//!
//! A toy key-value store applies a steady stream of changes and publishes
//! each with an increasing index; hundreds of subscribers (per-key and
//! wildcard) materialize views from snapshot + live events (some read slowly,
//! some disconnect and resume); a keyed ordered worker pool applies per-key
//! side effects under a lease pool; a durable work queue delivers webhooks to
//! a flaky endpoint. At the end every view is checked against the store.
//! Remote subscribers (client-side views and reconnecting subscribers)
//! follow the store over gRPC on loopback, and are checked too.
//!
//! ```text
//! cargo run --release --features net --example replicate     # disk queue in a temp dir
//! cargo run --release --features net --example replicate -- --help
//! cargo run --release --features net --example replicate -- --data-dir /tmp/snapstream-demo-data
//! cargo run --release --features net,admin --example replicate -- --admin 127.0.0.1:8080
//! cargo run --release --features net,redis --example replicate -- --redis redis://127.0.0.1:6379
//! cargo run --release --features net --example replicate -- --serve 127.0.0.1:7000     # terminal 1
//! cargo run --release --features net --example replicate -- --connect 127.0.0.1:7000   # terminal 2
//! ```
//!
//! Exits with 0 when every view converged and no webhook was lost, 1 when
//! not (the verdict line says why), 2 when the demo could not start (a bad
//! flag, an unusable `--data-dir`, no Redis, `--serve` cannot bind,
//! `--connect` finds no server: stderr says why, with the causes), 130 when
//! interrupted by Ctrl-C (or SIGTERM) — after removing its temporary
//! directory or Redis queues, and saying what `--data-dir` keeps. A second
//! Ctrl-C exits at once, without cleaning up. `--serve` runs until Ctrl-C,
//! which is its normal end: it then prints its table and exits with 0.

mod demo;

use std::future::Future;

use clap::Parser;

#[tokio::main]
async fn main() {
    let cfg = demo::Config::parse();
    // Installed before anything is made, so no Ctrl-C escapes the clean-up.
    let stop = match interrupted() {
        Ok(stop) => stop,
        Err(e) => {
            eprint!("{}", demo::error_text(&e));
            std::process::exit(2);
        }
    };
    tokio::pin!(stop);
    if cfg.serve.is_some() {
        let serving = match demo::start_serving(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprint!("{}", demo::error_text(&e));
                std::process::exit(2);
            }
        };
        // The address on stdout, for scripts (`--serve 127.0.0.1:0`).
        println!("serving on {}", serving.local_addr());
        let report = serving.run(stop).await;
        print!("{}", report.summary());
        std::process::exit(if report.ok() { 0 } else { 1 });
    }
    if cfg.connect.is_some() {
        match demo::connect(cfg, stop).await {
            Ok(report) => {
                print!("{}", report.summary());
                std::process::exit(if report.ok() { 0 } else { 1 });
            }
            Err(demo::DemoError::Interrupted { .. }) => {
                eprintln!("replicate: interrupted");
                std::process::exit(130);
            }
            Err(e) => {
                eprint!("{}", demo::error_text(&e));
                std::process::exit(2);
            }
        }
    }
    let started = tokio::select! {
        started = demo::start(cfg) => started,
        // Dropping `start` removes a temporary directory it made; Redis
        // queues hold nothing before the first push.
        () = &mut stop => {
            eprintln!("replicate: interrupted while starting");
            std::process::exit(130);
        }
    };
    let result = match started {
        Ok(running) => running.finish(stop).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(report) => {
            print!("{}", report.summary());
            for line in &report.cleanup {
                eprintln!("replicate: {line}");
            }
            std::process::exit(if report.ok() { 0 } else { 1 });
        }
        Err(demo::DemoError::Interrupted { cleanup }) => {
            eprintln!("replicate: interrupted");
            for line in &cleanup {
                eprintln!("replicate: {line}");
            }
            std::process::exit(130);
        }
        Err(e) => {
            eprint!("{}", demo::error_text(&e));
            std::process::exit(2);
        }
    }
}

/// Completes on the first Ctrl-C (or SIGTERM); a second one exits at once.
fn interrupted() -> std::io::Result<impl Future<Output = ()>> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered here, not when first polled.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            let _ = tx.send(());
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            eprintln!("replicate: interrupted again: exiting without cleaning up");
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            let _ = tx.send(());
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("replicate: interrupted again: exiting without cleaning up");
                std::process::exit(130);
            }
        });
    }
    Ok(async move {
        if rx.await.is_err() {
            // No signal can arrive any more: never interrupted.
            std::future::pending::<()>().await;
        }
    })
}
