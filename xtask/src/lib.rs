//! The build plumbing's library half: what the `xtask` binary and the tests share. Today that is
//! the local Kubernetes control plane ([`controlplane`]): `cargo xtask cluster up` keeps one
//! running, and each agent test starts a private one through the same code.

pub mod controlplane;
