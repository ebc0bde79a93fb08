//! The admin router over a real listening socket: every JSON endpoint's
//! shape, paging, the token rule, cross-site refusal, and 4xx JSON answers
//! to bad ids, bad bodies and oversized bodies.

mod admin_support;

use admin_support::{serve, Service, QUEUE, TOKEN};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The base URL of `service`'s admin (with `token` if given), mounted under
/// `/admin` as a service would.
async fn admin_url(service: &Service, token: Option<&str>) -> String {
    let mut b = service.admin().body_limit(1024);
    if let Some(t) = token {
        b = b.token(t);
    }
    let admin = b.build().unwrap();
    let app = axum::Router::new().nest("/admin", admin.router());
    format!("http://{}/admin", serve(app).await)
}

async fn get(url: &str) -> Value {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{url}");
    r.json().await.unwrap()
}

/// Sends `method url` with the token and an optional JSON body; returns
/// status and body JSON.
async fn send(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Client::new().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        assert_eq!(
            ctype.as_deref(),
            Some("application/json"),
            "{url}: error answers are JSON"
        );
        assert!(
            body["error"].is_string() && body["code"].is_string(),
            "{url}: {body}"
        );
    }
    (status, body)
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

#[tokio::test]
async fn every_json_endpoint_has_its_shape() {
    let svc = Service::start(1).await;
    svc.store.write("a", 7);
    svc.dead_letters([1, 2]).await;
    let base = admin_url(&svc, Some(TOKEN)).await;

    let o = get(&format!("{base}/api/overview")).await;
    assert_eq!(
        keys(&o),
        [
            "lease_pools",
            "pools",
            "queues",
            "read_only",
            "servers",
            "snapshot_builds",
            "snapshot_cache_hits",
            "topics"
        ]
    );
    assert_eq!(o["servers"], json!([]), "no network server watched");
    assert_eq!(o["read_only"], false);
    // The second subscriber joined the first one's running build.
    assert_eq!(
        (
            o["snapshot_builds"].as_u64(),
            o["snapshot_cache_hits"].as_u64()
        ),
        (Some(1), Some(1))
    );

    let topics = get(&format!("{base}/api/topics")).await;
    let t = &topics[0];
    assert_eq!(
        keys(t),
        [
            "building",
            "cached",
            "deliveries",
            "keys",
            "lag",
            "lagged",
            "max_lag",
            "publish_batch_events",
            "published",
            "resnapshotted",
            "retained",
            "snapshot_build_seconds",
            "subscribers",
            "topic"
        ]
    );
    assert_eq!(
        keys(&t["publish_batch_events"]),
        ["count", "mean", "p50", "p99"]
    );
    assert_eq!(
        t["snapshot_build_seconds"]["count"], 1,
        "one snapshot build: {t}"
    );
    assert_eq!(
        (
            t["topic"].as_str(),
            t["subscribers"].as_u64(),
            t["keys"].as_u64()
        ),
        (Some("kv"), Some(2), Some(1))
    );
    let buckets: Vec<(Value, u64)> = t["lag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["upto"].clone(), b["keys"].as_u64().unwrap()))
        .collect();
    assert_eq!(buckets.len(), 6);
    assert_eq!(buckets[5].0, Value::Null, "the last bucket has no bound");
    assert_eq!(
        buckets.iter().map(|b| b.1).sum::<u64>(),
        1,
        "one key in some bucket"
    );

    let topic = get(&format!("{base}/api/topics/kv")).await;
    assert_eq!(topic["topic"], "kv");
    assert_eq!(
        keys(&topic["key_list"]),
        ["items", "limit", "offset", "total"]
    );
    let key = &topic["key_list"]["items"][0];
    assert_eq!(
        keys(key),
        [
            "building",
            "cached",
            "max_lag",
            "published",
            "retained",
            "subject",
            "subscribers",
            "wildcard"
        ]
    );
    assert_eq!(
        (key["subject"].as_str(), key["subscribers"].as_u64()),
        (Some("a"), Some(2))
    );

    let pools = get(&format!("{base}/api/pools")).await;
    assert_eq!(keys(&pools), ["keyed", "lease"]);
    assert_eq!(
        keys(&pools["keyed"][0]),
        [
            "add_waits",
            "handled",
            "in_flight",
            "keys",
            "name",
            "panicked",
            "pending",
            "workers"
        ]
    );
    assert_eq!(pools["keyed"][0]["workers"], 2);
    assert_eq!(pools["lease"][0]["name"], "conns");
    assert_eq!(pools["lease"][0]["waits"], 0);
    assert_eq!(pools["keyed"][0]["add_waits"], 0);
    assert_eq!(
        pools["lease"][0]["watched"][0],
        json!({"key": "db", "target": 3, "active": 0})
    );

    let queues = get(&format!("{base}/api/queues")).await;
    let q = get(&format!("{base}/api/queues/{QUEUE}")).await;
    assert_eq!(queues[0], q);
    assert_eq!(
        keys(&q),
        [
            "acked",
            "active_workers",
            "backend",
            "dead_lettered",
            "dead_letters",
            "delayed",
            "error",
            "leased",
            "max_workers",
            "name",
            "push_seconds",
            "pushed",
            "ready",
            "retries",
            "workers"
        ]
    );
    assert_eq!(q["push_seconds"]["count"], 2, "two pushes timed: {q}");
    assert_eq!(
        (
            q["backend"].as_str(),
            q["dead_letters"].as_u64(),
            q["pushed"].as_u64()
        ),
        (Some("memory"), Some(2), Some(2))
    );

    assert_eq!(get(&format!("{base}/api/servers")).await, json!([]));

    let dead = get(&format!("{base}/api/queues/{QUEUE}/dead")).await;
    assert_eq!(keys(&dead), ["items", "limit", "offset", "total"]);
    let d = &dead["items"][0];
    assert_eq!(
        keys(d),
        [
            "attempts",
            "decode_error",
            "error",
            "id",
            "key",
            "raw",
            "reason",
            "value"
        ]
    );
    assert_eq!(
        (d["value"].clone(), d["reason"].as_str()),
        (json!({"n": 1}), Some("failed"))
    );
    let id = d["id"].as_u64().unwrap();
    let one = get(&format!("{base}/api/queues/{QUEUE}/dead/{id}")).await;
    assert_eq!(&one, d, "show one decodes the item");

    let page = reqwest::get(&base).await.unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("new EventSource"));
}

#[tokio::test]
async fn the_event_stream_sends_the_figures_and_dead_letters() {
    let svc = Service::start(1).await;
    svc.dead_letters([5]).await;
    let base = admin_url(&svc, None).await;
    let mut r = reqwest::get(format!("{base}/api/events")).await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    // One event is one `event:` line, one `data:` line and a blank line.
    while !text.contains("\n\n") {
        text.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    }
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("event: overview"));
    let data: Value =
        serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data["queues"][0]["name"], QUEUE);
    assert_eq!(data["dead"][QUEUE]["total"], 1);
    assert_eq!(data["dead"][QUEUE]["items"][0]["value"], json!({"n": 5}));
}

#[tokio::test]
async fn dead_letters_page() {
    let svc = Service::start(1).await;
    svc.dead_letters(0..5).await;
    let base = admin_url(&svc, None).await;
    let list = |q: &str| format!("{base}/api/queues/{QUEUE}/dead?{q}");
    let ns = |v: &Value| -> Vec<u64> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["value"]["n"].as_u64().unwrap())
            .collect()
    };
    let p = get(&list("limit=2")).await;
    assert_eq!(
        (
            p["total"].as_u64(),
            p["offset"].as_u64(),
            p["limit"].as_u64()
        ),
        (Some(5), Some(0), Some(2))
    );
    assert_eq!(ns(&p), [0, 1], "oldest first");
    assert_eq!(ns(&get(&list("offset=2&limit=2")).await), [2, 3]);
    assert_eq!(ns(&get(&list("offset=4")).await), [4]);
    assert_eq!(ns(&get(&list("offset=9")).await), Vec::<u64>::new());
    for bad in ["limit=0", "limit=1001", "limit=x", "offset=-1", "page=2"] {
        let (status, body) = send(Method::GET, &list(bad), None, None).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_query")),
            "{bad}"
        );
    }
}

/// Every mutating endpoint: (method, path after the base, JSON body).
fn mutations(id: u64) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/dead/{id}/requeue"),
            None,
        ),
        (
            Method::DELETE,
            format!("/api/queues/{QUEUE}/dead/{id}"),
            None,
        ),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/dead/requeue"),
            None,
        ),
        (Method::DELETE, format!("/api/queues/{QUEUE}/dead"), None),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/flush"),
            Some(json!({"timeout_ms": 1000})),
        ),
        (
            Method::PUT,
            format!("/api/queues/{QUEUE}/max_workers"),
            Some(json!({"max_workers": 2})),
        ),
        (Method::DELETE, format!("/api/queues/{QUEUE}/items"), None),
    ]
}

#[tokio::test]
async fn without_a_token_the_admin_is_read_only() {
    let svc = Service::start(1).await;
    svc.dead_letters([1]).await;
    let base = admin_url(&svc, None).await;
    let id = get(&format!("{base}/api/queues/{QUEUE}/dead")).await["items"][0]["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        get(&format!("{base}/api/overview")).await["read_only"],
        true
    );
    for (method, path, body) in mutations(id) {
        let (status, v) = send(method.clone(), &format!("{base}{path}"), Some(TOKEN), body).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("read_only")),
            "{method} {path}"
        );
    }
    assert_eq!(
        svc.queue.dead_letter_count().await.unwrap(),
        1,
        "nothing moved"
    );
    assert_eq!(svc.queue.max_workers(), 4, "nothing changed");
}

#[tokio::test]
async fn mutations_need_the_token_and_the_same_site() {
    let svc = Service::start(1).await;
    svc.dead_letters([1]).await;
    let base = admin_url(&svc, Some(TOKEN)).await;
    let id = get(&format!("{base}/api/queues/{QUEUE}/dead")).await["items"][0]["id"]
        .as_u64()
        .unwrap();
    for (method, path, body) in mutations(id) {
        let url = format!("{base}{path}");
        for token in [None, Some("wrong"), Some("test-token-but-longer")] {
            let (status, v) = send(method.clone(), &url, token, body.clone()).await;
            assert_eq!(
                (status, v["code"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("unauthorized")),
                "{method} {path} {token:?}"
            );
        }
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            let mut req = Client::new()
                .request(method.clone(), &url)
                .bearer_auth(TOKEN)
                .header(name, value);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::FORBIDDEN,
                "{method} {path} {name}: {value}"
            );
            assert_eq!(r.json::<Value>().await.unwrap()["code"], "cross_site");
        }
    }
    assert_eq!(
        svc.queue.dead_letter_count().await.unwrap(),
        1,
        "nothing moved"
    );
    // The right token from the same origin passes.
    let host = base
        .trim_start_matches("http://")
        .trim_end_matches("/admin")
        .to_owned();
    let r = Client::new()
        .put(format!("{base}/api/queues/{QUEUE}/max_workers"))
        .bearer_auth(TOKEN)
        .header("origin", format!("http://{host}"))
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"max_workers": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"max_workers": 7}));
    assert_eq!(svc.queue.max_workers(), 7);
}

#[tokio::test]
async fn mutations_act_on_the_queue() {
    let svc = Service::start(1).await;
    svc.dead_letters(0..5).await;
    let base = admin_url(&svc, Some(TOKEN)).await;
    let url = |p: &str| format!("{base}/api/queues/{QUEUE}{p}");
    let ids: Vec<u64> = get(&url("/dead")).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    svc.handler
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);

    // Requeue one: it leaves the dead letters and is handled.
    let (s, v) = send(
        Method::POST,
        &url(&format!("/dead/{}/requeue", ids[0])),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"count": 1})));
    svc.handler.wait_handled(0).await;
    assert_eq!(svc.queue.dead_letter_count().await.unwrap(), 4);
    // Requeueing it again finds nothing.
    let (s, _) = send(
        Method::POST,
        &url(&format!("/dead/{}/requeue", ids[0])),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Delete one: gone, never handled.
    let (s, v) = send(
        Method::DELETE,
        &url(&format!("/dead/{}", ids[1])),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"count": 1})));
    let (s, _) = send(Method::GET, &url(&format!("/dead/{}", ids[1])), None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(svc.queue.dead_letter_count().await.unwrap(), 3);

    // Requeue all but one: delete one more first, then requeue the rest.
    let (s, v) = send(Method::POST, &url("/dead/requeue"), Some(TOKEN), None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"count": 3})));
    for n in 2..5 {
        svc.handler.wait_handled(n).await;
    }
    assert_eq!(svc.handler.handled(), [0, 2, 3, 4], "job 1 was deleted");

    // Flush waits for what was pushed.
    let (s, v) = send(
        Method::POST,
        &url("/flush"),
        Some(TOKEN),
        Some(json!({"timeout_ms": 5000})),
    )
    .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"flushed": true})));
    let (s, _) = send(Method::POST, &url("/flush"), Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::OK, "the body is optional");

    // Delete all dead letters.
    svc.dead_letters([10, 11]).await;
    let (s, v) = send(Method::DELETE, &url("/dead"), Some(TOKEN), None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"count": 2})));
    assert_eq!(svc.queue.dead_letter_count().await.unwrap(), 0);

    // Pause the queue, fill it, and remove everything.
    let (s, _) = send(
        Method::PUT,
        &url("/max_workers"),
        Some(TOKEN),
        Some(json!({"max_workers": 0})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(svc.queue.max_workers(), 0);
    for n in 20..23 {
        svc.queue.push(admin_support::Job { n }).await.unwrap();
    }
    let (s, v) = send(Method::DELETE, &url("/items"), Some(TOKEN), None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"count": 3})));
    assert_eq!(svc.queue.len().await.unwrap().total(), 0);
}

#[tokio::test]
async fn bad_input_gets_a_4xx_json_answer() {
    let svc = Service::start(1).await;
    let base = admin_url(&svc, Some(TOKEN)).await;
    let t = Some(TOKEN);
    let cases: Vec<(Method, String, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::GET,
            format!("/api/queues/{QUEUE}/dead/abc"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_id",
        ),
        (
            Method::GET,
            format!("/api/queues/{QUEUE}/dead/-1"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_id",
        ),
        (
            Method::GET,
            format!("/api/queues/{QUEUE}/dead/99999999999999999999999"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_id",
        ),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/dead/x1/requeue"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_id",
        ),
        (
            Method::DELETE,
            format!("/api/queues/{QUEUE}/dead/1.5"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_id",
        ),
        (
            Method::GET,
            format!("/api/queues/{QUEUE}/dead/424242"),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/dead/424242/requeue"),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            format!("/api/queues/{QUEUE}/dead/424242"),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/api/queues/nope".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/api/queues/nope/dead".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/api/queues/nope/flush".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/api/topics/nope".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/api/nothing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::PATCH,
            "/api/overview".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            format!("/api/queues/{QUEUE}/dead/requeue"),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::PUT,
            format!("/api/queues/{QUEUE}/max_workers"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Method::PUT,
            format!("/api/queues/{QUEUE}/max_workers"),
            Some(json!({"max_workers": -1})),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Method::PUT,
            format!("/api/queues/{QUEUE}/max_workers"),
            Some(json!({"max_workers": "3"})),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Method::PUT,
            format!("/api/queues/{QUEUE}/max_workers"),
            Some(json!({"max_workers": 3, "x": 1})),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Method::PUT,
            format!("/api/queues/{QUEUE}/max_workers"),
            Some(json!({"max_workers": 1_000_000})),
            StatusCode::BAD_REQUEST,
            "out_of_range",
        ),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/flush"),
            Some(json!("soon")),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/flush"),
            Some(json!({"timeout": 5})),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            Method::POST,
            format!("/api/queues/{QUEUE}/flush"),
            Some(json!({"timeout_ms": 3_600_000})),
            StatusCode::BAD_REQUEST,
            "out_of_range",
        ),
    ];
    for (method, path, body, want, code) in cases {
        let (status, v) = send(method.clone(), &format!("{base}{path}"), t, body).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (want, Some(code)),
            "{method} {path}"
        );
    }
    // Not JSON at all.
    let r = Client::new()
        .put(format!("{base}/api/queues/{QUEUE}/max_workers"))
        .bearer_auth(TOKEN)
        .body("max_workers=3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_body");
    assert_eq!(svc.queue.max_workers(), 4, "no bad body changed anything");
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let svc = Service::start(1).await;
    let base = admin_url(&svc, Some(TOKEN)).await;
    // Announced length over the 1024-byte limit.
    let big = json!({"max_workers": 3, "pad": "x".repeat(2000)});
    let (status, v) = send(
        Method::PUT,
        &format!("{base}/api/queues/{QUEUE}/max_workers"),
        Some(TOKEN),
        Some(big),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
    );
    // Chunked, no length announced: refused while reading.
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/admin")
        .to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let chunk = "x".repeat(1500);
    let req = format!(
        "PUT /admin/api/queues/{QUEUE}/max_workers HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"code\":\"too_large\""), "{answer}");
    assert_eq!(svc.queue.max_workers(), 4);
    // Within the limit, it passes.
    let (status, _) = send(
        Method::PUT,
        &format!("{base}/api/queues/{QUEUE}/max_workers"),
        Some(TOKEN),
        Some(json!({"max_workers": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}
