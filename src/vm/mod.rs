//! One KVM virtual machine: memory, vCPUs, devices, boot, and the run loop.

pub mod builtin;
pub mod mptable;
