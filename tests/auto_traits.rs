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
