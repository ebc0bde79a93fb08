//! The admin page in a real headless browser (Debian's `chromium` driven
//! through `chromedriver`): dead letters appear live, a click on requeue
//! moves one back and it is handled, a click on delete removes another.
//!
//! Skipped with a notice when neither the browser nor the driver is
//! installed and `CI` is unset; in CI it must run (`.ci/run` installs both).

mod admin_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;

use admin_support::{serve, Service, QUEUE, TOKEN, TOPIC};
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Starts chromedriver on a port of its choosing; returns it and its URL.
async fn chromedriver(driver: &Path) -> (Child, String) {
    let mut child = Command::new(driver)
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // "ChromeDriver was started successfully on port 36309."
    let port = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("chromedriver says which port it listens on");
        if let Some(rest) = line.split("started successfully on port ").nth(1) {
            break rest.trim_end_matches('.').parse::<u16>().unwrap();
        }
    };
    // Keep reading its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://127.0.0.1:{port}"))
}

/// Waits, without polling, until `selector` matches: a MutationObserver in
/// the page calls back when the DOM changes.
async fn wait_for(client: &Client, selector: &str) {
    let script = r#"
        const [sel, done] = arguments;
        if (document.querySelector(sel)) return done(true);
        const obs = new MutationObserver(() => {
            if (document.querySelector(sel)) { obs.disconnect(); done(true); }
        });
        obs.observe(document.documentElement, { subtree: true, childList: true, attributes: true, characterData: true });
    "#;
    let found = client
        .execute_async(script, vec![json!(selector)])
        .await
        .unwrap_or_else(|e| panic!("waiting for {selector}: {e}"));
    assert_eq!(found, json!(true));
}

/// Waits, without polling, until the text of `selector` is `text`.
async fn wait_for_text(client: &Client, selector: &str, text: &str) {
    wait_text(client, selector, text, false).await
}

/// Waits, without polling, until the text of `selector` ends with `suffix`.
async fn wait_for_text_ending(client: &Client, selector: &str, suffix: &str) {
    wait_text(client, selector, suffix, true).await
}

async fn wait_text(client: &Client, selector: &str, text: &str, suffix: bool) {
    let script = r#"
        const [sel, want, suffix, done] = arguments;
        const ok = () => {
            const e = document.querySelector(sel);
            return e && (suffix ? e.textContent.endsWith(want) : e.textContent === want);
        };
        if (ok()) return done(true);
        const obs = new MutationObserver(() => { if (ok()) { obs.disconnect(); done(true); } });
        obs.observe(document.documentElement, { subtree: true, childList: true, attributes: true, characterData: true });
    "#;
    let found = client
        .execute_async(script, vec![json!(selector), json!(text), json!(suffix)])
        .await
        .unwrap_or_else(|e| panic!("waiting for {selector} to read {text:?}: {e}"));
    assert_eq!(found, json!(true));
}

fn dead_total(n: usize) -> String {
    format!("div.dead-queue[data-queue='{QUEUE}'][data-total='{n}']")
}

fn row(id: u64) -> String {
    format!("tr.dead-letter[data-queue='{QUEUE}'][data-id='{id}']")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_and_delete_dead_letters_from_the_page() {
    let browser = on_path(&["chromium", "chromium-browser", "google-chrome"]);
    let driver = on_path(&["chromedriver"]);
    let (browser, driver) = match (browser, driver) {
        (Some(b), Some(d)) => (b, d),
        (None, None) if std::env::var_os("CI").is_none() => {
            println!("admin_browser: skipped: neither chromium nor chromedriver is installed (apt-get install chromium chromium-driver)");
            return;
        }
        (b, d) => panic!("the browser test needs chromium ({b:?}) and chromedriver ({d:?})"),
    };
    let tmp = tempfile::tempdir().unwrap();

    let mut svc = Service::start(1).await;
    for (k, v) in [("a", 1), ("b", 2), ("a", 3)] {
        svc.store.write(k, v);
    }
    let _lease = svc.leases.try_acquire("db".to_string()).unwrap();
    let admin = svc
        .admin()
        .token(TOKEN)
        .refresh(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let app = axum::Router::new().nest("/admin", admin.router());
    let page = format!("http://{}/admin", serve(app).await);

    let (_driver, driver_url) = chromedriver(&driver).await;
    let profile = tmp.path().join("profile");
    let caps = json!({
        "goog:chromeOptions": {
            "binary": browser,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&driver_url)
        .await
        .expect("a chromium session");

    client.goto(&page).await.unwrap();
    wait_for(&client, "#conn.live").await;
    wait_for(&client, &dead_total(0)).await;
    client
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();

    // The topic's deliveries: none yet (the service's subscribers have not
    // read), then exactly what one subscriber reads, live.
    let deliveries = format!("tr[data-topic='{TOPIC}'] td[data-field='deliveries']");
    wait_for_text(&client, &deliveries, "0").await;
    let mut read = 0;
    let sub = &mut svc.subs[0];
    loop {
        let m = sub.next().await.unwrap();
        read += m.events().map_or(0, |b| b.events().len());
        if m.is_framing() {
            break;
        }
    }
    // The snapshot may have been taken before the writes above (then they
    // follow live) or after them: read on until nothing more is ready.
    while let Some(m) = sub.next().now_or_never() {
        let m = m.unwrap();
        assert!(!m.is_framing(), "one snapshot, then live events");
        read += m.events().map_or(0, |b| b.events().len());
    }
    assert!(read > 0, "the snapshot had events");
    wait_for_text(&client, &deliveries, &read.to_string()).await;
    // The lease held and no add waited: the pool figures read 0.
    wait_for_text(
        &client,
        "tr[data-pool='conns'] td[data-field='lease-waits']",
        "0",
    )
    .await;
    let push = format!("tr.queue[data-queue='{QUEUE}'] td[data-field='push-seconds']");
    wait_for_text(&client, &push, "–").await;

    // Three jobs fail and land in the dead letters: the page shows them
    // live, and the push latency summary counts their pushes.
    svc.dead_letters([1, 2, 3]).await;
    wait_for(&client, &dead_total(3)).await;
    wait_for_text_ending(&client, &push, "(3)").await;
    let ids: Vec<u64> = {
        let mut ids = Vec::new();
        for r in client
            .find_all(Locator::Css("tr.dead-letter"))
            .await
            .unwrap()
        {
            ids.push(r.attr("data-id").await.unwrap().unwrap().parse().unwrap());
        }
        ids
    };
    assert_eq!(ids.len(), 3);
    let shot = client.screenshot().await.unwrap();
    std::fs::write(tmp.path().join("admin-dead-letters.png"), &shot).unwrap();
    if let Some(path) = std::env::var_os("SNAPSTREAM_ADMIN_SCREENSHOT") {
        std::fs::write(path, &shot).unwrap();
    }

    // Requeue the first: it leaves the dead letters and is handled.
    svc.handler.failing.store(false, Ordering::SeqCst);
    client
        .find(Locator::Css(&format!("{} button.requeue", row(ids[0]))))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    svc.handler.wait_handled(1).await;
    wait_for(&client, &dead_total(2)).await;
    assert!(client
        .find_all(Locator::Css(&row(ids[0])))
        .await
        .unwrap()
        .is_empty());
    wait_for(&client, "#message.ok").await;

    // Delete the second: gone, never handled.
    client
        .find(Locator::Css(&format!("{} button.delete", row(ids[1]))))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&client, &dead_total(1)).await;
    assert!(client
        .find_all(Locator::Css(&row(ids[1])))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(svc.queue.dead_letter_count().await.unwrap(), 1);
    let left = svc.queue.dead_letters().await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&left[0].payload).unwrap(),
        json!({"n": 3})
    );
    assert_eq!(
        svc.handler.handled(),
        [1],
        "job 2 was deleted, job 3 is still dead"
    );

    let shot = client.screenshot().await.unwrap();
    let path = tmp.path().join("admin-after.png");
    std::fs::write(&path, &shot).unwrap();
    assert!(
        shot.starts_with(b"\x89PNG"),
        "a PNG screenshot at {}",
        path.display()
    );
    client.close().await.unwrap();
}
