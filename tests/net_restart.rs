//! The server process killed mid-stream and restarted on the same port:
//! every client resumes, every view converges to the store, and no event is
//! applied twice or skipped (each key's payload is its change count, so a
//! gap or a repeat shows).

mod net_common;

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::Duration;

use futures::StreamExt;
use net_common::{Checked, Store, TOPIC};
use snapstream::event::{Message, Subject};
use snapstream::net::{BinaryCodec, Client, RemoteRequest, Server, Views};
use tokio::sync::oneshot;

const KEYS: usize = 8;
/// A hang guard only: the test waits on signals, this bounds a broken run.
const GUARD: Duration = Duration::from_secs(120);

struct Process {
    kill: oneshot::Sender<()>,
    thread: thread::JoinHandle<()>,
}

/// A "server process": its own runtime with the publisher, the gRPC server
/// and a writer making `writes` changes. Killing it drops the runtime, and
/// with it every connection, mid-stream.
fn start(
    store: Store,
    addr: SocketAddr,
    writes: usize,
) -> (Process, SocketAddr, std_mpsc::Receiver<()>) {
    let (kill, killed) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let (done_tx, done_rx) = std_mpsc::channel();
    let thread = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let publisher = store.publisher();
            let server = Server::builder(publisher.clone(), BinaryCodec)
                .progress_interval(Some(Duration::from_millis(50)))
                .bind(addr)
                .await
                .unwrap();
            ready_tx.send(server.local_addr()).unwrap();
            tokio::spawn(async move {
                for n in 0..writes {
                    store.write(&publisher, &format!("k{}", n % KEYS));
                    // Pacing, so the kill lands while events flow.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let _ = done_tx.send(());
            });
            let _ = killed.await;
        });
        // Wait until every task (listener, connections) is dropped: the port
        // is free again when the thread ends.
        rt.shutdown_timeout(Duration::from_secs(30));
    });
    let addr = ready_rx.recv().unwrap();
    (Process { kill, thread }, addr, done_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_restarted_on_the_same_port_every_view_converges() {
    let store = Store::default();
    let (first, addr, _first_done) = start(store.clone(), "127.0.0.1:0".parse().unwrap(), 100_000);

    let client = Client::builder([format!("http://{addr}")])
        .backoff(Duration::from_millis(10), Duration::from_millis(200))
        .build::<u64>()
        .unwrap();
    let views = Views::builder(client.clone(), Checked::default).build();
    let keyed: Vec<_> = (0..KEYS)
        .map(|k| {
            (
                format!("k{k}"),
                views.view(TOPIC, Subject::key(format!("k{k}"))),
            )
        })
        .collect();
    let all = views.view(TOPIC, Subject::Wildcard);
    // A raw remote subscriber too: its messages must stay well framed.
    let mut raw = client.subscribe(RemoteRequest::new(TOPIC, Subject::key("k0")));

    // Mid-stream: every view has its snapshot and live events are flowing.
    for (_, v) in &keyed {
        assert!(v.wait(0, GUARD).await.unwrap() > 0);
    }
    let seen = all.wait(0, GUARD).await.unwrap();
    assert!(all.wait(seen + 50, GUARD).await.unwrap() > seen + 50);

    first.kill.send(()).unwrap();
    first.thread.join().unwrap();
    let at_kill = store.0.lock().unwrap().index;

    let (second, addr2, second_done) = start(store.clone(), addr, 300);
    assert_eq!(addr2, addr, "restarted on the same port");
    second_done.recv().unwrap();
    let final_index = store.0.lock().unwrap().index;
    assert!(final_index > at_kill);

    // Every view converges to the store.
    assert!(all.wait(final_index - 1, GUARD).await.unwrap() >= final_index);
    let expected = store.0.lock().unwrap().keys.clone();
    all.read(|s| {
        assert_eq!(s.violations, Vec::<String>::new());
        let got: Vec<_> = s.keys.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let want: Vec<_> = expected.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(got, want);
    });
    assert_eq!(all.duplicates(), 0);
    assert!(
        all.snapshots() >= 2,
        "the restarted server sent a fresh snapshot"
    );
    for (key, v) in &keyed {
        let (index, seq) = expected[key];
        assert!(v.wait(index - 1, GUARD).await.unwrap() >= index);
        v.read(|s| {
            assert_eq!(s.violations, Vec::<String>::new(), "{key}");
            assert_eq!(s.keys.get(key), Some(&(index, seq)), "{key}");
        });
        assert_eq!(v.duplicates(), 0);
    }

    // The raw subscriber: live indexes only grow between resets, and every
    // reset is announced before its snapshot.
    let (k0_index, _) = expected["k0"];
    let mut last = 0;
    let mut in_snapshot = true;
    while raw.last_index().is_none_or(|i| i < k0_index) {
        match raw.next().await.unwrap().unwrap() {
            Message::NewSnapshotToFollow => in_snapshot = true,
            Message::EndOfSnapshot { index } => {
                in_snapshot = false;
                last = index;
            }
            Message::Events(b) if !in_snapshot => {
                assert!(b.index() > last, "live {} after {last}", b.index());
                last = b.index();
            }
            Message::Events(_) => {}
        }
    }
    assert!(raw.reconnects() >= 1);

    second.kill.send(()).unwrap();
    second.thread.join().unwrap();
}
