//! The pinned layout, in one place: a persistent capture pins its maps and links under
//! `pin_dir/v<LAYOUT_VERSION>/{maps,links}/` on a bpffs (links named `<cgroup id>-<program>`),
//! and keeps DNS names, the audited cgroups and the window's start in `state_dir/`
//! [`STATE_FILE`]. A new layout version gets a directory of its own, so an upgraded capture
//! never reads maps of another shape.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::links::PinnedLink;
use netaudit_ebpf::{LAYOUT_VERSION, names};

use super::{DnsNames, Persist};
use crate::model::Source;

/// The capture's file in the state directory.
pub const STATE_FILE: &str = "capture-state.json";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// DNS names and the window's start, kept across recorder restarts.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub started: String,
    pub names: DnsNames,
    /// Every cgroup audited so far, so flows of one that went while no recorder ran keep their
    /// name.
    #[serde(default)]
    pub sources: Vec<Source>,
}

/// Where one persistent capture's pins and state live.
#[derive(Clone, Debug)]
pub struct Pins {
    /// `pin_dir/v<LAYOUT_VERSION>`.
    root: PathBuf,
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Pins {
    pub fn new(persist: &Persist) -> Pins {
        let root = persist.pin_dir.join(format!("v{LAYOUT_VERSION}"));
        Pins { root, pin_dir: persist.pin_dir.clone(), state_dir: persist.state_dir.clone() }
    }

    /// Makes the directories (the pin directory must be on a bpffs).
    pub fn create(&self) -> Result<()> {
        check_bpffs(&self.pin_dir)?;
        for d in [self.root.join("maps"), self.root.join("links"), self.state_dir.clone()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link(&self, cgroup_id: u64, program: &str) -> PathBuf {
        self.root.join("links").join(format!("{cgroup_id}-{program}"))
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }

    /// The pinned links by cgroup id, of cgroups `keep` does not keep.
    pub fn links_except(&self, keep: impl Fn(u64) -> bool) -> Result<BTreeMap<u64, Vec<PathBuf>>> {
        let mut out: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
        let dir = self.root.join("links");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
            let name = entry.file_name();
            let id = name.to_str().and_then(|n| n.split('-').next()).and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id.filter(|id| !keep(*id)) {
                out.entry(id).or_default().push(entry.path());
            }
        }
        Ok(out)
    }

    /// The state an earlier capture left, if any.
    pub fn read_state(&self) -> Result<Option<SavedState>> {
        let file = self.state_file();
        let Ok(text) = std::fs::read_to_string(&file) else { return Ok(None) };
        let state = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a netaudit capture state; remove it", file.display()))?;
        Ok(Some(state))
    }

    pub fn write_state(&self, state: &SavedState) -> Result<()> {
        Ok(crate::output::write_atomically(&self.state_file(), &serde_json::to_string(state)?)?)
    }

    /// Removes the pinned maps, the (by then empty) pin directories and the state file; the
    /// links are unpinned first by the caller.
    pub fn remove_maps_and_state(&self) {
        for m in names::MAPS {
            let _ = std::fs::remove_file(self.map(m));
        }
        for d in [self.root.join("maps"), self.root.join("links"), self.root.clone()] {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_file(self.state_file());
    }

    /// Every pinned link, whoever pinned it.
    pub fn all_links(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.root.join("links")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Unpinning a pinned link and dropping it detaches its program.
pub fn unpin_links(paths: &[PathBuf]) -> Result<()> {
    for link in paths {
        let pinned = PinnedLink::from_pin(link).with_context(|| format!("opening {}", link.display()))?;
        drop(pinned.unpin().with_context(|| format!("unpinning {}", link.display()))?);
    }
    Ok(())
}

/// Pins must live on a bpffs; say how to get one rather than failing in the middle of a pin.
pub fn check_bpffs(dir: &Path) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).context("pin directory path")?;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a struct we own for statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        anyhow::bail!("pin directory {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        anyhow::bail!(
            "pin directory {} is not on a bpffs: mount one (`mount -t bpf bpf /sys/fs/bpf`) and pin below it",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_versioned_and_links_are_named_by_cgroup_and_program() {
        let pins =
            Pins::new(&Persist { pin_dir: "/sys/fs/bpf/netaudit".into(), state_dir: "/var/lib/netaudit".into() });
        let v = format!("/sys/fs/bpf/netaudit/v{LAYOUT_VERSION}");
        assert_eq!(pins.map(names::FLOWS), PathBuf::from(format!("{v}/maps/FLOWS")));
        assert_eq!(pins.link(42, names::EGRESS), PathBuf::from(format!("{v}/links/42-netaudit_egress")));
        assert_eq!(pins.state_file(), PathBuf::from("/var/lib/netaudit/capture-state.json"));
    }
}
