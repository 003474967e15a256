//! cgroup v2 plumbing: where the hierarchy is mounted, which cgroup a process is in, a cgroup's
//! id, and the processes under it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// The cgroup v2 mount point, read from /proc/mounts (hybrid layouts mount it in a sub-folder).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
        })
        .context("no cgroup2 file system in /proc/mounts: netaudit needs cgroup v2 (mount it, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)")
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The cgroup v2 directory of a process (its `0::` line in /proc/<pid>/cgroup).
pub fn cgroup_of_pid(pid: u32) -> Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {file}: is {pid} a running process?"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("{file} has no cgroup v2 (`0::`) line"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// The kernel's cgroup id: the inode number of the cgroup directory.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir).with_context(|| format!("reading cgroup {}", dir.display()))?.ino())
}

/// Checks that `dir` is a cgroup v2 directory below the root, and returns it canonicalized.
pub fn validate(dir: &Path, mount: &Path) -> Result<PathBuf> {
    let canon = fs::canonicalize(dir).with_context(|| {
        format!("cgroup {}: no such directory (cgroup v2 is mounted at {})", dir.display(), mount.display())
    })?;
    let mount = fs::canonicalize(mount)?;
    if !canon.starts_with(&mount) || !canon.join("cgroup.procs").is_file() {
        bail!(
            "{} is not a cgroup v2 directory (cgroup v2 is mounted at {}; pass a directory below it, or --pid)",
            dir.display(),
            mount.display()
        );
    }
    if canon == mount {
        bail!("refusing to audit the root cgroup {}: pass the workload's own cgroup", canon.display());
    }
    Ok(canon)
}

/// Rejects audited cgroups nested in one another: both attachments would see the inner one's
/// packets and count them twice.
pub fn reject_nesting(dirs: &[PathBuf]) -> Result<()> {
    for a in dirs {
        for b in dirs {
            if a != b && a.starts_with(b) {
                bail!("cgroup {} lies inside cgroup {}: audit only the outer one", a.display(), b.display());
            }
        }
    }
    Ok(())
}

/// Every process in `dir` and its descendants.
pub fn pids_under(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    pids
}
