//! # snapstream
//!
//! Pub/sub event streaming around one shared broadcast buffer.
//!
//! (Crate documentation is written out in full as the subsystems land.)

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]
#![doc(test(attr(deny(warnings))))]

pub(crate) mod sync;

pub mod buffer;
pub mod event;
pub mod publisher;
pub mod queue;
pub mod subscription;
