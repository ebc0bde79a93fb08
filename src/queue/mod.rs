//! Durable work queues: base queues and the batching [`WorkQueue`](self).

mod base;
pub mod config;
#[cfg(feature = "disk")]
pub mod disk;
pub mod manager;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;
mod work;

pub use base::{
    Backend, BackendError, BaseQueue, Delivery, InvalidOption, ItemId, NewItem, PushError,
    QueueError, QueueLen, QueueOptions,
};
pub use manager::{Manager, ManagerError, QueueInfo};
pub use memory::MemoryQueue;
pub use work::{
    DeadLetter, DeadReason, Item, WorkError, WorkPushError, WorkQueue, WorkQueueOptions,
};
