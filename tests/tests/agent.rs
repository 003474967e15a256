//! The agent's node-local targeting on real cgroup trees in the kubelet's layouts (both cgroup
//! drivers, every QoS class): the pod's cgroup is found from its UID, the programs attach there,
//! a process in a container cgroup below it is recorded as the pod, and a restarted container
//! (a new container cgroup, a new process) keeps being recorded without re-attaching.

use std::fs;

use netaudit::{
    agent::cgroups::{Driver, QosClass, find_pod_cgroup, pod_path},
    capture::{Capture, CaptureConfig},
    model::{Direction, Protocol},
};
use netaudit_tests::{KubeletTree, Lab, PEER_V4, helper, require_kernel, start_peer_services};

/// The container cgroup name each runtime would use under the pod.
fn container_dir(driver: Driver, id: &str) -> String {
    match driver {
        Driver::Systemd => format!("cri-containerd-{id}.scope"),
        Driver::Cgroupfs => id.to_string(),
    }
}

#[test]
fn pods_are_found_and_recorded_in_both_kubelet_layouts_across_container_restarts() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        for qos in QosClass::ALL {
            let uid = format!("5f1e2d3c-4b5a-4697-8a9b-{:012x}", std::process::id());
            let tree = KubeletTree::new(&format!("{driver:?}-{qos:?}").to_lowercase());
            // Another pod beside ours, which must not be picked.
            tree.mkdir(&pod_path(driver, qos, "00000000-0000-0000-0000-000000000000"));
            let pod = tree.mkdir(&pod_path(driver, qos, &uid));
            let case = format!("{driver:?}/{qos:?}");
            assert_eq!(find_pod_cgroup(&tree.root, &uid, Some(qos)).as_deref(), Some(pod.as_path()), "{case}");
            assert_eq!(find_pod_cgroup(&tree.root, &uid, None).as_deref(), Some(pod.as_path()), "{case} without QoS");

            let capture = Capture::start(&CaptureConfig::new(vec![pod.clone()])).unwrap();
            // First container: two connections.
            let first = tree.mkdir(&pod.strip_prefix(&tree.root).unwrap().join(container_dir(driver, "aaaa1111")));
            helper(&lab.pod, Some(&first), &["tcp", &format!("{PEER_V4}:80"), "2"]).unwrap().finish().unwrap();
            // The container restarts: its cgroup goes, a new one comes with a new process.
            fs::remove_dir(&first).unwrap();
            let second = tree.mkdir(&pod.strip_prefix(&tree.root).unwrap().join(container_dir(driver, "bbbb2222")));
            helper(&lab.pod, Some(&second), &["tcp", &format!("{PEER_V4}:80"), "3"]).unwrap().finish().unwrap();
            let file = capture.stop().unwrap();

            assert_eq!(file.flows.len(), 1, "{case}: {:#?}", file.flows);
            let f = &file.flows[0];
            assert_eq!(
                (f.direction, f.protocol, f.dst.port),
                (Some(Direction::Egress), Protocol::Tcp, Some(80)),
                "{case}"
            );
            assert_eq!(f.connections, 5, "{case}: both containers' connections count for the pod");
            assert_eq!(f.cgroup.as_deref(), Some(pod.to_str().unwrap()), "{case}: recorded as the pod");
        }
    }
}
