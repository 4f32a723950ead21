//! vmm-fleet: a supervisor for a fleet of KVM virtual machines.
//!
//! Data flows one way: [`config`] -> supervisor -> [`vm`] child -> metrics.
//! [`protocol`] is the contract between the supervisor and a VM child process.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod control;
pub mod metrics;
pub mod protocol;
pub mod supervisor;
pub mod vm;
