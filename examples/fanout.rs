//! Fan-out demo of the core buffer: one writer, many readers reading at their
//! own pace, one of them joining late through a spliced snapshot.
//!
//! `cargo run --release --example fanout [readers] [events]`

use std::time::Instant;

use snapstream::buffer::{EventBuffer, ReadError};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let readers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let events: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);

    let mut live: EventBuffer<u64, String> = EventBuffer::new();
    let mut tasks = Vec::with_capacity(readers);
    for id in 0..readers {
        let mut cursor = live.head();
        tasks.push(tokio::spawn(async move {
            let (mut count, mut sum, mut batches) = (0u64, 0u64, 0u64);
            loop {
                match cursor.next().await {
                    Ok(batch) => {
                        batches += 1;
                        for v in batch {
                            count += 1;
                            sum = sum.wrapping_add(*v);
                        }
                        // Every 97th reader is slow: it yields after each batch.
                        if id % 97 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(ReadError::Failed(reason)) => return (count, sum, batches, reason.clone()),
                    Err(ReadError::Closed) => return (count, sum, batches, "closed".into()),
                }
            }
        }));
    }

    // A late joiner: a snapshot of the first half, spliced onto the live
    // position taken before the snapshot was built.
    let half = events / 2;
    let start = Instant::now();
    let mut published = 0u64;
    let mut late = None;
    while published < events {
        let n = 16.min(events - published);
        live.append((published..published + n).collect());
        published += n;
        if late.is_none() && published >= half {
            let position = live.head();
            let mut snapshot: EventBuffer<u64, String> = EventBuffer::new();
            let reader = snapshot.head();
            snapshot.append((0..published).collect());
            snapshot
                .splice(&position)
                .expect("snapshot is newer than live");
            late = Some(tokio::spawn(async move {
                let mut cursor = reader;
                let (mut count, mut sum) = (0u64, 0u64);
                while let Ok(batch) = cursor.next().await {
                    count += batch.len() as u64;
                    sum = batch.iter().fold(sum, |s, v| s.wrapping_add(*v));
                }
                (count, sum)
            }));
        }
        if published.is_multiple_of(4096) {
            tokio::task::yield_now().await;
        }
    }
    let publish_time = start.elapsed();
    live.fail("end of demo".to_string());

    let expected_sum = events * (events - 1) / 2;
    let mut ok = 0;
    let mut total_batches = 0;
    for t in tasks {
        let (count, sum, batches, reason) = t.await.expect("reader task");
        total_batches += batches;
        if count == events && sum == expected_sum && reason == "end of demo" {
            ok += 1;
        }
    }
    let (late_count, late_sum) = late.expect("late joiner").await.expect("late task");
    let elapsed = start.elapsed();
    let deliveries = events * readers as u64;
    println!("snapstream fan-out demo");
    println!("  readers                 {readers}");
    println!("  events published        {events} (in batches of 16)");
    println!("  publish time            {publish_time:?}");
    println!(
        "  deliveries              {deliveries} in {elapsed:?} ({:.1} M/s)",
        deliveries as f64 / elapsed.as_secs_f64() / 1e6
    );
    println!(
        "  batches per reader      {:.0}",
        total_batches as f64 / readers as f64
    );
    println!("  readers complete        {ok}/{readers} (every event once, in order, then the terminal error)");
    println!(
        "  late joiner             {late_count} events via snapshot + live, sum {}",
        if late_sum == expected_sum {
            "correct"
        } else {
            "WRONG"
        }
    );
    let all_ok = ok == readers && late_count == events && late_sum == expected_sum;
    println!(
        "  result                  {}",
        if all_ok { "OK" } else { "FAILED" }
    );
    if !all_ok {
        std::process::exit(1);
    }
}
