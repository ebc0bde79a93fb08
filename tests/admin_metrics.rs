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

/// A histogram's `+Inf` bucket, count and sum, checking on the way that its
/// buckets are cumulative and end at the count.
fn histogram(m: &BTreeMap<Series, f64>, name: &str, label: (&str, &str)) -> (f64, f64) {
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter(|((n, l), _)| {
            n == &format!("{name}_bucket")
                && l.iter().any(|(k, v)| (k.as_str(), v.as_str()) == label)
        })
        .map(|((_, l), v)| {
            let le = &l.iter().find(|(k, _)| k == "le").expect("le label").1;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, *v)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(buckets.len() > 1, "{name} has buckets");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name} is cumulative"
    );
    let count = get(m, &format!("{name}_count"), &[label]);
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    (count, get(m, &format!("{name}_sum"), &[label]))
}

/// The figures the hot paths count: lag closes and re-snapshots, publish
/// batch sizes, snapshot build times, push latency, pool and lease waits.
#[tokio::test]
async fn hot_path_figures_move() {
    use snapstream::event::Event;
    use snapstream::lease::LeasePool;
    use snapstream::publisher::{
        LagPolicy, Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest,
    };
    use snapstream::workpool::KeyedPool;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    let svc = Service::start(2).await;
    let mut b = Publisher::<u64>::builder();
    b.lag_limit(Some(2));
    b.register("lag", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async {
        Ok(1)
    })
    .unwrap();
    let publisher = b.build();
    // A keyed pool of capacity 1 whose handler waits for a permit.
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let pool = KeyedPool::builder()
        .workers(1)
        .capacity(1)
        .build(move |_k: String, _v: u64| {
            let g = g.clone();
            async move { g.acquire().await.unwrap().forget() }
        })
        .unwrap();
    let leases = LeasePool::new();
    leases.set("db".to_string(), 1);
    let admin = snapstream::admin::Admin::builder()
        .publisher(&publisher)
        .keyed_pool("gated", &pool)
        .lease_pool("one", &leases, ["db".to_string()])
        .queue(&svc.queue)
        .build()
        .unwrap();
    let url = format!("http://{}/metrics", serve(admin.router()).await);
    let topic = ("topic", "lag");
    let queue = ("queue", QUEUE);

    let before = scrape(&url).await;
    assert_eq!(
        get(
            &before,
            "snapstream_topic_lagged_subscribers_total",
            &[topic]
        ),
        0.0
    );
    assert_eq!(
        histogram(&before, "snapstream_topic_publish_batch_events", topic),
        (0.0, 0.0)
    );
    assert_eq!(
        histogram(&before, "snapstream_queue_push_duration_seconds", queue).0,
        0.0
    );
    assert_eq!(
        get(
            &before,
            "snapstream_pool_add_waits_total",
            &[("pool", "gated")]
        ),
        0.0
    );
    assert_eq!(
        get(
            &before,
            "snapstream_lease_acquire_waits_total",
            &[("pool", "one")]
        ),
        0.0
    );

    // Two subscribers that never read, one of each lag policy; a reader
    // that waits for its snapshot first (one build).
    let mut reader = publisher
        .subscribe(SubscribeRequest::new("lag", "k"))
        .unwrap();
    let _closed = publisher
        .subscribe(SubscribeRequest::new("lag", "k"))
        .unwrap();
    let _resnap = publisher
        .subscribe(SubscribeRequest::new("lag", "k").on_lag(LagPolicy::Resnapshot))
        .unwrap();
    assert!(reader.next().await.unwrap().is_framing());
    // Five publishes (one of two events, four of one), which the reader
    // keeps up with and the other two fall behind by more than the limit.
    publisher
        .publish(vec![
            Event::new("lag", "k", 2, 0),
            Event::new("lag", "k", 2, 1),
        ])
        .unwrap();
    assert!(reader.next().await.unwrap().events().is_some());
    for i in 3..7 {
        publisher
            .publish(vec![Event::new("lag", "k", i, 0)])
            .unwrap();
        assert!(reader.next().await.unwrap().events().is_some());
    }
    svc.queue.push(Job { n: 1 }).await.unwrap();
    // One item the worker takes and holds (its handler waits for the
    // gate); then fill the pool without waiting, and one add that has to
    // wait for room.
    pool.try_add("first".into(), 0).unwrap();
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let mut n = 1;
    while pool.try_add(format!("k{n}"), n).is_ok() {
        n += 1;
    }
    assert_eq!(pool.stats().add_waits, 0, "try_add never waits");
    let third = tokio::spawn({
        let pool = pool.clone();
        async move { pool.add("last".into(), n).await.unwrap() }
    });
    // A lease held, and an acquire that waits for it.
    let held = leases.try_acquire("db".to_string()).unwrap();
    let waiter = tokio::spawn({
        let leases = leases.clone();
        async move { leases.acquire("db".to_string()).await.unwrap().id() }
    });
    // Poll the waiters until they counted their wait (no timing: the
    // counters are the signal).
    while pool.stats().add_waits == 0 || leases.waits() == 0 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(n as usize + 1);
    third.await.unwrap();
    drop(held);
    waiter.await.unwrap();

    let after = scrape(&url).await;
    assert_eq!(
        get(
            &after,
            "snapstream_topic_lagged_subscribers_total",
            &[topic]
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "snapstream_topic_resnapshotted_subscribers_total",
            &[topic]
        ),
        1.0
    );
    assert_eq!(
        histogram(&after, "snapstream_topic_publish_batch_events", topic),
        (5.0, 6.0),
        "five publish calls, six events"
    );
    let (builds, seconds) = histogram(&after, "snapstream_topic_snapshot_build_seconds", topic);
    assert!(builds >= 1.0, "the reader's snapshot was built");
    assert!(seconds >= 0.0);
    assert_eq!(
        histogram(&after, "snapstream_queue_push_duration_seconds", queue).0,
        1.0
    );
    assert_eq!(
        get(
            &after,
            "snapstream_pool_add_waits_total",
            &[("pool", "gated")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "snapstream_lease_acquire_waits_total",
            &[("pool", "one")]
        ),
        1.0
    );
}

/// Deliveries: the topic's counter moves by exactly the events its
/// subscribers received (snapshot and live), once each has caught up,
/// closed or read a flush's worth of batches.
#[tokio::test]
async fn deliveries_count_every_event_delivered() {
    use futures::FutureExt;
    use snapstream::event::{Event, Subject};
    use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};

    let mut b = Publisher::<u64>::builder();
    b.lag_limit(None);
    b.register(
        "d",
        |r: SnapshotRequest, mut s: SnapshotSink<u64>| async move {
            // Three snapshot events.
            s.append(vec![
                Event::new("d", r.subject().clone(), 1, 10),
                Event::new("d", r.subject().clone(), 1, 11),
            ])?;
            s.append(vec![Event::new("d", r.subject().clone(), 1, 12)])?;
            Ok(1)
        },
    )
    .unwrap();
    let publisher = b.build();
    let admin = snapstream::admin::Admin::builder()
        .publisher(&publisher)
        .build()
        .unwrap();
    let addr = serve(admin.router()).await;
    let url = format!("http://{addr}/metrics");
    let topic = [("topic", "d")];
    let delivered = || publisher.stats().topics[0].delivered;

    let before = scrape(&url).await;
    assert_eq!(
        get(&before, "snapstream_topic_deliveries_total", &topic),
        0.0
    );

    let mut a = publisher
        .subscribe(SubscribeRequest::new("d", "k"))
        .unwrap();
    let mut b = publisher
        .subscribe(SubscribeRequest::new("d", "k"))
        .unwrap();
    // Reads one subscriber until nothing is ready; returns the events seen.
    async fn drain(sub: &mut snapstream::publisher::Subscription<u64>) -> u64 {
        let mut n = 0;
        // The first message may need the snapshot task: wait for it.
        let first = sub.next().await.unwrap();
        n += first.events().map_or(0, |b| b.events().len() as u64);
        while let Some(m) = sub.next().now_or_never() {
            n += m.unwrap().events().map_or(0, |b| b.events().len() as u64);
        }
        n
    }
    // Wait for the snapshot to end on `a` (framing last), then drain.
    let mut seen_a = 0;
    loop {
        let m = a.next().await.unwrap();
        seen_a += m.events().map_or(0, |b| b.events().len() as u64);
        if m.is_framing() {
            break;
        }
    }
    assert_eq!(seen_a, 3, "three snapshot events");
    assert!(a.next().now_or_never().is_none(), "a caught up");
    assert_eq!(delivered(), 3, "a's snapshot, counted once a caught up");

    publisher
        .publish(vec![Event::new("d", "k", 2, 0), Event::new("d", "k", 2, 1)])
        .unwrap();
    publisher.publish(vec![Event::new("d", "k", 3, 0)]).unwrap();
    seen_a += drain(&mut a).await;
    assert_eq!(seen_a, 6);
    assert_eq!(delivered(), 6, "b has read nothing yet");

    // b reads its snapshot and the first live batch, then drops: its count
    // is added on drop.
    let mut seen_b = 0;
    loop {
        let m = b.next().await.unwrap();
        seen_b += m.events().map_or(0, |b| b.events().len() as u64);
        if m.is_framing() {
            break;
        }
    }
    assert_eq!(seen_b, 3);
    seen_b += b.next().await.unwrap().events().unwrap().events().len() as u64;
    assert_eq!(seen_b, 5);
    drop(b);
    assert_eq!(delivered(), 11);

    // A reader that never catches up still adds its count every so many
    // batches: 100 ready, 70 read.
    for i in 4..104 {
        publisher
            .publish(vec![Event::new("d", Subject::key("k"), i, 0)])
            .unwrap();
    }
    for _ in 0..70 {
        a.next().now_or_never().unwrap().unwrap();
    }
    let mid = delivered();
    assert!(
        mid > 11 && mid <= 11 + 70,
        "a added part of its 70 while reading: {mid}"
    );
    seen_a += 70 + drain(&mut a).await;
    assert_eq!(seen_a, 6 + 100);
    assert_eq!(delivered(), 11 + 100);

    let after = scrape(&url).await;
    assert_eq!(
        get(&after, "snapstream_topic_deliveries_total", &topic),
        111.0
    );
    let topics: serde_json::Value = reqwest::get(format!("http://{addr}/api/topics"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(topics[0]["deliveries"], 111, "{topics}");
}
