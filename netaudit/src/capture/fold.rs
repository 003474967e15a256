//! The fold before every read of FLOWS. The data path counts an established connection's
//! packets in its socket's storage; the fold iterators (TCP, UDP) walk the sockets and move each
//! one's pending counts into its flow, so a drain sees exact counts. (A closing socket folds
//! itself in `netaudit_release`.)
//!
//! A socket iterator walks the sockets of the network namespace it was created in, so the fold
//! enters each audited pod's namespace (that of a process in its cgroup) on a short-lived thread
//! of its own: no thread that runs anything else ever changes namespace.

use std::{
    collections::HashSet,
    fs::File,
    io::Read,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};

use super::sys::bpf_fd;

/// Why the fold could not run.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("linking a fold iterator (BPF_LINK_CREATE): {0}")]
    Link(#[source] std::io::Error),
    #[error("entering the network namespace {}: {source}", path.display())]
    Enter { path: PathBuf, source: std::io::Error },
    #[error("starting a fold iterator (BPF_ITER_CREATE): {0}")]
    Start(#[source] std::io::Error),
    #[error("running a fold iterator: {0}")]
    Run(#[source] std::io::Error),
    #[error("the fold thread panicked")]
    Thread,
}

/// The fold iterators, linked.
pub struct Folder {
    links: Vec<OwnedFd>,
}

impl Folder {
    /// Links each loaded iterator program.
    pub fn new<'a>(programs: impl IntoIterator<Item = BorrowedFd<'a>>) -> Result<Folder, FoldError> {
        let links = programs.into_iter().map(link).collect::<Result<_, _>>()?;
        Ok(Folder { links })
    }

    /// Runs every iterator in each network namespace (`/proc/<pid>/ns/net` paths). A namespace
    /// that is gone (its last process exited) is skipped: its sockets were released, and
    /// released sockets fold themselves.
    pub fn run(&self, namespaces: &[PathBuf]) -> Result<(), FoldError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                for path in namespaces {
                    match File::open(path) {
                        Ok(ns) => enter(&ns).map_err(|source| FoldError::Enter { path: path.clone(), source })?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(source) => return Err(FoldError::Enter { path: path.clone(), source }),
                    }
                    for link in &self.links {
                        iterate(link.as_fd())?;
                    }
                }
                Ok(())
            })
            .join()
            .map_err(|_| FoldError::Thread)?
        })
    }
}

/// Whether this process may enter other network namespaces (CAP_SYS_ADMIN), as the fold must:
/// tried on its own namespace, on a thread of its own.
pub fn can_enter_namespaces() -> bool {
    std::thread::spawn(|| File::open("/proc/self/ns/net").is_ok_and(|ns| enter(&ns).is_ok())).join().unwrap_or(false)
}

/// The distinct network namespaces of the processes in `cgroups` and of this process, as paths
/// to enter them by.
pub fn network_namespaces<'a>(cgroups: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let own = PathBuf::from("/proc/self/ns/net");
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let pids = cgroups.into_iter().flat_map(super::cgroup::pids_under);
    for path in std::iter::once(own).chain(pids.map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))) {
        // A process that exited meanwhile has no namespace to visit.
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if seen.insert((meta.dev(), meta.ino())) {
            out.push(path);
        }
    }
    out
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns with a namespace fd this function borrows; it only changes the calling
    // thread (the fold's own).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates an iterator link for a loaded iterator program (aya's `Iter::attach` keeps the link
/// inside the program, where its fd cannot be used to start iterations).
fn link(program: BorrowedFd<'_>) -> Result<OwnedFd, FoldError> {
    // SAFETY: bpf_attr is plain old data; all-zero is its documented "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_create.__bindgen_anon_1.prog_fd = program.as_raw_fd() as u32;
    attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
    bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(FoldError::Link)
}

/// One run of an iterator over the current namespace: reading its (empty) output to the end runs
/// it.
fn iterate(link: BorrowedFd<'_>) -> Result<(), FoldError> {
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.iter_create.link_fd = link.as_raw_fd() as u32;
    let iter = bpf_fd(bpf_cmd::BPF_ITER_CREATE, &mut attr).map_err(FoldError::Start)?;
    let mut sink = Vec::new();
    File::from(iter).read_to_end(&mut sink).map_err(FoldError::Run)?;
    Ok(())
}
