//! `Send`/`Sync`/`Unpin` of the public handles and futures, checked at
//! compile time (as tokio's `async_send_sync.rs` does).

use snapstream::buffer::{Cursor, EventBuffer, Next, ReadError};

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn unpin<T: Unpin>() {}

#[test]
fn buffer_handles_are_send_sync_unpin() {
    send::<EventBuffer<u64, String>>();
    sync::<EventBuffer<u64, String>>();
    unpin::<EventBuffer<u64, String>>();
    send::<Cursor<u64, String>>();
    sync::<Cursor<u64, String>>();
    unpin::<Cursor<u64, String>>();
    send::<Next<'static, u64, String>>();
    sync::<Next<'static, u64, String>>();
    unpin::<Next<'static, u64, String>>();
    send::<ReadError<'static, String>>();
}

#[test]
fn next_future_is_send_across_spawn() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut w = EventBuffer::<u64>::new();
        let mut r = w.head();
        let t = tokio::spawn(async move { r.next().await.map(<[u64]>::to_vec).ok() });
        w.append_one(1);
        assert_eq!(t.await.unwrap(), Some(vec![1]));
    });
}

#[cfg(feature = "jetstream")]
#[test]
fn cluster_handles_and_futures_are_send_sync() {
    use snapstream::cluster::{
        JsonCodec, Log, LogWriter, Node, NodeBuilder, NodeState, NodeSubscribeError, StartError,
        WriteError,
    };
    use snapstream::event::{Event, Subject, Topic};
    use snapstream::publisher::SubscribeRequest;

    struct S;
    impl NodeState<String> for S {
        fn apply(&mut self, _: &Event<String>) {}
        fn snapshot(&self, _: &Topic, _: &Subject) -> Vec<Event<String>> {
            Vec::new()
        }
        fn reset(&mut self) {}
    }
    fn is_send<T: Send>(_: &T) {}

    send::<Log>();
    sync::<Log>();
    send::<LogWriter<String, JsonCodec>>();
    sync::<LogWriter<String, JsonCodec>>();
    send::<NodeBuilder<String, S>>();
    send::<Node<String, S>>();
    sync::<Node<String, S>>();
    send::<WriteError>();
    sync::<WriteError>();
    send::<StartError>();
    send::<NodeSubscribeError>();
    // The futures can be spawned.
    #[allow(dead_code)]
    fn futures(w: LogWriter<String, JsonCodec>, b: NodeBuilder<String, S>, n: Node<String, S>) {
        let v = String::new();
        is_send(&w.put("t", "k", &v));
        is_send(&b.start());
        is_send(&n.subscribe(SubscribeRequest::new("t", Subject::key("k"))));
        is_send(&n.wait_for_index(1, std::time::Duration::ZERO));
        is_send(&n.shutdown());
    }
}
