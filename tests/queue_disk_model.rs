//! Property test: the disk queue against a simple model, across reopens.
//!
//! Random sequences of push, push_batch, pop, ack, nack (no delay), remove_all and
//! *reopen* (drop the store, open the file again: leased items become ready at
//! their old place) must give the same deliveries, in the same order, and the
//! same lengths as a plain `Vec`-based model.

#![cfg(feature = "disk")]

use std::time::Duration;

use proptest::prelude::*;
use snapstream::queue::disk::{DiskQueue, DiskStore};
use snapstream::queue::{BaseQueue, ItemId, NewItem, QueueLen, QueueOptions};

#[derive(Debug, Clone)]
enum Op {
    Push(u8),
    /// One `push_batch` (one commit) of these payloads.
    PushBatch(Vec<u8>),
    Pop(usize),
    Ack(usize),
    Nack(usize),
    RemoveAll,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Push),
        2 => proptest::collection::vec(any::<u8>(), 0..6).prop_map(Op::PushBatch),
        3 => (1usize..5).prop_map(Op::Pop),
        2 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Nack),
        1 => Just(Op::RemoveAll),
        1 => Just(Op::Reopen),
    ]
}

/// The model: stored items with a ready-order sequence number.
#[derive(Default)]
struct Model {
    seq: u64,
    /// (seq, payload) of ready items.
    ready: Vec<(u64, u8)>,
    /// (id, seq, payload) of leased items, in lease order.
    leased: Vec<(ItemId, u64, u8)>,
}

impl Model {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
    fn len(&self) -> QueueLen {
        QueueLen {
            ready: self.ready.len() as u64,
            delayed: 0,
            leased: self.leased.len() as u64,
        }
    }
}

const T: Duration = Duration::from_secs(10);

async fn open(path: &std::path::Path) -> (DiskStore, DiskQueue) {
    let store = DiskStore::open(path).unwrap();
    let q = store.queue("model", QueueOptions::default()).unwrap();
    (store, q)
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.redb");
    let (mut store, mut q) = open(&path).await;
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Push(p) => {
                q.push(NewItem::new([p]), T).await.unwrap();
                let seq = m.next_seq();
                m.ready.push((seq, p));
            }
            Op::PushBatch(ps) => {
                let items = ps.iter().map(|&p| NewItem::new([p])).collect();
                let out = q.push_batch(items, T).await;
                assert_eq!(out.len(), ps.len());
                for (r, p) in out.into_iter().zip(ps) {
                    r.unwrap();
                    let seq = m.next_seq();
                    m.ready.push((seq, p));
                }
            }
            Op::Pop(n) => {
                let got = q.pop(n, Duration::ZERO).await.unwrap();
                let take = n.min(m.ready.len());
                let expected: Vec<_> = m.ready.drain(..take).collect();
                assert_eq!(
                    got.iter().map(|d| d.payload[0]).collect::<Vec<_>>(),
                    expected.iter().map(|&(_, p)| p).collect::<Vec<_>>()
                );
                for (d, (seq, p)) in got.iter().zip(expected) {
                    m.leased.push((d.id, seq, p));
                }
            }
            Op::Ack(i) if !m.leased.is_empty() => {
                let (id, _, _) = m.leased.remove(i % m.leased.len());
                q.ack(&[id]).await.unwrap();
            }
            Op::Nack(i) if !m.leased.is_empty() => {
                let (id, _, p) = m.leased.remove(i % m.leased.len());
                q.nack(&[id], Duration::ZERO).await.unwrap();
                let seq = m.next_seq();
                m.ready.push((seq, p));
            }
            Op::Ack(_) | Op::Nack(_) => {}
            Op::RemoveAll => {
                let n = q.remove_all().await.unwrap();
                assert_eq!(n, (m.ready.len() + m.leased.len()) as u64);
                m.ready.clear();
                m.leased.clear();
            }
            Op::Reopen => {
                drop(q);
                drop(store);
                (store, q) = open(&path).await;
                // Leased items come back at their old place.
                for (_, seq, p) in m.leased.drain(..) {
                    m.ready.push((seq, p));
                }
                m.ready.sort_by_key(|&(seq, _)| seq);
            }
        }
        assert_eq!(q.len().await.unwrap(), m.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn disk_queue_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops));
    }
}
