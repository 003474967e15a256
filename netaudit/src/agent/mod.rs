//! The DaemonSet agent's building blocks (issue 6, in progress): finding the target pods'
//! cgroups on this node, the capabilities it needs (measured), its install bundle, and watch
//! mode's drift alerts (deduplicated, rate-limited). Attaching to and detaching from pods at run
//! time and surviving SIGKILL live in `capture` (`add_cgroup`, `remove_cgroup`, `Persist`). The
//! `netaudit agent` command (kube-rs watches, live inventory, Events, metrics, FlowReports) is
//! next.

pub mod cgroups;
pub mod drift;
pub mod manifests;

/// The Linux capabilities the agent needs, as measured on kernel 6.18 (tests/tests/capabilities.rs
/// proves each is needed): BPF, NET_ADMIN and PERFMON to load and attach the cgroup programs;
/// SYS_PTRACE and DAC_READ_SEARCH to read the socket inodes of pod processes that run as other
/// users (the attach-time snapshot that classifies connections already open). Not SYS_ADMIN, and
/// not SYS_RESOURCE: BPF memory is charged to the cgroup on these kernels, no memlock rlimit.
pub const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];
