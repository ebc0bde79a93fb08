//! `--admin ADDR`: the operator's view of the demo while it runs.

use std::hash::Hash;
use std::net::SocketAddr;

#[cfg(feature = "admin")]
use serde::{de::DeserializeOwned, Serialize};
use snapstream::lease::LeasePool;
use snapstream::publisher::Publisher;
use snapstream::queue::WorkQueue;
use snapstream::workpool::KeyedPool;

use super::BoxError;

/// Serves the admin page, JSON API and `/metrics` of the demo's publisher,
/// pool, lease pool and work queue on `addr`, in a task that runs until the
/// process exits. Mutations are allowed only when `SNAPSTREAM_ADMIN_TOKEN`
/// is set (it is the bearer token).
#[cfg(feature = "admin")]
pub async fn serve<P, K, T, W>(
    addr: SocketAddr,
    publisher: &Publisher<P>,
    pool: &KeyedPool<K, T>,
    leases: &LeasePool<usize>,
    nodes: usize,
    queue: &WorkQueue<W>,
) -> Result<(), BoxError>
where
    P: Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Send + 'static,
    KeyedPool<K, T>: Send + Sync,
    W: Serialize + DeserializeOwned + Send + 'static,
{
    let mut admin = snapstream::admin::Admin::builder()
        .publisher(publisher)
        .keyed_pool("side-effects", pool)
        .lease_pool("nodes", leases, 0..nodes)
        .queue(queue);
    let token = std::env::var("SNAPSTREAM_ADMIN_TOKEN").ok();
    if let Some(t) = &token {
        admin = admin.token(t.clone());
    }
    let router = admin.build()?.router();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let at = listener.local_addr()?;
    let mode = if token.is_some() {
        "token from SNAPSTREAM_ADMIN_TOKEN"
    } else {
        "read-only: set SNAPSTREAM_ADMIN_TOKEN to allow actions"
    };
    eprintln!("replicate: admin page at http://{at}/ ({mode}); metrics at http://{at}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            eprintln!("replicate: the admin server stopped: {e}");
        }
    });
    Ok(())
}

/// Without the `admin` feature, `--admin` is refused.
#[cfg(not(feature = "admin"))]
pub async fn serve<P, K: Hash + Eq + Clone, T, W>(
    _addr: SocketAddr,
    _publisher: &Publisher<P>,
    _pool: &KeyedPool<K, T>,
    _leases: &LeasePool<usize>,
    _nodes: usize,
    _queue: &WorkQueue<W>,
) -> Result<(), BoxError> {
    // `Config::validate` refuses `--admin` in such a build.
    Err("this build has no admin feature".into())
}
