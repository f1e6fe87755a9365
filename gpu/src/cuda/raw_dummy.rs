//! The bottom layer in a build without the `cuda` feature: the same
//! functions as `raw.rs`, each failing with "built without the cuda feature",
//! so the safe layer above compiles unchanged and every GPU call returns a
//! clear [`Error::NoCuda`].

#![allow(clippy::missing_safety_doc, clippy::unnecessary_wraps)]

use std::ffi::{c_void, CStr};

use crate::error::{Error, Result};

pub(crate) type Handle = usize;

fn off<T>() -> Result<T> {
    Err(Error::NoCuda(
        "kvmesh-gpu was built without the cuda feature".into(),
    ))
}

pub(crate) fn init() -> Result<()> {
    off()
}
pub(crate) fn nvrtc_init() -> Result<()> {
    off()
}
pub(crate) fn device_count() -> Result<i32> {
    off()
}
pub(crate) fn device_get(_ordinal: i32) -> Result<i32> {
    off()
}
pub(crate) fn device_name(_dev: i32) -> Result<String> {
    off()
}
#[derive(Debug, Clone, Copy)]
pub(crate) enum Attr {
    CcMajor,
    CcMinor,
    SmCount,
}
pub(crate) fn device_attr(_dev: i32, _a: Attr) -> Result<i32> {
    off()
}
pub(crate) fn primary_ctx_retain(_dev: i32) -> Result<Handle> {
    off()
}
pub(crate) unsafe fn primary_ctx_release(_dev: i32) -> Result<()> {
    off()
}
pub(crate) unsafe fn ctx_set_current(_ctx: Handle) -> Result<()> {
    off()
}
pub(crate) fn ctx_synchronize() -> Result<()> {
    off()
}
pub(crate) fn stream_create() -> Result<Handle> {
    off()
}
pub(crate) unsafe fn stream_destroy(_s: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn stream_sync(_s: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn stream_wait_event(_s: Handle, _e: Handle) -> Result<()> {
    off()
}
pub(crate) fn event_create(_timing: bool) -> Result<Handle> {
    off()
}
pub(crate) unsafe fn event_destroy(_e: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn event_record(_e: Handle, _s: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn event_query(_e: Handle) -> Result<bool> {
    off()
}
pub(crate) unsafe fn event_sync(_e: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn event_elapsed_ms(_start: Handle, _end: Handle) -> Result<f32> {
    off()
}
pub(crate) fn mem_alloc(_len: usize) -> Result<u64> {
    off()
}
pub(crate) unsafe fn mem_free(_p: u64) -> Result<()> {
    off()
}
pub(crate) fn mem_host_alloc(_len: usize) -> Result<*mut u8> {
    off()
}
pub(crate) unsafe fn mem_free_host(_p: *mut u8) -> Result<()> {
    off()
}
pub(crate) unsafe fn mem_host_register(_p: *mut u8, _len: usize) -> Result<()> {
    off()
}
pub(crate) unsafe fn mem_host_unregister(_p: *mut u8) -> Result<()> {
    off()
}
pub(crate) unsafe fn memcpy_async(_dst: u64, _src: u64, _len: usize, _s: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn memcpy(_dst: u64, _src: u64, _len: usize) -> Result<()> {
    off()
}
pub(crate) unsafe fn memset_d8_async(_dst: u64, _b: u8, _len: usize, _s: Handle) -> Result<()> {
    off()
}
pub(crate) fn address_range(_p: u64) -> Result<(u64, u64)> {
    off()
}
pub(crate) fn pointer_device(_p: u64) -> Result<Option<i32>> {
    off()
}
pub(crate) fn ipc_get_handle(_base: u64) -> Result<[u8; 64]> {
    off()
}
pub(crate) fn ipc_open(_handle: &[u8; 64]) -> Result<u64> {
    off()
}
pub(crate) unsafe fn ipc_close(_p: u64) -> Result<()> {
    off()
}
pub(crate) fn module_load(_image: &[u8]) -> Result<Handle> {
    off()
}
pub(crate) unsafe fn module_unload(_m: Handle) -> Result<()> {
    off()
}
pub(crate) unsafe fn module_function(_m: Handle, _name: &CStr) -> Result<Handle> {
    off()
}
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // read by the real backend only
pub(crate) struct Launch {
    pub(crate) grid: u32,
    pub(crate) block: u32,
}
pub(crate) unsafe fn launch(
    _f: Handle,
    _l: Launch,
    _s: Handle,
    _params: &mut [*mut c_void],
) -> Result<()> {
    off()
}
pub(crate) fn nvrtc_compile(_src: &str, _name: &str, _opts: &[String]) -> Result<Vec<u8>> {
    off()
}
