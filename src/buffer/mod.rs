//! The shared broadcast buffer at the centre of snapstream.
//!
//! An [`EventBuffer`] is an unbounded sequence of *batches* with exactly one
//! writer and any number of readers, stored in a singly linked list of
//! blocks of slots (one batch per slot). Readers hold a [`Cursor`], a
//! position in the sequence, and move along it at their own pace.
//!
//! ```text
//!  block 0: [sentinel, e1, [e2, e3], e4, …, e31] ──► block 1: [e32, e33, _, …]
//!                       ▲                                          ▲
//!                  slow cursor                   fast cursor (waiting at the tail)
//! ```
//!
//! # Publishing
//!
//! [`EventBuffer::append`] stores the whole batch in one slot, publishes it
//! and wakes every reader parked at the tail, all at once. The cost of an append does not depend on how many readers
//! there are or how far behind they are: the writer never waits for a reader,
//! never visits a reader, and never blocks on one.
//!
//! # Reading
//!
//! A [`Cursor`] taken with [`EventBuffer::head`] sits on the newest slot and
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
//! Slots are allocated in blocks of 32, linked in a list (as tokio's mpsc
//! does): a retained one-event batch costs its slot (two words for a
//! pointer-sized event) plus a 32nd of the block's header, instead of a heap
//! node of its own. Each block is reference counted and freed as soon as no
//! cursor sits in it or in a block before it. A reader that stops reading
//! keeps everything after its position alive, so a consumer that can stall
//! must bound its own lag (the [`Publisher`](crate) does this for its
//! subscriptions). Long chains are freed iteratively, never by recursion, so
//! dropping millions of blocks at once cannot overflow the stack.
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
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::ptr;
use std::task::{Context, Poll, Waker};

use crate::sync::{
    arc_into_inner, Arc, AtomicPtr, AtomicU64, AtomicUsize, Mutex, Ordering, UnsafeCell,
};

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

/// What a slot carries.
///
/// Kept at two words for pointer-sized `T` (a one-event batch is stored
/// inline; larger batches behind one thin pointer) so that a retained
/// one-event batch of a pointer-sized event costs 16 bytes of slot.
enum Item<T, E> {
    /// The sentinel a buffer starts with; skipped by readers.
    Empty,
    /// A batch of one.
    One(T),
    /// A batch of two or more.
    #[allow(clippy::box_collection)] // a thin pointer keeps `Item` two words
    Many(Box<Vec<T>>),
    /// Splice point: reading on from here means reading on from after this
    /// slot of another buffer (whose wait list comes along, boxed to keep
    /// `Item` two words).
    Follow(Box<Splice<T, E>>),
    /// Terminal: the writer failed the buffer.
    Failed(Box<E>),
    /// Terminal: the writer was dropped.
    Closed,
}

impl<T, E> Item<T, E> {
    fn events(&self) -> &[T] {
        match self {
            Item::One(event) => std::slice::from_ref(event),
            Item::Many(events) => events,
            _ => &[],
        }
    }
}

/// Where a splice point leads: a slot of an older buffer, and that buffer's
/// wait list.
struct Splice<T, E> {
    block: Arc<Block<T, E>>,
    slot: usize,
    shared: Arc<Shared>,
}

/// Slots per block. Small under loom, so that the models cross block
/// boundaries.
const BLOCK: usize = if cfg!(loom) { 2 } else { 32 };

/// A run of [`BLOCK`] slots, filled in order by the single writer.
///
/// Slots `0..len` are initialised and never change while the block is
/// shared; the writer initialises slot `len` and then publishes it by
/// storing `len + 1` with `Release`. A reader reads a slot only below a
/// `len` it loaded with `Acquire` (or slot 0 of a block it reached through
/// `next`, which is linked only after its slot 0 is written).
///
/// Why not `OnceLock<Item>` slots (no `unsafe`): a `OnceLock` adds a state
/// word, 24 bytes per slot instead of 16 for a `u64` event, which is just
/// above the 24 B per retained event target once the block header and the
/// allocator's rounding are counted (measured: `benches/memory.rs`).
struct Block<T, E> {
    /// Null until the writer links the next block; then owns one strong
    /// count of it (from `Arc::into_raw`). Written once, by the single
    /// writer, with `Release`; read with `Acquire`.
    next: AtomicPtr<Block<T, E>>,
    /// `seq` of slot 0 (the buffer's sentinel is seq 0).
    base: u64,
    /// How many slots are published.
    len: AtomicUsize,
    slots: [UnsafeCell<MaybeUninit<Item<T, E>>>; BLOCK],
}

// SAFETY: a shared block hands out only shared references to its published
// items (so `T` and `E` must be `Sync`), and its items may be dropped by
// whichever thread drops the last reference (so they must be `Send`). The
// only writes through `&Block` are the single writer's initialisation of
// unpublished slots, which no other thread reads before the `Release` store
// of `len` (or of the `next` link) that publishes them.
unsafe impl<T: Send + Sync, E: Send + Sync> Sync for Block<T, E> {}

impl<T, E> Block<T, E> {
    fn new(base: u64) -> Self {
        Self {
            next: AtomicPtr::new(ptr::null_mut()),
            base,
            len: AtomicUsize::new(0),
            slots: std::array::from_fn(|_| UnsafeCell::new(MaybeUninit::uninit())),
        }
    }

    /// Writes `item` into slot `slot` and publishes it.
    ///
    /// # Safety
    ///
    /// Only the buffer's single writer may call this, with `slot` equal to
    /// the number of slots published so far and below [`BLOCK`]: no reader
    /// reads that slot before the `Release` store below.
    unsafe fn publish(&self, slot: usize, item: Item<T, E>) {
        self.slots[slot].with_mut(|p| {
            // SAFETY: per the contract, nobody else accesses this unpublished
            // slot; it is uninitialised, so nothing is overwritten unfreed.
            unsafe { (*p).write(item) };
        });
        self.len.store(slot + 1, Ordering::Release);
    }

    /// The item in `slot`.
    ///
    /// # Safety
    ///
    /// `slot` is published as seen by this thread: below a `len` loaded with
    /// `Acquire`, or 0 in a block reached through an `Acquire` load of
    /// `next`.
    unsafe fn item(&self, slot: usize) -> &Item<T, E> {
        self.slots[slot].with(|p| {
            // SAFETY: published slots are initialised and never written
            // again while `&self` exists (only `clear`, with `&mut self`).
            unsafe { (*p).assume_init_ref() }
        })
    }

    /// The linked successor, borrowed from `self`.
    fn next_ref(&self) -> Option<&Block<T, E>> {
        let next = self.next.load(Ordering::Acquire);
        // SAFETY: a non-null `next` came from `Arc::into_raw` and `self` owns
        // that strong count until `self` is dropped, so the pointee lives at
        // least as long as the `&self` borrow. The Acquire load pairs with the
        // writer's Release store, so the block's slot 0 is visible.
        unsafe { next.as_ref() }
    }

    /// A strong reference to the linked successor.
    fn next_arc(&self) -> Option<Arc<Block<T, E>>> {
        let next = self.next_ref()?;
        let raw: *const Block<T, E> = next;
        // SAFETY: `raw` came from `Arc::into_raw` and is kept alive by the
        // count `self` owns (see `next_ref`); `from_raw` takes ownership of
        // exactly the count added here.
        unsafe {
            Arc::increment_strong_count(raw);
            Some(Arc::from_raw(raw))
        }
    }

    /// Takes ownership of the successor link, leaving this block unlinked.
    fn take_next(&mut self) -> Option<Arc<Block<T, E>>> {
        let next = self.next.swap(ptr::null_mut(), Ordering::Acquire);
        if next.is_null() {
            None
        } else {
            // SAFETY: the pointer came from `Arc::into_raw` and this block
            // owned its count; swapping in null transfers that ownership here.
            Some(unsafe { Arc::from_raw(next) })
        }
    }

    /// Drops every item, handing splice targets to `pending` so that the
    /// caller frees them iteratively.
    fn clear(&mut self, pending: &mut Vec<Arc<Block<T, E>>>) {
        let len = self.len.swap(0, Ordering::Acquire);
        for slot in &self.slots[..len] {
            // SAFETY: slots below `len` are initialised; `&mut self` means
            // nobody else can reach them, and `len` is already 0, so each is
            // read out (and dropped) exactly once, even if a drop panics.
            let item = slot.with_mut(|p| unsafe { (*p).assume_init_read() });
            if let Item::Follow(splice) = item {
                pending.push(splice.block);
            }
        }
    }
}

impl<T, E> Drop for Block<T, E> {
    fn drop(&mut self) {
        // Unlink iteratively: every block we are the last owner of is taken
        // apart here, so no `Drop` recurses along the chain (or into a spliced
        // chain through a `Follow`).
        let mut pending: Vec<Arc<Block<T, E>>> = Vec::new();
        let mut next = self.take_next();
        self.clear(&mut pending);
        loop {
            let Some(arc) = next.take().or_else(|| pending.pop()) else {
                break;
            };
            if let Some(mut block) = arc_into_inner(arc) {
                next = block.take_next();
                block.clear(&mut pending);
                // `block` drops here with nothing linked and no items.
            }
        }
    }
}

/// One buffer's wait list: readers parked on its tail.
struct Shared {
    /// Identity for splice ordering: buffers created later have larger ids.
    id: u64,
    /// `seq` of the buffer's newest slot (for [`Cursor::lag`]).
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

    /// Wakes every registered reader. Called after the new slot is published.
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
    /// The newest block.
    tail: Arc<Block<T, E>>,
    /// Slots of `tail` published so far (at least 1); the writer's own copy
    /// of `tail.len`.
    len: usize,
    shared: Arc<Shared>,
    /// Set once `fail` or `splice` has ended the buffer, so `Drop` does not
    /// append `Closed`.
    ended: bool,
    /// Reused by [`Shared::wake_all`].
    spare: Vec<Option<Waker>>,
}

impl<T, E> fmt::Debug for EventBuffer<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBuffer")
            .field("seq", &self.seq())
            .finish_non_exhaustive()
    }
}

impl<T, E> Default for EventBuffer<T, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, E> EventBuffer<T, E> {
    /// Creates an empty buffer: a single sentinel that readers can wait on.
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
        let block = Block::new(0);
        // SAFETY: the block is not shared yet; slot 0 is the first.
        unsafe { block.publish(0, Item::Empty) };
        Self {
            tail: Arc::new(block),
            len: 1,
            shared: Arc::new(Shared::new()),
            ended: false,
            spare: Vec::new(),
        }
    }

    /// Appends a batch as one slot; readers receive it as one slice.
    ///
    /// An empty batch appends nothing. The cost is no allocation for a batch
    /// of one (one per 32 slots, for the block), one for a larger
    /// batch, and one wake-up of all parked readers, whatever their number.
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

    /// A cursor on the newest slot: it sees exactly what is appended after
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
        Cursor {
            block: self.tail.clone(),
            slot: self.len - 1,
            shared: self.shared.clone(),
            registration: None,
        }
    }

    /// How many batches were appended so far.
    pub fn seq(&self) -> u64 {
        self.tail.base + self.len as u64 - 1
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
            block: at.block.clone(),
            slot: at.slot,
            shared: at.shared.clone(),
        })));
        self.ended = true;
        Ok(())
    }

    fn link(&mut self, item: Item<T, E>) {
        let seq = self.seq() + 1;
        if self.len < BLOCK {
            // SAFETY: `&mut self` makes this the single writer, and slot
            // `len` is the first unpublished one.
            unsafe { self.tail.publish(self.len, item) };
            self.len += 1;
        } else {
            let block = Block::new(seq);
            // SAFETY: the block is not shared yet; slot 0 is the first.
            unsafe { block.publish(0, item) };
            let block = Arc::new(block);
            // Link the block: Release makes its slot 0 visible to any reader
            // that loads `next` with Acquire. The single writer is the only
            // one to store here, and the full tail's `next` is still null.
            self.tail
                .next
                .store(Arc::into_raw(block.clone()).cast_mut(), Ordering::Release);
            self.tail = block;
            self.len = 1;
        }
        self.shared.appended.store(seq, Ordering::Release);
        // The slot is published before the wake: a reader that registered
        // before this sees the wake; one that registers after it sees the
        // slot (it re-checks under the same lock `wake_all` takes).
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
/// A cursor keeps the block it is in, and every block after it, alive; drop
/// it (or move it on) to let them go.
///
/// See the [module docs](self) for the semantics.
pub struct Cursor<T, E = Infallible> {
    /// The block of the position; holding it keeps every later block alive
    /// (each block owns its successor, and a splice point its target).
    block: Arc<Block<T, E>>,
    /// The slot last consumed (or the slot the cursor started on).
    slot: usize,
    /// Wait list of the buffer the position belongs to. Kept here rather
    /// than in every block: the writer and the readers then share no
    /// reference count per block.
    shared: Arc<Shared>,
    /// Where this cursor is parked in `shared`, if it is.
    registration: Option<Registration>,
}

impl<T, E> Clone for Cursor<T, E> {
    fn clone(&self) -> Self {
        Self {
            block: self.block.clone(),
            slot: self.slot,
            shared: self.shared.clone(),
            registration: None,
        }
    }
}

impl<T, E> fmt::Debug for Cursor<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor")
            .field("seq", &self.seq())
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
    fn seq(&self) -> u64 {
        self.block.base + self.slot as u64
    }

    /// The published item after the position, if there is one.
    fn peek(&self) -> Option<&Item<T, E>> {
        let block = &*self.block;
        let slot = self.slot + 1;
        if slot < BLOCK {
            if slot < block.len.load(Ordering::Acquire) {
                // SAFETY: `slot` is below a `len` loaded with Acquire.
                return Some(unsafe { block.item(slot) });
            }
            return None;
        }
        // SAFETY: slot 0 of a block reached through an Acquire load of
        // `next` (a block is linked only after its slot 0 is published).
        block.next_ref().map(|next| unsafe { next.item(0) })
    }

    /// Moves onto the slot after the position (which `peek` found).
    fn advance(&mut self) {
        if self.slot + 1 < BLOCK {
            self.slot += 1;
        } else {
            let next = self.block.next_arc().expect("peek found the next block");
            // The old block is let go here; if this was its last cursor it is
            // freed (iteratively) on this thread.
            self.block = next;
            self.slot = 0;
        }
    }

    /// Waits for the next batch and returns it.
    ///
    /// Empty slots (sentinels, splice points) are skipped. At the end of the
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
            .saturating_sub(self.seq())
    }

    fn outcome(&self, step: Step) -> Result<&[T], ReadError<'_, E>> {
        match step {
            // SAFETY: `Batch` means the cursor just moved onto a published
            // slot of its block.
            Step::Batch => Ok(unsafe { self.block.item(self.slot) }.events()),
            Step::Failed => match self.peek() {
                Some(Item::Failed(error)) => Err(ReadError::Failed(error)),
                _ => Err(ReadError::Closed),
            },
            Step::Closed | Step::Tail => Err(ReadError::Closed),
        }
    }

    /// Moves past empty slots to the next batch (the cursor then sits on
    /// it), or stops at a terminal slot (the cursor stays before it) or at
    /// the tail (registering `cx` if given).
    fn step(&mut self, mut cx: Option<&mut Context<'_>>) -> Step {
        loop {
            enum Found<T, E> {
                Batch,
                Skip,
                Follow(Arc<Block<T, E>>, usize, Arc<Shared>),
            }
            let found = match self.peek() {
                None => {
                    let Some(cx) = cx.as_deref_mut() else {
                        return Step::Tail;
                    };
                    if self.park(cx) {
                        return Step::Tail;
                    }
                    continue; // published while we took the lock
                }
                Some(Item::Failed(_)) => return Step::Failed,
                Some(Item::Closed) => return Step::Closed,
                Some(Item::One(_) | Item::Many(_)) => Found::Batch,
                Some(Item::Empty) => Found::Skip,
                // A splice point moves the cursor onto a slot of the older
                // buffer *as already consumed*: reading goes on after it.
                Some(Item::Follow(splice)) => {
                    Found::Follow(splice.block.clone(), splice.slot, splice.shared.clone())
                }
            };
            if let Some(registration) = self.registration.take() {
                self.shared.deregister(registration);
            }
            match found {
                Found::Batch => {
                    self.advance();
                    return Step::Batch;
                }
                Found::Skip => self.advance(),
                Found::Follow(block, slot, shared) => {
                    self.block = block;
                    self.slot = slot;
                    self.shared = shared;
                }
            }
        }
    }

    /// Registers the waker unless the next slot got published; returns
    /// whether it did.
    fn park(&mut self, cx: &mut Context<'_>) -> bool {
        let mut waiters = self.shared.waiters.lock();
        // Re-check under the lock the writer takes to wake: no lost wake-up.
        if self.peek().is_some() {
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
