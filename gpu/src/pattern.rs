//! Deterministic byte patterns for verifying transfers: the byte at absolute
//! offset `o` under seed `s` depends only on `(s, o)`, so any range can be
//! generated or checked independently (unaligned ranges included).

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of `seed` starting at absolute offset `at`.
pub fn fill(buf: &mut [u8], seed: u64, at: u64) {
    let mut o = at;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ (o >> 3)).to_le_bytes();
        let start = (o & 7) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        o += n as u64;
    }
}

/// Returns the first offset (relative to `buf`) that differs from the
/// pattern, or `None` if every byte matches.
pub fn check(buf: &[u8], seed: u64, at: u64) -> Option<usize> {
    let mut o = at;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ (o >> 3)).to_le_bytes();
        let start = (o & 7) as usize;
        let n = (8 - start).min(buf.len() - i);
        if buf[i..i + n] != word[start..start + n] {
            let k = (0..n).find(|&k| buf[i + k] != word[start + k]).unwrap_or(0);
            return Some(i + k);
        }
        i += n;
        o += n as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_ranges_agree_with_whole() {
        let mut whole = vec![0u8; 100];
        fill(&mut whole, 42, 1000);
        let mut part = vec![0u8; 37];
        fill(&mut part, 42, 1013);
        assert_eq!(&whole[13..50], &part[..]);
        assert_eq!(check(&whole[13..50], 42, 1013), None);
        part[20] ^= 1;
        assert_eq!(check(&part, 42, 1013), Some(20));
        assert_ne!(check(&whole, 43, 1000), None);
    }
}
