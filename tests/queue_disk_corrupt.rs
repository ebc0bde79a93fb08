//! A damaged disk-queue file gives typed errors, never a panic, and
//! [`DiskStore::repair`] keeps every intact item.
//!
//! The files are damaged the way the issue reproduced it: 4 KiB of zeros
//! written over the middle of a file (`dd conv=notrunc`), both over a file
//! closed cleanly and over the image a killed process leaves behind.

#![cfg(feature = "disk")]

use std::path::Path;
use std::time::Duration;

use snapstream::queue::disk::{Damage, DiskError, DiskStore};
use snapstream::queue::{BaseQueue, NewItem, QueueOptions};

const T: Duration = Duration::from_secs(10);

/// What a file holds: `(queue, payload)`, one entry per stored item.
type Contents = Vec<(String, Vec<u8>)>;

/// Writes items into two queues (as the demo does: a queue and its dead
/// letters), acking some so the file has freed pages too. Returns what the
/// file holds, and, with `crash`, a copy of the file taken while the store
/// still has it open (what `kill -9` leaves).
async fn fill(path: &Path, crash: Option<&Path>) -> Contents {
    let store = DiskStore::open(path).unwrap();
    let main = store.queue("webhooks", QueueOptions::default()).unwrap();
    let dead = store
        .queue("webhooks.dead", QueueOptions::default())
        .unwrap();
    let mut contents = Vec::new();
    for i in 0..600u32 {
        let payload = format!("hook {i:05} {}", "x".repeat(i as usize % 300)).into_bytes();
        let item = if i % 7 == 0 {
            NewItem::with_key(payload.clone(), format!("key{}", i % 5))
        } else {
            NewItem::new(payload.clone())
        };
        main.push(item, T).await.unwrap();
        contents.push(("webhooks".to_owned(), payload));
        if i % 25 == 0 {
            let payload = format!("dead {i}").into_bytes();
            dead.push(NewItem::new(payload.clone()), T).await.unwrap();
            contents.push(("webhooks.dead".to_owned(), payload));
        }
    }
    // Ack a third of the main queue (the oldest ready items).
    let got = main.pop(200, T).await.unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.id).collect();
    main.ack(&ids).await.unwrap();
    for d in &got {
        let at = contents
            .iter()
            .position(|(q, p)| q == "webhooks" && *p == d.payload)
            .unwrap();
        contents.remove(at);
    }
    if let Some(copy) = crash {
        // Every write above was acknowledged, so it is in the file now.
        std::fs::copy(path, copy).unwrap();
    }
    contents
}

fn zero(path: &Path, offset: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![0; len]).unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Regression: 4 KiB zeroed in the middle of the file made redb panic inside
/// the committer thread; the store then only said "disk store has stopped".
#[tokio::test]
async fn disk_zeroed_page_mid_file_is_corrupt_with_path_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.redb");
    let crashed = dir.path().join("crashed.redb");
    fill(&clean, Some(&crashed)).await;
    for path in [&clean, &crashed] {
        zero(path, file_len(path) / 2, 4096);
        let opened = std::panic::catch_unwind(|| DiskStore::open(path));
        let err = opened.expect("no panic escapes").unwrap_err();
        let DiskError::Corrupt {
            path: reported,
            damage,
        } = &err
        else {
            panic!("expected Corrupt, got {err:?}")
        };
        assert_eq!(reported, path);
        assert!(
            matches!(damage, Damage::Redb(_)),
            "what redb said: {damage:?}"
        );
        assert!(err.to_string().contains(&*path.to_string_lossy()));
        let said = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            said.contains("corrupt"),
            "redb's message is chained: {said}"
        );
    }
}
