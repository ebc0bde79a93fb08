//! The shared broadcast buffer at the centre of snapstream.
//!
//! An [`EventBuffer`] is an unbounded, singly linked list of *batches* with
//! exactly one writer and any number of readers. Readers hold a [`Cursor`],
//! a position in the list, and move along it at their own pace.
//!
//! ```text
//!  sentinel ──► [e1] ──► [e2, e3] ──► [e4] ──► (tail; next not yet linked)
//!                 ▲                     ▲
//!            slow cursor           fast cursor (waiting here)
//! ```
//!
//! # Publishing
//!
//! [`EventBuffer::append`] allocates one node for the whole batch, links it
//! into the old tail's `next` and wakes every reader parked on the old tail,
//! all at once. The cost of an append does not depend on how many readers
//! there are or how far behind they are: the writer never waits for a reader,
//! never visits a reader, and never blocks on one.
//!
//! # Reading
//!
//! A [`Cursor`] taken with [`EventBuffer::head`] sits on the newest node and
//! sees only what is appended after it was taken. [`Cursor::next`] waits for
//! the next batch and returns it as a slice borrowed from the cursor; it is
//! cancel-safe: dropping the future leaves the cursor where it was, and the
//! next call returns the batch the dropped one would have. Everything a
//! cursor yields is a contiguous, in-order run of what was appended after its
//! start. [`Cursor::try_next`] never waits: it returns `None` at the tail,
//! where the cursor then serves as a *follow position* that sees only later
//! appends.
//!
//! # Memory
//!
//! Each node is reference counted: a node is freed as soon as no cursor sits
//! on or before it. A reader that stops reading keeps everything after its
//! position alive, so a consumer that can stall must bound its own lag (the
//! [`Publisher`](crate) does this for its subscriptions). Long chains are
//! freed iteratively, never by recursion, so dropping millions of nodes at once
//! cannot overflow the stack.
//!
//! # Ending
//!
//! [`EventBuffer::fail`] appends a terminal error: every reader that reaches
//! it gets [`ReadError::Failed`], and keeps getting it, its cursor staying
//! put. Dropping the writer without `fail` or `splice` ends the buffer the same
//! way with [`ReadError::Closed`], so no reader waits forever for a writer that
//! is gone.
//!
//! # Splicing
//!
//! [`EventBuffer::splice`] ends one buffer by linking its tail to a position in
//! another (older) buffer: readers of the first flow on into the second with no
//! gap and no repeat. This is how a snapshot, built in its own buffer, is joined
//! onto the live stream.
//!
//! # Examples
//!
//! ```
//! use snapstream::buffer::EventBuffer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut writer: EventBuffer<&str> = EventBuffer::new();
//! let mut reader = writer.head();
//!
//! writer.append(vec!["a", "b"]);
//! writer.append_one("c");
//!
//! assert_eq!(reader.next().await.unwrap(), ["a", "b"]);
//! assert_eq!(reader.next().await.unwrap(), ["c"]);
//! assert!(reader.try_next().is_none()); // at the tail
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::task::{Context, Poll, Waker};

use crate::sync::{arc_into_inner, Arc, AtomicPtr, AtomicU64, Mutex, Ordering};

#[cfg(all(test, loom))]
#[path = "tests/loom_buffer.rs"]
mod loom_buffer;
#[cfg(all(test, not(loom)))]
mod tests;

/// Why a cursor cannot move on.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError<'a, E> {
    /// The writer ended the buffer with this error.
    Failed(&'a E),
    /// The writer was dropped without ending the buffer with an error.
    Closed,
}

impl<E> Clone for ReadError<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for ReadError<'_, E> {}

impl<E: fmt::Display> fmt::Display for ReadError<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Failed(e) => write!(f, "buffer failed: {e}"),
            ReadError::Closed => f.write_str("buffer closed"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ReadError<'_, E> {}

/// Why [`EventBuffer::splice`] refused; the writer is handed back unchanged.
pub struct SpliceError<T, E>(pub EventBuffer<T, E>);

impl<T, E> fmt::Debug for SpliceError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpliceError(..)")
    }
}

impl<T, E> fmt::Display for SpliceError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("can only splice onto a buffer created before this one")
    }
}

impl<T, E> std::error::Error for SpliceError<T, E> {}

/// What a node carries.
///
/// Kept at two words for pointer-sized `T` (a one-event batch is stored
/// inline; larger batches behind one thin pointer) so that a retained node
/// costs 40 bytes beyond its payload.
enum Item<T, E> {
    /// The sentinel a buffer starts with; skipped by readers.
    Empty,
    /// A batch of one.
    One(T),
    /// A batch of two or more.
    #[allow(clippy::box_collection)] // a thin pointer keeps `Item` two words
    Many(Box<Vec<T>>),
    /// Splice point: reading on from here means reading on from after this
    /// node of another buffer (whose wait list comes along, boxed to keep
    /// `Item` two words).
    Follow(Box<Splice<T, E>>),
    /// Terminal: the writer failed the buffer.
    Failed(Box<E>),
    /// Terminal: the writer was dropped.
    Closed,
}

/// Where a splice point leads: a node of an older buffer, and that buffer's
/// wait list.
struct Splice<T, E> {
    node: Arc<Node<T, E>>,
    shared: Arc<Shared>,
}

struct Node<T, E> {
    /// Null until the writer links the next node; then owns one strong count
    /// of it (from `Arc::into_raw`). Written once, by the single writer, with
    /// `Release`; read with `Acquire`.
    next: AtomicPtr<Node<T, E>>,
    /// Position of this node in its buffer (the sentinel is 0).
    seq: u64,
    item: Item<T, E>,
}

impl<T, E> Node<T, E> {
    fn new(seq: u64, item: Item<T, E>) -> Self {
        Self {
            next: AtomicPtr::new(ptr::null_mut()),
            seq,
            item,
        }
    }

    /// The linked successor, borrowed from `self`.
    fn next_ref(&self) -> Option<&Node<T, E>> {
        let next = self.next.load(Ordering::Acquire);
        // SAFETY: a non-null `next` came from `Arc::into_raw` and `self` owns
        // that strong count until `self` is dropped, so the pointee lives at
        // least as long as the `&self` borrow. The Acquire load pairs with the
        // writer's Release store, so the node's contents are visible.
        unsafe { next.as_ref() }
    }

    /// Takes ownership of the successor link, leaving this node unlinked.
    fn take_next(&mut self) -> Option<Arc<Node<T, E>>> {
        let next = self.next.swap(ptr::null_mut(), Ordering::Acquire);
        if next.is_null() {
            None
        } else {
            // SAFETY: the pointer came from `Arc::into_raw` and this node
            // owned its count; swapping in null transfers that ownership here.
            Some(unsafe { Arc::from_raw(next) })
        }
    }

    fn events(&self) -> &[T] {
        match &self.item {
            Item::One(event) => std::slice::from_ref(event),
            Item::Many(events) => events,
            _ => &[],
        }
    }
}

impl<T, E> Drop for Node<T, E> {
    fn drop(&mut self) {
        // Unlink iteratively: every node we are the last owner of is taken
        // apart here, so no `Drop` recurses along the chain (or into a spliced
        // chain through a `Follow`).
        let mut pending: Vec<Arc<Node<T, E>>> = Vec::new();
        let mut next = self.take_next();
        if let Item::Follow(splice) = std::mem::replace(&mut self.item, Item::Empty) {
            pending.push(splice.node);
        }
        loop {
            let Some(arc) = next.take().or_else(|| pending.pop()) else {
                break;
            };
            if let Some(mut node) = arc_into_inner(arc) {
                next = node.take_next();
                if let Item::Follow(splice) = std::mem::replace(&mut node.item, Item::Empty) {
                    pending.push(splice.node);
                }
                // `node` drops here with nothing linked: no recursion.
            }
        }
    }
}

/// Nodes the readers are done with, handed back to the writer so that a
/// steady stream of appends allocates nothing (with glibc, a node allocated
/// on the writer's thread and freed on a reader's costs more than the rest of
/// an append).
struct Bin<T, E> {
    nodes: Mutex<Vec<Arc<Node<T, E>>>>,
}

/// Most nodes a bin keeps (about 12 KiB for small payloads).
const BIN_CAPACITY: usize = 256;

impl<T, E> Bin<T, E> {
    fn new() -> Self {
        Self {
            nodes: Mutex::new(Vec::new()),
        }
    }
}

/// One buffer's wait list: readers parked on its tail.
struct Shared {
    /// Identity for splice ordering: buffers created later have larger ids.
    id: u64,
    /// `seq` of the buffer's newest node (for [`Cursor::lag`]).
    appended: AtomicU64,
    /// Bumped (under the lock) each time the waiters are woken; lets a cursor
    /// see without locking that its registration is already gone.
    epoch: AtomicU64,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    epoch: u64,
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// A cursor's place in a wait list.
#[derive(Clone, Copy, Debug)]
struct Registration {
    epoch: u64,
    slot: usize,
}

impl Shared {
    fn new() -> Self {
        // Not part of any loom model: a plain std counter is fine here.
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            appended: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            waiters: Mutex::new(Waiters::default()),
        }
    }

    /// Wakes every registered reader. Called after the tail's `next` is linked.
    ///
    /// `spare` is an empty vector owned by the writer: the wakers are swapped
    /// into it under the lock and woken outside it, and both vectors keep
    /// their capacity, so a park/wake cycle allocates nothing.
    fn wake_all(&self, spare: &mut Vec<Option<Waker>>) {
        {
            let mut waiters = self.waiters.lock();
            if waiters.slots.len() == waiters.free.len() {
                // Nobody waits (every slot is free): nothing to wake, and
                // registrations stay valid.
                return;
            }
            waiters.epoch += 1;
            self.epoch.store(waiters.epoch, Ordering::Release);
            waiters.free.clear();
            std::mem::swap(&mut waiters.slots, spare);
        }
        for waker in spare.drain(..).flatten() {
            waker.wake();
        }
    }

    fn deregister(&self, registration: Registration) {
        if self.epoch.load(Ordering::Acquire) != registration.epoch {
            return; // already woken and cleared
        }
        let mut waiters = self.waiters.lock();
        if waiters.epoch == registration.epoch {
            if let Some(slot) = waiters.slots.get_mut(registration.slot) {
                if slot.take().is_some() {
                    waiters.free.push(registration.slot);
                }
            }
        }
    }
}

/// The single writer of a broadcast buffer.
///
/// There is exactly one `EventBuffer` per buffer: it is not `Clone`, and every
/// method that changes the buffer takes `&mut self` or `self`, so the
/// single-writer rule is checked by the compiler. Readers are [`Cursor`]s,
/// taken with [`head`](Self::head) and cloned freely.
///
/// `E` is the type of the terminal error given to [`fail`](Self::fail).
///
/// See the [module docs](self) for the semantics.
pub struct EventBuffer<T, E = Infallible> {
    tail: Arc<Node<T, E>>,
    shared: Arc<Shared>,
    /// Where readers return nodes they are done with.
    bin: Arc<Bin<T, E>>,
    /// Recycled nodes taken from `bin`, ready for reuse.
    stock: Vec<Arc<Node<T, E>>>,
    /// Set once `fail` or `splice` has ended the buffer, so `Drop` does not
    /// append `Closed`.
    ended: bool,
    /// Reused by [`Shared::wake_all`].
    spare: Vec<Option<Waker>>,
}

impl<T, E> fmt::Debug for EventBuffer<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBuffer")
            .field("seq", &self.tail.seq)
            .finish_non_exhaustive()
    }
}

impl<T, E> Default for EventBuffer<T, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, E> EventBuffer<T, E> {
    /// Creates an empty buffer: a single sentinel node that readers can wait on.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let writer: EventBuffer<u64> = EventBuffer::new();
    /// assert_eq!(writer.seq(), 0);
    /// ```
    pub fn new() -> Self {
        let shared = Arc::new(Shared::new());
        let tail = Arc::new(Node::new(0, Item::Empty));
        Self {
            tail,
            shared,
            bin: Arc::new(Bin::new()),
            stock: Vec::new(),
            ended: false,
            spare: Vec::new(),
        }
    }

    /// Appends a batch as one node; readers receive it as one slice.
    ///
    /// An empty batch appends nothing. The cost is one allocation (none extra
    /// for a batch of one) and one wake-up of all parked readers, whatever
    /// their number.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let mut writer = EventBuffer::<u32>::new();
    /// let mut reader = writer.head();
    /// writer.append(vec![1, 2, 3]);
    /// assert_eq!(reader.try_next(), Some(Ok(&[1, 2, 3][..])));
    /// ```
    pub fn append(&mut self, mut batch: Vec<T>) {
        let item = match batch.len() {
            0 => return,
            1 => match batch.pop() {
                Some(event) => Item::One(event),
                None => return,
            },
            _ => Item::Many(Box::new(batch)),
        };
        self.link(item);
    }

    /// Appends a batch of one event.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let mut writer = EventBuffer::<&str>::new();
    /// let mut reader = writer.head();
    /// writer.append_one("hello");
    /// assert_eq!(reader.try_next(), Some(Ok(&["hello"][..])));
    /// ```
    pub fn append_one(&mut self, event: T) {
        self.link(Item::One(event));
    }

    /// A cursor on the newest node: it sees exactly what is appended after
    /// this call.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let mut writer = EventBuffer::<u8>::new();
    /// writer.append_one(1);
    /// let mut reader = writer.head(); // taken after 1 was appended
    /// writer.append_one(2);
    /// assert_eq!(reader.try_next(), Some(Ok(&[2][..])));
    /// ```
    pub fn head(&self) -> Cursor<T, E> {
        Cursor::at(self.tail.clone(), self.shared.clone(), self.bin.clone())
    }

    /// How many batches were appended so far.
    pub fn seq(&self) -> u64 {
        self.tail.seq
    }

    /// Ends the buffer with a terminal error.
    ///
    /// Every reader that reaches the end receives [`ReadError::Failed`] with
    /// this error, on every call: its cursor does not move past it.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::{EventBuffer, ReadError};
    ///
    /// let mut writer = EventBuffer::<u8, &str>::new();
    /// let mut reader = writer.head();
    /// writer.append_one(1);
    /// writer.fail("shutting down");
    /// assert_eq!(reader.try_next(), Some(Ok(&[1][..])));
    /// assert_eq!(reader.try_next(), Some(Err(ReadError::Failed(&"shutting down"))));
    /// assert_eq!(reader.try_next(), Some(Err(ReadError::Failed(&"shutting down"))));
    /// ```
    pub fn fail(mut self, error: E) {
        self.link(Item::Failed(Box::new(error)));
        self.ended = true;
    }

    /// Ends this buffer by joining it onto `at`, a position in an older buffer:
    /// a reader of this buffer reads everything appended here, then goes on
    /// with whatever follows `at` — nothing skipped, nothing twice.
    ///
    /// This is how a snapshot joins the live stream: take the live position
    /// *before* building the snapshot, build it in a new buffer, then splice.
    ///
    /// # Errors
    ///
    /// [`SpliceError`], handing the writer back, when `at` lies in a buffer
    /// created after this one. Only splicing onto older buffers is allowed,
    /// which makes a cycle (a reader going round forever) impossible.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let mut live = EventBuffer::<&str>::new();
    /// let live_pos = live.head();
    ///
    /// let mut snapshot = EventBuffer::new();
    /// let mut reader = snapshot.head();
    /// snapshot.append(vec!["state-1", "state-2"]);
    /// live.append_one("change-3"); // published while the snapshot was built
    /// snapshot.splice(&live_pos).unwrap();
    ///
    /// assert_eq!(reader.try_next(), Some(Ok(&["state-1", "state-2"][..])));
    /// assert_eq!(reader.try_next(), Some(Ok(&["change-3"][..])));
    /// ```
    pub fn splice(mut self, at: &Cursor<T, E>) -> Result<(), SpliceError<T, E>> {
        if at.shared.id >= self.shared.id {
            return Err(SpliceError(self));
        }
        self.link(Item::Follow(Box::new(Splice {
            node: at.position_arc(),
            shared: at.shared.clone(),
        })));
        self.ended = true;
        Ok(())
    }

    /// A node for `item`: a recycled one when readers handed some back.
    fn node(&mut self, seq: u64, item: Item<T, E>) -> Arc<Node<T, E>> {
        if self.stock.is_empty() {
            let mut bin = self.bin.nodes.lock();
            if !bin.is_empty() {
                // Take them all at once; the bin keeps our empty vector's
                // capacity.
                std::mem::swap(&mut *bin, &mut self.stock);
            }
        }
        while let Some(mut node) = self.stock.pop() {
            // A binned node is unique (see `Cursor::release`); the check
            // keeps a mistake from ever becoming a data race.
            if let Some(fresh) = Arc::get_mut(&mut node) {
                fresh.seq = seq;
                fresh.item = item;
                return node;
            }
        }
        Arc::new(Node::new(seq, item))
    }

    fn link(&mut self, item: Item<T, E>) {
        let seq = self.tail.seq + 1;
        let node = self.node(seq, item);
        let new_tail = node.clone();
        // Publish the node: Release makes its contents visible to any reader
        // that loads `next` with Acquire. The single writer is the only one to
        // store here, and the tail's `next` is still null.
        self.tail
            .next
            .store(Arc::into_raw(node).cast_mut(), Ordering::Release);
        self.shared.appended.store(seq, Ordering::Release);
        self.tail = new_tail;
        // `next` is linked before the wake: a reader that registered before
        // this sees the wake; one that registers after it sees `next` (it
        // re-checks under the same lock `wake_all` takes).
        self.shared.wake_all(&mut self.spare);
    }
}

impl<T, E> Drop for EventBuffer<T, E> {
    fn drop(&mut self) {
        if !self.ended {
            self.link(Item::Closed);
        }
    }
}

/// A reader's position in a buffer.
///
/// A cursor yields every batch appended after its position, in order, each
/// once. Cloning a cursor gives an independent reader at the same position.
/// A cursor keeps the nodes from its position on alive; drop it (or move it
/// on) to let them go.
///
/// See the [module docs](self) for the semantics.
pub struct Cursor<T, E = Infallible> {
    /// Keeps `pos` alive: every node owns its successor (and a splice point
    /// owns its target), so everything reachable from `pin` lives as long as
    /// `pin` does.
    pin: Arc<Node<T, E>>,
    /// The last node consumed (or the node the cursor started on). Always
    /// reachable from `pin`. Moving it costs no reference-count traffic;
    /// `pin` catches up every [`REPIN_EVERY`] nodes and before parking.
    pos: NonNull<Node<T, E>>,
    /// Nodes moved past since `pin` was last set to `pos`.
    unpinned: u32,
    /// Wait list of the buffer `pos` belongs to. Kept here rather than in
    /// every node: the writer and the readers then share no reference count
    /// per event, and a node is one word smaller.
    shared: Arc<Shared>,
    /// Where this cursor is parked in `shared`, if it is.
    registration: Option<Registration>,
    /// The bin of the buffer the cursor started in (nodes of any buffer of
    /// the same types may go there).
    bin: Arc<Bin<T, E>>,
    /// Nodes released by the last re-pin, on their way to the bin (kept to
    /// reuse its capacity).
    released: Vec<Arc<Node<T, E>>>,
}

/// How many nodes a cursor walks on borrowed pointers before it moves its
/// pin: a cursor keeps at most this many already-read nodes alive, and pays
/// two reference-count updates per this many deliveries instead of per
/// delivery.
const REPIN_EVERY: u32 = if cfg!(loom) { 1 } else { 32 };

// SAFETY: a cursor owns an `Arc<Node<T, E>>` and a pointer into the chain
// that `Arc` keeps alive; it reads nodes only through shared references. It
// is therefore exactly as thread-safe as `Arc<Node<T, E>>`, which is `Send`
// and `Sync` when `T` and `E` are both `Send + Sync`.
unsafe impl<T: Send + Sync, E: Send + Sync> Send for Cursor<T, E> {}
// SAFETY: as for `Send` above.
unsafe impl<T: Send + Sync, E: Send + Sync> Sync for Cursor<T, E> {}

impl<T, E> Clone for Cursor<T, E> {
    fn clone(&self) -> Self {
        Self {
            pin: self.pin.clone(),
            pos: self.pos,
            unpinned: self.unpinned,
            shared: self.shared.clone(),
            registration: None,
            bin: self.bin.clone(),
            released: Vec::new(),
        }
    }
}

impl<T, E> fmt::Debug for Cursor<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor")
            .field("seq", &self.node().seq)
            .field("lag", &self.lag())
            .finish_non_exhaustive()
    }
}

impl<T, E> Drop for Cursor<T, E> {
    fn drop(&mut self) {
        if let Some(registration) = self.registration.take() {
            self.shared.deregister(registration);
        }
    }
}

/// What one step of reading found.
enum Step {
    Batch,
    Failed,
    Closed,
    Tail,
}

impl<T, E> Cursor<T, E> {
    fn at(node: Arc<Node<T, E>>, shared: Arc<Shared>, bin: Arc<Bin<T, E>>) -> Self {
        let pos = NonNull::from(&*node);
        Self {
            pin: node,
            pos,
            unpinned: 0,
            shared,
            registration: None,
            bin,
            released: Vec::new(),
        }
    }

    /// The node at the cursor's position.
    fn node(&self) -> &Node<T, E> {
        // SAFETY: `pos` is always reachable from `pin` (it starts equal to it
        // and only ever moves to a node linked from a reachable node), and
        // every node keeps its successor and splice target alive, so `pos`
        // lives at least as long as `self.pin`, which `&self` borrows.
        unsafe { self.pos.as_ref() }
    }

    /// A strong reference to the node at the cursor's position.
    fn position_arc(&self) -> Arc<Node<T, E>> {
        if ptr::eq(self.pos.as_ptr(), Arc::as_ptr(&self.pin)) {
            return self.pin.clone();
        }
        // SAFETY: `pos` is alive (see `node`) and came from an `Arc` (every
        // node is allocated by `Arc::new` and linked via `Arc::into_raw`), so
        // its strong count is at least one while we add ours, and `from_raw`
        // takes ownership of exactly the count we added.
        unsafe {
            Arc::increment_strong_count(self.pos.as_ptr().cast_const());
            Arc::from_raw(self.pos.as_ptr().cast_const())
        }
    }

    /// Moves the pin up to the position, letting everything before it go.
    fn repin(&mut self) {
        if self.unpinned > 0 {
            let pin = self.position_arc();
            let old = std::mem::replace(&mut self.pin, pin);
            self.unpinned = 0;
            self.release(old);
        }
    }

    /// Lets go of `node` and of every node after it that nobody else holds,
    /// handing those to the bin for the writer to reuse.
    ///
    /// A node this cursor holds the only reference to is unreachable for
    /// every other cursor: another cursor's pin before it would hold a
    /// reference to it through the chain. So it can be cleared and reused.
    /// The walk ends at the first shared node, at the latest at the new pin.
    fn release(&mut self, mut node: Arc<Node<T, E>>) {
        while let Some(unique) = Arc::get_mut(&mut node) {
            let next = unique.take_next();
            // Drops the payload (or a splice target) now, on this thread.
            unique.item = Item::Empty;
            self.released.push(node);
            match next {
                Some(next) => node = next,
                None => break,
            }
        }
        // `node` (if the loop stopped on a shared one) is simply let go here.
        if self.released.is_empty() {
            return;
        }
        {
            let mut bin = self.bin.nodes.lock();
            let room = BIN_CAPACITY.saturating_sub(bin.len());
            let keep = room.min(self.released.len());
            bin.extend(self.released.drain(..keep));
        }
        // What did not fit is freed, outside the lock.
        self.released.clear();
    }

    /// Waits for the next batch and returns it.
    ///
    /// Empty nodes (sentinels, splice points) are skipped. At the end of the
    /// buffer the cursor stays put and every call returns the same error.
    ///
    /// # Errors
    ///
    /// [`ReadError::Failed`] once the writer [failed](EventBuffer::fail) the
    /// buffer; [`ReadError::Closed`] once the writer was dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe. The cursor moves only when a batch is returned: dropping
    /// the future loses nothing, and the next call returns that batch.
    ///
    /// # Panics
    ///
    /// Polling the returned future again after it completed panics, as for
    /// any future.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut writer = EventBuffer::<u64>::new();
    /// let mut reader = writer.head();
    /// let task = tokio::spawn(async move { reader.next().await.unwrap().to_vec() });
    /// writer.append(vec![7, 8]);
    /// assert_eq!(task.await.unwrap(), vec![7, 8]);
    /// # }
    /// ```
    #[allow(clippy::should_implement_trait)] // a lending async `next`, not Iterator's
    pub fn next(&mut self) -> Next<'_, T, E> {
        Next { cursor: Some(self) }
    }

    /// Polls for the next batch; see [`next`](Self::next).
    ///
    /// On `Pending` the waker of `cx` is registered and woken by the next
    /// append (a later poll replaces it).
    ///
    /// # Errors
    ///
    /// As [`next`](Self::next).
    ///
    /// # Cancel safety
    ///
    /// Returning `Pending` does not move the cursor.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<&[T], ReadError<'_, E>>> {
        match self.step(Some(cx)) {
            Step::Tail => Poll::Pending,
            step => Poll::Ready(self.outcome(step)),
        }
    }

    /// Returns the next batch if one is linked, without waiting.
    ///
    /// `None` means the cursor is at the tail; it then serves as a *follow
    /// position*: it sees only what is appended from now on.
    ///
    /// # Errors
    ///
    /// As [`next`](Self::next), inside the `Some`.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let mut writer = EventBuffer::<u8>::new();
    /// let mut follow = writer.head();
    /// assert!(follow.try_next().is_none());
    /// writer.append_one(5);
    /// assert_eq!(follow.try_next(), Some(Ok(&[5][..])));
    /// ```
    pub fn try_next(&mut self) -> Option<Result<&[T], ReadError<'_, E>>> {
        match self.step(None) {
            Step::Tail => None,
            step => Some(self.outcome(step)),
        }
    }

    /// How many batches were appended, to the buffer this cursor is now in,
    /// after the cursor's position.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::buffer::EventBuffer;
    ///
    /// let mut writer = EventBuffer::<u8>::new();
    /// let reader = writer.head();
    /// writer.append_one(1);
    /// writer.append_one(2);
    /// assert_eq!(reader.lag(), 2);
    /// ```
    pub fn lag(&self) -> u64 {
        self.shared
            .appended
            .load(Ordering::Acquire)
            .saturating_sub(self.node().seq)
    }

    fn outcome(&self, step: Step) -> Result<&[T], ReadError<'_, E>> {
        match step {
            Step::Batch => Ok(self.node().events()),
            Step::Failed => match self.node().next_ref().map(|n| &n.item) {
                Some(Item::Failed(error)) => Err(ReadError::Failed(error)),
                _ => Err(ReadError::Closed),
            },
            Step::Closed | Step::Tail => Err(ReadError::Closed),
        }
    }

    /// Moves past empty nodes to the next batch (the cursor then sits on it),
    /// or stops at a terminal node (the cursor stays before it) or at the
    /// tail (registering `cx` if given).
    fn step(&mut self, mut cx: Option<&mut Context<'_>>) -> Step {
        loop {
            let Some(next) = self.node().next_ref() else {
                // At the tail: hold only the node we are on.
                self.repin();
                let Some(cx) = cx.as_deref_mut() else {
                    return Step::Tail;
                };
                if self.park(cx) {
                    return Step::Tail;
                }
                continue; // linked while we took the lock
            };
            let (target, shared, is_batch) = match &next.item {
                Item::Failed(_) => return Step::Failed,
                Item::Closed => return Step::Closed,
                // A splice point moves the cursor onto a node of the older
                // buffer *as already consumed*: reading goes on after it.
                Item::Follow(splice) => (
                    NonNull::from(&*splice.node),
                    Some(splice.shared.clone()),
                    false,
                ),
                Item::Empty => (NonNull::from(next), None, false),
                Item::One(_) | Item::Many(_) => (NonNull::from(next), None, true),
            };
            self.move_to(target, shared);
            if is_batch {
                return Step::Batch;
            }
        }
    }

    /// Registers the waker unless `next` got linked; returns whether it did.
    fn park(&mut self, cx: &mut Context<'_>) -> bool {
        let mut waiters = self.shared.waiters.lock();
        // Re-check under the lock the writer takes to wake: no lost wake-up.
        if !self.node().next.load(Ordering::Acquire).is_null() {
            return false;
        }
        let waker = cx.waker();
        match self.registration {
            Some(reg) if reg.epoch == waiters.epoch => match &mut waiters.slots[reg.slot] {
                Some(old) if old.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            },
            _ => {
                let slot = match waiters.free.pop() {
                    Some(slot) => {
                        waiters.slots[slot] = Some(waker.clone());
                        slot
                    }
                    None => {
                        waiters.slots.push(Some(waker.clone()));
                        waiters.slots.len() - 1
                    }
                };
                self.registration = Some(Registration {
                    epoch: waiters.epoch,
                    slot,
                });
            }
        }
        true
    }

    /// Moves onto `node`, which must be linked from the current position
    /// (so it is reachable from the pin); `shared` is given when it lies in
    /// another buffer.
    fn move_to(&mut self, node: NonNull<Node<T, E>>, shared: Option<Arc<Shared>>) {
        if let Some(registration) = self.registration.take() {
            self.shared.deregister(registration);
        }
        self.pos = node;
        if let Some(shared) = shared {
            self.shared = shared;
        }
        self.unpinned += 1;
        if self.unpinned >= REPIN_EVERY {
            self.repin();
        }
    }
}

/// Future returned by [`Cursor::next`].
#[must_use = "futures do nothing unless polled"]
pub struct Next<'a, T, E> {
    cursor: Option<&'a mut Cursor<T, E>>,
}

impl<T, E> fmt::Debug for Next<'_, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next").finish_non_exhaustive()
    }
}

impl<'a, T, E> Future for Next<'a, T, E> {
    type Output = Result<&'a [T], ReadError<'a, E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(cursor) = self.cursor.take() else {
            panic!("`Next` polled after completion");
        };
        match cursor.step(Some(cx)) {
            Step::Tail => {
                self.cursor = Some(cursor);
                Poll::Pending
            }
            step => Poll::Ready(cursor.outcome(step)),
        }
    }
}
