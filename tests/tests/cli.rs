//! The `netaudit record` command line: real recordings by PID, and bad input.

use std::process::Command;

use netaudit::model::{Direction, FlowFile, Protocol};
use netaudit_tests::*;

#[test]
fn record_by_pid_writes_the_flow_file_atomically() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let mut client = helper(&lab.pod, Some(&cg.path), &["wait", "tcp", "192.0.2.2:80", "2", "wait"]).unwrap();
    assert_eq!(client.line().unwrap(), "waiting");
    let pid = std::fs::read_to_string(cg.path.join("cgroup.procs")).unwrap().trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flows.json");
    let mut rec = Command::new(netaudit_bin())
        .args(["record", "--pid", &pid, "--duration", "2s", "--output"])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Make the traffic once the recorder says it is attached.
    let mut stderr = std::io::BufReader::new(rec.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("netaudit: recording cgroup"), "{line}");
    client.send("go").unwrap();
    assert_eq!(client.line().unwrap(), "waiting");
    let status = rec.wait().unwrap();
    drop(stderr);
    client.send("go").unwrap();
    client.finish().unwrap();
    assert!(status.success());
    let file = FlowFile::read(&out).unwrap();
    assert_eq!(file.flows.len(), 1, "{:#?}", file.flows);
    let f = &file.flows[0];
    assert_eq!(
        (f.direction, f.protocol, f.src.ip.to_string(), f.dst.ip.to_string(), f.dst.port, f.connections),
        (Some(Direction::Egress), Protocol::Tcp, POD_V4.into(), PEER_V4.into(), Some(80), 2)
    );
    assert_eq!(file.sources.len(), 1);
    assert!(file.window.is_some());
    // Only the flow file is left: the temporary file was renamed into place.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn bad_input_exits_2_naming_the_problem_and_keeps_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flows.json");
    std::fs::write(&out, "previous recording").unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(netaudit_bin()).args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let outs = out.to_str().unwrap();
    let (code, stdout, stderr) = run(&["record", "--cgroup", "/nonexistent/cgroup", "--output", outs]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.contains("/nonexistent/cgroup") && stderr.contains("no such directory"), "{stderr}");

    let (code, _, stderr) = run(&["record", "--cgroup", "/tmp", "--duration", "1"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a cgroup v2 directory"), "{stderr}");

    let (code, _, stderr) = run(&["record", "--pid", "1", "--duration", "5x"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("5x"), "{stderr}");

    let (code, _, stderr) = run(&["record", "--pid", "4000000000"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--pid 4000000000"), "{stderr}");

    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous recording");
}

#[test]
fn a_killed_recorder_loses_nothing_and_the_next_one_resumes() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let bpffs = Bpffs::mount();
    let state = tempfile::tempdir().unwrap();
    let out = state.path().join("flows.json");
    let recorder = |duration: &str| {
        let mut c = Command::new(netaudit_bin())
            .args(["record", "--cgroup"])
            .arg(&cg.path)
            .args(["--duration", duration, "--pin-dir"])
            .arg(bpffs.0.path())
            .arg("--state-dir")
            .arg(state.path())
            .arg("--output")
            .arg(&out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(c.stderr.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(line.starts_with("netaudit: recording cgroup"), "{line}");
        (c, stderr)
    };
    let traffic = |n: &str| {
        let udp = format!("{PEER_V4}:7");
        let h = helper(
            &lab.pod,
            Some(&cg.path),
            &["dns", "192.0.2.53:53", "api.lab.test", "tcp", "@resolved:80", n, "udp", &udp, n],
        );
        h.unwrap().finish().unwrap();
    };

    // Recorder one sees 2 connections and a DNS answer, then is killed (no clean stop).
    let (mut first, _e1) = recorder("60s");
    traffic("2");
    std::thread::sleep(std::time::Duration::from_millis(300));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!out.exists(), "a killed recorder wrote nothing");
    // While no recorder runs, the pinned programs keep counting.
    traffic("3");
    // Recorder two resumes, sees 1 more connection, and finishes cleanly.
    let (second, _e2) = recorder("2s");
    traffic("1");
    let status = second.wait_with_output().unwrap().status;
    assert!(status.success());

    let file = FlowFile::read(&out).unwrap();
    let api = file
        .flows
        .iter()
        .find(|f| f.dst.ip.to_string() == PEER_V4 && f.dst.port == Some(80))
        .unwrap_or_else(|| panic!("{:#?}", file.flows));
    assert_eq!(api.connections, 6, "every connection, before, during and after the kill, once: {:#?}", file.flows);
    assert_eq!(api.dst.names, ["api.lab.test"], "names learned before the kill survive");
    // Exactly one program per hook counted each datagram: none lost, none doubled.
    let echo = file.flows.iter().find(|f| f.dst.port == Some(7)).unwrap();
    assert_eq!((echo.packets_from_src, echo.packets_from_dst), (6, 6), "{echo:#?}");
    let dns = file.flows.iter().find(|f| f.dst.port == Some(53)).unwrap();
    assert_eq!(dns.connections, 0);
    assert!(dns.packets_from_src >= 3, "three lookups: {dns:#?}");
    // A clean stop leaves no pin and no state behind.
    // (A fresh bpffs holds the kernel's own progs.debug and maps.debug; ours go in v<layout>.)
    let pins = bpffs.0.path().join(format!("v{}", netaudit_ebpf::LAYOUT_VERSION));
    assert!(!pins.exists(), "pins left behind in {}", pins.display());
    assert!(!state.path().join("capture-state.json").exists());
}
