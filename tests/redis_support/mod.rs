//! Shared by the Redis integration tests: where the server is, and queue
//! names no other test run uses.

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
