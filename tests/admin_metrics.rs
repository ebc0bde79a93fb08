//! `/metrics` over a real socket: the text parses as the Prometheus
//! exposition format, and the counters move as the test publishes, pushes
//! and fails items.

mod admin_support;

use std::collections::BTreeMap;

use admin_support::{serve, Job, Service, QUEUE};

/// One sample: metric name and sorted labels.
type Series = (String, Vec<(String, String)>);

/// A strict reader of the Prometheus text exposition format (0.0.4): every
/// line is blank, `# HELP name text`, `# TYPE name kind` (before the
/// name's samples, once) or `name{label="value",...} value`.
fn parse(text: &str) -> BTreeMap<Series, f64> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'), "the text ends with a newline");
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, tail) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
            assert!(is_name(name, true), "{line}");
            match kw {
                "HELP" => assert!(tail.is_some(), "{line}"),
                "TYPE" => {
                    let kind = tail.unwrap();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "one TYPE per name: {line}"
                    );
                }
                _ => panic!("unknown comment {line}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(is_name(key, false), "{line}");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => value.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => value.push(c),
                                other => panic!("bad escape {other:?}: {line}"),
                            },
                            Some((i, '"')) => break i,
                            Some((_, c)) => value.push(c),
                            None => panic!("unterminated label value: {line}"),
                        }
                    };
                    labels.push((key.to_owned(), value));
                    rest = &after[end + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
                labels.sort();
                (name, labels)
            }
        };
        assert!(is_name(name, true), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        let kind = types
            .get(family)
            .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counters end in _total: {line}");
            assert!(value >= 0.0, "{line}");
        }
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "one sample per series: {line}"
        );
    }
    samples
}

fn get(m: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    *m.get(&(name.to_owned(), l))
        .unwrap_or_else(|| panic!("no {name} {labels:?}"))
}

async fn scrape(url: &str) -> BTreeMap<Series, f64> {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    parse(&r.text().await.unwrap())
}

#[test]
fn the_parser_refuses_what_is_not_exposition_format() {
    for bad in [
        "x 1\n",                                 // no TYPE
        "# TYPE x gauge\nx{a=\"1\"\n",           // unclosed labels
        "# TYPE x gauge\nx one\n",               // bad value
        "# TYPE x counter\nx 1\n",               // counter without _total
        "# TYPE x gauge\n# TYPE x gauge\nx 1\n", // two TYPEs
        "# TYPE x gauge\nx 1",                   // no final newline
    ] {
        assert!(std::panic::catch_unwind(|| parse(bad)).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse("# HELP x_total a b\n# TYPE x_total counter\nx_total{a=\"q\\\"\"} 2\n").len(),
        1
    );
}

#[tokio::test]
async fn counters_move_as_the_service_works() {
    let svc = Service::start(2).await;
    let admin = svc.admin().build().unwrap();
    let url = format!("http://{}/metrics", serve(admin.router()).await);
    let topic = [("topic", "kv")];
    let queue = [("queue", QUEUE)];

    let before = scrape(&url).await;
    assert_eq!(get(&before, "snapstream_topic_subscribers", &topic), 2.0);
    assert_eq!(get(&before, "snapstream_queue_pushes_total", &queue), 0.0);
    assert_eq!(
        get(
            &before,
            "snapstream_lease_target",
            &[("pool", "conns"), ("key", "db")]
        ),
        3.0
    );
    let published = get(&before, "snapstream_topic_published_batches_total", &topic);

    // Publish three changes to the watched key and one to an unwatched key.
    for v in 1..=3 {
        svc.store.write("a", v);
    }
    svc.store.write("zz", 9);
    // Two jobs fail twice and are dead-lettered; one is handled.
    svc.dead_letters([1, 2]).await;
    svc.handler
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    svc.queue.push(Job { n: 3 }).await.unwrap();
    svc.handler.wait_handled(3).await;
    svc.queue
        .flush(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    for n in 0..4u64 {
        svc.pool.add(format!("k{}", n % 2), n).await.unwrap();
    }
    svc.pool.stop(snapstream::workpool::StopMode::Drain).await;

    let after = scrape(&url).await;
    assert_eq!(
        get(&after, "snapstream_topic_published_batches_total", &topic) - published,
        3.0,
        "three batches reached the watched key"
    );
    assert_eq!(get(&after, "snapstream_queue_pushes_total", &queue), 3.0);
    assert_eq!(get(&after, "snapstream_queue_acks_total", &queue), 1.0);
    assert_eq!(
        get(&after, "snapstream_queue_retries_total", &queue),
        2.0,
        "one retry per failed job"
    );
    assert_eq!(
        get(&after, "snapstream_queue_dead_lettered_total", &queue),
        2.0
    );
    assert_eq!(get(&after, "snapstream_queue_dead_letters", &queue), 2.0);
    assert_eq!(get(&after, "snapstream_queue_ready", &queue), 0.0);
    assert_eq!(
        get(
            &after,
            "snapstream_pool_handled_total",
            &[("pool", "index")]
        ),
        4.0
    );
    assert_eq!(
        get(&after, "snapstream_pool_panics_total", &[("pool", "index")]),
        0.0
    );
    assert!(get(&after, "snapstream_snapshot_builds_total", &[]) >= 1.0);

    // Requeueing through the admin moves the counters too.
    svc.queue.requeue_dead_letters(|_| true).await.unwrap();
    svc.handler.wait_handled(2).await;
    svc.queue
        .flush(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let last = scrape(&url).await;
    assert_eq!(
        get(&last, "snapstream_queue_pushes_total", &queue),
        5.0,
        "requeues are pushes"
    );
    assert_eq!(get(&last, "snapstream_queue_acks_total", &queue), 3.0);
    assert_eq!(get(&last, "snapstream_queue_dead_letters", &queue), 0.0);
}

/// With a Prometheus recorder the service installed globally, `collect`
/// records into it and `/metrics` renders the service's handle.
#[tokio::test]
async fn a_global_recorder_sees_the_figures() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    metrics::counter!("service_own_requests_total").increment(5);
    let svc = Service::start(1).await;
    let admin = svc.admin().prometheus(handle.clone()).build().unwrap();
    admin.collect().await;
    let text = handle.render();
    let m = parse(&text);
    assert_eq!(
        get(&m, "snapstream_topic_subscribers", &[("topic", "kv")]),
        2.0
    );
    svc.queue.push(Job { n: 1 }).await.unwrap();
    let url = format!("http://{}/metrics", serve(admin.router()).await);
    let m = scrape(&url).await;
    assert_eq!(
        get(&m, "snapstream_queue_pushes_total", &[("queue", QUEUE)]),
        1.0
    );
    assert_eq!(
        get(&m, "service_own_requests_total", &[]),
        5.0,
        "the service's own metrics too"
    );
}
