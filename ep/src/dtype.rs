//! Element formats of the host path and the kernels that convert, quantize
//! and reduce rows of them.
//!
//! Every reduction here accumulates in `f32`, left to right, starting at
//! `+0.0`, with separate multiply and add (Rust never contracts them into an
//! FMA), so the same inputs give the same bits on every run and every rank.
//! A GPU path must use the same order to give the same bits.
//!
//! This module is pure: no I/O, no engine.

use serde::{Deserialize, Serialize};

/// Element type of activations (dispatch input, expert outputs, combine
/// output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            _ => Err(format!("unknown dtype {s:?} (expected f32 or bf16)")),
        }
    }
}

/// How dispatched rows travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WireFormat {
    /// In the activation dtype, bit for bit.
    Native,
    /// FP8 e4m3 (the `e4m3fn` variant: no infinities, max 448) with one
    /// `f32` scale per 128 channels: `x ≈ q × scale`. Combine still travels
    /// in the activation dtype.
    Fp8E4M3,
}

/// Channels per FP8 scale.
pub const FP8_BLOCK: usize = 128;
/// Largest finite e4m3 value.
pub const FP8_MAX: f32 = 448.0;

/// Bytes of one dispatched payload row of `hidden` channels.
pub fn payload_bytes(hidden: usize, dtype: DType, wire: WireFormat) -> usize {
    match wire {
        WireFormat::Native => hidden * dtype.size(),
        WireFormat::Fp8E4M3 => hidden + 4 * hidden.div_ceil(FP8_BLOCK),
    }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even `f32` → bf16 bits; NaN stays NaN (quiet).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    if nan {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded as u16
    }
}

/// Element `i` of a row in `dtype`, as `f32`.
#[inline(always)]
fn load(row: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::Bf16 => bf16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])),
        DType::F32 => {
            f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
        }
    }
}

/// Best SIMD level of this CPU: 0 baseline, 1 AVX2, 2 AVX-512 (F+BW).
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let l = LEVEL.load(Relaxed);
    if l != u8::MAX {
        return l;
    }
    let l = if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
    {
        2
    } else if std::is_x86_feature_detected!("avx2") {
        1
    } else {
        0
    };
    LEVEL.store(l, Relaxed);
    l
}

/// Defines a row kernel compiled three times (baseline, AVX2, AVX-512) and
/// picked at run time. The body is the same scalar code each time, and Rust
/// never fuses multiply and add, so every version gives the same bits.
macro_rules! kernel {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                unsafe fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                match simd_level() {
                    // SAFETY: the CPU supports AVX-512F and AVX-512BW
                    // (checked at run time by `simd_level`).
                    2 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU supports AVX2 (checked at run time).
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            generic($($arg),*)
        }
    };
}

kernel! {
    fn axpy_bf16(acc: &mut [f32], row: &[u8], w: f32) {
        let n = acc.len();
        let row = &row[..2 * n];
        for i in 0..n {
            let x = bf16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]]));
            acc[i] += w * x;
        }
    }
}

kernel! {
    fn axpy_f32(acc: &mut [f32], row: &[u8], w: f32) {
        let n = acc.len();
        let row = &row[..4 * n];
        for i in 0..n {
            let x = f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]);
            acc[i] += w * x;
        }
    }
}

kernel! {
    fn add_bf16(acc: &mut [f32], row: &[u8]) {
        let n = acc.len();
        let row = &row[..2 * n];
        for i in 0..n {
            acc[i] += bf16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]]));
        }
    }
}

kernel! {
    fn add_f32(acc: &mut [f32], row: &[u8]) {
        let n = acc.len();
        let row = &row[..4 * n];
        for i in 0..n {
            acc[i] += f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]);
        }
    }
}

kernel! {
    fn store_bf16(acc: &[f32], out: &mut [u8]) {
        let n = acc.len();
        let out = &mut out[..2 * n];
        for i in 0..n {
            let b = f32_to_bf16(acc[i]).to_le_bytes();
            out[2 * i] = b[0];
            out[2 * i + 1] = b[1];
        }
    }
}

kernel! {
    fn store_f32(acc: &[f32], out: &mut [u8]) {
        let n = acc.len();
        let out = &mut out[..4 * n];
        for i in 0..n {
            out[4 * i..4 * i + 4].copy_from_slice(&acc[i].to_le_bytes());
        }
    }
}

// The bf16 sums below work on 32-bit words, each holding two elements
// (little endian: element 2i in the low half, 2i+1 in the high half), so
// widening, narrowing and rounding are lane-wise shifts and masks: no
// shuffles, which on x86 all queue for one port and bounded the
// element-wise form.

/// The f32 of the low / high bf16 of a word.
#[inline(always)]
fn lo_f32(w: u32) -> f32 {
    f32::from_bits(w << 16)
}

#[inline(always)]
fn hi_f32(w: u32) -> f32 {
    f32::from_bits(w & 0xFFFF_0000)
}

/// [`f32_to_bf16`] of `x`, in the high half of the word (low half zero).
#[inline(always)]
fn bf16_hi(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    (if nan { b | 0x0040_0000 } else { rounded }) & 0xFFFF_0000
}

/// The word holding [`f32_to_bf16`] of `lo` and `hi`.
#[inline(always)]
fn pack_bf16(lo: f32, hi: f32) -> u32 {
    (bf16_hi(lo) >> 16) | bf16_hi(hi)
}

kernel! {
    fn sum2_bf16(a: &[u32], b: &[u32], out: &mut [u32]) {
        let n = out.len();
        let (a, b) = (&a[..n], &b[..n]);
        for i in 0..n {
            let lo = (0.0 + lo_f32(a[i])) + lo_f32(b[i]);
            let hi = (0.0 + hi_f32(a[i])) + hi_f32(b[i]);
            out[i] = pack_bf16(lo, hi);
        }
    }
}

kernel! {
    fn sum_bf16(rows: &[&[u32]], out: &mut [u32]) {
        const C: usize = 128;
        let mut lo = [0f32; C];
        let mut hi = [0f32; C];
        let mut s = 0;
        while s < out.len() {
            let e = (s + C).min(out.len());
            let (lo, hi) = (&mut lo[..e - s], &mut hi[..e - s]);
            lo.fill(0.0);
            hi.fill(0.0);
            for r in rows {
                for ((l, h), &w) in lo.iter_mut().zip(hi.iter_mut()).zip(&r[s..e]) {
                    *l += lo_f32(w);
                    *h += hi_f32(w);
                }
            }
            for ((o, l), h) in out[s..e].iter_mut().zip(lo.iter()).zip(hi.iter()) {
                *o = pack_bf16(*l, *h);
            }
            s = e;
        }
    }
}

kernel! {
    fn sum_f32(rows: &[&[f32]], out: &mut [f32]) {
        const C: usize = 256;
        let mut acc = [0f32; C];
        let mut s = 0;
        while s < out.len() {
            let e = (s + C).min(out.len());
            let acc = &mut acc[..e - s];
            acc.fill(0.0);
            for r in rows {
                for (a, &x) in acc.iter_mut().zip(&r[s..e]) {
                    *a += x;
                }
            }
            out[s..e].copy_from_slice(acc);
            s = e;
        }
    }
}

/// `out = round(Σ rows)` in `dtype`: f32 accumulation from +0.0, rows in
/// the given order (the same bits as [`add`] of each row into a zeroed
/// accumulator, then [`store`]). `acc` is scratch of `hidden` elements for
/// rows that are not aligned for their element type.
pub fn sum_rows(rows: &[&[u8]], out: &mut [u8], dtype: DType, acc: &mut [f32]) {
    match dtype {
        DType::Bf16 => {
            // Whole words, 4-byte aligned; an odd last element (odd hidden)
            // goes through the general path below.
            let words = out.len() / 4 * 4;
            let typed: Option<Vec<&[u32]>> = rows
                .iter()
                .map(|r| {
                    r.get(..words)
                        .and_then(|w| bytemuck::try_cast_slice(w).ok())
                })
                .collect();
            let o = bytemuck::try_cast_slice_mut::<u8, u32>(&mut out[..words]);
            // bf16 bits are little endian in memory, as on every host this
            // runs on (x86-64, aarch64).
            if let (Some(t), Ok(o), true) = (typed, o, cfg!(target_endian = "little")) {
                match t.as_slice() {
                    [a, b] => sum2_bf16(a, b, o),
                    _ => sum_bf16(&t, o),
                }
                if words == out.len() {
                    return;
                }
                let tail: Vec<&[u8]> = rows.iter().map(|r| &r[words..]).collect();
                let n = (out.len() - words) / 2;
                sum_rows_scalar(&tail, &mut out[words..], dtype, &mut acc[..n]);
                return;
            }
        }
        DType::F32 => {
            let typed: Option<Vec<&[f32]>> = rows
                .iter()
                .map(|r| bytemuck::try_cast_slice(r).ok())
                .collect();
            if let (Some(t), Ok(o)) = (typed, bytemuck::try_cast_slice_mut::<u8, f32>(out)) {
                if cfg!(target_endian = "little") {
                    sum_f32(&t, o);
                    return;
                }
            }
        }
    }
    sum_rows_scalar(rows, out, dtype, acc);
}

/// [`sum_rows`] through `acc`, for any alignment.
fn sum_rows_scalar(rows: &[&[u8]], out: &mut [u8], dtype: DType, acc: &mut [f32]) {
    acc.fill(0.0);
    for r in rows {
        add(acc, r, dtype);
    }
    store(acc, out, dtype);
}

/// `acc[i] += w × row[i]` (separate multiply and add).
pub fn axpy(acc: &mut [f32], row: &[u8], dtype: DType, w: f32) {
    match dtype {
        DType::Bf16 => axpy_bf16(acc, row, w),
        DType::F32 => axpy_f32(acc, row, w),
    }
}

/// `acc[i] += row[i]`.
pub fn add(acc: &mut [f32], row: &[u8], dtype: DType) {
    match dtype {
        DType::Bf16 => add_bf16(acc, row),
        DType::F32 => add_f32(acc, row),
    }
}

/// Rounds `acc` into `out` (in `dtype`).
pub fn store(acc: &[f32], out: &mut [u8], dtype: DType) {
    match dtype {
        DType::Bf16 => store_bf16(acc, out),
        DType::F32 => store_f32(acc, out),
    }
}

/// Converts an activation row to `f32`.
pub fn to_f32(row: &[u8], dtype: DType, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = load(row, dtype, i);
    }
}

/// Decodes one e4m3fn byte.
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * f32::powi(2.0, e - 7)
    }
}

/// Encodes `x` as e4m3fn, round to nearest even, saturating at ±448; NaN
/// becomes NaN.
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= FP8_MAX {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Subnormal range: code = a / 2^-9 rounded; 8 is the smallest
        // normal (0x08), which is exactly what the rounding yields.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let b = a.to_bits();
    // Keep 3 mantissa bits, rounding to nearest even; a carry moves into
    // the exponent as it should.
    let r = (b + 0x7_FFFF + ((b >> 20) & 1)) >> 20;
    let exp = (r >> 3) as i32 - 127 + 7;
    let man = r & 7;
    if exp > 15 || (exp == 15 && man == 7) {
        return sign | 0x7E;
    }
    sign | ((exp as u8) << 3) | man as u8
}

/// Quantizes one row of `hidden` channels (given as `f32`) into `out`
/// (`hidden` e4m3 bytes followed by one little-endian `f32` scale per
/// 128-channel block).
pub fn quantize_fp8(x: &[f32], out: &mut [u8]) {
    let hidden = x.len();
    let (q, scales) = out.split_at_mut(hidden);
    for (b, block) in x.chunks(FP8_BLOCK).enumerate() {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / FP8_MAX
        } else {
            1.0
        };
        let inv = 1.0 / scale;
        for (i, v) in block.iter().enumerate() {
            q[b * FP8_BLOCK + i] = f32_to_e4m3(v * inv);
        }
        scales[4 * b..4 * b + 4].copy_from_slice(&scale.to_le_bytes());
    }
}

/// Inverse of [`quantize_fp8`]: `out[i] = q[i] × scale(i / 128)`.
pub fn dequantize_fp8(row: &[u8], out: &mut [f32]) {
    let hidden = out.len();
    let (q, scales) = row.split_at(hidden);
    for (b, block) in out.chunks_mut(FP8_BLOCK).enumerate() {
        let s = f32::from_le_bytes([
            scales[4 * b],
            scales[4 * b + 1],
            scales[4 * b + 2],
            scales[4 * b + 3],
        ]);
        for (i, o) in block.iter_mut().enumerate() {
            *o = e4m3_to_f32(q[b * FP8_BLOCK + i]) * s;
        }
    }
}

/// Converts a dispatched payload row (in `wire` format) to `f32`.
pub fn payload_to_f32(row: &[u8], dtype: DType, wire: WireFormat, out: &mut [f32]) {
    match wire {
        WireFormat::Native => to_f32(row, dtype, out),
        WireFormat::Fp8E4M3 => dequantize_fp8(row, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        let mut s = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f32::from_bits(s as u32);
            let ours = f32_to_bf16(x);
            let theirs = half::bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(bf16_to_f32(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{x:e}");
            }
        }
    }

    #[test]
    fn e4m3_roundtrips_every_code_and_rounds_to_nearest() {
        for c in 0u8..=255 {
            let v = e4m3_to_f32(c);
            if v.is_nan() {
                assert_eq!(c & 0x7F, 0x7F);
                continue;
            }
            // -0.0 encodes as 0x80, 0.0 as 0.
            assert_eq!(f32_to_e4m3(v), c, "code {c:#x} value {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(-1e9), 0xFE);
        // Nearest: compare with a brute-force search over all finite codes.
        let finite: Vec<f32> = (0u8..=0x7E).map(e4m3_to_f32).collect();
        let mut s = 77u64;
        for _ in 0..50_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 500.0;
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = finite
                .iter()
                .map(|v| (v - x.min(448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((got - x.min(448.0)).abs() <= best, "{x}: got {got}");
        }
    }

    #[test]
    fn fp8_quantization_error_is_bounded() {
        let hidden = 300; // a partial last block
        let x: Vec<f32> = (0..hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * if i < 128 { 0.01 } else { 3.0 })
            .collect();
        let mut q = vec![0u8; payload_bytes(hidden, DType::F32, WireFormat::Fp8E4M3)];
        quantize_fp8(&x, &mut q);
        let mut back = vec![0f32; hidden];
        dequantize_fp8(&q, &mut back);
        for (b, (xs, ys)) in x.chunks(FP8_BLOCK).zip(back.chunks(FP8_BLOCK)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, y) in xs.iter().zip(ys) {
                // 3 mantissa bits: relative error ≤ 2^-4 for normals, and an
                // absolute floor of half a subnormal step for tiny values.
                let tol = a.abs() / 16.0 + amax / FP8_MAX / 1024.0 + 1e-12;
                assert!((a - y).abs() <= tol, "block {b}: {a} vs {y}");
            }
        }
    }

    #[test]
    fn sum_rows_matches_add_then_store_aligned_or_not() {
        // bf16 values that stress the rounding: -0.0, ±inf, quiet and
        // signalling NaNs, subnormals, and sums that round up, to even, or
        // overflow.
        const SPECIAL: [u16; 10] = [
            0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFF81, 0x0001, 0x807F, 0x7F7F, 0x3F81, 0x3F80,
        ];
        for dtype in [DType::Bf16, DType::F32] {
            for hidden in [300, 301] {
                let rb = hidden * dtype.size();
                // Extra bytes so the slices at offsets 1..3 are misaligned.
                let mut data = vec![0u8; 5 * rb + 3];
                let mut s = 99u64;
                for c in data.chunks_mut(2) {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let v = if (s >> 60) == 0 {
                        SPECIAL[(s >> 40) as usize % SPECIAL.len()]
                    } else {
                        ((s >> 33) as u16 & 0x3FFF) | 0x3C00 | (((s >> 20) as u16 & 1) << 15)
                    };
                    c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
                }
                for off in [0usize, 1, 2] {
                    for n in 1..=5 {
                        let rows: Vec<&[u8]> = (0..n)
                            .map(|i| &data[off + i * rb..off + (i + 1) * rb])
                            .collect();
                        let mut acc = vec![0f32; hidden];
                        let mut want = vec![0u8; rb];
                        for r in &rows {
                            add(&mut acc, r, dtype);
                        }
                        store(&acc, &mut want, dtype);
                        let mut got = vec![0u8; rb];
                        sum_rows(&rows, &mut got, dtype, &mut acc);
                        assert_eq!(got, want, "{dtype:?} hidden {hidden} offset {off} rows {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn word_wise_bf16_sums_match_element_wise_on_every_pair() {
        // Every bf16 value against a spread of partners, both halves of
        // the word: the packed rounding equals `f32_to_bf16`.
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut s = 5u64;
        for x in 0..=u16::MAX {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            let y = (s >> 48) as u16;
            a.push(u32::from(x) | (u32::from(y) << 16));
            b.push(u32::from(y) | (u32::from(x.rotate_left(3)) << 16));
        }
        let mut out = vec![0u32; a.len()];
        sum2_bf16(&a, &b, &mut out);
        let mut out3 = vec![0u32; a.len()];
        sum_bf16(&[&a, &b, &a], &mut out3);
        let el = |w: u32, half: u32| bf16_to_f32((w >> (16 * half)) as u16);
        for i in 0..a.len() {
            for half in 0..2 {
                let want2 = f32_to_bf16((0.0 + el(a[i], half)) + el(b[i], half));
                let want3 = f32_to_bf16(((0.0 + el(a[i], half)) + el(b[i], half)) + el(a[i], half));
                let got2 = (out[i] >> (16 * half)) as u16;
                let got3 = (out3[i] >> (16 * half)) as u16;
                assert_eq!(got2, want2, "pair {i} half {half}");
                assert_eq!(got3, want3, "triple {i} half {half}");
            }
        }
    }

    #[test]
    fn reductions_are_left_to_right_f32() {
        let row: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut acc = vec![0.0f32; 3];
        axpy(&mut acc, &row, DType::F32, 0.5);
        add(&mut acc, &row, DType::F32);
        assert_eq!(acc, vec![2.25, -3.0, 4.875]);
        let mut out = vec![0u8; 6];
        store(&acc, &mut out, DType::Bf16);
        let mut back = vec![0f32; 3];
        to_f32(&out, DType::Bf16, &mut back);
        assert_eq!(back, vec![2.25, -3.0, 4.875]);
    }
}
