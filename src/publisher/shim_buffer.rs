//! TEMPORARY stand-in for `crate::buffer` with the API the lead promised, so the
//! publisher can be built and tested before the real EventBuffer lands on `main`.
//! Deleted when `main` is merged; nothing outside `publisher` uses it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

enum Payload<T, E> {
    Empty,
    Batch(Vec<T>),
    Err(E),
}

struct Link<T, E> {
    next: OnceLock<Arc<Node<T, E>>>,
    wakers: Mutex<Vec<Waker>>,
}

struct Node<T, E> {
    payload: Payload<T, E>,
    link: Arc<Link<T, E>>,
    seq: u64,
    buf: Arc<AtomicU64>,
}

fn new_link<T, E>() -> Arc<Link<T, E>> {
    Arc::new(Link {
        next: OnceLock::new(),
        wakers: Mutex::new(Vec::new()),
    })
}

pub(crate) struct EventBuffer<T, E = std::convert::Infallible> {
    tail: Arc<Node<T, E>>,
    seq: Arc<AtomicU64>,
}

impl<T, E> EventBuffer<T, E> {
    pub(crate) fn new() -> Self {
        let seq = Arc::new(AtomicU64::new(0));
        Self {
            tail: Arc::new(Node {
                payload: Payload::Empty,
                link: new_link(),
                seq: 0,
                buf: seq.clone(),
            }),
            seq,
        }
    }

    fn link(&mut self, node: Arc<Node<T, E>>) {
        let _ = self.tail.link.next.set(node.clone());
        let wakers = std::mem::take(&mut *self.tail.link.wakers.lock().unwrap());
        self.tail = node;
        for w in wakers {
            w.wake();
        }
    }

    pub(crate) fn append(&mut self, batch: Vec<T>) {
        if batch.is_empty() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let node = Arc::new(Node {
            payload: Payload::Batch(batch),
            link: new_link(),
            seq,
            buf: self.seq.clone(),
        });
        self.link(node);
    }

    pub(crate) fn append_one(&mut self, event: T) {
        self.append(vec![event]);
    }

    pub(crate) fn head(&self) -> Cursor<T, E> {
        Cursor {
            node: self.tail.clone(),
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    pub(crate) fn fail(mut self, error: E) {
        let node = Arc::new(Node {
            payload: Payload::Err(error),
            link: new_link(),
            seq: self.seq(),
            buf: self.seq.clone(),
        });
        self.link(node);
    }

    pub(crate) fn splice(mut self, at: &Cursor<T, E>) {
        let node = Arc::new(Node {
            payload: Payload::Empty,
            link: at.node.link.clone(),
            seq: at.node.seq,
            buf: at.node.buf.clone(),
        });
        self.link(node);
    }
}

pub(crate) struct Cursor<T, E> {
    node: Arc<Node<T, E>>,
}

impl<T, E> Clone for Cursor<T, E> {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
        }
    }
}

impl<T, E> Cursor<T, E> {
    pub(crate) async fn next(&mut self) -> Result<&[T], &E> {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
        self.try_next().expect("ready")
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let next = match self.node.link.next.get() {
                Some(n) => n.clone(),
                None => {
                    self.node
                        .link
                        .wakers
                        .lock()
                        .unwrap()
                        .push(cx.waker().clone());
                    match self.node.link.next.get() {
                        Some(n) => n.clone(),
                        None => return Poll::Pending,
                    }
                }
            };
            match next.payload {
                Payload::Empty => self.node = next,
                _ => return Poll::Ready(()),
            }
        }
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<&[T], &E>> {
        match self.step(Some(cx)) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    pub(crate) fn try_next(&mut self) -> Option<Result<&[T], &E>> {
        self.step(None)
    }

    fn step(&mut self, mut cx: Option<&mut Context<'_>>) -> Option<Result<&[T], &E>> {
        loop {
            let next = match self.node.link.next.get() {
                Some(n) => n.clone(),
                None => {
                    let cx = cx.as_deref_mut()?;
                    self.node
                        .link
                        .wakers
                        .lock()
                        .unwrap()
                        .push(cx.waker().clone());
                    match self.node.link.next.get() {
                        Some(n) => n.clone(),
                        None => return None,
                    }
                }
            };
            match &next.payload {
                Payload::Err(_) => {
                    return match &self.node.link.next.get().unwrap().payload {
                        Payload::Err(e) => Some(Err(e)),
                        _ => unreachable!(),
                    }
                }
                Payload::Empty => self.node = next,
                Payload::Batch(_) => {
                    self.node = next;
                    return match &self.node.payload {
                        Payload::Batch(v) => Some(Ok(v)),
                        _ => unreachable!(),
                    };
                }
            }
        }
    }

    pub(crate) fn lag(&self) -> u64 {
        self.node.buf.load(Ordering::SeqCst) - self.node.seq
    }
}
