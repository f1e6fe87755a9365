//! Activation rows as the group's operations take and return them: views
//! ([`Rows`]), owned tensors ([`Tensor`]), the group's registered send
//! buffers ([`SendBuf`]) and what combine gets back from the experts
//! ([`ExpertOut`]).
//!
//! Storage stays private so a device-memory form can be added for the GPU
//! path without changing the signatures that take these types.

use kvmesh_gpu::{Region, RegionId};

use crate::dtype::{self, DType};
use crate::error::{Error, Result};

/// A view of activation rows (`[rows, hidden]`, row-major) in host memory.
///
/// Its storage is private so a device-memory form can be added for the GPU
/// path without changing the signatures that take it.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) hidden: usize,
    pub(crate) dtype: DType,
    /// (region, offset of `bytes[0]`) when the rows live in one of the
    /// group's send buffers.
    pub(crate) region: Option<(RegionId, usize)>,
}

impl<'a> Rows<'a> {
    /// Rows of raw little-endian bytes; `bytes.len()` must be a multiple of
    /// `hidden × dtype.size()`.
    pub fn new(bytes: &'a [u8], hidden: usize, dtype: DType) -> Result<Rows<'a>> {
        let row = hidden * dtype.size();
        if bytes.len().checked_rem(row) != Some(0) {
            return Err(Error::Invalid(format!(
                "{} bytes is not a whole number of {hidden}-channel {} rows",
                bytes.len(),
                dtype.name()
            )));
        }
        Ok(Rows {
            bytes,
            hidden,
            dtype,
            region: None,
        })
    }

    pub fn from_f32(v: &'a [f32], hidden: usize) -> Result<Rows<'a>> {
        Rows::new(bytemuck::cast_slice(v), hidden, DType::F32)
    }

    pub fn from_bf16(v: &'a [half::bf16], hidden: usize) -> Result<Rows<'a>> {
        Rows::new(bytemuck::cast_slice(v), hidden, DType::Bf16)
    }

    pub fn num_rows(&self) -> usize {
        self.bytes.len() / self.row_bytes()
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }

    /// Bytes of row `i`.
    pub fn row(&self, i: usize) -> &'a [u8] {
        let r = self.row_bytes();
        &self.bytes[i * r..(i + 1) * r]
    }
}

/// A registered buffer of the group that the caller fills with activation
/// rows. Rows taken from it ([`SendBuf::rows`]) leave without a staging
/// copy: the engine copies them straight into the peers' receive buffers
/// (dispatch input, or [`ExpertOut::Reduced`] rows grouped by source rank as
/// received), or, for combine between ranks on one host, the peers read
/// them in place (the buffer is an area of the group's receive region).
/// See [`crate::EpGroup::take_send_buffers`].
#[derive(Debug)]
pub struct SendBuf {
    pub(crate) region: Region,
    pub(crate) off: usize,
    pub(crate) len: usize,
    pub(crate) hidden: usize,
    pub(crate) dtype: DType,
}

impl SendBuf {
    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer, for filling.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `off..off+len` lies inside the region (set at allocation),
        // which `self.region` keeps mapped. Nothing else writes it: the group
        // hands each buffer out once, and peers never write this area of
        // its receive region (they write only their slots and doorbells).
        // The engine, and same-host peers pulling combine rows, only read it
        // inside a dispatch/combine that borrowed `&self` (through `rows`),
        // which waits for those reads (landed batches, peers' release
        // doorbells) before returning, so no read is in flight while
        // `&mut self` lives.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr().add(self.off), self.len) }
    }

    /// The first `n` rows, tagged so dispatch and combine send them without
    /// a staging copy.
    pub fn rows(&self, n: usize) -> Result<Rows<'_>> {
        let bytes = n * self.hidden * self.dtype.size();
        if bytes > self.len {
            return Err(Error::Invalid(format!(
                "{n} rows exceed the send buffer's {} bytes",
                self.len
            )));
        }
        // SAFETY: in bounds (checked above); the engine only reads the
        // region, and the caller cannot write it while this borrow lives.
        let view = unsafe { std::slice::from_raw_parts(self.region.as_ptr().add(self.off), bytes) };
        Ok(Rows {
            bytes: view,
            hidden: self.hidden,
            dtype: self.dtype,
            region: Some((self.region.id(), self.off)),
        })
    }
}

/// An owned `[rows, hidden]` activation tensor (combine output, permuted
/// rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub bytes: Vec<u8>,
    pub rows: usize,
    pub hidden: usize,
    pub dtype: DType,
}

impl Tensor {
    pub fn zeros(rows: usize, hidden: usize, dtype: DType) -> Tensor {
        Tensor {
            bytes: vec![0; rows * hidden * dtype.size()],
            rows,
            hidden,
            dtype,
        }
    }

    /// Makes this a `[rows, hidden]` tensor, keeping the allocation when it
    /// is large enough; the contents are unspecified.
    pub fn reshape(&mut self, rows: usize, hidden: usize, dtype: DType) {
        self.bytes.resize(rows * hidden * dtype.size(), 0);
        (self.rows, self.hidden, self.dtype) = (rows, hidden, dtype);
    }

    pub fn as_rows(&self) -> Rows<'_> {
        Rows {
            bytes: &self.bytes,
            hidden: self.hidden,
            dtype: self.dtype,
            region: None,
        }
    }

    /// All elements as `f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.hidden];
        dtype::to_f32(&self.bytes, self.dtype, &mut out);
        out
    }
}

/// What combine gets back from the experts.
#[derive(Debug, Clone, Copy)]
pub enum ExpertOut<'a> {
    /// One row per expert-major entry ([`crate::Dispatched::num_expert_rows`] rows,
    /// in [`crate::Dispatched::permute`] order). Combine sums each received row's
    /// entries with their gate weights (local expert ascending, f32), rounds
    /// to the activation dtype and sends the partial row back.
    PerExpert(Rows<'a>),
    /// One row per received row ([`crate::Dispatched::num_rows`]), already summed
    /// over this rank's experts with the gate weights by the caller (what a
    /// grouped GEMM with a weighted scatter epilogue produces). Combine sends
    /// it back as is.
    Reduced(Rows<'a>),
}
