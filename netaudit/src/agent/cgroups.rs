//! Where the kubelet puts a pod's cgroup (v2), for both cgroup drivers and every QoS class:
//!
//! | driver   | Guaranteed                                   | Burstable / BestEffort                                                  |
//! |----------|----------------------------------------------|--------------------------------------------------------------------------|
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice`     | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`     |
//! | cgroupfs | `kubepods/pod<uid>`                          | `kubepods/<qos>/pod<uid>`                                                |
//!
//! (`<uid_>`: the UID with `-` → `_`, as systemd unit names need.) Containers are cgroups below
//! the pod's; attaching at the pod level covers every container, restarts included. A kubelet
//! with a custom `--cgroup-root` nests all of it deeper: then the pod is found by name.

use std::{
    fs,
    path::{Path, PathBuf},
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort];

    /// The name in cgroup paths (`burstable`, `besteffort`); none for Guaranteed.
    fn dir(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

impl FromStr for QosClass {
    type Err = crate::error::FieldError;
    /// As `status.qosClass` spells it.
    fn from_str(s: &str) -> Result<QosClass, Self::Err> {
        match s {
            "Guaranteed" => Ok(QosClass::Guaranteed),
            "Burstable" => Ok(QosClass::Burstable),
            "BestEffort" => Ok(QosClass::BestEffort),
            other => Err(crate::error::FieldError::whole(format!(
                "`{other}` is not a QoS class (Guaranteed, Burstable, BestEffort)"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// The pod's cgroup directory relative to the kubelet's cgroup root.
pub fn pod_path(driver: Driver, qos: QosClass, uid: &str) -> PathBuf {
    match driver {
        Driver::Systemd => {
            let unit_uid = uid.replace('-', "_");
            let mut p = PathBuf::from("kubepods.slice");
            match qos.dir() {
                None => p.push(format!("kubepods-pod{unit_uid}.slice")),
                Some(q) => {
                    p.push(format!("kubepods-{q}.slice"));
                    p.push(format!("kubepods-{q}-pod{unit_uid}.slice"));
                }
            }
            p
        }
        Driver::Cgroupfs => {
            let mut p = PathBuf::from("kubepods");
            if let Some(q) = qos.dir() {
                p.push(q);
            }
            p.push(format!("pod{uid}"));
            p
        }
    }
}

/// Finds the pod's cgroup under `root` (normally the cgroup2 mount): first where the kubelet's
/// layouts put it (the QoS class narrows the search when known), then by name up to a few
/// levels deep (a custom `--cgroup-root`). None: the pod has no cgroup on this node (yet).
pub fn find_pod_cgroup(root: &Path, uid: &str, qos: Option<QosClass>) -> Option<PathBuf> {
    let classes: Vec<QosClass> = match qos {
        Some(q) => vec![q],
        None => QosClass::ALL.to_vec(),
    };
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        for q in &classes {
            let p = root.join(pod_path(driver, *q, uid));
            if p.is_dir() {
                return Some(p);
            }
        }
    }
    let names = [format!("pod{uid}"), format!("pod{}.slice", uid.replace('-', "_"))];
    search(root, &names, 6)
}

fn search(dir: &Path, names: &[String], depth: usize) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut subdirs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subdirs.sort();
    for d in &subdirs {
        let name = d.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if names.iter().any(|n| name == n || name.ends_with(&format!("-{n}"))) {
            return Some(d.clone());
        }
    }
    // Only descend into the kubelet's trees (and slices), not the whole machine.
    subdirs
        .iter()
        .filter(|d| d.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("kube") || n.ends_with(".slice")))
        .find_map(|d| search(d, names, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b7e4c2a-1f3d-4e5a-9c8b-7d6e5f4a3b21";

    #[test]
    fn layouts_of_both_drivers() {
        assert_eq!(
            pod_path(Driver::Systemd, QosClass::Burstable, UID),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b7e4c2a_1f3d_4e5a_9c8b_7d6e5f4a3b21.slice"
            )
        );
        assert_eq!(
            pod_path(Driver::Systemd, QosClass::Guaranteed, UID),
            Path::new("kubepods.slice/kubepods-pod0b7e4c2a_1f3d_4e5a_9c8b_7d6e5f4a3b21.slice")
        );
        assert_eq!(
            pod_path(Driver::Cgroupfs, QosClass::BestEffort, UID),
            Path::new(&format!("kubepods/besteffort/pod{UID}"))
        );
        assert_eq!(pod_path(Driver::Cgroupfs, QosClass::Guaranteed, UID), Path::new(&format!("kubepods/pod{UID}")));
        assert_eq!("Burstable".parse::<QosClass>(), Ok(QosClass::Burstable));
        assert!("burstable".parse::<QosClass>().is_err());
    }

    #[test]
    fn finds_pods_in_plain_directory_trees_too() {
        // Layout logic only (plain directories); the real-cgroup test is tests/tests/agent.rs.
        let dir = tempfile::tempdir().unwrap();
        let custom = dir.path().join("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice");
        let pod = custom.join(format!("kubelet-kubepods-besteffort-pod{}.slice", UID.replace('-', "_")));
        fs::create_dir_all(&pod).unwrap();
        assert_eq!(find_pod_cgroup(dir.path(), UID, None), Some(pod));
        assert_eq!(find_pod_cgroup(dir.path(), "other", None), None);
    }
}
