//! Remote clients failing over between nodes fed from one JetStream log:
//! each node serves its publisher over `net::Server` (`Node::server`), each
//! client is given every node's address. When a node's server goes away its
//! clients move to the next node and resume there by index — with no new
//! snapshot when that node holds the index, and only once that node has
//! applied the index when it lags (read-your-index). Checked by framing and
//! index by index: nothing applied twice, nothing skipped.

mod cluster_support;

use std::sync::Arc;
use std::time::Duration;

use cluster_support::{delete_log, open_log, Gate, Kv, Model, View, PATIENCE};
use futures::{FutureExt, StreamExt};
use snapstream::cluster::{JsonCodec, Log, Node};
use snapstream::event::{Message, Subject};
use snapstream::net::{Client, RemoteRequest, RemoteSubscriber, Server};

const TOPIC: &str = "t";

async fn start_node(log: &Log, state: Kv, catch_up: Duration) -> Node<String, Kv> {
    let mut b = Node::builder(log, state, JsonCodec);
    b.wildcard_topic(TOPIC)
        // Keep each key's snapshot chain for the whole test, so a node that
        // has applied an index still holds it for a resume.
        .snapshot_cache_ttl(Duration::from_secs(3600))
        .catch_up_timeout(catch_up);
    b.start().await.expect("node starts")
}

async fn serve(node: &Node<String, Kv>) -> Server {
    node.server(JsonCodec)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .expect("bind")
}

/// A client of `servers`, trying `first` first and then the others in turn.
fn client(servers: &[&Server], first: usize) -> Client<String, JsonCodec> {
    let n = servers.len();
    let addresses: Vec<String> = (0..n)
        .map(|i| format!("http://{}", servers[(first + i) % n].local_addr()))
        .collect();
    Client::builder(addresses)
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
        .build_with::<String, _>(JsonCodec)
        .unwrap()
}

/// A remote wildcard subscriber and the view it builds, with its framing.
struct Remote {
    sub: RemoteSubscriber<String>,
    view: View,
    new_snapshots: usize,
}

impl Remote {
    fn new(client: &Client<String, JsonCodec>) -> Self {
        Self {
            sub: client.subscribe(RemoteRequest::new(TOPIC, Subject::Wildcard)),
            view: View::fresh(),
            new_snapshots: 0,
        }
    }

    fn apply(&mut self, msg: Message<String>) {
        if matches!(msg, Message::NewSnapshotToFollow) {
            self.new_snapshots += 1;
        }
        self.view.apply(msg);
    }

    /// Reads until the view is complete up to `index`.
    async fn follow_to(&mut self, index: u64) {
        while !self.view.complete_to(index) {
            let msg = tokio::time::timeout(PATIENCE, self.sub.next())
                .await
                .expect("remote subscriber stalled")
                .expect("remote stream ended")
                .expect("remote subscriber failed");
            self.apply(msg);
        }
    }

    /// One snapshot, then every acknowledged change after it exactly once,
    /// in order; the view equals the writer's state at `last`.
    fn assert_exact(&self, model: &Model, last: u64, who: &str) {
        assert_eq!(self.new_snapshots, 0, "{who}: no NewSnapshotToFollow");
        assert_eq!(self.view.snapshots.len(), 1, "{who}: one snapshot only");
        let (at, ref content) = self.view.snapshots[0];
        assert_eq!(content, &model.at(TOPIC, at), "{who}: snapshot content");
        assert_eq!(
            self.view.live,
            model.after(TOPIC, at),
            "{who}: every live change once, none skipped"
        );
        assert_eq!(self.view.data, model.at(TOPIC, last), "{who}: converged");
    }
}

async fn put_n(model: &mut Model, w: &snapstream::cluster::LogWriter<String, JsonCodec>, n: usize) {
    for _ in 0..n {
        let k = model.changes.len();
        model
            .put(w, TOPIC, &format!("k{}", k % 5), &format!("v{k}"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_dead_node_resume_on_a_caught_up_node_without_a_snapshot() {
    let Some((_nats, log)) = open_log("failover_caught_up").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    put_n(&mut model, &writer, 10).await;

    let nodes = [
        start_node(&log, Kv::default(), PATIENCE).await,
        start_node(&log, Kv::default(), PATIENCE).await,
        start_node(&log, Kv::default(), PATIENCE).await,
    ];
    for node in &nodes {
        node.wait_for_index(model.last(), PATIENCE).await.unwrap();
    }
    let (sa, sb, sc) = (
        serve(&nodes[0]).await,
        serve(&nodes[1]).await,
        serve(&nodes[2]).await,
    );
    let servers = [&sa, &sb, &sc];
    // Two remote views per node, each client starting at its own node.
    let clients: Vec<_> = (0..3).map(|i| client(&servers, i)).collect();
    let mut remotes: Vec<Remote> = (0..6).map(|i| Remote::new(&clients[i % 3])).collect();
    for r in &mut remotes {
        r.follow_to(model.last()).await;
    }
    assert_eq!(
        [
            sa.active_streams(),
            sb.active_streams(),
            sc.active_streams()
        ],
        [2, 2, 2]
    );

    // Writes go on while node A's server dies; its clients follow on B.
    put_n(&mut model, &writer, 10).await;
    for r in &mut remotes {
        r.follow_to(model.last()).await;
    }
    for node in &nodes {
        node.wait_for_index(model.last(), PATIENCE).await.unwrap();
    }
    let writes = {
        let mut model = model.clone();
        let writer = log.writer::<String, _>(JsonCodec);
        tokio::spawn(async move {
            put_n(&mut model, &writer, 30).await;
            model
        })
    };
    sa.shutdown().await.unwrap();
    let model = writes.await.unwrap();
    let last = model.last();
    for r in &mut remotes {
        r.follow_to(last).await;
    }

    for (i, r) in remotes.iter().enumerate() {
        let who = format!("view {i} (started on node {})", i % 3);
        r.assert_exact(&model, last, &who);
        if i % 3 == 0 {
            assert!(r.sub.reconnects() >= 1, "{who} failed over");
        } else {
            assert_eq!(r.sub.reconnects(), 0, "{who} stayed");
        }
    }
    assert_eq!(
        [sb.active_streams(), sc.active_streams()],
        [4, 2],
        "A's clients moved to B, their next address"
    );
    for node in &nodes {
        assert_eq!(
            node.read(|s, _| s.topic(TOPIC)).await,
            model.at(TOPIC, last)
        );
    }
    sb.shutdown().await.unwrap();
    sc.shutdown().await.unwrap();
    delete_log(&log).await;
}

/// Opens the gate when the test ends, failed or not (a blocked apply would
/// otherwise keep the runtime from shutting down).
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_failing_over_to_a_lagging_node_waits_for_its_index() {
    let Some((_nats, log)) = open_log("failover_lagging").await else {
        return;
    };
    let writer = log.writer::<String, _>(JsonCodec);
    let mut model = Model::default();
    put_n(&mut model, &writer, 5).await;
    let gate = Arc::new(Gate::default());
    let _open_on_failure = OpenOnDrop(gate.clone());
    // B gives up on a resume it has not applied after 100 ms: the client
    // then cycles between dead A and lagging B.
    let a = start_node(&log, Kv::default(), PATIENCE).await;
    let b = start_node(&log, Kv::gated(gate.clone()), Duration::from_millis(100)).await;
    a.wait_for_index(model.last(), PATIENCE).await.unwrap();
    b.wait_for_index(model.last(), PATIENCE).await.unwrap();
    let (sa, sb) = (serve(&a).await, serve(&b).await);
    let servers = [&sa, &sb];
    let mut on_a = Remote::new(&client(&servers, 0));
    let mut on_b = Remote::new(&client(&servers, 1));
    on_a.follow_to(model.last()).await;
    on_b.follow_to(model.last()).await;

    // B stops applying; A goes on, and its view with it.
    let lagging_at = model.last();
    gate.close_from(lagging_at + 1);
    put_n(&mut model, &writer, 5).await;
    let last = model.last();
    on_a.follow_to(last).await;
    assert_eq!(b.applied(), lagging_at);

    // A dies. Its client must not be served B's older state: every attempt
    // is refused (A is gone, B is not caught up) and it yields nothing.
    sa.shutdown().await.unwrap();
    let refused = on_a.sub.reconnects() + 6;
    tokio::time::timeout(PATIENCE, async {
        while on_a.sub.reconnects() < refused {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("refused again and again while B lags (a stale answer would stop the retries)");
    assert!(
        on_a.sub.next().now_or_never().is_none(),
        "nothing served while B lags behind the client's index"
    );
    assert_eq!(b.applied(), lagging_at);

    // B catches up: the client resumes there, from its own index, and
    // follows the changes after it.
    gate.open();
    put_n(&mut model, &writer, 5).await;
    let last = model.last();
    on_a.follow_to(last).await;
    on_b.follow_to(last).await;
    on_a.assert_exact(&model, last, "view that failed over");
    on_b.assert_exact(&model, last, "view on B");
    assert_eq!(sb.active_streams(), 2);
    sb.shutdown().await.unwrap();
    delete_log(&log).await;
}
