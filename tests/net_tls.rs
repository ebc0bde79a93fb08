//! Subscribing over TLS (rustls): a client trusting the server's CA gets
//! its snapshot and live events, and the idle timeout counts its TLS
//! connection's streams.
//! Certificates are made with the `openssl` command; the test is skipped
//! (with a notice) where it is missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use snapstream::event::{Event, Message, Subject};
use snapstream::net::{BinaryCodec, Client, RemoteRequest, Server};
use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

const IDLE: Duration = Duration::from_millis(200);

fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// (CA pem, server cert pem, server key pem), or None without openssl.
fn certificates(dir: &Path) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=snapstream test CA",
    ]);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .ok()?;
    let sign = [
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ];
    if !(openssl(dir, &ca) && openssl(dir, &csr) && openssl(dir, &sign)) {
        return None;
    }
    let read = |f: &str| std::fs::read(dir.join(f)).ok();
    Some((read("ca.pem")?, read("server.pem")?, read("server.key")?))
}

#[tokio::test]
async fn subscribe_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let Some((ca, cert, key)) = certificates(dir.path()) else {
        eprintln!("skipping net_tls: the openssl command is not available");
        return;
    };
    let mut b = Publisher::<u64>::builder();
    b.register(
        "t",
        |r: SnapshotRequest, mut s: SnapshotSink<u64>| async move {
            s.append(vec![Event::new("t", r.subject().clone(), 1, 10)])?;
            Ok(1)
        },
    )
    .unwrap();
    let publisher = b.build();
    let server = Server::builder(publisher.clone(), BinaryCodec)
        .tls(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .idle_timeout(Some(IDLE))
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = server.local_addr().port();

    let trusted = Client::builder([format!("https://localhost:{port}")])
        .tls(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .build::<u64>()
        .unwrap();
    let mut sub = trusted.subscribe(RemoteRequest::new("t", Subject::key("k")));
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!(*first.events().unwrap()[0].payload(), 10);
    assert_eq!(
        sub.next().await.unwrap(),
        Ok(Message::EndOfSnapshot { index: 1 })
    );
    // The open stream keeps its TLS connection past the idle timeout.
    tokio::time::sleep(IDLE * 3).await;
    publisher
        .publish(vec![Event::new("t", "k", 2, 11)])
        .unwrap();
    let live = sub.next().await.unwrap().unwrap();
    assert_eq!(*live.events().unwrap()[0].payload(), 11);
    assert_eq!(sub.reconnects(), 0);
    assert_eq!(server.stats().connections_closed_idle, 0);

    // Without a stream it is closed.
    drop(sub);
    tokio::time::timeout(Duration::from_secs(30), async {
        while server.stats().connections_closed_idle == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the idle TLS connection was never closed");
    server.shutdown().await.unwrap();
}
