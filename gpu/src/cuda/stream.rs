//! Streams and events: the ordering primitives of the safe layer.

use std::sync::Arc;

use super::device::{record_drop_error, GpuDevice};
use super::memory::GpuMemory;
use super::poller::{self, EventFuture};
use super::raw::{self, Handle};
use crate::error::{Error, Result};

/// A CUDA stream: work queued on it runs in order.
///
/// Streams created here are non-blocking (they do not synchronise with the
/// legacy default stream). A foreign stream (e.g. PyTorch's current stream)
/// can be wrapped with [`GpuStream::from_raw`]; it is not destroyed on drop.
pub struct GpuStream {
    dev: GpuDevice,
    raw: Handle,
    owned: bool,
}

// SAFETY: stream handles may be used from any thread (the driver API is
// thread-safe); work submitted from several threads is ordered by the driver.
unsafe impl Send for GpuStream {}
// SAFETY: as above; every method only passes the handle to the driver.
unsafe impl Sync for GpuStream {}

impl std::fmt::Debug for GpuStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStream")
            .field("device", &self.dev.ordinal())
            .field("raw", &format_args!("{:#x}", self.raw))
            .field("owned", &self.owned)
            .finish()
    }
}

impl Drop for GpuStream {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let r = self.dev.bind().and_then(|()| {
            // SAFETY: we created the stream and nothing uses it after us;
            // the driver lets pending work finish before releasing it.
            unsafe { raw::stream_destroy(self.raw) }
        });
        if let Err(e) = r {
            record_drop_error("stream", e);
        }
    }
}

impl GpuStream {
    /// Creates a non-blocking stream on `dev`.
    pub fn new(dev: &GpuDevice) -> Result<GpuStream> {
        dev.bind()?;
        Ok(GpuStream {
            dev: dev.clone(),
            raw: raw::stream_create()?,
            owned: true,
        })
    }

    /// Wraps a stream created elsewhere (e.g. `torch.cuda.current_stream().cuda_stream`);
    /// 0 is the legacy default stream.
    ///
    /// # Safety
    /// `raw` must be a stream of `dev`'s primary context that stays alive
    /// for as long as the returned value and any work queued through it.
    pub unsafe fn from_raw(dev: &GpuDevice, raw: u64) -> GpuStream {
        GpuStream {
            dev: dev.clone(),
            raw: raw as Handle,
            owned: false,
        }
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }

    /// The raw `CUstream` (for handing to other CUDA code).
    pub fn as_raw(&self) -> u64 {
        self.raw as u64
    }

    /// Blocks until all work queued so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: the stream is live while `self` is.
        unsafe { raw::stream_sync(self.raw) }
    }

    /// Records a new event after the work queued so far.
    pub fn record(&self) -> Result<GpuEvent> {
        self.record_inner(false)
    }

    /// Like [`GpuStream::record`], with timing enabled (for [`GpuEvent::elapsed_ms`]).
    pub fn record_timed(&self) -> Result<GpuEvent> {
        self.record_inner(true)
    }

    fn record_inner(&self, timing: bool) -> Result<GpuEvent> {
        self.dev.bind()?;
        let ev = GpuEvent::new_inner(&self.dev, timing)?;
        // SAFETY: both handles are live.
        unsafe { raw::event_record(ev.inner.raw, self.raw) }?;
        Ok(ev)
    }

    /// Makes work queued after this call wait for `ev` (recorded on any
    /// stream of the same device, or a foreign event from [`GpuEvent::from_raw`]).
    /// Does not block the host.
    pub fn wait(&self, ev: &GpuEvent) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: both handles are live while `self` and `ev` are.
        unsafe { raw::stream_wait_event(self.raw, ev.inner.raw) }
    }

    /// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`,
    /// asynchronously on this stream, after earlier work on either buffer
    /// (on any stream) that conflicts with it.
    pub fn copy(
        &self,
        dst: &dyn GpuMemory,
        dst_off: u64,
        src: &dyn GpuMemory,
        src_off: u64,
        len: u64,
    ) -> Result<()> {
        let d = dst.range("copy destination", dst_off, len)?;
        let s = src.range("copy source", src_off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.dev.bind()?;
        dst.access().before_write(self)?;
        src.access().before_read(self)?;
        // SAFETY: both ranges were checked against their buffers, which stay
        // alive until the recorded event completed (their drop waits for it).
        unsafe { raw::memcpy_async(d, s, len as usize, self.raw) }?;
        let ev = self.record()?;
        dst.access().wrote(&ev);
        src.access().read(&ev);
        Ok(())
    }

    /// Fills `len` bytes of `dst` at `off` with `byte`, asynchronously.
    pub fn fill(&self, dst: &dyn GpuMemory, off: u64, len: u64, byte: u8) -> Result<()> {
        let d = dst.range("fill", off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.dev.bind()?;
        dst.access().before_write(self)?;
        // SAFETY: the range was checked; the buffer outlives the work (drop waits).
        unsafe { raw::memset_d8_async(d, byte, len as usize, self.raw) }?;
        dst.access().wrote(&self.record()?);
        Ok(())
    }

    /// Copies between raw addresses (device, pinned or registered host
    /// memory; pageable host memory makes the call synchronous).
    ///
    /// # Safety
    /// Both ranges must be valid, stay valid until the copy completed on
    /// this stream, and not be written by anything else meanwhile.
    pub unsafe fn copy_raw(&self, dst: u64, src: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { raw::memcpy_async(dst, src, len as usize, self.raw) }
    }

    pub(crate) fn raw(&self) -> Handle {
        self.raw
    }
}

pub(crate) struct EventInner {
    pub(crate) dev: GpuDevice,
    pub(crate) raw: Handle,
    owned: bool,
}

// SAFETY: event handles may be used from any thread (thread-safe driver API).
unsafe impl Send for EventInner {}
// SAFETY: as above; methods only pass the handle to the driver.
unsafe impl Sync for EventInner {}

impl Drop for EventInner {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let r = self.dev.bind().and_then(|()| {
            // SAFETY: we created the event; the last `Arc` is going away.
            unsafe { raw::event_destroy(self.raw) }
        });
        if let Err(e) = r {
            record_drop_error("event", e);
        }
    }
}

/// A CUDA event: marks a point in a stream. Cheap to clone.
#[derive(Clone)]
pub struct GpuEvent {
    pub(crate) inner: Arc<EventInner>,
}

impl std::fmt::Debug for GpuEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEvent")
            .field("device", &self.inner.dev.ordinal())
            .field("raw", &format_args!("{:#x}", self.inner.raw))
            .finish()
    }
}

impl GpuEvent {
    fn new_inner(dev: &GpuDevice, timing: bool) -> Result<GpuEvent> {
        dev.bind()?;
        Ok(GpuEvent {
            inner: Arc::new(EventInner {
                dev: dev.clone(),
                raw: raw::event_create(timing)?,
                owned: true,
            }),
        })
    }

    /// Wraps an event created elsewhere (e.g. `torch.cuda.Event().cuda_event`
    /// after `record()`); not destroyed on drop.
    ///
    /// # Safety
    /// `raw` must be an event of `dev`'s primary context that stays alive for
    /// as long as the returned value (and its clones).
    pub unsafe fn from_raw(dev: &GpuDevice, raw: u64) -> GpuEvent {
        GpuEvent {
            inner: Arc::new(EventInner {
                dev: dev.clone(),
                raw: raw as Handle,
                owned: false,
            }),
        }
    }

    /// The raw `CUevent`.
    pub fn as_raw(&self) -> u64 {
        self.inner.raw as u64
    }

    /// The device the event belongs to.
    pub fn device(&self) -> &GpuDevice {
        &self.inner.dev
    }

    /// Whether the work before the event has finished (non-blocking).
    pub fn query(&self) -> Result<bool> {
        self.inner.dev.bind()?;
        // SAFETY: the event is live while `self` is.
        unsafe { raw::event_query(self.inner.raw) }
    }

    /// Blocks until the work before the event has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.dev.bind()?;
        // SAFETY: the event is live while `self` is.
        unsafe { raw::event_sync(self.inner.raw) }
    }

    /// A future resolved once the event has completed, by the process's
    /// event poller thread (so async code can await GPU work without a
    /// blocked thread). Cancel-safe: dropping it stops nothing.
    pub fn completed(&self) -> EventFuture {
        poller::future(self.clone())
    }

    /// Runs `f` on the poller thread once the event completed (or failed).
    /// `f` must be quick: it delays every other waiter.
    pub fn on_complete(&self, f: impl FnOnce(Result<()>) + Send + 'static) {
        poller::watch(self.clone(), Box::new(f));
    }

    /// Milliseconds from `self` to `end`; both recorded with
    /// [`GpuStream::record_timed`] and completed.
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32> {
        if self.inner.dev != end.inner.dev {
            return Err(Error::Invalid("events of different devices".into()));
        }
        self.inner.dev.bind()?;
        // SAFETY: both events are live; the driver reports events without
        // timing or not yet completed as errors.
        unsafe { raw::event_elapsed_ms(self.inner.raw, end.inner.raw) }
    }
}
