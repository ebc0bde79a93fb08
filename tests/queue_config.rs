//! Queue configuration from TOML: defaults, overrides, errors naming the field.

use std::time::Duration;

use snapstream::queue::config::{
    BackendConfig, QueuesConfig, DEFAULT_BATCH_LENGTH, DEFAULT_CONNECTION, DEFAULT_LENGTH,
    DEFAULT_MAX_WORKERS,
};

fn parse(s: &str) -> QueuesConfig {
    toml::from_str(s).unwrap()
}

#[test]
fn empty_config_gives_documented_defaults() {
    let c = parse("").resolve("any").unwrap();
    assert_eq!(c.backend, BackendConfig::Memory);
    assert_eq!(c.base.capacity, Some(DEFAULT_LENGTH));
    assert_eq!(c.work.batch_len, DEFAULT_BATCH_LENGTH);
    assert_eq!(c.work.max_workers, DEFAULT_MAX_WORKERS);
    assert!(!c.base.unique);
}

#[test]
fn per_queue_overrides_beat_shared_defaults() {
    let cfg = parse(
        r#"
        [defaults]
        backend = "disk"
        path = "/tmp/q.redb"
        max_workers = 8
        batch_length = 16
        visibility_timeout_ms = 5000

        [queues.mail]
        batch_length = 1
        unique = true

        [queues.index]
        backend = "memory"
        length = 10
        max_attempts = 2
        backoff_base_ms = 10
        backoff_max_ms = 20
        "#,
    );
    let mail = cfg.resolve("mail").unwrap();
    assert!(
        matches!(mail.backend, BackendConfig::Disk { ref path } if path.to_str() == Some("/tmp/q.redb"))
    );
    assert_eq!((mail.work.batch_len, mail.work.max_workers), (1, 8));
    assert!(mail.base.unique);
    assert_eq!(mail.base.visibility_timeout, Duration::from_secs(5));

    let index = cfg.resolve("index").unwrap();
    assert_eq!(index.backend, BackendConfig::Memory);
    assert_eq!(index.base.capacity, Some(10));
    assert_eq!(index.work.batch_len, 16);
    assert_eq!(index.work.max_attempts, 2);
    assert_eq!(index.work.backoff_max, Duration::from_millis(20));
    assert_eq!(cfg.resolve_all().unwrap().len(), 2);
}

#[test]
fn unknown_backend_names_the_field() {
    let cfg = parse(
        r#"
        [queues.mail]
        backend = "kafka"
        "#,
    );
    let err = cfg.resolve("mail").unwrap_err();
    assert_eq!(err.field, "queues.mail.backend");
    assert!(err.to_string().contains("queues.mail.backend"), "{err}");
    assert!(err.problem.contains("kafka"));
    // Other queues fall back to the (valid) defaults.
    assert!(cfg.resolve("other").is_ok());
}

#[test]
fn bad_values_name_the_field_and_layer() {
    let cases = [
        ("[defaults]\nlength = 0", "x", "defaults.length"),
        ("[queues.x]\nbatch_length = 0", "x", "queues.x.batch_length"),
        ("[queues.x]\nmax_workers = 0", "x", "queues.x.max_workers"),
        ("[defaults]\nmax_attempts = 0", "x", "defaults.max_attempts"),
        (
            "[queues.x]\nbackoff_base_ms = 100\nbackoff_max_ms = 10",
            "x",
            "queues.x.backoff_max_ms",
        ),
        (
            "[defaults]\nvisibility_timeout_ms = 0",
            "x",
            "defaults.visibility_timeout_ms",
        ),
        ("[queues.x]\nbackend = \"disk\"", "x", "queues.x.path"),
        ("[defaults]\nbackend = \"disk\"", "y", "defaults.path"),
    ];
    for (src, queue, field) in cases {
        let err = parse(src).resolve(queue).unwrap_err();
        assert_eq!(err.field, field, "config {src:?}");
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_connection_default_and_validation() {
    let c = parse("[defaults]\nbackend = \"redis\"")
        .resolve("q")
        .unwrap();
    assert_eq!(
        c.backend,
        BackendConfig::Redis {
            url: DEFAULT_CONNECTION.to_owned()
        }
    );
    let err = parse("[defaults]\nbackend = \"redis\"\nconnection = \"http://x\"")
        .resolve("q")
        .unwrap_err();
    assert_eq!(err.field, "defaults.connection");
}

#[cfg(not(feature = "redis"))]
#[test]
fn redis_not_compiled_in_is_an_error() {
    let err = parse("[defaults]\nbackend = \"redis\"")
        .resolve("q")
        .unwrap_err();
    assert_eq!(err.field, "defaults.backend");
    let _ = DEFAULT_CONNECTION;
}

#[test]
fn unknown_fields_and_wrong_types_are_rejected_by_the_parser() {
    let err = toml::from_str::<QueuesConfig>("[defaults]\nmax_wrokers = 3").unwrap_err();
    assert!(err.to_string().contains("max_wrokers"), "{err}");
    let err = toml::from_str::<QueuesConfig>("[queues.a]\nlength = -1").unwrap_err();
    assert!(err.to_string().contains("length"), "{err}");
    let err = toml::from_str::<QueuesConfig>("[queues.a]\nbatch_length = \"many\"").unwrap_err();
    assert!(err.to_string().contains("batch_length"), "{err}");
}
