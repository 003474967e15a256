//! The DaemonSet agent's building blocks (issue 6, in progress): finding the target pods'
//! cgroups on this node, the capabilities it needs (measured), its install bundle, and watch
//! mode's drift alerts (deduplicated, rate-limited). The API
//! watches, live inventory, drift alerts and state persistence come next.

pub mod cgroups;
pub mod drift;
pub mod manifests;

/// The Linux capabilities the agent needs, as measured on kernel 6.18 (tests/tests/capabilities.rs
/// proves each is needed): BPF, NET_ADMIN and PERFMON to load and attach the cgroup programs;
/// SYS_PTRACE and DAC_READ_SEARCH to read the socket inodes of pod processes that run as other
/// users (the attach-time snapshot that classifies connections already open). Not SYS_ADMIN, and
/// not SYS_RESOURCE: BPF memory is charged to the cgroup on these kernels, no memlock rlimit.
pub const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];
