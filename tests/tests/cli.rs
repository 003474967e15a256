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
