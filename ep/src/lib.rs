//! MoE expert-parallel dispatch/combine on the kvmesh engine.
