//! Property: snapshot then live, nothing lost and nothing twice, whatever the
//! interleaving of publishes, subscribes, reads and the snapshot handler's
//! progress (the handler is gated, so publishes land before, during and after
//! its read of the state, and before and after the splice).

mod publisher_support;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use snapstream::publisher::{SubscribeRequest, Subscription};
use tokio::sync::Semaphore;

use publisher_support::{builder, settle, Store, View, TOPIC};

const KEYS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    Write(usize, u64),
    Subscribe { key: usize, stale: bool },
    Read(usize),
    Unsubscribe(usize),
    OpenGate,
    Yield,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS.len(), 0..1000u64).prop_map(|(k, v)| Op::Write(k, v)),
        2 => (0..KEYS.len(), any::<bool>()).prop_map(|(key, stale)| Op::Subscribe { key, stale }),
        3 => (0..8usize).prop_map(Op::Read),
        1 => (0..8usize).prop_map(Op::Unsubscribe),
        2 => Just(Op::OpenGate),
        2 => Just(Op::Yield),
    ]
}

struct Sub {
    key: usize,
    sub: Subscription<u64>,
    view: View,
}

fn read_one(s: &mut Sub) {
    use futures::FutureExt;
    if let Some(m) = s.sub.next().now_or_never() {
        s.view.apply(m.expect("no error in this model"));
    }
}

fn run(ops: Vec<Op>, ttl: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let gate = Arc::new(Semaphore::new(0));
        let store = Store::new(Some(gate.clone()));
        let mut b = builder();
        if ttl {
            b.snapshot_cache_ttl(Duration::from_secs(3600));
        }
        let p = store.publisher(&mut b);
        store.write("seed", 0); // an empty store's snapshot reports index 1
        let mut subs: Vec<Sub> = Vec::new();
        for op in ops {
            match op {
                Op::Write(k, v) => {
                    store.write(KEYS[k], v);
                }
                Op::Subscribe { key, stale } => {
                    let req = SubscribeRequest::new(TOPIC, KEYS[key]).index(u64::from(stale));
                    let sub = p.subscribe(req).unwrap();
                    // A "stale" subscriber claims the state at index 1 (the
                    // seed: nothing for KEYS). If that index is still held it
                    // is resumed without framing, otherwise re-snapshotted.
                    let view = if stale {
                        View {
                            snapshot_done: true,
                            eos_index: 1,
                            last_live: 1,
                            ..View::default()
                        }
                    } else {
                        View::default()
                    };
                    subs.push(Sub { key, sub, view });
                }
                Op::Read(i) => {
                    if let Some(s) = subs.get_mut(i) {
                        read_one(s);
                    }
                }
                Op::Unsubscribe(i) => {
                    if i < subs.len() {
                        subs.remove(i);
                    }
                }
                Op::OpenGate => gate.add_permits(1),
                Op::Yield => tokio::task::yield_now().await,
            }
        }
        gate.add_permits(1_000);
        settle().await;
        for s in &mut subs {
            s.view.drain(&mut s.sub).expect("no error");
            let key = KEYS[s.key];
            prop_assert!(s.view.snapshot_done, "snapshot finished");
            prop_assert_eq!(&s.view.data, &store.view(Some(key)), "converged");
            prop_assert_eq!(
                &s.view.live_indexes,
                &store.writes_after(key, s.view.eos_index),
                "every live change after the snapshot exactly once"
            );
        }
        let stats = p.stats();
        prop_assert_eq!(stats.subscribers(), subs.len());
        drop(subs);
        prop_assert_eq!(p.stats().subscribers(), 0);
        prop_assert!(p.stats().topics[0].keys.is_empty(), "buffers freed");
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_then_live_nothing_lost_nothing_twice(
        ops in prop::collection::vec(op(), 1..60),
        ttl in any::<bool>(),
    ) {
        run(ops, ttl)?;
    }
}
