//! The DaemonSet agent's building blocks (issue 6, in progress): finding the target pods'
//! cgroups on this node. The API watches, live inventory, drift alerts and state persistence
//! come next.

pub mod cgroups;
