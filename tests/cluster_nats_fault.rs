//! A three-server JetStream cluster, started by the test on its own ports,
//! with the log's stream replicated three times: killing the stream's leader
//! mid-run loses no acknowledged change, and every node converges once the
//! stream has a leader again.

mod cluster_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_support::{free_port, nats_server_binary, unique_stream, Kv, View};
use snapstream::cluster::{JsonCodec, Log, LogConfig, Node};
use snapstream::event::Subject;
use snapstream::publisher::SubscribeRequest;

/// A failover takes the ordered consumer two missed heartbeats to notice.
const PATIENCE: Duration = Duration::from_secs(90);

/// Three `nats-server -js` processes routed into one cluster; killed on drop.
struct NatsCluster {
    servers: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let routes: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("\"nats-route://127.0.0.1:{}\"", route_ports[j]))
                .collect();
            let store = dir.path().join(format!("n{i}"));
            let conf = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{}\"\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: snapstream-test, listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
                client_ports[i],
                store.display(),
                route_ports[i],
                routes.join(", ")
            );
            let conf_path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&conf_path, conf).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start nats-server");
            servers.push(Some(child));
        }
        Self {
            servers,
            client_ports,
            _dir: dir,
        }
    }

    fn urls(&self) -> Vec<String> {
        self.client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// Opens the R3 log, retrying while the cluster forms (no signal tells
/// when JetStream's meta leader is elected but asking).
async fn open_when_ready(client: &async_nats::Client, config: &LogConfig) -> Log {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match Log::open(client.clone(), config).await {
            Ok(log) => return log,
            Err(e) if Instant::now() < deadline => {
                eprintln!("cluster not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("JetStream cluster never became ready: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_no_acknowledged_change() {
    let Some(bin) = nats_server_binary() else {
        eprintln!("notice: no nats-server binary (set NATS_SERVER_BIN); skipping");
        return;
    };
    let mut cluster = NatsCluster::start(&bin);
    let urls = cluster.urls();
    let deadline = Instant::now() + PATIENCE;
    let client = loop {
        match async_nats::connect(urls.clone()).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("cannot reach the test cluster: {e}"),
        }
    };
    let stream = unique_stream("r3_fault");
    let config = LogConfig::new(&stream, "snapstream-test.r3").replicas(3);
    let log = open_when_ready(&client, &config).await;
    let info = log
        .jetstream()
        .get_stream(&stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.config.num_replicas, 3);

    // Two nodes, each with its own connection to the cluster.
    let mut nodes = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..2 {
        let c = async_nats::connect(urls.clone()).await.unwrap();
        let node_log = Log::open(c, &config).await.unwrap();
        let mut b = Node::builder(&node_log, Kv::default(), JsonCodec);
        b.wildcard_topic("services");
        let node = b.start().await.unwrap();
        subs.push(
            node.subscribe(SubscribeRequest::new("services", Subject::Wildcard))
                .await
                .unwrap(),
        );
        nodes.push(node);
    }

    let writer = log.writer::<String, _>(JsonCodec);
    // Each change its own key: acknowledged ones must be in every view;
    // unacknowledged ones may be, but then in every view alike.
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut unsure = Vec::new();
    let mut killed_at = None;
    let mut acked_after_kill = 0;
    let started = Instant::now();
    let mut failed = 0;
    let deadline = Instant::now() + PATIENCE;
    for i in 0.. {
        if i == 40 {
            let info = log
                .jetstream()
                .get_stream(&stream)
                .await
                .unwrap()
                .get_info()
                .await
                .unwrap();
            let leader = info.cluster.and_then(|c| c.leader).expect("stream leader");
            let n: usize = leader.trim_start_matches('n').parse().unwrap();
            cluster.kill(n);
            killed_at = Some(i);
        }
        let key = format!("c{i:03}");
        match writer.put("services", &key, &format!("v{i}")).await {
            Ok(index) => {
                assert!(acked.values().all(|&j| j < index), "indexes increase");
                acked.insert(key, index);
                if killed_at.is_some() {
                    acked_after_kill += 1;
                }
            }
            Err(e) => {
                assert!(killed_at.is_some(), "writes fail only after the kill: {e}");
                failed += 1;
                if e.may_be_in_log() {
                    unsure.push(key);
                }
                // Retry pace while the stream elects a new leader.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if acked_after_kill >= 40 || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        acked_after_kill >= 40,
        "the stream took writes again after the kill"
    );
    let last = *acked.values().max().unwrap();
    eprintln!(
        "{:?}: acknowledged {} ({} after the kill), failed {failed} ({} maybe in the log)",
        started.elapsed(),
        acked.len(),
        acked_after_kill,
        unsure.len()
    );

    let mut states = Vec::new();
    for (node, sub) in nodes.iter().zip(&mut subs) {
        let waited = Instant::now();
        node.wait_for_index(last, PATIENCE).await.unwrap();
        eprintln!(
            "node caught up {:?} after the last write: {:?}",
            waited.elapsed(),
            node.stats()
        );
        let state = node.read(|kv, _| kv.topic("services")).await;
        for (key, index) in &acked {
            let (at, value) = state
                .get(key)
                .unwrap_or_else(|| panic!("acknowledged {key} lost"));
            assert_eq!(at, index);
            assert_eq!(*value, format!("v{}", &key[1..].parse::<u32>().unwrap()));
        }
        for key in state.keys() {
            assert!(
                acked.contains_key(key) || unsure.contains(key),
                "{key} was never written"
            );
        }
        let mut view = View::fresh();
        view.follow_to(sub, node.applied()).await.unwrap();
        assert_eq!(
            view.data, state,
            "the subscriber's view converged to the node's state"
        );
        assert_eq!(node.stats().quarantined, 0);
        states.push(state);
    }
    assert_eq!(
        states[0], states[1],
        "every node holds the same state, unacknowledged changes alike"
    );

    for node in nodes {
        node.shutdown().await;
    }
    // The servers and their storage go away with the test; deleting the
    // stream is a courtesy that may race the cluster's recovery.
    if let Err(e) = log.jetstream().delete_stream(&stream).await {
        eprintln!("stream not deleted (the cluster is discarded anyway): {e}");
    }
}
