//! Batch deadlines: one timer task for the whole engine instead of a timer
//! per batch. Arming a deadline is a map insert (the timer task is woken only
//! when the new deadline is the earliest); a batch that completes removes its
//! entry, so the map holds only batches in flight.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use crate::batch::{BatchId, BatchState};

/// What to do when a batch's deadline passes before it completed.
pub(crate) type OnExpire = Box<dyn FnOnce(Arc<BatchState>) + Send>;

struct Entry {
    batch: Weak<BatchState>,
    on_expire: OnExpire,
}

/// The deadlines of batches in flight.
#[derive(Default)]
pub(crate) struct Deadlines {
    map: Mutex<BTreeMap<(Instant, BatchId), Entry>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlines")
            .field("armed", &self.map.lock().len())
            .finish()
    }
}

impl Deadlines {
    /// Arms `batch`'s deadline.
    pub(crate) fn insert(&self, batch: &Arc<BatchState>, on_expire: OnExpire) {
        let key = (batch.deadline, batch.id);
        let earliest = {
            let mut m = self.map.lock();
            let earliest = m.keys().next().is_none_or(|k| key < *k);
            m.insert(
                key,
                Entry {
                    batch: Arc::downgrade(batch),
                    on_expire,
                },
            );
            earliest
        };
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Disarms a deadline (the batch completed).
    pub(crate) fn remove(&self, deadline: Instant, id: BatchId) {
        self.map.lock().remove(&(deadline, id));
    }

    /// The timer task: fires expired deadlines until the runtime stops.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let next = self.map.lock().keys().next().map(|k| k.0);
            match next {
                None => self.wake.notified().await,
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t.into()) => {}
                        _ = self.wake.notified() => continue,
                    }
                }
            }
            let now = Instant::now();
            let expired: Vec<Entry> = {
                let mut m = self.map.lock();
                let later = m.split_off(&(now, BatchId::MAX));
                std::mem::replace(&mut *m, later).into_values().collect()
            };
            for e in expired {
                if let Some(b) = e.batch.upgrade() {
                    (e.on_expire)(b);
                }
            }
        }
    }
}
