//! What a key's buffer chain holds: a snapshot, its end marker, live batches.
//!
//! Shared by the publisher (which routes into the chain), the snapshot build
//! (which writes a snapshot into its own buffer and splices it on) and the
//! subscription (which reads it).

use super::error::SnapshotError;
use crate::buffer::{Cursor, EventBuffer};
use crate::event::EventBatch;

/// One node's content in a key's buffer chain.
pub(crate) enum Item<P> {
    Batch(EventBatch<P>),
    EndOfSnapshot(u64),
}

pub(crate) type Buf<P> = EventBuffer<Item<P>, SnapshotError>;
pub(crate) type Cur<P> = Cursor<Item<P>, SnapshotError>;
