//! The type-erased handles the admin holds, each over public API only.

use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::histogram::Histogram;
use crate::lease::{Counts, LeasePool};
use crate::publisher::{Publisher, PublisherStats};
use crate::queue::{Backend, DeadLetter, ItemId, QueueError, QueueLen, WorkError, WorkQueue};
use crate::workpool::{self, KeyedPool};

pub(crate) trait PublisherSource: Send + Sync {
    fn stats(&self) -> PublisherStats;
    /// The topic's publish batch sizes and snapshot build times.
    fn histograms(&self, topic: &str) -> Option<(Histogram, Histogram)>;
}

impl<P: Send + Sync + 'static> PublisherSource for Publisher<P> {
    fn stats(&self) -> PublisherStats {
        Publisher::stats(self)
    }
    fn histograms(&self, topic: &str) -> Option<(Histogram, Histogram)> {
        Some((self.batch_sizes(topic)?, self.snapshot_build_times(topic)?))
    }
}

pub(crate) trait PoolSource: Send + Sync {
    fn stats(&self) -> workpool::Stats;
}

impl<K, T> PoolSource for KeyedPool<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Send + 'static,
    KeyedPool<K, T>: Send + Sync,
{
    fn stats(&self) -> workpool::Stats {
        KeyedPool::stats(self)
    }
}

pub(crate) trait LeaseSource: Send + Sync {
    fn keys(&self) -> usize;
    fn counts(&self) -> Vec<(String, Counts)>;
    fn waits(&self) -> u64;
}

pub(crate) struct Leases<K: Hash + Eq + Clone> {
    pub(crate) pool: LeasePool<K>,
    pub(crate) keys: Vec<K>,
}

impl<K> LeaseSource for Leases<K>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
{
    fn keys(&self) -> usize {
        self.pool.keys()
    }
    fn waits(&self) -> u64 {
        self.pool.waits()
    }
    fn counts(&self) -> Vec<(String, Counts)> {
        self.keys
            .iter()
            .map(|k| (k.to_string(), self.pool.get(k)))
            .collect()
    }
}

/// A work queue as the admin sees it.
pub(crate) trait AdminQueue: Send + Sync {
    fn name(&self) -> &str;
    fn backend(&self) -> Backend;
    fn workers(&self) -> usize;
    fn active(&self) -> usize;
    fn max_workers(&self) -> usize;
    fn set_max_workers(&self, n: usize);
    fn retries(&self) -> u64;
    fn dead_lettered(&self) -> u64;
    fn pushed(&self) -> u64;
    fn acked(&self) -> u64;
    fn push_latency(&self) -> Histogram;
    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>>;
    fn dead_count(&self) -> BoxFuture<'_, Result<u64, QueueError>>;
    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>, WorkError>>;
    /// The payload decoded as the queue's item type, as JSON.
    fn decode(&self, payload: &[u8]) -> Result<serde_json::Value, String>;
    /// Requeues one dead letter (or all with `None`); returns how many moved.
    fn requeue(&self, id: Option<ItemId>) -> BoxFuture<'_, Result<u64, WorkError>>;
    /// Deletes one dead letter (or all with `None`); returns how many went.
    fn delete(&self, id: Option<ItemId>) -> BoxFuture<'_, Result<u64, WorkError>>;
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, Result<(), WorkError>>;
    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>>;
}

pub(crate) struct Queue<T> {
    queue: WorkQueue<T>,
    /// Listing, requeueing and deleting dead letters each lease all of them
    /// for a moment: one at a time, so none sees the others' leases.
    dead_ops: tokio::sync::Mutex<()>,
}

impl<T> Queue<T> {
    pub(crate) fn new(queue: WorkQueue<T>) -> Self {
        Self {
            queue,
            dead_ops: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T> AdminQueue for Queue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn name(&self) -> &str {
        self.queue.name()
    }
    fn backend(&self) -> Backend {
        self.queue.backend()
    }
    fn workers(&self) -> usize {
        self.queue.workers()
    }
    fn active(&self) -> usize {
        self.queue.active_workers()
    }
    fn max_workers(&self) -> usize {
        self.queue.max_workers()
    }
    fn set_max_workers(&self, n: usize) {
        self.queue.set_max_workers(n)
    }
    fn retries(&self) -> u64 {
        self.queue.retries()
    }
    fn dead_lettered(&self) -> u64 {
        self.queue.dead_lettered()
    }
    fn pushed(&self) -> u64 {
        self.queue.pushed()
    }
    fn acked(&self) -> u64 {
        self.queue.acked()
    }
    fn push_latency(&self) -> Histogram {
        self.queue.push_latency()
    }
    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>> {
        Box::pin(self.queue.len())
    }
    fn dead_count(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(self.queue.dead_letter_count())
    }
    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>, WorkError>> {
        Box::pin(async move {
            let _one = self.dead_ops.lock().await;
            self.queue.dead_letters().await
        })
    }
    fn decode(&self, payload: &[u8]) -> Result<serde_json::Value, String> {
        let value: T = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        serde_json::to_value(&value).map_err(|e| e.to_string())
    }
    fn requeue(&self, id: Option<ItemId>) -> BoxFuture<'_, Result<u64, WorkError>> {
        Box::pin(async move {
            let _one = self.dead_ops.lock().await;
            self.queue
                .requeue_dead_letters(|d| id.is_none_or(|id| d.id == id))
                .await
        })
    }
    fn delete(&self, id: Option<ItemId>) -> BoxFuture<'_, Result<u64, WorkError>> {
        Box::pin(async move {
            let _one = self.dead_ops.lock().await;
            let dead = self.queue.dead_letter_queue();
            let Some(id) = id else {
                return dead.remove_all().await.map_err(WorkError::Queue);
            };
            // Lease every dead letter, delete the one, hand the rest back.
            let mut all = Vec::new();
            loop {
                let got = dead
                    .pop(1024, Duration::ZERO)
                    .await
                    .map_err(WorkError::Queue)?;
                if got.is_empty() {
                    break;
                }
                all.extend(got);
            }
            let found = all.iter().any(|d| d.id == id);
            let rest: Vec<ItemId> = all.iter().map(|d| d.id).filter(|d| *d != id).collect();
            let acked = if found {
                dead.ack(&[id]).await.map_err(WorkError::Queue)
            } else {
                Ok(())
            };
            dead.nack(&rest, Duration::ZERO)
                .await
                .map_err(WorkError::Queue)?;
            acked?;
            Ok(u64::from(found))
        })
    }
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, Result<(), WorkError>> {
        Box::pin(self.queue.flush(timeout))
    }
    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(self.queue.remove_all())
    }
}
