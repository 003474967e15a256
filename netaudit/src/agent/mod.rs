//! The DaemonSet agent (`netaudit agent`): one per node, it audits the target workloads' pods on
//! its node. [`cluster`] watches the API (target pods on this node, the live inventory and
//! policies); [`cgroups`] finds a pod's cgroup; [`run`] attaches and detaches the capture as pods
//! come and go, enriches and judges the flows ([`drift`]), and publishes them: [`http`],
//! [`metrics`], Events, and [`reports`] (FlowReport objects). [`manifests`] is its install
//! bundle; [`config`] what it is told.

pub mod cgroups;
pub mod cluster;
pub mod config;
pub mod drift;
pub mod events;
pub mod http;
pub mod judge;
pub mod manifests;
pub mod metrics;
pub mod reports;
pub mod run;
pub mod stores;

/// The Linux capabilities the agent needs, as measured on kernel 6.18 (tests/tests/capabilities.rs
/// proves each is needed): BPF, NET_ADMIN and PERFMON to load and attach the cgroup programs;
/// SYS_PTRACE and DAC_READ_SEARCH to read the socket inodes of pod processes that run as other
/// users (the attach-time snapshot that classifies connections already open). Not SYS_ADMIN, and
/// not SYS_RESOURCE: BPF memory is charged to the cgroup on these kernels, no memlock rlimit.
pub const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];
