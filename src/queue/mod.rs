//! Durable work queues: base queues and the batching [`WorkQueue`](self).

mod base;
pub mod memory;
mod work;
#[cfg(feature = "disk")]
pub mod disk;
#[cfg(feature = "redis")]
pub mod redis;

pub use base::{
    Backend, BackendError, BaseQueue, Delivery, ItemId, NewItem, PushError, QueueError, QueueLen,
    QueueOptions,
};
pub use memory::MemoryQueue;
pub use work::{
    DeadLetter, DeadReason, InvalidOption, Item, WorkError, WorkPushError, WorkQueue,
    WorkQueueOptions,
};
