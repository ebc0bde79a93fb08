//! Tracing: spans for subscribe, snapshot build, splice and queue batch
//! handling carry topic / key / queue fields at DEBUG, and nothing of the
//! hot path reaches a subscriber listening at INFO.

mod publisher_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use publisher_support::{Store, TOPIC};
use snapstream::publisher::SubscribeRequest;
use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata};

/// Records every span (name and fields) and event at or above `level`.
struct Recorder {
    level: Level,
    next: AtomicU64,
    seen: Arc<Mutex<Vec<String>>>,
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.level
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(self.level.into())
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut f = Fields(format!("span {}", span.metadata().name()));
        span.record(&mut f);
        self.seen.lock().unwrap().push(f.0);
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut f = Fields(format!("event {}", event.metadata().level()));
        event.record(&mut f);
        self.seen.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Subscribes, publishes, and runs a work queue batch under a recorder at
/// `level`; returns what it recorded.
fn run_at(level: Level) -> Vec<String> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        level,
        next: AtomicU64::new(0),
        seen: seen.clone(),
    };
    tracing::subscriber::with_default(recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = Store::new(None);
            let p = store.publisher(&mut publisher_support::builder());
            let mut sub = p.subscribe(SubscribeRequest::new(TOPIC, "a")).unwrap();
            store.write("a", 1);
            let mut view = publisher_support::View::default();
            while !view.snapshot_done {
                view.apply(sub.next().await.unwrap());
            }
            store.write("a", 2);
            view.apply(sub.next().await.unwrap());

            let base = Arc::new(MemoryQueue::new("mail", QueueOptions::default()).unwrap());
            let dead = Arc::new(MemoryQueue::new("mail.dead", QueueOptions::default()).unwrap());
            let q = WorkQueue::new(
                base,
                dead,
                WorkQueueOptions::default(),
                |_b: Vec<Item<u32>>| async { Vec::new() },
            )
            .unwrap();
            q.push(1).await.unwrap();
            q.flush(Duration::from_secs(5)).await.unwrap();
            q.shutdown(Duration::from_secs(5)).await;
        });
    });
    let out = seen.lock().unwrap().clone();
    out
}

#[test]
fn spans_at_debug_name_their_topic_key_and_queue() {
    let seen = run_at(Level::DEBUG);
    let has = |prefix: &str| seen.iter().any(|s| s.starts_with(prefix));
    assert!(
        has(&format!("span subscribe topic={TOPIC} subject=a")),
        "{seen:#?}"
    );
    assert!(
        has(&format!("span snapshot topic={TOPIC} subject=a")),
        "{seen:#?}"
    );
    assert!(has("span splice"), "{seen:#?}");
    assert!(has("span queue_batch queue=mail items=1"), "{seen:#?}");
}

#[test]
fn the_hot_path_is_silent_at_info() {
    let seen = run_at(Level::INFO);
    assert_eq!(seen, Vec::<String>::new());
}
