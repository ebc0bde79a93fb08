//! Graceful shutdown of one server of two: its streams end with
//! UNAVAILABLE, every remote subscriber moves to the other address and
//! resumes, and the views stay converged with nothing doubled or skipped.

mod net_common;

use std::time::Duration;

use net_common::{Checked, Store, TOPIC};
use snapstream::event::Subject;
use snapstream::net::{BinaryCodec, Client, Server, Views};
use snapstream::publisher::Publisher;

const GUARD: Duration = Duration::from_secs(120);

/// One change, published to both replicas' publishers.
fn write(store: &Store, replicas: &[&Publisher<u64>], key: &str) -> u64 {
    let index = store.write(replicas[0], key);
    let (_, seq) = store.get(key).unwrap();
    replicas[1]
        .publish(vec![snapstream::event::Event::new(TOPIC, key, index, seq)])
        .unwrap();
    index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_one_server_down_moves_every_subscriber_to_the_next() {
    let store = Store::default();
    let (pa, pb) = (store.publisher(), store.publisher());
    for k in 0..4 {
        write(&store, &[&pa, &pb], &format!("k{k}"));
    }
    let a = Server::builder(pa.clone(), BinaryCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let b = Server::builder(pb.clone(), BinaryCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::builder([
        format!("http://{}", a.local_addr()),
        format!("http://{}", b.local_addr()),
    ])
    .backoff(Duration::from_millis(5), Duration::from_millis(50))
    .build::<u64>()
    .unwrap();
    let views = Views::builder(client, Checked::default).build();
    let all = views.view(TOPIC, Subject::Wildcard);
    let one = views.view(TOPIC, Subject::key("k1"));
    let ready = all.wait(0, GUARD).await.unwrap();
    one.wait(0, GUARD).await.unwrap();
    assert_eq!(a.active_streams(), 2, "the first address is tried first");
    assert_eq!(b.active_streams(), 0);

    let mut last = ready;
    for n in 0..50 {
        last = write(&store, &[&pa, &pb], &format!("k{}", n % 4));
    }
    assert!(all.wait(last - 1, GUARD).await.unwrap() >= last);

    a.shutdown().await.unwrap();
    for n in 0..50 {
        last = write(&store, &[&pa, &pb], &format!("k{}", n % 4));
    }
    assert!(all.wait(last - 1, GUARD).await.unwrap() >= last);
    let (k1_index, k1_seq) = store.get("k1").unwrap();
    assert!(one.wait(k1_index - 1, GUARD).await.unwrap() >= k1_index);
    assert_eq!(
        b.active_streams(),
        2,
        "both subscriptions moved to the second server"
    );

    let expected = store.0.lock().unwrap().keys.clone();
    all.read(|s| {
        assert_eq!(s.violations, Vec::<String>::new());
        assert_eq!(s.keys, expected);
    });
    one.read(|s| {
        assert_eq!(s.violations, Vec::<String>::new());
        assert_eq!(s.keys.get("k1"), Some(&(k1_index, k1_seq)));
    });
    assert_eq!(all.duplicates() + one.duplicates(), 0);
    b.shutdown().await.unwrap();
}
