//! Durable work queues: base queues and the batching [`WorkQueue`](self).

mod base;
mod memory;

pub use base::{
    Backend, BackendError, BaseQueue, Delivery, ItemId, NewItem, PushError, QueueError, QueueLen,
    QueueOptions,
};
pub use memory::MemoryQueue;
