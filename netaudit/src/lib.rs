//! netaudit: record the flows a Kubernetes workload really makes (cgroup eBPF) and compare them
//! with the traffic it is supposed to need.
//!
//! Stages of the data path, one module each: [`capture`] (kernel programs → flows) feeds the
//! shared flow [`model`]; [`inventory`] knows the cluster (who owns an address, which Service
//! fronts which backends); [`policy`] reads four policy engines and judges connections;
//! [`chart`] renders the audited chart's policies from its values; [`matrix`] says which traffic
//! the workload needs; [`check`] puts them together per flow. The CLI (`cli/`, the `netaudit`
//! binary) wires the stages to commands; [`input`] reads what users hand it, with [`error`]s that name the place.

pub mod agent;
pub mod capture;
pub mod chart;
pub mod check;
pub mod error;
pub mod graph;
pub mod input;
pub mod inventory;
pub mod k8s;
pub mod load;
pub mod matrix;
pub mod model;
pub mod output;
pub mod policy;
pub mod propose;
pub mod resolve;
