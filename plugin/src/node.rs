//! A store peer with its own tokio runtime, for callers outside async
//! code: the C ABI and blocking programs.
//!
//! ```text
//!   StoreNode::start(StoreConfig) ─► runtime (N threads) ─► Store::start
//!   node.prefix_store(cache, cfg)  ─► PrefixStore running on that runtime
//!   node.block_on(timeout, what, future)      from any non-runtime thread
//!   node.shutdown(timeout)  leaves the swarm, stops the runtime (also on drop)
//! ```

use std::sync::Arc;
use std::time::Duration;

use kvmesh_p2p_store::{Store, StoreConfig};
use parking_lot::Mutex;
use tokio::runtime::{Handle, Runtime};

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::prefix::{block_on, PrefixStore, PrefixStoreConfig};

/// A store peer and the runtime it runs on.
#[derive(Debug)]
pub struct StoreNode {
    store: Store,
    handle: Handle,
    /// Taken by [`StoreNode::shutdown`]; never dropped on one of its own
    /// threads (shutdown happens on the caller's thread).
    rt: Mutex<Option<Runtime>>,
}

impl StoreNode {
    /// Starts a runtime with `threads` worker threads (at least 1) and a
    /// store peer on it (joining through `cfg.bootstrap`). Must be called
    /// outside any async runtime.
    pub fn start(cfg: StoreConfig, threads: usize) -> Result<StoreNode> {
        if Handle::try_current().is_ok() {
            return Err(Error::Invalid(
                "StoreNode::start called inside an async runtime; use Store::start there".into(),
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("kvmesh-store")
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("store runtime: {e}")))?;
        let store = rt.block_on(Store::start(cfg))?;
        Ok(StoreNode {
            store,
            handle: rt.handle().clone(),
            rt: Mutex::new(Some(rt)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The runtime the store runs on.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `fut` on the store's runtime from a thread outside it, waiting
    /// at most `timeout`.
    pub fn block_on<T>(
        &self,
        timeout: Duration,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        block_on(&self.handle, timeout, what, fut)
    }

    /// Lookup, save and load for `cache` (registered with this peer's engine).
    pub fn prefix_store(&self, cache: Arc<KvCache>, cfg: PrefixStoreConfig) -> Result<PrefixStore> {
        let _g = self.handle.enter();
        PrefixStore::new(self.store.clone(), cache, cfg)
    }

    /// Leaves the swarm and stops the runtime (waiting up to `timeout` for
    /// the goodbye). Idempotent; must be called outside the runtime.
    pub fn shutdown(&self, timeout: Duration) {
        let Some(rt) = self.rt.lock().take() else {
            return;
        };
        let _ = rt.block_on(async { tokio::time::timeout(timeout, self.store.shutdown()).await });
        rt.shutdown_timeout(Duration::from_millis(500));
    }
}

impl Drop for StoreNode {
    fn drop(&mut self) {
        if Handle::try_current().is_ok() {
            // Dropping a runtime on a runtime thread would panic: leave it
            // to stop with the process.
            if let Some(rt) = self.rt.lock().take() {
                rt.shutdown_background();
            }
            return;
        }
        self.shutdown(Duration::from_secs(1));
    }
}
