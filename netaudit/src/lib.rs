//! netaudit: record the flows a Kubernetes workload really makes (cgroup eBPF) and compare them
//! with the traffic it is supposed to need.
//!
//! Stages of the data path, one module each: [`capture`] (kernel programs → flows) feeds the
//! shared flow [`model`]; the CLI in the binary wires the stages to commands.

pub mod capture;
pub mod model;
