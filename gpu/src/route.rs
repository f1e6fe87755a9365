//! Which transport carries an operation: a pure function of what the
//! engine's configuration asks for and what can reach the remote region.
//!
//! The engine works out [`Reach`] (why each transport can or cannot reach
//! the region from here) and [`choose`] decides; nothing here does I/O, so
//! every combination is unit-tested.
//!
//! `Auto` takes the fastest transport that reaches the region:
//!
//! ```text
//!  cuda-ipc (same machine, GPU region)  >  shm (same host, shareable host
//!  region)  >  rdma (both engines run RDMA, region has rkeys)  >  tcp
//! ```
//!
//! An explicit transport other than `tcp` only ever uses itself and refuses
//! what it cannot reach, naming the reason.

use crate::engine::TransportKind;

/// The transport chosen for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Carrier {
    Tcp,
    Shm,
    CudaIpc,
    Rdma,
}

/// Whether each transport reaches the remote region, with the reason when
/// it does not. `tcp` reaches everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reach {
    pub(crate) cuda_ipc: Result<(), &'static str>,
    pub(crate) shm: Result<(), &'static str>,
    pub(crate) rdma: Result<(), &'static str>,
}

/// A refusal: the transport asked for and why it cannot reach the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) transport: &'static str,
    pub(crate) why: &'static str,
}

/// Picks the transport for one operation.
pub(crate) fn choose(kind: TransportKind, reach: &Reach) -> Result<Carrier, Refusal> {
    let only = |r: Result<(), &'static str>, c: Carrier, transport: &'static str| {
        r.map(|()| c).map_err(|why| Refusal { transport, why })
    };
    match kind {
        TransportKind::Tcp => Ok(Carrier::Tcp),
        TransportKind::Auto => Ok(if reach.cuda_ipc.is_ok() {
            Carrier::CudaIpc
        } else if reach.shm.is_ok() {
            Carrier::Shm
        } else if reach.rdma.is_ok() {
            Carrier::Rdma
        } else {
            Carrier::Tcp
        }),
        TransportKind::CudaIpc => only(reach.cuda_ipc, Carrier::CudaIpc, "cuda-ipc"),
        TransportKind::Shm => only(reach.shm, Carrier::Shm, "shm"),
        TransportKind::Rdma => only(reach.rdma, Carrier::Rdma, "rdma"),
    }
}

/// Why `rdma` can or cannot reach a region, from what both sides offer:
/// this engine runs RDMA, the peer published NICs, the peer registered the
/// region (rkeys, one per peer NIC), and the local region is registered.
pub(crate) fn rdma_reach(
    local_up: bool,
    peer_has_nics: Option<usize>,
    remote_rkeys: Option<usize>,
    local_registered: bool,
) -> Result<(), &'static str> {
    if !local_up {
        return Err(if cfg!(feature = "rdma") {
            "this engine runs without RDMA (no usable NIC, or disabled)"
        } else {
            "built without the rdma feature"
        });
    }
    let Some(nics) = peer_has_nics else {
        return Err("peer runs without RDMA");
    };
    match remote_rkeys {
        None => Err("region descriptor carries no rkeys"),
        Some(n) if n != nics || n == 0 => Err("region rkeys do not match the peer's NICs"),
        Some(_) if !local_registered => Err("local region is not registered with the NICs"),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO: Result<(), &str> = Err("no");

    fn reach(ipc: bool, shm: bool, rdma: bool) -> Reach {
        let r = |b: bool| if b { Ok(()) } else { NO };
        Reach {
            cuda_ipc: r(ipc),
            shm: r(shm),
            rdma: r(rdma),
        }
    }

    #[test]
    fn auto_prefers_cuda_ipc_then_shm_then_rdma_then_tcp() {
        for ipc in [false, true] {
            for shm in [false, true] {
                for rdma in [false, true] {
                    let want = if ipc {
                        Carrier::CudaIpc
                    } else if shm {
                        Carrier::Shm
                    } else if rdma {
                        Carrier::Rdma
                    } else {
                        Carrier::Tcp
                    };
                    let got = choose(TransportKind::Auto, &reach(ipc, shm, rdma));
                    assert_eq!(got, Ok(want), "ipc {ipc} shm {shm} rdma {rdma}");
                    // tcp is always tcp, whatever else reaches.
                    assert_eq!(
                        choose(TransportKind::Tcp, &reach(ipc, shm, rdma)),
                        Ok(Carrier::Tcp)
                    );
                }
            }
        }
    }

    #[test]
    fn explicit_transports_use_only_themselves_and_say_why_not() {
        let all = reach(true, true, true);
        assert_eq!(choose(TransportKind::Rdma, &all), Ok(Carrier::Rdma));
        assert_eq!(choose(TransportKind::Shm, &all), Ok(Carrier::Shm));
        assert_eq!(choose(TransportKind::CudaIpc, &all), Ok(Carrier::CudaIpc));
        let none = Reach {
            cuda_ipc: Err("ipc why"),
            shm: Err("shm why"),
            rdma: Err("rdma why"),
        };
        for (k, t, why) in [
            (TransportKind::Rdma, "rdma", "rdma why"),
            (TransportKind::Shm, "shm", "shm why"),
            (TransportKind::CudaIpc, "cuda-ipc", "ipc why"),
        ] {
            assert_eq!(choose(k, &none), Err(Refusal { transport: t, why }));
        }
        // Explicit rdma does not fall back to a faster transport either.
        assert!(choose(TransportKind::Rdma, &reach(true, true, false)).is_err());
    }

    #[test]
    fn rdma_needs_both_sides_and_matching_keys() {
        assert!(rdma_reach(false, Some(1), Some(1), true).is_err());
        assert_eq!(
            rdma_reach(true, None, Some(1), true),
            Err("peer runs without RDMA")
        );
        assert_eq!(
            rdma_reach(true, Some(2), None, true),
            Err("region descriptor carries no rkeys")
        );
        assert!(rdma_reach(true, Some(2), Some(1), true).is_err());
        assert!(rdma_reach(true, Some(0), Some(0), true).is_err());
        assert!(rdma_reach(true, Some(2), Some(2), false).is_err());
        assert_eq!(rdma_reach(true, Some(2), Some(2), true), Ok(()));
    }

    #[test]
    fn without_the_feature_the_reason_says_so() {
        let why = rdma_reach(false, None, None, false).unwrap_err();
        if cfg!(feature = "rdma") {
            assert!(why.contains("without RDMA"), "{why}");
        } else {
            assert!(why.contains("built without the rdma feature"), "{why}");
        }
    }
}
