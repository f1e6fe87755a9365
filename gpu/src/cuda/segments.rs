//! Segment lists: the one shape every KV-cache layout reduces to for the
//! gather/scatter kernels. A segment copies `len` bytes from `src` to `dst`
//! (device addresses, or any addresses for the host reference).
//!
//! Planning is pure and runs without a GPU: build the list
//! ([`gather`], [`scatter`]), merge neighbours ([`coalesce`]), check it
//! against the buffers it may touch ([`validate`]) and cut it into
//! kernel-sized chunks ([`split`]). [`copy_on_host`] is the CPU reference
//! the GPU tests compare against.
//!
//! This module must not depend on CUDA.

use crate::error::{Error, Result};

/// One contiguous copy. `#[repr(C)]`: the kernel reads this layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct Segment {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// Segments gathering `(src, len)` pieces into one contiguous range at `dst`,
/// in order. Zero-length pieces are dropped.
pub fn gather(pieces: &[(u64, u64)], dst: u64) -> Vec<Segment> {
    let mut at = dst;
    let mut out = Vec::with_capacity(pieces.len());
    for &(src, len) in pieces {
        if len > 0 {
            out.push(Segment { src, dst: at, len });
            at += len;
        }
    }
    out
}

/// Segments scattering one contiguous range at `src` into `(dst, len)`
/// pieces, in order. Zero-length pieces are dropped.
pub fn scatter(src: u64, pieces: &[(u64, u64)]) -> Vec<Segment> {
    let mut at = src;
    let mut out = Vec::with_capacity(pieces.len());
    for &(dst, len) in pieces {
        if len > 0 {
            out.push(Segment { src: at, dst, len });
            at += len;
        }
    }
    out
}

/// Merges each segment into its predecessor when both its source and its
/// destination continue the predecessor's (a contiguous layout becomes one
/// segment). Order is kept.
pub fn coalesce(segs: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segs.len());
    for &s in segs.iter().filter(|s| s.len > 0) {
        match out.last_mut() {
            Some(p) if p.src + p.len == s.src && p.dst + p.len == s.dst => p.len += s.len,
            _ => out.push(s),
        }
    }
    out
}

/// Cuts segments longer than `chunk` bytes into pieces of `chunk` bytes
/// (the last one shorter), so one kernel block copies one piece. `chunk` is
/// rounded up to a multiple of 16, which keeps each piece's alignment equal
/// to its segment's. Zero-length segments are dropped.
pub fn split(segs: &[Segment], chunk: u64) -> Vec<Segment> {
    let chunk = chunk.max(16).next_multiple_of(16);
    let n: u64 = segs.iter().map(|s| s.len.div_ceil(chunk)).sum();
    let mut out = Vec::with_capacity(n as usize);
    for s in segs {
        let mut off = 0;
        while off < s.len {
            let len = chunk.min(s.len - off);
            out.push(Segment {
                src: s.src + off,
                dst: s.dst + off,
                len,
            });
            off += len;
        }
    }
    out
}

/// Checks that every segment reads inside `src` and writes inside `dst`
/// (`(base, len)` ranges), that no address computation overflows, and that
/// no two segments write the same byte (the kernel runs them in parallel).
pub fn validate(segs: &[Segment], src: (u64, u64), dst: (u64, u64)) -> Result<()> {
    let inside = |what: &'static str, at: u64, len: u64, (base, blen): (u64, u64)| {
        let ok = at >= base
            && at
                .checked_add(len)
                .is_some_and(|e| base.checked_add(blen).is_some_and(|be| e <= be));
        if ok {
            Ok(())
        } else {
            Err(Error::OutOfBounds {
                what,
                offset: at.wrapping_sub(base),
                len,
                region_len: blen,
            })
        }
    };
    for s in segs {
        inside("segment source", s.src, s.len, src)?;
        inside("segment destination", s.dst, s.len, dst)?;
    }
    let mut w: Vec<(u64, u64)> = segs
        .iter()
        .filter(|s| s.len > 0)
        .map(|s| (s.dst, s.dst + s.len))
        .collect();
    w.sort_unstable();
    for p in w.windows(2) {
        if p[1].0 < p[0].1 {
            return Err(Error::Invalid(format!(
                "segments overlap in the destination at {:#x}",
                p[1].0
            )));
        }
    }
    Ok(())
}

/// Applies `segs` on host memory: `src_mem` holds the bytes at addresses
/// `src_base..`, `dst_mem` those at `dst_base..`. Panics on a segment outside
/// either (it is a test reference).
pub fn copy_on_host(
    segs: &[Segment],
    src_mem: &[u8],
    src_base: u64,
    dst_mem: &mut [u8],
    dst_base: u64,
) {
    for s in segs {
        let so = (s.src - src_base) as usize;
        let d = (s.dst - dst_base) as usize;
        let n = s.len as usize;
        dst_mem[d..d + n].copy_from_slice(&src_mem[so..so + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gather_scatter_coalesce() {
        let g = gather(&[(100, 10), (110, 5), (0, 0), (300, 7)], 1000);
        assert_eq!(
            g,
            vec![
                Segment {
                    src: 100,
                    dst: 1000,
                    len: 10
                },
                Segment {
                    src: 110,
                    dst: 1010,
                    len: 5
                },
                Segment {
                    src: 300,
                    dst: 1015,
                    len: 7
                },
            ]
        );
        assert_eq!(
            coalesce(&g),
            vec![
                Segment {
                    src: 100,
                    dst: 1000,
                    len: 15
                },
                Segment {
                    src: 300,
                    dst: 1015,
                    len: 7
                },
            ]
        );
        let s = scatter(50, &[(7, 3), (20, 4)]);
        assert_eq!(
            s[1],
            Segment {
                src: 53,
                dst: 20,
                len: 4
            }
        );
    }

    #[test]
    fn validate_rejects_outside_overflow_and_overlap() {
        let src = (1000, 100);
        let dst = (5000, 100);
        let ok = [Segment {
            src: 1000,
            dst: 5000,
            len: 100,
        }];
        validate(&ok, src, dst).unwrap();
        let below = [Segment {
            src: 999,
            dst: 5000,
            len: 1,
        }];
        assert!(validate(&below, src, dst).is_err());
        let past = [Segment {
            src: 1000,
            dst: 5050,
            len: 51,
        }];
        assert!(validate(&past, src, dst).is_err());
        let wrap = [Segment {
            src: u64::MAX,
            dst: 5000,
            len: 2,
        }];
        assert!(validate(&wrap, src, dst).is_err());
        let overlap = [
            Segment {
                src: 1000,
                dst: 5000,
                len: 10,
            },
            Segment {
                src: 1020,
                dst: 5009,
                len: 1,
            },
        ];
        let e = validate(&overlap, src, dst).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
    }

    proptest! {
        /// Splitting and coalescing never change what a segment list does,
        /// and split pieces respect the chunk size and keep alignment.
        #[test]
        fn split_and_coalesce_preserve_the_copy(
            pieces in prop::collection::vec((0u64..4000, 0u64..700), 0..40),
            chunk in 1u64..300,
        ) {
            let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
            let segs = gather(&pieces, 0);
            let total: u64 = segs.iter().map(|s| s.len).sum();
            let mut want = vec![0u8; total as usize];
            copy_on_host(&segs, &src, 0, &mut want, 0);
            for variant in [split(&segs, chunk), coalesce(&segs), split(&coalesce(&segs), chunk)] {
                let mut got = vec![0u8; total as usize];
                copy_on_host(&variant, &src, 0, &mut got, 0);
                prop_assert_eq!(&got, &want);
            }
            let c = chunk.max(16).next_multiple_of(16);
            for s in split(&segs, chunk) {
                prop_assert!(s.len >= 1 && s.len <= c);
            }
            validate(&segs, (0, 5000), (0, total)).unwrap();
        }
    }
}
