//! The event poller: one background thread per process that watches CUDA
//! events and runs a completion callback for each, so batches and async
//! callers can wait for GPU work without a blocked thread per wait.
//!
//! ```text
//!  watch(ev, f) --channel--> poller thread: query pending events;
//!                                 done -> f(Ok) | error -> f(Err)
//!                                 none done -> wait up to 50 us for new watches
//! ```
//! It polls only while events are pending and sleeps on the channel
//! otherwise.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

use super::stream::GpuEvent;
use crate::error::{Error, Result};

pub(crate) type Callback = Box<dyn FnOnce(Result<()>) + Send>;

struct Watch {
    ev: GpuEvent,
    done: Callback,
}

/// Pending watches are bounded only by the callers' own bounds (batches,
/// in-flight slices); the channel is unbounded so `watch` never blocks.
static POLLER: OnceLock<crossbeam_channel::Sender<Watch>> = OnceLock::new();

fn sender() -> &'static crossbeam_channel::Sender<Watch> {
    POLLER.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Watch>();
        let spawned = std::thread::Builder::new()
            .name("kvmesh-cuda-poll".into())
            .spawn(move || run(rx));
        if let Err(e) = spawned {
            tracing::error!("cannot start the CUDA event poller: {e}");
        }
        tx
    })
}

fn run(rx: crossbeam_channel::Receiver<Watch>) {
    let mut pending: Vec<Watch> = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(w) => pending.push(w),
                Err(_) => return,
            }
        }
        while let Ok(w) = rx.try_recv() {
            pending.push(w);
        }
        let before = pending.len();
        let mut i = 0;
        while i < pending.len() {
            match pending[i].ev.query() {
                Ok(false) => i += 1,
                Ok(true) => {
                    let w = pending.swap_remove(i);
                    (w.done)(Ok(()));
                }
                Err(e) => {
                    let w = pending.swap_remove(i);
                    (w.done)(Err(e));
                }
            }
        }
        if pending.len() == before {
            // Nothing finished: wait a little, waking early for new work.
            match rx.recv_timeout(Duration::from_micros(50)) {
                Ok(w) => pending.push(w),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    if pending.is_empty() {
                        return;
                    }
                }
            }
        }
    }
}

/// Runs `done` on the poller thread once `ev` completed or failed.
pub(crate) fn watch(ev: GpuEvent, done: Callback) {
    if let Err(e) = sender().send(Watch { ev, done }) {
        // The poller is gone (could not start): complete synchronously.
        let w = e.into_inner();
        let r = w.ev.synchronize();
        (w.done)(r);
    }
}

#[derive(Default)]
struct Slot {
    result: Option<Result<()>>,
    waker: Option<Waker>,
}

/// Resolves once a [`GpuEvent`] has completed (see [`GpuEvent::completed`]).
pub struct EventFuture {
    slot: Arc<Mutex<Slot>>,
}

impl std::fmt::Debug for EventFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFuture")
            .field("ready", &self.slot.lock().result.is_some())
            .finish()
    }
}

pub(crate) fn future(ev: GpuEvent) -> EventFuture {
    let slot = Arc::new(Mutex::new(Slot::default()));
    let s2 = slot.clone();
    watch(
        ev,
        Box::new(move |r| {
            let w = {
                let mut g = s2.lock();
                g.result = Some(r);
                g.waker.take()
            };
            if let Some(w) = w {
                w.wake();
            }
        }),
    );
    EventFuture { slot }
}

impl Future for EventFuture {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut g = self.slot.lock();
        match g.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                g.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl EventFuture {
    /// Blocks until resolved or `timeout`; `Err(Timeout)` on timeout.
    pub fn wait_blocking(self, timeout: Duration) -> Result<()> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self.slot.lock().result.take() {
                return r;
            }
            if std::time::Instant::now() >= until {
                return Err(Error::Timeout(format!("GPU event after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}
