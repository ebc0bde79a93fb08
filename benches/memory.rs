//! Memory per retained event, measured by resident set size (RSS, from
//! `/proc/self/status`), never by requested bytes: allocator rounding and
//! headers count.
//!
//! Each case runs in a fresh child process (this same binary, re-run with
//! `SNAPSTREAM_MEMORY_CASE` set), reads its RSS, appends the events with one
//! reader parked at the start (it never reads), reads its RSS again and
//! prints the difference per event.
//!
//! Run: `cargo bench --bench memory` (5M events per case) or
//! `SNAPSTREAM_BENCH_QUICK=1 cargo bench --bench memory` (500k events; CI).
//!
//! Cases:
//! - `buffer`: a bare `EventBuffer<u64>`, one `append_one` per event;
//! - `publisher`: a `Publisher<u64>` with no lag limit and one subscriber that
//!   read its `EndOfSnapshot` and then stalls; events published one per call
//!   as `Event::new("t", key.clone(), index, value)` (the topic given as a
//!   `&str`, the key an `Arc<str>` made once);
//! - `tokio`: `tokio::sync::broadcast` with room for every event, for scale.

use std::process::Command;

use snapstream::buffer::EventBuffer;
use snapstream::event::{Event, Message};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

/// Resident set size in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// Appends `events` events with a stalled reader; returns RSS bytes added.
fn case(name: &str, events: u64) -> u64 {
    match name {
        "buffer" => {
            let before = rss();
            let mut w = EventBuffer::<u64>::new();
            let parked = w.head();
            for i in 0..events {
                w.append_one(i);
            }
            let after = rss();
            assert_eq!(parked.lag(), events, "the reader retains every event");
            after - before
        }
        "publisher" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut b = Publisher::<u64>::builder();
                b.lag_limit(None);
                b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
                    Ok(1)
                })
                .unwrap();
                let p = b.build();
                let key: std::sync::Arc<str> = "k".into();
                let mut sub = p
                    .subscribe(SubscribeRequest::new("t", key.clone()))
                    .unwrap();
                match sub.next().await {
                    Ok(Message::EndOfSnapshot { .. }) => {}
                    other => panic!("expected EndOfSnapshot, got {other:?}"),
                }
                let before = rss();
                for i in 0..events {
                    p.publish(vec![Event::new("t", key.clone(), i + 2, i)])
                        .unwrap();
                }
                let after = rss();
                // The stalled subscriber still gets everything, in order.
                let mut next = 0;
                while next < events.min(1000) {
                    let Ok(Message::Events(batch)) = sub.next().await else {
                        panic!("expected events");
                    };
                    for e in batch.iter() {
                        assert_eq!(*e.payload(), next, "lost or reordered");
                        next += 1;
                    }
                }
                after - before
            })
        }
        "tokio" => {
            // Measured from before the channel: its ring is allocated (and
            // written) up front.
            let before = rss();
            let (tx, parked) = tokio::sync::broadcast::channel::<u64>(events as usize);
            for i in 0..events {
                let _ = tx.send(i);
            }
            let after = rss();
            assert_eq!(parked.len() as u64, events);
            after - before
        }
        other => panic!("unknown case {other}"),
    }
}

fn main() {
    let quick = std::env::var_os("SNAPSTREAM_BENCH_QUICK").is_some();
    let events: u64 = if quick { 500_000 } else { 5_000_000 };
    if let Ok(name) = std::env::var("SNAPSTREAM_MEMORY_CASE") {
        println!("{}", case(&name, events));
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    println!("# memory: RSS per retained event, one reader parked at the start");
    println!("{events} u64 events, one per append/publish, each case in a fresh child process\n");
    println!("| case | RSS B/event | target | met |");
    println!("|---|---:|---:|---|");
    let mut all_met = true;
    for (name, label, target) in [
        ("buffer", "bare EventBuffer<u64>", Some(24.0)),
        (
            "publisher",
            "Publisher<u64>, no lag limit, stalled subscriber",
            Some(64.0),
        ),
        ("tokio", "tokio broadcast (capacity = events)", None),
    ] {
        let out = Command::new(&exe)
            .env("SNAPSTREAM_MEMORY_CASE", name)
            .output()
            .expect("run the child case");
        assert!(
            out.status.success(),
            "case {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the child prints its RSS growth");
        let per_event = bytes as f64 / events as f64;
        let (target_s, met_s) = match target {
            Some(t) => {
                let met = per_event <= t;
                all_met &= met;
                (format!("≤ {t:.0}"), if met { "yes" } else { "**no**" })
            }
            None => ("—".to_string(), "—"),
        };
        println!("| {label} | {per_event:.1} | {target_s} | {met_s} |");
    }
    println!(
        "\ntargets: {}",
        if all_met { "all met" } else { "NOT all met" }
    );
}
