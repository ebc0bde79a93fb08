//! Serving a node over the network (features `jetstream` and `net`): the
//! node's publisher behind a [`Server`] that waits, for a resume, until the
//! node has applied the requested index.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::node::Node;
use super::state::NodeState;
use crate::codec::PayloadCodec;
use crate::net::{CatchUp, NotCaughtUp, Server, ServerBuilder};

/// Read-your-index for a [`Server`] over a node's publisher: a resume from
/// index `i` waits until the node has applied `i`, at most the node's
/// [`catch_up_timeout`](super::NodeBuilder::catch_up_timeout). Made by
/// [`Node::catch_up`]; [`Node::server`] installs it.
///
/// # Examples
///
/// See [`Node::server`].
#[derive(Debug, Clone)]
pub struct NodeCatchUp {
    applied: watch::Receiver<u64>,
    timeout: Duration,
}

impl NodeCatchUp {
    pub(super) fn new(applied: watch::Receiver<u64>, timeout: Duration) -> Self {
        Self { applied, timeout }
    }
}

impl CatchUp for NodeCatchUp {
    fn wait_for(&self, index: u64) -> BoxFuture<'static, Result<(), NotCaughtUp>> {
        let mut rx = self.applied.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let waited = tokio::time::timeout(timeout, async {
                rx.wait_for(|&a| a >= index).await.is_ok()
            })
            .await;
            match waited {
                Ok(true) => Ok(()),
                // Stopped, or the bound passed.
                Ok(false) | Err(_) => Err(NotCaughtUp {
                    requested: index,
                    applied: *rx.borrow(),
                }),
            }
        })
    }
}

impl<P: Send + Sync + 'static, S: NodeState<P>> Node<P, S> {
    /// The read-your-index wait of this node, for a [`Server`] of your own
    /// over [`publisher`](Self::publisher) (see [`ServerBuilder::catch_up`]).
    ///
    /// # Examples
    ///
    /// See [`server`](Self::server).
    pub fn catch_up(&self) -> NodeCatchUp {
        NodeCatchUp::new(self.applied_watch(), self.catch_up_timeout_value())
    }

    /// A [`ServerBuilder`] over this node's publisher with its
    /// read-your-index wait installed: a remote subscriber that failed over
    /// from a node further ahead waits here until this node has applied its
    /// index (at most the [`catch_up_timeout`](super::NodeBuilder::catch_up_timeout)),
    /// then resumes — without a new snapshot when the publisher still holds
    /// the index; past the bound its call ends with `UNAVAILABLE` and the
    /// client tries its next address. It is never served older state.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// use snapstream::cluster::{JsonCodec, Node, NodeState};
    /// use snapstream::event::Subject;
    /// use snapstream::net::{Client, RemoteRequest};
    ///
    /// # async fn f<S: NodeState<String>>(a: Node<String, S>, b: Node<String, S>) {
    /// let sa = a.server(JsonCodec).bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    /// let sb = b.server(JsonCodec).bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    /// // A client given both nodes: when `a` goes away its subscriptions resume on `b`.
    /// let client = Client::builder([format!("http://{}", sa.local_addr()), format!("http://{}", sb.local_addr())])
    ///     .build_with::<String, _>(JsonCodec)
    ///     .unwrap();
    /// let sub = client.subscribe(RemoteRequest::new("services", Subject::Wildcard));
    /// # drop(sub); }
    /// ```
    pub fn server<C: PayloadCodec<P>>(&self, codec: C) -> ServerBuilder<P, C> {
        Server::builder(self.publisher().clone(), codec).catch_up(self.catch_up())
    }
}
