//! The agent's capability set, measured: `netaudit record` of a process owned by another user
//! works with exactly `netaudit::agent::CAPABILITIES` (no CAP_SYS_ADMIN), and dropping any one of
//! them either fails the load/attach or makes the socket snapshot unreadable (and says so).

use std::process::Command;

use netaudit::agent::CAPABILITIES;
use netaudit_tests::{netaudit_bin, require_kernel, test_cgroup};

fn record_with(caps: &[&str], pid: &str, out: &std::path::Path) -> (bool, String) {
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--inh-caps", "-all", "--"])
        .arg(netaudit_bin())
        .args(["record", "--pid", pid, "--duration", "1", "--output"])
        .arg(out)
        .output()
        .expect("setpriv (util-linux)");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_measured_capabilities_are_enough_and_each_is_needed() {
    if !require_kernel() {
        return;
    }
    let cg = test_cgroup().unwrap();
    // A pod process runs as some other user.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 --clear-groups sleep 30",
            cg.path.display()
        ))
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    std::thread::sleep(std::time::Duration::from_millis(300));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flows.json");
    let (ok, stderr) = record_with(&CAPABILITIES, &pid, &out);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("cannot read the sockets"), "{stderr}");
    for drop in CAPABILITIES {
        let fewer: Vec<&str> = CAPABILITIES.iter().copied().filter(|c| *c != drop).collect();
        let (ok, stderr) = record_with(&fewer, &pid, &out);
        assert!(!ok || stderr.contains("cannot read the sockets"), "without CAP_{drop} nothing changed: {stderr}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
