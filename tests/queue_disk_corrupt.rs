//! A damaged disk-queue file gives typed errors, never a panic, and
//! [`DiskStore::repair`] keeps every intact item.
//!
//! The files are damaged the way the issue reproduced it (bytes overwritten in
//! place, `dd conv=notrunc`), over a file closed cleanly and over the image a
//! killed process leaves behind. The sweep checks, for every damage: no panic
//! escapes, nothing hangs, and every item the file held is either back in its
//! queue or reported (quarantined, counted as lost, or the whole file
//! reported unreadable); nothing that was not pushed comes back.

#![cfg(feature = "disk")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use snapstream::queue::disk::{Damage, DiskError, DiskStore, RepairReport};
use snapstream::queue::{BaseQueue, NewItem, QueueError, QueueOptions};

const T: Duration = Duration::from_secs(10);
const QUEUES: [&str; 2] = ["webhooks", "webhooks.dead"];

/// `queue -> payloads`.
type Contents = BTreeMap<String, BTreeSet<Vec<u8>>>;

/// A file and what it holds.
struct Image {
    bytes: Vec<u8>,
    /// What the latest commit holds.
    now: Contents,
    /// What the commit before the last one holds (the last commit acked
    /// items): a repair that falls back to it may bring those back.
    before: Contents,
    /// Taken while the store had the file open.
    crashed: bool,
}

/// `queue -> item count`, for readable assertion messages.
fn counts(c: &Contents) -> BTreeMap<&str, usize> {
    c.iter()
        .map(|(q, items)| (q.as_str(), items.len()))
        .collect()
}

fn insert(c: &mut Contents, queue: &str, payload: Vec<u8>) {
    c.entry(queue.to_owned()).or_default().insert(payload);
}

/// Fills two queues (as the demo does: webhooks and their dead letters),
/// keyed and unkeyed items of many sizes, then acks a third of the main queue
/// in one last commit, so the file also has freed pages. With `crash`, the
/// image is copied while the store still has it open (what `kill -9` leaves).
async fn fill(path: &Path, crash: bool) -> Image {
    let store = DiskStore::open(path).unwrap();
    let main = store.queue(QUEUES[0], QueueOptions::default()).unwrap();
    let dead = store.queue(QUEUES[1], QueueOptions::default()).unwrap();
    let mut now = Contents::new();
    for i in 0..300u32 {
        let payload = format!("hook {i:05} {}", "x".repeat(i as usize * 7 % 400)).into_bytes();
        let item = if i % 7 == 0 {
            NewItem::with_key(payload.clone(), format!("key{}", i % 40))
        } else {
            NewItem::new(payload.clone())
        };
        main.push(item, T).await.unwrap();
        insert(&mut now, QUEUES[0], payload);
        if i % 12 == 0 {
            let payload = format!("dead {i}").into_bytes();
            dead.push(NewItem::new(payload.clone()), T).await.unwrap();
            insert(&mut now, QUEUES[1], payload);
        }
    }
    let before = now.clone();
    let got = main.pop(100, T).await.unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.id).collect();
    main.ack(&ids).await.unwrap();
    for d in &got {
        assert!(now.get_mut(QUEUES[0]).unwrap().remove(&d.payload));
    }
    let bytes = if crash {
        // Every write above was acknowledged, so it is in the file now.
        std::fs::read(path).unwrap()
    } else {
        drop((main, dead, store));
        std::fs::read(path).unwrap()
    };
    Image {
        bytes,
        now,
        before,
        crashed: crash,
    }
}

/// The two images, built once per test binary.
fn images() -> &'static [Image; 2] {
    static IMAGES: OnceLock<[Image; 2]> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(async {
            [
                fill(&dir.path().join("clean.redb"), false).await,
                fill(&dir.path().join("crashed.redb"), true).await,
            ]
        })
    })
}

#[derive(Debug, Clone)]
enum Fill {
    Zeros,
    Random(u64),
}

/// Writes `image` with `len` bytes at `offset` overwritten into `dir`.
fn damaged(dir: &Path, image: &Image, offset: usize, len: usize, fill: &Fill) -> PathBuf {
    let mut bytes = image.bytes.clone();
    let end = (offset + len).min(bytes.len());
    match fill {
        Fill::Zeros => bytes[offset..end].fill(0),
        Fill::Random(seed) => {
            rand::rngs::StdRng::seed_from_u64(*seed).fill(&mut bytes[offset..end]);
        }
    }
    let path = dir.join("damaged.redb");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What the queues `names` of the store hold, out of the items `pushed`
/// (without popping: popping keyed items needs an ack, a commit, per item of
/// a key). Checks that they hold nothing else: no garbage, no duplicates.
fn contents(store: &DiskStore, names: &[String], pushed: &Contents) -> Result<Contents, DiskError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut out = Contents::new();
    for name in names {
        let q = store
            .queue(name, QueueOptions::default())
            .map_err(|e| match e {
                QueueError::Backend(source) => *source.downcast::<DiskError>().unwrap(),
                e => panic!("unexpected {e:?}"),
            })?;
        rt.block_on(async {
            let mut found = BTreeSet::new();
            for p in pushed.get(name).into_iter().flatten() {
                if q.has(p).await.unwrap() {
                    found.insert(p.clone());
                }
            }
            let total = q.len().await.unwrap().total();
            assert_eq!(
                total,
                found.len() as u64,
                "{name}: the queue holds only items that were pushed, once each"
            );
            out.insert(name.clone(), found);
        });
    }
    Ok(out)
}

/// How a damaged file ended up.
#[derive(Debug)]
enum Outcome {
    /// redb's check passed; nothing was lost.
    Intact,
    /// Repaired: the report.
    Repaired(RepairReport),
    /// The whole file was reported unusable (typed error).
    Refused,
}

/// Opens the damaged file, repairs it if it is corrupt, and checks that
/// every item is kept or reported.
fn check(path: &Path, image: &Image) -> Outcome {
    let names: Vec<String> = QUEUES.iter().map(|q| q.to_string()).collect();
    let opened = std::panic::catch_unwind(|| {
        DiskStore::open(path).and_then(|store| contents(&store, &names, &image.before))
    })
    .expect("no panic escapes open");
    match opened {
        Ok(found) => {
            // redb's check passed. After a crash, damage to a page only the
            // last commit wrote looks to redb like that commit was torn by
            // the crash: it rolls back to the commit before (here the last
            // commit only acked items, which come back).
            let rolled_back = image.crashed && found == image.before;
            assert!(
                found == image.now || rolled_back,
                "redb's check passed, so nothing is lost: found {:?}, stored {:?}",
                counts(&found),
                counts(&image.now)
            );
            return Outcome::Intact;
        }
        Err(DiskError::Corrupt { path: p, .. }) => assert_eq!(p, path),
        Err(DiskError::Open { .. }) => {
            // The header is destroyed: not a redb file any more.
            let repaired = std::panic::catch_unwind(|| DiskStore::repair(path))
                .expect("no panic escapes repair");
            assert!(
                repaired.is_err(),
                "a file redb cannot identify is not repaired"
            );
            return Outcome::Refused;
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
    let report = match std::panic::catch_unwind(|| DiskStore::repair(path))
        .expect("no panic escapes repair")
    {
        Ok(report) => report,
        Err(DiskError::Corrupt {
            damage: Damage::Unreadable { .. },
            ..
        }) => return Outcome::Refused,
        Err(e) => panic!("unexpected repair error {e:?}"),
    };
    let store = DiskStore::open(path).expect("a repaired file opens");
    let reported: Vec<String> = report.queues.iter().map(|q| q.name.clone()).collect();
    let found = contents(&store, &reported, &image.before).expect("a repaired queue opens");
    for q in &report.queues {
        let kept = found.get(&q.name).cloned().unwrap_or_default();
        assert_eq!(
            kept.len() as u64,
            q.kept,
            "{}: the report counts what is there",
            q.name
        );
        assert_eq!(
            store.quarantined(&q.name).unwrap().len() as u64,
            q.quarantined,
            "{}: every quarantined record is readable",
            q.name
        );
        // Nothing that was not pushed comes back; acked items only when the
        // repair fell back to the commit before the ack.
        let allowed = if report.from_previous_commit {
            &image.before
        } else {
            &image.now
        };
        let pushed = allowed.get(&q.name).cloned().unwrap_or_default();
        assert!(
            kept.is_subset(&pushed),
            "{}: garbage or resurrected items kept",
            q.name
        );
        // Every intact item is kept or reported.
        let missing = image
            .now
            .get(&q.name)
            .map_or(0, |w| w.difference(&kept).count()) as u64;
        if let Some(lost) = q.lost {
            assert!(
                missing <= q.quarantined + lost,
                "{}: {missing} items missing, {} quarantined, {lost} lost",
                q.name,
                q.quarantined
            );
        }
    }
    for name in image.now.keys() {
        if !reported.contains(name) {
            assert_ne!(
                report.unreadable_tables,
                Some(0),
                "queue {name} vanished without being reported"
            );
        }
    }
    drop(store);
    // A repaired file needs no more repair.
    let again = DiskStore::repair(path).unwrap();
    assert_eq!(again.damaged_original, None);
    assert!(again
        .queues
        .iter()
        .all(|q| q.quarantined == 0 && q.lost == Some(0)));
    Outcome::Repaired(report)
}

/// Runs `check` on its own thread: a hang fails the test instead of stalling
/// the run (the bound only guards against a hang; a case takes milliseconds).
fn check_without_hanging(image: usize, offset: usize, len: usize, fill: Fill) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let what = format!("image {image}, {len} bytes at {offset}, {fill:?}");
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let img = &images()[image];
        let path = damaged(dir.path(), img, offset, len, &fill);
        let _ = tx.send(std::panic::catch_unwind(|| check(&path, img)));
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("hung: {what}"),
    }
}

/// Regression: 4 KiB zeroed in the middle of the file made redb panic inside
/// the committer thread; the store then only said "disk store has stopped".
/// Now the open says `Corrupt` with the path and redb's message, and the
/// repair keeps every intact item.
#[test]
fn disk_zeroed_page_mid_file_is_corrupt_then_repaired() {
    for image in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let img = &images()[image];
        // The middle of the file, or the first page after it in use (a page
        // freed by the acks is not read by anyone).
        let (offset, path, err) = (img.bytes.len() / 2..img.bytes.len())
            .step_by(4096)
            .find_map(|offset| {
                let path = damaged(dir.path(), img, offset, 4096, &Fill::Zeros);
                let opened = std::panic::catch_unwind(|| DiskStore::open(&path));
                opened
                    .expect("no panic escapes")
                    .err()
                    .map(|e| (offset, path, e))
            })
            .expect("some page after the middle is in use");
        let DiskError::Corrupt {
            path: reported,
            damage,
        } = &err
        else {
            panic!("expected Corrupt, got {err:?}")
        };
        assert_eq!(reported, &path);
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

        let Outcome::Repaired(report) = check(&path, img) else {
            panic!("expected a repair")
        };
        let damaged = report.damaged_original.as_ref().expect("rebuilt");
        let mut original = img.bytes.clone();
        original[offset..offset + 4096].fill(0);
        assert!(
            std::fs::read(damaged).unwrap() == original,
            "the damaged original is kept as it was"
        );
        let kept: u64 = report.queues.iter().map(|q| q.kept).sum();
        assert!(kept > 0, "intact items are kept: {report:?}");
    }
}

/// A record redb stores fine but snapstream cannot decode: the queue's open
/// says which, and the repair (in place) moves it to quarantine.
#[test]
fn disk_undecodable_record_is_reported_then_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = DiskStore::open(&path).unwrap();
        let q = store.queue("q", QueueOptions::default()).unwrap();
        q.push(NewItem::new("good"), T).await.unwrap();
    });
    {
        // Bytes no snapstream version wrote, under id 7.
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, &[u8]> =
                redb::TableDefinition::new("snapstream.queue.items/q");
            txn.open_table(def)
                .unwrap()
                .insert(7, &[9u8; 5][..])
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = DiskStore::open(&path).unwrap();
    let QueueError::Backend(source) = store.queue("q", QueueOptions::default()).unwrap_err() else {
        panic!("expected a backend error")
    };
    let err = source.downcast_ref::<DiskError>().unwrap();
    assert!(
        matches!(
            err,
            DiskError::Corrupt { path: p, damage: Damage::Record { queue, id: 7 } }
                if p == &path && queue == "q"
        ),
        "got {err:?}"
    );
    drop(store);

    let report = DiskStore::repair(&path).unwrap();
    assert_eq!(
        report.damaged_original, None,
        "redb's check passed: in place"
    );
    assert_eq!(report.queues.len(), 1);
    let q = &report.queues[0];
    assert_eq!((q.kept, q.quarantined, q.lost), (1, 1, Some(0)));
    assert!(!report.is_lossless());

    let store = DiskStore::open(&path).unwrap();
    let quarantined = store.quarantined("q").unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].id, Some(snapstream::queue::ItemId(7)));
    assert_eq!(quarantined[0].record, [9u8; 5]);
    let queue = store.queue("q", QueueOptions::default()).unwrap();
    let got = rt.block_on(queue.pop(10, T)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"good");
}

/// Every page of both images damaged in turn: zeroed whole (what `dd
/// bs=4096` does), and its second half's first kilobyte overwritten with
/// garbage (a torn or misdirected write: the page's start still parses).
#[test]
fn disk_corruption_every_page() {
    let mut tally: BTreeMap<&str, u32> = BTreeMap::new();
    let (mut kept, mut quarantined) = (0, 0);
    for image in 0..2 {
        let pages = images()[image].bytes.len().div_ceil(4096);
        for page in 0..pages {
            for (at, len, fill) in [
                (0, 4096, Fill::Zeros),
                (2048, 1024, Fill::Random(page as u64)),
            ] {
                let outcome = check_without_hanging(image, page * 4096 + at, len, fill);
                let kind = match &outcome {
                    Outcome::Intact => "intact",
                    Outcome::Repaired(r) if r.is_lossless() => "repaired, lossless",
                    Outcome::Repaired(_) => "repaired, with losses",
                    Outcome::Refused => "refused",
                };
                if let Outcome::Repaired(r) = &outcome {
                    kept += r.queues.iter().map(|q| q.kept).sum::<u64>();
                    quarantined += r.queues.iter().map(|q| q.quarantined).sum::<u64>();
                }
                *tally.entry(kind).or_default() += 1;
            }
        }
    }
    println!("every page damaged: {tally:?}; {kept} items kept, {quarantined} quarantined in all");
    assert!(
        tally.get("repaired, with losses").copied().unwrap_or(0) > 0 && kept > 0,
        "the sweep reached pages holding items: {tally:?}"
    );
    assert!(quarantined > 0, "records of damaged pages were quarantined");
}

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![Just(Fill::Zeros), any::<u64>().prop_map(Fill::Random)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any run of bytes, anywhere, zeros or garbage.
    #[test]
    fn disk_corruption_sweep_never_panics_hangs_or_loses_silently(
        image in 0..2usize,
        at in 0.0..1.0f64,
        len in 1..9000usize,
        fill in fill_strategy(),
    ) {
        let offset = (at * images()[image].bytes.len() as f64) as usize;
        check_without_hanging(image, offset, len, fill);
    }
}
