//! Durable work queues: base queues and the batching [`WorkQueue`](self).

mod base;
#[cfg(feature = "disk")]
pub mod disk;

pub use base::{
    Backend, BackendError, BaseQueue, Delivery, ItemId, NewItem, PushError, QueueError, QueueLen,
    QueueOptions,
};
