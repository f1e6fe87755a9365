//! Blocking on the engine's async notification queue from a plain thread,
//! with a deadline and without sleeping in a poll loop: the thread parks
//! and the queue's waker unparks it.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` on this thread until it completes or `timeout` passes; `None`
/// on timeout (the future is dropped, so it must be cancel-safe).
pub(crate) fn block_on_timeout<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout(deadline - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_and_times_out() {
        assert_eq!(
            block_on_timeout(async { 7 }, Duration::from_millis(10)),
            Some(7)
        );
        let t = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(block_on_timeout(never, Duration::from_millis(30)), None);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
