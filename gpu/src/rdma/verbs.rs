//! The only place that calls verbs: raw `ibverbs-sys` calls wrapped in RAII
//! types.
//!
//! Why not the safe `ibverbs` crate's types: they borrow each other by
//! lifetime (a context cannot be stored next to its queue pairs), panic in
//! `Drop` when a destroy call fails, hard-code port 1, register only memory
//! they allocate themselves, and have no dma-buf registration, no list
//! posting and no WRITE_WITH_IMM. This module keeps their thread-safety
//! reasoning (verbs objects may be used from any thread, the library locks
//! internally) and uses the crate's re-exported completion types.
//!
//! Ownership: every object holds an `Arc` of its parent (QP → PD, CQ →
//! context), so destruction order is always child first. `Drop` never
//! panics: a failed destroy is logged.
//!
//! Nothing here decides anything: attributes come from [`super::qp`],
//! work requests from [`super::plan`].

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use ibverbs_sys as ffi;

use super::device::{GidInfo, GidType, LinkLayer, Mtu, NicInfo, PortInfo};
use super::error::{RdmaError, Result};
use super::qp::QpAttrs;

/// Lists every verbs device with its ports and GID tables.
///
/// A machine without kernel RDMA support makes `ibv_get_device_list` fail
/// (or return an empty list); both come back as [`RdmaError::NoDevices`].
pub(crate) fn probe_devices() -> Result<Vec<NicInfo>> {
    let mut n: i32 = 0;
    // SAFETY: `n` is a valid out-pointer; the returned array is freed below
    // and not used after that.
    let list = unsafe { ffi::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        return Err(RdmaError::NoDevices {
            reason: format!("ibv_get_device_list: {e} (no kernel RDMA support or no device)"),
        });
    }
    let guard = DeviceList(list);
    let count = usize::try_from(n).unwrap_or(0);
    let mut nics = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: `list` holds `n` valid device pointers while `guard` lives.
        let dev = unsafe { *guard.0.add(i) };
        if dev.is_null() {
            continue;
        }
        nics.push(probe_one(dev)?);
    }
    Ok(nics)
}

struct DeviceList(*mut *mut ffi::ibv_device);

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ibv_get_device_list and is freed once.
        unsafe { ffi::ibv_free_device_list(self.0) };
    }
}

fn device_name(dev: *mut ffi::ibv_device) -> String {
    // SAFETY: `dev` is a valid device of a live device list; the name is a
    // NUL-terminated string owned by the library.
    let p = unsafe { ffi::ibv_get_device_name(dev) };
    if p.is_null() {
        return String::from("?");
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn probe_one(dev: *mut ffi::ibv_device) -> Result<NicInfo> {
    let name = device_name(dev);
    // SAFETY: `dev` is valid while the device list lives (caller holds it).
    let guid = u64::from_be(unsafe { ffi::ibv_get_device_guid(dev) });
    let ctx = Context::from_device(dev, &name)?;
    let mut attr = ffi::ibv_device_attr::default();
    // SAFETY: the context is open; `attr` is a valid out-pointer.
    let rc = unsafe { ffi::ibv_query_device(ctx.raw(), &mut attr) };
    if rc != 0 {
        return Err(RdmaError::verbs(
            "ibv_query_device",
            &name,
            io::Error::from_raw_os_error(rc),
        ));
    }
    let mut ports = Vec::new();
    for port_num in 1..=attr.phys_port_cnt {
        ports.push(ctx.query_port(port_num)?);
    }
    Ok(NicInfo {
        name,
        guid,
        max_qp_wr: u32::try_from(attr.max_qp_wr).unwrap_or(0),
        max_sge: u32::try_from(attr.max_sge).unwrap_or(0),
        max_qp_init_rd_atom: u8::try_from(attr.max_qp_init_rd_atom).unwrap_or(u8::MAX),
        max_qp_rd_atom: u8::try_from(attr.max_qp_rd_atom).unwrap_or(u8::MAX),
        max_mr_size: attr.max_mr_size,
        ports,
    })
}

/// An open device context.
#[derive(Debug)]
pub struct Context {
    ctx: NonNull<ffi::ibv_context>,
    name: String,
}

// SAFETY: verbs contexts may be used from any thread; libibverbs serialises
// the calls that need it (see the thread-safety notes of ibv_open_device).
unsafe impl Send for Context {}
// SAFETY: as above; `&Context` only exposes verbs calls.
unsafe impl Sync for Context {}

impl Context {
    /// Opens the device called `name`.
    pub fn open(name: &str) -> Result<Arc<Context>> {
        let mut n: i32 = 0;
        // SAFETY: see probe_devices.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = io::Error::last_os_error();
            return Err(RdmaError::NoDevices {
                reason: format!("ibv_get_device_list: {e}"),
            });
        }
        let guard = DeviceList(list);
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: index within the `n` entries of a live list.
            let dev = unsafe { *guard.0.add(i) };
            if !dev.is_null() && device_name(dev) == name {
                // The context stays valid after the list is freed.
                return Context::from_device(dev, name).map(Arc::new);
            }
        }
        Err(RdmaError::UnknownDevice(name.to_owned()))
    }

    fn from_device(dev: *mut ffi::ibv_device, name: &str) -> Result<Context> {
        // SAFETY: `dev` is a valid device of a live list.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        let ctx = NonNull::new(ctx)
            .ok_or_else(|| RdmaError::verbs("ibv_open_device", name, io::Error::last_os_error()))?;
        Ok(Context {
            ctx,
            name: name.to_owned(),
        })
    }

    fn raw(&self) -> *mut ffi::ibv_context {
        self.ctx.as_ptr()
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queries one port and its GID table.
    pub fn query_port(&self, port_num: u8) -> Result<PortInfo> {
        let mut pa = ffi::ibv_port_attr::default();
        // SAFETY: the exported ibv_query_port takes the compat layout, a
        // prefix of `ibv_port_attr`; the buffer is larger and zeroed.
        let rc = unsafe {
            ffi::ibv_query_port(
                self.raw(),
                port_num,
                (&mut pa as *mut ffi::ibv_port_attr).cast(),
            )
        };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_query_port",
                &self.name,
                io::Error::from_raw_os_error(rc),
            ));
        }
        let active = pa.state == ffi::ibv_port_state::IBV_PORT_ACTIVE;
        let mut gids = Vec::new();
        let len = usize::try_from(pa.gid_tbl_len).unwrap_or(0);
        if active && len > 0 {
            let mut table = vec![ffi::ibv_gid_entry::default(); len];
            // SAFETY: `table` has room for `len` entries of the given size.
            let got = unsafe {
                ffi::_ibv_query_gid_table(
                    self.raw(),
                    table.as_mut_ptr(),
                    table.len(),
                    0,
                    std::mem::size_of::<ffi::ibv_gid_entry>(),
                )
            };
            if got < 0 {
                let e = io::Error::from_raw_os_error(i32::try_from(-got).unwrap_or(libc::EIO));
                return Err(RdmaError::verbs("ibv_query_gid_table", &self.name, e));
            }
            table.truncate(usize::try_from(got).unwrap_or(0));
            for e in table
                .into_iter()
                .filter(|e| e.port_num == u32::from(port_num))
            {
                if let Some(gid_type) = GidType::from_verbs(e.gid_type) {
                    // SAFETY: every bit pattern of the 16-byte union is a valid `raw`.
                    let raw = unsafe { e.gid.raw };
                    gids.push(GidInfo {
                        index: e.gid_index,
                        gid: raw,
                        gid_type,
                    });
                }
            }
        }
        Ok(PortInfo {
            port_num,
            active,
            link_layer: LinkLayer::from_verbs(pa.link_layer),
            lid: pa.lid,
            active_mtu: Mtu::from_verbs(pa.active_mtu).unwrap_or(Mtu::M1024),
            gids,
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, closed once; every child holds
        // an Arc of this context, so none is alive.
        let rc = unsafe { ffi::ibv_close_device(self.raw()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, rc, "ibv_close_device failed");
        }
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct ProtectionDomain {
    pd: NonNull<ffi::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: see Context; a PD is an opaque handle usable from any thread.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// Allocates a PD on `ctx`.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: the context is open.
        let pd = unsafe { ffi::ibv_alloc_pd(ctx.raw()) };
        let pd = NonNull::new(pd).ok_or_else(|| {
            RdmaError::verbs("ibv_alloc_pd", &ctx.name, io::Error::last_os_error())
        })?;
        Ok(Arc::new(ProtectionDomain {
            pd,
            ctx: ctx.clone(),
        }))
    }

    /// The device this PD belongs to.
    pub fn device(&self) -> &str {
        &self.ctx.name
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd, freed once; MRs and QPs hold an
        // Arc of the PD, so none is alive.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.pd.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.ctx.name, rc, "ibv_dealloc_pd failed");
        }
    }
}

/// A completion entry, copied out of `ibv_wc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// Work request id.
    pub wr_id: u64,
    /// `ibv_wc_status`.
    pub status: u32,
    /// `ibv_wc_opcode` (valid on success only).
    pub opcode: u32,
    /// Vendor syndrome.
    pub vendor_err: u32,
    /// Bytes (receives and READs).
    pub byte_len: u32,
    /// Immediate, host order, when the completion carries one.
    pub imm: Option<u32>,
    /// Local QP number.
    pub qp_num: u32,
}

/// A completion queue.
#[derive(Debug)]
pub struct CompletionQueue {
    cq: NonNull<ffi::ibv_cq>,
    ctx: Arc<Context>,
}

// SAFETY: see Context; polling a CQ is thread-safe in libibverbs providers
// (they lock the CQ), and the transport polls each CQ from one thread anyway.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    /// Creates a CQ of at least `entries` entries.
    pub fn new(ctx: &Arc<Context>, entries: u32) -> Result<Arc<CompletionQueue>> {
        let cqe = i32::try_from(entries)
            .map_err(|_| RdmaError::Invalid(format!("CQ of {entries} entries")))?;
        // SAFETY: open context; no channel, no user context.
        let cq = unsafe { ffi::ibv_create_cq(ctx.raw(), cqe, ptr::null_mut(), ptr::null_mut(), 0) };
        let cq = NonNull::new(cq).ok_or_else(|| {
            RdmaError::verbs("ibv_create_cq", &ctx.name, io::Error::last_os_error())
        })?;
        Ok(Arc::new(CompletionQueue {
            cq,
            ctx: ctx.clone(),
        }))
    }

    /// Polls up to `out.len()` completions; returns how many were written.
    pub fn poll(&self, out: &mut Vec<Cqe>, max: usize) -> Result<usize> {
        let mut wcs = vec![ffi::ibv_wc::default(); max.clamp(1, 256)];
        // SAFETY: the CQ is live; its context's ops table is filled in by
        // the provider at open time and never changes.
        let poll = unsafe { (*self.ctx.raw()).ops.poll_cq };
        let poll = poll.ok_or_else(|| {
            RdmaError::verbs(
                "ibv_poll_cq",
                &self.ctx.name,
                io::Error::from_raw_os_error(libc::ENOSYS),
            )
        })?;
        let len = i32::try_from(wcs.len()).unwrap_or(i32::MAX);
        // SAFETY: `wcs` holds `len` writable entries.
        let n = unsafe { poll(self.cq.as_ptr(), len, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(RdmaError::verbs(
                "ibv_poll_cq",
                &self.ctx.name,
                io::Error::from_raw_os_error(-n),
            ));
        }
        let n = usize::try_from(n).unwrap_or(0);
        for wc in &wcs[..n] {
            let (status, vendor_err) = wc
                .error()
                .unwrap_or((ffi::ibv_wc_status::IBV_WC_SUCCESS, 0));
            out.push(Cqe {
                wr_id: wc.wr_id(),
                status,
                opcode: wc.opcode(),
                vendor_err,
                byte_len: u32::try_from(wc.len()).unwrap_or(u32::MAX),
                imm: wc.imm_data().map(u32::from_be),
                qp_num: wc.qp_num,
            });
        }
        Ok(n)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq, destroyed once; QPs using it hold
        // an Arc, so none is alive.
        let rc = unsafe { ffi::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.ctx.name, rc, "ibv_destroy_cq failed");
        }
    }
}

/// Operation of one send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// RDMA READ.
    Read,
    /// RDMA WRITE.
    Write,
    /// RDMA WRITE with a 32-bit immediate (host order).
    WriteImm(u32),
}

/// One send work request with at most one scatter/gather entry (zero when
/// `len` is 0, as for a bare notification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRequest {
    /// Id echoed by the completion.
    pub wr_id: u64,
    /// Operation.
    pub op: SendOp,
    /// Local address.
    pub local_addr: u64,
    /// lkey of the local MR.
    pub lkey: u32,
    /// Bytes.
    pub len: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// rkey of the remote MR.
    pub rkey: u32,
    /// Ask for a completion entry.
    pub signaled: bool,
}

/// A failed post: requests from `first_failed` on were not queued.
#[derive(Debug)]
pub struct PostError {
    /// Index (in the posted slice) of the first request not queued.
    pub first_failed: usize,
    /// The error.
    pub error: RdmaError,
}

/// An RC queue pair.
#[derive(Debug)]
pub struct QueuePair {
    qp: NonNull<ffi::ibv_qp>,
    pd: Arc<ProtectionDomain>,
    _send_cq: Arc<CompletionQueue>,
    _recv_cq: Arc<CompletionQueue>,
}

// SAFETY: see Context; posting to one QP from several threads is serialised
// by the provider's QP lock, and the transport posts under its own lock.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

/// Sizes of a new queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send-queue depth.
    pub max_send_wr: u32,
    /// Receive-queue depth.
    pub max_recv_wr: u32,
}

impl QueuePair {
    /// Creates an RC QP in RESET, completions of both queues on `cq`s.
    pub fn new_rc(
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<QueuePair> {
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: send_cq.cq.as_ptr(),
            recv_cq: recv_cq.cq.as_ptr(),
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: caps.max_recv_wr,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: PD and CQs are live and belong to the same context; `init`
        // is fully initialised.
        let qp = unsafe { ffi::ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| {
            RdmaError::verbs("ibv_create_qp", pd.device(), io::Error::last_os_error())
        })?;
        Ok(QueuePair {
            qp,
            pd: pd.clone(),
            _send_cq: send_cq.clone(),
            _recv_cq: recv_cq.clone(),
        })
    }

    /// Queue pair number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; qp_num is set at creation and constant.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// Applies one state transition computed by [`super::qp`].
    pub fn modify(&self, a: &QpAttrs) -> Result<()> {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: a.qp_state,
            qp_access_flags: a.access_flags,
            pkey_index: a.pkey_index,
            port_num: a.port_num,
            path_mtu: a.path_mtu,
            dest_qp_num: a.dest_qp_num,
            rq_psn: a.rq_psn,
            sq_psn: a.sq_psn,
            max_dest_rd_atomic: a.max_dest_rd_atomic,
            max_rd_atomic: a.max_rd_atomic,
            min_rnr_timer: a.min_rnr_timer,
            timeout: a.timeout,
            retry_cnt: a.retry_cnt,
            rnr_retry: a.rnr_retry,
            ..Default::default()
        };
        attr.ah_attr.dlid = a.av.dlid;
        attr.ah_attr.sl = a.av.sl;
        attr.ah_attr.port_num = a.av.port_num;
        attr.ah_attr.is_global = u8::from(a.av.is_global);
        attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: a.av.dgid };
        attr.ah_attr.grh.sgid_index = a.av.sgid_index;
        attr.ah_attr.grh.hop_limit = a.av.hop_limit;
        attr.ah_attr.grh.traffic_class = a.av.traffic_class;
        let mask = i32::try_from(a.mask)
            .map_err(|_| RdmaError::Invalid(format!("attr mask {:#x}", a.mask)))?;
        // SAFETY: live QP; `attr` is fully initialised and only the fields
        // named in `mask` are read.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp.as_ptr(), &mut attr, mask) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_modify_qp",
                self.pd.device(),
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Posts send requests as one linked list.
    pub fn post_send(&self, reqs: &[SendRequest]) -> std::result::Result<(), PostError> {
        if reqs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<ffi::ibv_sge> = reqs
            .iter()
            .map(|r| ffi::ibv_sge {
                addr: r.local_addr,
                length: r.len,
                lkey: r.lkey,
            })
            .collect();
        let mut wrs: Vec<ffi::ibv_send_wr> = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let mut wr = ffi::ibv_send_wr {
                wr_id: r.wr_id,
                next: ptr::null_mut(),
                // The sge vector is not resized after this point, so the
                // pointers stay valid for the call.
                sg_list: if r.len == 0 {
                    ptr::null_mut()
                } else {
                    &mut sges[i]
                },
                num_sge: i32::from(r.len != 0),
                opcode: match r.op {
                    SendOp::Read => ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                    SendOp::Write => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                    SendOp::WriteImm(_) => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                },
                send_flags: if r.signaled {
                    ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
                } else {
                    0
                },
                ..Default::default()
            };
            if let SendOp::WriteImm(imm) = r.op {
                wr.__bindgen_anon_1.imm_data = imm.to_be();
            }
            wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: r.remote_addr,
                rkey: r.rkey,
            };
            wrs.push(wr);
        }
        // SAFETY: live QP; ops table constant after open.
        let post = unsafe { (*(*self.qp.as_ptr()).context).ops.post_send };
        // SAFETY: the SGEs the requests point to live until the call returns
        // (the provider copies them into the send queue).
        unsafe { self.post_list("ibv_post_send", &mut wrs, |w, n| w.next = n, post) }
    }

    /// Links `wrs` into one list and posts it with the provider's `post`;
    /// on failure, names the first request not posted.
    ///
    /// # Safety
    /// `post` must be this QP's post function for `W`, and everything the
    /// requests point to must stay valid until the call returns.
    unsafe fn post_list<W>(
        &self,
        what: &'static str,
        wrs: &mut [W],
        link: fn(&mut W, *mut W),
        post: Option<unsafe extern "C" fn(*mut ffi::ibv_qp, *mut W, *mut *mut W) -> libc::c_int>,
    ) -> std::result::Result<(), PostError> {
        let fail = |first_failed, errno| PostError {
            first_failed,
            error: RdmaError::verbs(what, self.pd.device(), io::Error::from_raw_os_error(errno)),
        };
        let Some(post) = post else {
            return Err(fail(0, libc::ENOSYS));
        };
        let base = wrs.as_mut_ptr();
        for i in 0..wrs.len().saturating_sub(1) {
            // SAFETY: `i + 1 < len`, within the slice.
            link(&mut wrs[i], unsafe { base.add(i + 1) });
        }
        let mut bad: *mut W = ptr::null_mut();
        // SAFETY: live QP; the list lives until the call returns (caller's
        // contract for what it points to); `bad` is an out-pointer.
        let rc = unsafe { post(self.qp.as_ptr(), base, &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        let first_failed = if bad.is_null() {
            0
        } else {
            // SAFETY: `bad` points into `wrs` (the provider returns the
            // failing element of the list we passed).
            usize::try_from(unsafe { bad.offset_from(base) }).unwrap_or(0)
        };
        Err(fail(first_failed, rc))
    }

    /// Posts buffer-less receives (for WRITE_WITH_IMM notifications).
    pub fn post_recv_empty(&self, wr_ids: &[u64]) -> std::result::Result<(), PostError> {
        if wr_ids.is_empty() {
            return Ok(());
        }
        let mut wrs: Vec<ffi::ibv_recv_wr> = wr_ids
            .iter()
            .map(|&id| ffi::ibv_recv_wr {
                wr_id: id,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 0,
            })
            .collect();
        // SAFETY: live QP; ops table constant after open.
        let post = unsafe { (*(*self.qp.as_ptr()).context).ops.post_recv };
        // SAFETY: the requests carry no buffers.
        unsafe { self.post_list("ibv_post_recv", &mut wrs, |w, n| w.next = n, post) }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once. After this call
        // the NIC no longer touches memory through this QP.
        let rc = unsafe { ffi::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.pd.device(), rc, "ibv_destroy_qp failed");
        }
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct MemoryRegion {
    mr: NonNull<ffi::ibv_mr>,
    pd: Arc<ProtectionDomain>,
    iova: u64,
    len: u64,
}

// SAFETY: an MR is an opaque handle plus constant keys; verbs allow
// deregistering it from any thread.
unsafe impl Send for MemoryRegion {}
// SAFETY: `&MemoryRegion` only reads constant fields.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` (host memory, or device memory when
    /// nvidia-peermem is loaded) with `access` flags.
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must stay mapped (and, for remote access, must be
    /// memory the caller allows peers to read/write) until the returned MR
    /// is dropped; the NIC reads and writes it without the CPU knowing.
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: u64,
        len: u64,
        access: u32,
    ) -> Result<MemoryRegion> {
        let size =
            usize::try_from(len).map_err(|_| RdmaError::Invalid(format!("MR of {len} bytes")))?;
        // SAFETY: live PD; the caller guarantees the range stays mapped.
        // iova2 masks optional access flags (relaxed ordering) the kernel
        // does not know, unlike plain ibv_reg_mr.
        let mr = unsafe {
            ffi::ibv_reg_mr_iova2(
                pd.pd.as_ptr(),
                addr as *mut libc::c_void,
                size,
                addr,
                access,
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| {
            RdmaError::verbs("ibv_reg_mr", pd.device(), io::Error::last_os_error())
        })?;
        Ok(MemoryRegion {
            mr,
            pd: pd.clone(),
            iova: addr,
            len,
        })
    }

    /// Registers `len` bytes at `offset` of a dma-buf (GPU memory exported
    /// with `cuMemGetHandleForAddressRange`), addressed by peers at `iova`
    /// (normally the GPU virtual address). The fd may be closed afterwards:
    /// the MR keeps its own reference to the buffer.
    pub fn register_dmabuf(
        pd: &Arc<ProtectionDomain>,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: u64,
        access: u32,
    ) -> Result<MemoryRegion> {
        let size =
            usize::try_from(len).map_err(|_| RdmaError::Invalid(format!("MR of {len} bytes")))?;
        let access =
            i32::try_from(access).map_err(|_| RdmaError::Invalid(format!("access {access:#x}")))?;
        // SAFETY: live PD; `fd` is a valid open descriptor for the call; the
        // kernel pins the dma-buf for the life of the MR, so no Rust memory
        // is aliased.
        let mr = unsafe {
            ffi::ibv_reg_dmabuf_mr(pd.pd.as_ptr(), offset, size, iova, fd.as_raw_fd(), access)
        };
        let mr = NonNull::new(mr).ok_or_else(|| {
            RdmaError::verbs("ibv_reg_dmabuf_mr", pd.device(), io::Error::last_os_error())
        })?;
        Ok(MemoryRegion {
            mr,
            pd: pd.clone(),
            iova,
            len,
        })
    }

    /// Local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: live MR; keys are constant.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    /// Remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: live MR; keys are constant.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    /// Address peers and work requests use for byte 0.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Zero-length regions cannot be registered; always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// NIC it is registered on.
    pub fn device(&self) -> &str {
        self.pd.device()
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once. The transport drops an
        // MR only after the operations using it have drained.
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.pd.device(), rc, "ibv_dereg_mr failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::qp::{access, mask};
    use super::*;

    /// The pure modules use ABI constants of their own; they must equal the
    /// bindings'.
    #[test]
    fn pure_constants_match_the_verbs_abi() {
        use ffi::ibv_qp_attr_mask as m;
        let pairs = [
            (mask::STATE, m::IBV_QP_STATE),
            (mask::ACCESS_FLAGS, m::IBV_QP_ACCESS_FLAGS),
            (mask::PKEY_INDEX, m::IBV_QP_PKEY_INDEX),
            (mask::PORT, m::IBV_QP_PORT),
            (mask::AV, m::IBV_QP_AV),
            (mask::PATH_MTU, m::IBV_QP_PATH_MTU),
            (mask::TIMEOUT, m::IBV_QP_TIMEOUT),
            (mask::RETRY_CNT, m::IBV_QP_RETRY_CNT),
            (mask::RNR_RETRY, m::IBV_QP_RNR_RETRY),
            (mask::RQ_PSN, m::IBV_QP_RQ_PSN),
            (mask::MAX_QP_RD_ATOMIC, m::IBV_QP_MAX_QP_RD_ATOMIC),
            (mask::MIN_RNR_TIMER, m::IBV_QP_MIN_RNR_TIMER),
            (mask::SQ_PSN, m::IBV_QP_SQ_PSN),
            (mask::MAX_DEST_RD_ATOMIC, m::IBV_QP_MAX_DEST_RD_ATOMIC),
            (mask::DEST_QPN, m::IBV_QP_DEST_QPN),
        ];
        for (ours, theirs) in pairs {
            assert_eq!(ours, theirs.0);
        }
        use ffi::ibv_access_flags as a;
        assert_eq!(access::LOCAL_WRITE, a::IBV_ACCESS_LOCAL_WRITE.0);
        assert_eq!(access::REMOTE_WRITE, a::IBV_ACCESS_REMOTE_WRITE.0);
        assert_eq!(access::REMOTE_READ, a::IBV_ACCESS_REMOTE_READ.0);
        assert_eq!(access::RELAXED_ORDERING, a::IBV_ACCESS_RELAXED_ORDERING.0);
        use super::super::qp::QpState;
        use ffi::ibv_qp_state as s;
        assert_eq!(QpState::Reset.to_verbs(), s::IBV_QPS_RESET);
        assert_eq!(QpState::Init.to_verbs(), s::IBV_QPS_INIT);
        assert_eq!(QpState::Rtr.to_verbs(), s::IBV_QPS_RTR);
        assert_eq!(QpState::Rts.to_verbs(), s::IBV_QPS_RTS);
        assert_eq!(QpState::Error.to_verbs(), s::IBV_QPS_ERR);
        assert_eq!(Mtu::M4096.to_verbs(), ffi::IBV_MTU_4096);
        assert_eq!(Mtu::M256.to_verbs(), ffi::IBV_MTU_256);
        assert_eq!(
            LinkLayer::from_verbs(ffi::IBV_LINK_LAYER_ETHERNET as u8),
            LinkLayer::Ethernet
        );
        assert_eq!(
            LinkLayer::from_verbs(ffi::IBV_LINK_LAYER_INFINIBAND as u8),
            LinkLayer::Infiniband
        );
        assert_eq!(
            GidType::from_verbs(ffi::IBV_GID_TYPE_ROCE_V2),
            Some(GidType::RoceV2)
        );
    }

    #[test]
    fn opening_a_device_without_rdma_is_a_clear_error() {
        match Context::open("kvmesh-no-such-nic") {
            Err(RdmaError::NoDevices { .. }) | Err(RdmaError::UnknownDevice(_)) => {}
            other => panic!("expected NoDevices or UnknownDevice, got {other:?}"),
        }
    }
}
