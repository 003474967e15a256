//! The exit-code contract through the real binary: 0 nothing cut, 1 some flow cut (lint: an
//! error-level finding), 2 every error — bad input and failures such as a full output alike. A
//! closed stdout is not an error (quiet, the verdict's code); a broken stderr never panics.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use netaudit_tests::netaudit_bin;

/// Two hand-written flows; with [`VALUES`] the HTTPS one is cut.
const FLOWS: &str = r#"{"version": 1, "flows": [
    {"protocol": "UDP", "src": {"ip": "10.0.0.5"}, "dst": {"ip": "10.0.0.10", "port": 53}},
    {"protocol": "TCP", "src": {"ip": "10.0.0.5"}, "dst": {"ip": "192.0.2.7", "port": 443}}
]}"#;
const VALUES: &str =
    "networkPolicy: {enabled: true, egress: {enabled: true, dns: false, to: [{ports: [{protocol: UDP, port: 53}]}]}}\n";

struct Files {
    dir: tempfile::TempDir,
    flows: PathBuf,
    values: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows.json");
    let values = dir.path().join("values.yaml");
    std::fs::write(&flows, FLOWS).unwrap();
    std::fs::write(&values, VALUES).unwrap();
    Files { dir, flows, values }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The write end of a pipe whose reader is already gone: every write fails with EPIPE.
fn broken_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer.into()
}

fn dev_full() -> Stdio {
    std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap().into()
}

/// Runs netaudit with the given stdout; returns its exit code and stderr.
fn run(args: &[&str], stdout: Stdio) -> (Option<i32>, String) {
    let o = Command::new(netaudit_bin()).args(args).stdout(stdout).stderr(Stdio::piped()).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn a_closed_stdout_keeps_the_verdicts_code_and_says_nothing() {
    let f = files();
    let check = ["check", "--flows", s(&f.flows), "--values", s(&f.values)];
    assert_eq!(run(&check, Stdio::null()).0, Some(1), "the baseline: one flow is cut");
    let (code, stderr) = run(&check, broken_pipe());
    assert_eq!((code, stderr.as_str()), (Some(1), ""));
    let (code, stderr) = run(&["check", "--flows", s(&f.flows)], broken_pipe());
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
    let (code, stderr) = run(&["propose", "--flows", s(&f.flows), "--engine", "cilium"], broken_pipe());
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
    let (code, stderr) = run(&["manifests"], broken_pipe());
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
}

#[test]
fn a_full_stdout_is_an_error() {
    let f = files();
    let (code, stderr) = run(&["check", "--flows", s(&f.flows), "--values", s(&f.values)], dev_full());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("writing to stdout") && stderr.contains("No space left"), "{stderr}");
}

#[test]
fn a_broken_stderr_never_panics() {
    let f = files();
    for (args, want) in [
        (vec!["check", "--flows", "/nonexistent/flows.json"], 2),
        (vec!["check", "--flows", s(&f.flows), "--values", s(&f.values)], 1),
        (vec!["check", "--format", "xml", "--flows", s(&f.flows)], 2),
    ] {
        let o = Command::new(netaudit_bin()).args(&args).stdout(Stdio::null()).stderr(broken_pipe()).status();
        assert_eq!(o.unwrap().code(), Some(want), "{args:?}");
    }
}

#[test]
fn output_problems_name_the_flag_and_exit_2() {
    let f = files();
    let dangling = f.dir.path().join("latest.json");
    std::os::unix::fs::symlink(f.dir.path().join("gone/flows.json"), &dangling).unwrap();
    let (a, b) = (f.dir.path().join("a"), f.dir.path().join("b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let propose =
        |out: &Path| run(&["propose", "--flows", s(&f.flows), "--engine", "kubernetes", "-o", s(out)], Stdio::null());
    for (out, want) in
        [(&dangling, "does not exist"), (&a, "symlink loop"), (&f.dir.path().to_path_buf(), "is a directory")]
    {
        let (code, stderr) = propose(out);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(&format!("--output {}", out.display())) && stderr.contains(want), "{stderr}");
    }
    // A write that fails (a full device) is an error too, and names the file.
    let (code, stderr) = propose(Path::new("/dev/full"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("writing /dev/full"), "{stderr}");
    // The recorder checks its --output before touching the kernel.
    let (code, stderr) = run(&["record", "--cgroup", "/nonexistent", "--output", s(&dangling)], Stdio::null());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--output") && stderr.contains("does not exist"), "{stderr}");
}
