//! `Send`/`Sync`/`Unpin` of the network handles and futures, checked at
//! compile time.

use snapstream::net::{
    BinaryCodec, Client, KeyValue, RemoteError, RemoteSubscriber, Server, SubscribeService, View,
    Views,
};

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn unpin<T: Unpin>() {}
fn send_future<F: std::future::Future + Send>(_: F) {}

#[test]
fn net_handles_are_send_sync_unpin() {
    send::<Server>();
    sync::<Server>();
    send::<SubscribeService<u64, BinaryCodec>>();
    sync::<SubscribeService<u64, BinaryCodec>>();
    send::<Client<u64, BinaryCodec>>();
    sync::<Client<u64, BinaryCodec>>();
    send::<RemoteSubscriber<u64>>();
    sync::<RemoteSubscriber<u64>>();
    unpin::<RemoteSubscriber<u64>>();
    send::<Views<u64, BinaryCodec, KeyValue<u64>>>();
    sync::<Views<u64, BinaryCodec, KeyValue<u64>>>();
    send::<View<KeyValue<u64>>>();
    sync::<View<KeyValue<u64>>>();
    unpin::<View<KeyValue<u64>>>();
    send::<RemoteError>();
    sync::<RemoteError>();
}

#[allow(dead_code, clippy::diverging_sub_expression, unreachable_code)]
fn futures_are_send(sub: &mut RemoteSubscriber<u64>, view: &View<KeyValue<u64>>, server: Server) {
    send_future(sub.recv());
    send_future(view.wait(0, std::time::Duration::ZERO));
    send_future(server.shutdown());
}
