//! Helpers: several ranks in one process, each with its own engine, talking
//! over real loopback TCP or shared memory.
#![allow(dead_code)]

use std::time::Duration;

use kvmesh_ep::{EpBuffers, EpConfig, EpGroup};
use kvmesh_gpu::{Engine, EngineConfig, TransportKind};

pub fn engine(transport: TransportKind) -> Engine {
    Engine::new(EngineConfig {
        transport,
        io_threads: 1,
        shm_threads: 1,
        ..Default::default()
    })
    .expect("engine")
}

/// Forms a group of `world` in-process ranks.
pub fn form(world: usize, cfg: &EpConfig, transport: TransportKind) -> Vec<EpGroup> {
    let bufs: Vec<EpBuffers> = (0..world)
        .map(|r| EpBuffers::alloc(&engine(transport), cfg, r, world).expect("buffers"))
        .collect();
    form_from(bufs)
}

pub fn form_from(bufs: Vec<EpBuffers>) -> Vec<EpGroup> {
    let descs: Vec<_> = bufs.iter().map(|b| b.desc()).collect();
    let handles: Vec<_> = bufs
        .into_iter()
        .map(|b| {
            let d = descs.clone();
            std::thread::spawn(move || EpGroup::new(b, &d))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("group"))
        .collect()
}

/// Runs `f` on every rank concurrently; returns the results in rank order.
pub fn on_all<T: Send + 'static>(
    groups: Vec<EpGroup>,
    f: impl Fn(&mut EpGroup) -> T + Send + Sync + 'static,
) -> Vec<(EpGroup, T)> {
    let f = std::sync::Arc::new(f);
    let hs: Vec<_> = groups
        .into_iter()
        .map(|mut g| {
            let f = f.clone();
            std::thread::spawn(move || {
                let r = f(&mut g);
                (g, r)
            })
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

pub fn cfg(experts: usize, hidden: usize, topk: usize, max_tokens: usize) -> EpConfig {
    let mut c = EpConfig::new(experts, hidden, topk, max_tokens);
    c.timeout = Duration::from_secs(10);
    c
}
