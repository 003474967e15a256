//! `netaudit demo` end to end, as root: the lab is built, the stand-in controller is recorded by
//! the real programs, `check` and `propose` run on the recording, the artefacts are written, and
//! nothing (namespace, cgroup) is left behind — also when the demo is interrupted.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use netaudit::model::{Direction, FlowFile, Protocol};
use netaudit_tests::{netaudit_bin, require_kernel};

fn leftovers(pid: u32) -> Vec<String> {
    netaudit_lab::leftovers(&pid.to_string())
}

#[test]
fn the_demo_records_checks_proposes_and_cleans_up() {
    if !require_kernel() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(netaudit_bin())
        .args(["demo", "--window", "2s", "--output-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}\n{stdout}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "the demo left things behind");

    // Real recorded flows: the watch opened before recording is egress, names came from DNS
    // answers, the ingress callers are outside the pod.
    let flows = FlowFile::read(&dir.path().join("flows.json")).unwrap();
    let find = |dst: &str, port: u16| {
        flows
            .flows
            .iter()
            .find(|f| f.dst.ip.to_string() == dst && f.dst.port == Some(port))
            .unwrap_or_else(|| panic!("no flow to {dst}:{port}: {:#?}", flows.flows))
    };
    let watch = find("203.0.113.1", 443);
    assert_eq!((watch.direction, watch.protocol), (Some(Direction::Egress), Protocol::Tcp));
    assert_eq!(find("203.0.113.20", 80).connections, 3);
    assert_eq!(find("198.51.100.20", 443).dst.names, ["s3.example.com"]);
    assert_eq!(find("203.0.113.10", 53).protocol, Protocol::Udp);
    let metrics = find("192.0.2.5", 8080);
    assert_eq!(
        (metrics.direction, metrics.src.ip.to_string(), metrics.internal),
        (Some(Direction::Ingress), "192.0.2.30".into(), false)
    );
    assert!(!flows.losses.any());

    // The report: the flow table, the proposal, and the docs example's cuts with reasons.
    for want in [
        "== Recorded flows (10) ==",
        "row: UNEXPECTED",
        "== Proposed allowlist (kubernetes engine, as chart values) ==",
        "cidr: 192.0.2.2/32",
        "port: 6443",
        "What the chart documentation's example egress block would cut (2 of 10 flows)",
        "no rule there allows TCP/6443 to node cp (192.0.2.2)",
    ] {
        assert!(stdout.contains(want), "`{want}` missing from the demo's output:\n{stdout}");
    }
    for file in [
        "flows.json",
        "inventory.yaml",
        "values.yaml",
        "docs-example-values.yaml",
        "check-docs-example.json",
        "proposal-values.yaml",
        "proposal-manifests.yaml",
        "proposal.json",
        "flows.dot",
        "flows.html",
        "report.txt",
    ] {
        let p = dir.path().join(file);
        assert!(p.metadata().map(|m| m.len() > 0).unwrap_or(false), "{file} missing or empty");
    }
    let html = std::fs::read_to_string(dir.path().join("flows.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("CUT"), "the picture shows the cuts");
    let dot = std::fs::read_to_string(dir.path().join("flows.dot")).unwrap();
    assert!(dot.starts_with("digraph flows {") && dot.contains("apiserver"));
}

#[test]
fn an_interrupted_demo_removes_its_lab() {
    if !require_kernel() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(netaudit_bin())
        .args(["demo", "--window", "30s", "--output-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until it is recording, then Ctrl-C it.
    let mut waited = Duration::ZERO;
    while leftovers(pid).len() < 3 && waited < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    }
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "an interrupted demo left things behind");
}
