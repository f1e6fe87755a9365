//! KV-cache plugin and C ABI.
