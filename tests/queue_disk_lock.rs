//! A second process opening a disk store's file fails fast with a typed error.
//!
//! The parent holds the file open and starts this test binary again as a
//! child (only the ignored `lock_child` test, selected by an environment
//! variable) that tries to open the same file and reports the outcome.

#![cfg(all(feature = "disk", unix))]

use std::process::Command;

use snapstream::queue::disk::{DiskError, DiskStore};

const CHILD_PATH: &str = "SNAPSTREAM_LOCK_CHILD_DB";

#[test]
#[ignore = "child process of disk_second_process_open_fails_fast; started by it"]
fn lock_child() {
    let Ok(path) = std::env::var(CHILD_PATH) else {
        return;
    };
    let outcome = match DiskStore::open(&path) {
        Ok(_) => "OUTCOME opened".to_owned(),
        Err(DiskError::AlreadyOpen { path: p }) => {
            format!("OUTCOME already-open {}", p.display())
        }
        Err(e) => format!("OUTCOME other {e}"),
    };
    println!("{outcome}");
}

fn try_open_in_child(path: &std::path::Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_child", "--ignored", "--nocapture"])
        .env(CHILD_PATH, path)
        .output()
        .expect("run the child");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // libtest may print "test lock_child ... " on the same line first.
        .find_map(|l| l.split_once("OUTCOME ").map(|(_, o)| o.to_owned()))
        .unwrap_or_else(|| panic!("child reported nothing: {out:?}"))
}

#[test]
fn disk_second_process_open_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.redb");
    let store = DiskStore::open(&path).unwrap();
    let outcome = try_open_in_child(&path);
    assert_eq!(outcome, format!("already-open {}", path.display()));
    // The error reads well.
    let err = DiskError::AlreadyOpen { path: path.clone() };
    assert!(err.to_string().starts_with("database file is already open"));

    drop(store);
    assert_eq!(
        try_open_in_child(&path),
        "opened",
        "the lock goes with the store"
    );
}
