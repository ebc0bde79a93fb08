//! Durable work queues: base queues and the batching [`WorkQueue`](self).

mod base;
#[cfg(feature = "redis")]
pub mod redis;

pub use base::{
    Backend, BackendError, BaseQueue, Delivery, ItemId, NewItem, PushError, QueueError, QueueLen,
    QueueOptions,
};
