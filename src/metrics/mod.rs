//! What the fleet counts and exports: per-vCPU exit counters, and the bounded `/metrics`
//! endpoint.

pub mod counters;
pub mod exporter;
pub mod http;
