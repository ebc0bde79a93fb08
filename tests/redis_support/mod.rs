//! Shared by the Redis integration tests: where the server is, queue names
//! no other test run uses, and throw-away servers a test starts itself.
#![allow(dead_code)] // each test uses its own part

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `REDIS_URL`, or the default local server if one answers; `None` (after a
/// printed notice) when neither is there, so the caller skips.
pub async fn url() -> Option<String> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(url);
    }
    if tokio::net::TcpStream::connect("127.0.0.1:6379")
        .await
        .is_ok()
    {
        return Some("redis://127.0.0.1:6379".into());
    }
    eprintln!("notice: REDIS_URL is unset and nothing answers at 127.0.0.1:6379; skipping");
    None
}

/// A queue name unique to this test, process and moment.
pub fn unique_name(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test-{test}-{}-{nanos}", std::process::id())
}

/// The `redis-server` binary on `PATH`, if there is one.
pub fn find_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// Starts `bin` on `127.0.0.1:port` with `args` and returns once it logged
/// that it accepts connections (within `patience`), draining its log after
/// that so it never blocks on a full pipe. Killed when the child is dropped.
pub async fn start_server<I, S>(
    bin: &std::path::Path,
    port: u16,
    args: I,
    patience: Duration,
) -> Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn redis-server");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Ready to accept connections") {
                return;
            }
        }
        panic!("redis-server exited before it was ready");
    };
    tokio::time::timeout(patience, ready)
        .await
        .expect("redis-server ready");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}
