//! A partition and a degraded link between client and server, made with
//! network namespaces and a veth pair (root only; bounded by `timeout`;
//! only addresses inside the two namespaces): every view converges after
//! the network heals, nothing lost or doubled.
//!
//! The test re-runs its own binary in each namespace: the server role (a
//! store, a publisher, the gRPC server; it writes when told on stdin) and
//! the client role (views; it degrades and partitions the link). Packet loss
//! needs the kernel's `netem` qdisc; where it is missing the degraded phase
//! throttles the link with `tbf` instead, and says so. Without root or
//! network namespaces the test is skipped with a notice.

mod net_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use net_common::{Checked, Store, TOPIC};
use snapstream::event::Subject;
use snapstream::net::{BinaryCodec, Client, RemoteRequest, Server, Views};

const ROLE: &str = "SNAPSTREAM_NETNS_ROLE";
const NAME: &str = "partition_between_namespaces_heals_and_views_converge";
const SERVER_IP: &str = "10.231.7.1";
const CLIENT_IP: &str = "10.231.7.2";
const PORT: u16 = 7001;
const KEYS: usize = 8;
/// A hang guard only: the test waits on signals, this bounds a broken run.
const GUARD: Duration = Duration::from_secs(60);

fn names() -> (String, String) {
    let id =
        std::env::var("SNAPSTREAM_NETNS_ID").unwrap_or_else(|_| std::process::id().to_string());
    (format!("ssnet-srv-{id}"), format!("ssnet-cli-{id}"))
}

fn run(cmd: &[&str]) -> bool {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deletes the namespaces (and with them the veth pair) on drop.
struct Namespaces(String, String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        run(&["ip", "netns", "del", &self.0]);
        run(&["ip", "netns", "del", &self.1]);
    }
}

fn role_command(ns: &str, role: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    c
}

#[test]
fn partition_between_namespaces_heals_and_views_converge() {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => return server_role(),
        Ok("client") => return client_role(),
        _ => {}
    }
    let (srv, cli) = names();
    if !run(&["ip", "netns", "add", &srv]) {
        eprintln!(
            "skipping net_partition: cannot create network namespaces (root and iproute2 needed)"
        );
        return;
    }
    let _cleanup = Namespaces(srv.clone(), cli.clone());
    assert!(run(&["ip", "netns", "add", &cli]));
    let in_ns = |ns: &str, args: &[&str]| {
        let mut cmd = vec!["ip", "netns", "exec", ns];
        cmd.extend_from_slice(args);
        assert!(run(&cmd), "{cmd:?}");
    };
    assert!(run(&[
        "ip", "link", "add", "veth-s", "netns", &srv, "type", "veth", "peer", "name", "veth-c",
        "netns", &cli,
    ]));
    in_ns(
        &srv,
        &[
            "ip",
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "veth-s",
        ],
    );
    in_ns(
        &cli,
        &[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "veth-c",
        ],
    );
    for (ns, dev) in [(&srv, "veth-s"), (&cli, "veth-c")] {
        in_ns(ns, &["ip", "link", "set", "lo", "up"]);
        in_ns(ns, &["ip", "link", "set", dev, "up"]);
    }
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("timeout")
        .args(["240", "ip", "netns", "exec", &cli])
        .arg(exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(ROLE, "client")
        .env("SNAPSTREAM_NETNS_ID", std::process::id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "the client role failed: {status}");
}

/// The server process: writes `n` changes on "write n", answers with the
/// store's state; ends on "quit" or when stdin closes.
fn server_role() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::default();
        let publisher = store.publisher();
        let server = Server::builder(publisher.clone(), BinaryCodec)
            .keepalive(Duration::from_secs(1), Duration::from_secs(1))
            .progress_interval(Some(Duration::from_millis(200)))
            .bind(format!("{SERVER_IP}:{PORT}").parse().unwrap())
            .await
            .unwrap();
        println!("@@ ready");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut n = 0usize;
        while let Some(line) = rx.recv().await {
            let Some(count) = line.strip_prefix("write ") else {
                break;
            };
            for _ in 0..count.trim().parse::<usize>().unwrap() {
                store.write(&publisher, &format!("k{}", n % KEYS));
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let st = store.0.lock().unwrap();
            let keys: Vec<String> = st
                .keys
                .iter()
                .map(|(k, (i, s))| format!("{k}={i}:{s}"))
                .collect();
            println!("@@ done {} {}", st.index, keys.join(","));
        }
        server.shutdown().await.unwrap();
    });
}

struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ServerProcess {
    fn line(&mut self) -> String {
        loop {
            let mut l = String::new();
            assert!(
                self.stdout.read_line(&mut l).unwrap() > 0,
                "the server role ended"
            );
            // The harness may have printed on the same line before it.
            if let Some(at) = l.find("@@ ") {
                return l[at + 3..].trim_end().to_string();
            }
        }
    }

    /// Asks for `n` writes; returns the store's index and keys afterwards.
    fn write(&mut self, n: usize) -> (u64, BTreeMap<String, (u64, u64)>) {
        writeln!(self.stdin, "write {n}").unwrap();
        let l = self.line();
        let mut parts = l.strip_prefix("done ").unwrap().split(' ');
        let index = parts.next().unwrap().parse().unwrap();
        let keys = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                let (i, s) = v.split_once(':').unwrap();
                (k.to_string(), (i.parse().unwrap(), s.parse().unwrap()))
            })
            .collect();
        (index, keys)
    }
}

fn tc_degrade() -> &'static str {
    if run(&[
        "tc", "qdisc", "add", "dev", "veth-c", "root", "netem", "loss", "20%", "delay", "5ms",
    ]) {
        "netem loss 20%, delay 5 ms"
    } else {
        assert!(run(&[
            "tc", "qdisc", "add", "dev", "veth-c", "root", "tbf", "rate", "256kbit", "burst",
            "16kbit", "latency", "200ms",
        ]));
        eprintln!("net_partition: no netem in this kernel; the degraded phase throttles the link (tbf 256 kbit/s) instead of dropping packets");
        "tbf 256 kbit/s"
    }
}

fn client_role() {
    let (srv, _) = names();
    let mut child = role_command(&srv, "server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = ServerProcess {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    assert_eq!(server.line(), "ready");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = Client::builder([format!("http://{SERVER_IP}:{PORT}")])
            .keepalive(Duration::from_secs(1), Duration::from_secs(1))
            .connect_timeout(Duration::from_secs(1))
            .backoff(Duration::from_millis(20), Duration::from_millis(500))
            .build::<u64>()
            .unwrap();
        let views = Views::builder(client.clone(), Checked::default).build();
        let all = views.view(TOPIC, Subject::Wildcard);
        let keyed: Vec<_> = (0..KEYS)
            .map(|k| {
                (
                    format!("k{k}"),
                    views.view(TOPIC, Subject::key(format!("k{k}"))),
                )
            })
            .collect();
        let raw = client.subscribe(RemoteRequest::new(TOPIC, Subject::key("k0")));

        let converge = |index: u64, expected: BTreeMap<String, (u64, u64)>| {
            let all = &all;
            let keyed = &keyed;
            async move {
                assert!(all.wait(index - 1, GUARD).await.unwrap() >= index);
                all.read(|s| {
                    assert_eq!(s.violations, Vec::<String>::new());
                    assert_eq!(s.keys, expected);
                });
                for (key, v) in keyed {
                    let (i, seq) = expected[key];
                    assert!(v.wait(i - 1, GUARD).await.unwrap() >= i, "{key}");
                    v.read(|s| {
                        assert_eq!(s.violations, Vec::<String>::new(), "{key}");
                        assert_eq!(s.keys.get(key), Some(&(i, seq)), "{key}");
                    });
                    assert_eq!(v.duplicates(), 0);
                }
                assert_eq!(all.duplicates(), 0);
            }
        };

        let (index, keys) = tokio::task::block_in_place(|| server.write(100));
        eprintln!(
            "net_partition: wrote up to {index}; views at {}",
            all.index()
        );
        converge(index, keys).await;
        eprintln!("net_partition: converged on a healthy link");

        // A degraded link while changes flow.
        let how = tc_degrade();
        let (index, keys) = tokio::task::block_in_place(|| server.write(300));
        converge(index, keys).await;
        assert!(run(&["tc", "qdisc", "del", "dev", "veth-c", "root"]));
        eprintln!("net_partition: converged over a degraded link ({how})");

        // A partition while changes flow: long enough for the keepalive to
        // declare the connection dead (1 s + 1 s).
        assert!(run(&["ip", "link", "set", "veth-c", "down"]));
        let (index, keys) = tokio::task::block_in_place(|| server.write(300));
        tokio::time::sleep(Duration::from_secs(3)).await; // the partition's length
        assert!(run(&["ip", "link", "set", "veth-c", "up"]));
        converge(index, keys).await;
        assert!(raw.reconnects() >= 1, "the partition broke the connection");
        eprintln!(
            "net_partition: converged after a 3 s partition ({} reconnects)",
            raw.reconnects()
        );

        writeln!(server.stdin, "quit").unwrap();
        assert!(server.child.wait().unwrap().success());
    });
}
