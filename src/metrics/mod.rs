//! What the fleet counts and exports: per-vCPU exit counters.

pub mod counters;
pub mod exporter;
