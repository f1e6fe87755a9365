//! libp2p peer store for KV pages (no master).
