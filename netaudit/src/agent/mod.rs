//! The DaemonSet agent (`netaudit agent`): one per node, it audits the target workloads' pods on
//! its node. [`run`] joins three tasks: [`attach`] (a controller over this node's target pods:
//! attaches and detaches the capture as they come and go; [`cgroups`] finds a pod's cgroup),
//! [`look`] (drains and enriches the flows from the live inventory [`cluster`] keeps in
//! [`stores`], has the [`judge`] judge them and [`drift`] decide what to alert, [`events`] the
//! Events) and [`publish`] ([`http`], [`metrics`], [`reports`]: FlowReport objects).
//! [`manifests`] is its install bundle; [`config`] what it is told.

pub mod attach;
pub mod cgroups;
pub mod cluster;
pub mod config;
pub mod drift;
pub mod events;
pub mod http;
pub mod judge;
pub mod look;
pub mod manifests;
pub mod metrics;
pub mod publish;
pub mod reports;
pub mod run;
pub mod stores;

/// The Linux capabilities the agent needs, as measured on kernel 6.18 (tests/tests/capabilities.rs
/// proves each is needed): BPF, NET_ADMIN and PERFMON to load and attach the cgroup programs;
/// SYS_PTRACE and DAC_READ_SEARCH to read the socket inodes of pod processes that run as other
/// users (the attach-time snapshot that classifies connections already open). Not SYS_ADMIN, and
/// not SYS_RESOURCE: BPF memory is charged to the cgroup on these kernels, no memlock rlimit.
pub const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];
