//! Test hosts for the real-kernel tests: network namespaces joined by a veth pair, a fresh
//! cgroup v2 directory, and helper processes placed in them. Everything is removed on drop,
//! also when a test fails.
//!
//! Addresses are documentation ranges inside namespaces this harness creates, with no route
//! off the machine: the "pod" is 192.0.2.1 / 2001:db8::1, its peer 192.0.2.2 / 2001:db8::2,
//! and the peer's DNS server 192.0.2.53.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub const POD_V4: &str = "192.0.2.1";
pub const PEER_V4: &str = "192.0.2.2";
pub const DNS_V4: &str = "192.0.2.53";
pub const POD_V6: &str = "2001:db8::1";
pub const PEER_V6: &str = "2001:db8::2";

/// The traffic helper binary (tests/src/bin/traffic.rs).
pub fn traffic_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Integration tests live in target/<profile>/deps; binaries one level up.
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    dir.join("netaudit-traffic")
}

/// The `netaudit` binary `cargo xtask test` builds beside the test binaries.
pub fn netaudit_bin() -> PathBuf {
    let bin = traffic_bin().with_file_name("netaudit");
    assert!(bin.is_file(), "{} is missing: run the tests through `cargo xtask test`, which builds it", bin.display());
    bin
}

/// The fixtures folder (tests/fixtures).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Whether the real-kernel tests can run. Without root they skip loudly; under CI a skip is a
/// failure, so a misconfigured runner cannot pass by skipping.
pub fn require_kernel() -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = if !root {
        Some("not root".to_string())
    } else {
        netaudit::capture::cgroup::cgroup2_mount().err().map(|e| e.to_string())
    };
    match reason {
        None => true,
        Some(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("real-kernel test cannot run under CI=true: {why}");
            }
            eprintln!("\n*** SKIPPING real-kernel test: {why}. Run as root (cargo xtask test) ***\n");
            false
        }
    }
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn run(cmd: &[&str]) -> Result<()> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique(prefix);
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, cmd: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Two hosts on one link: the audited "pod" and its "peer" (servers, clients, DNS).
pub struct Lab {
    pub pod: Netns,
    pub peer: Netns,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        let pod = Netns::new("nap")?;
        let peer = Netns::new("naq")?;
        let (a, b) = (unique("va"), unique("vb"));
        run(&["ip", "link", "add", &a, "netns", &pod.name, "type", "veth", "peer", "name", &b, "netns", &peer.name])?;
        pod.exec(&["ip", "addr", "add", &format!("{POD_V4}/24"), "dev", &a])?;
        pod.exec(&["ip", "addr", "add", &format!("{POD_V6}/64"), "dev", &a, "nodad"])?;
        pod.exec(&["ip", "link", "set", &a, "up"])?;
        peer.exec(&["ip", "addr", "add", &format!("{PEER_V4}/24"), "dev", &b])?;
        peer.exec(&["ip", "addr", "add", &format!("{DNS_V4}/24"), "dev", &b])?;
        peer.exec(&["ip", "addr", "add", &format!("{PEER_V6}/64"), "dev", &b, "nodad"])?;
        peer.exec(&["ip", "link", "set", &b, "up"])?;
        Ok(Lab { pod, peer })
    }
}

/// A fresh cgroup v2 directory; its processes are killed and the directory removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Result<TestCgroup> {
        let mount = netaudit::capture::cgroup::cgroup2_mount()?;
        let path = mount.join(unique("netaudit-test-"));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TestCgroup { path })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// A helper process, killed on drop.
pub struct Helper {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
}

impl Helper {
    /// Starts the traffic helper with `args`, inside `netns`, and inside `cgroup` if given.
    pub fn spawn(netns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Result<Helper> {
        let ns = fs::File::open(netns.path()).with_context(|| format!("opening {}", netns.path().display()))?;
        let procs = cgroup.map(|c| CString::new(c.join("cgroup.procs").to_str().unwrap()).unwrap());
        let mut cmd = Command::new(traffic_bin());
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let ns_fd = ns.as_raw_fd();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(fd);
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {}", traffic_bin().display()))?;
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        drop(ns);
        Ok(Helper { child, stdout, stdin })
    }

    /// Waits for the next line the helper prints (e.g. "ready").
    pub fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            bail!("helper exited before printing a line");
        }
        Ok(s.trim().to_string())
    }

    /// Sends a line to the helper (the "go on" of `wait`).
    pub fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "go")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the helper to exit and fails if it failed.
    pub fn finish(mut self) -> Result<Vec<String>> {
        drop(self.stdin.take());
        let mut lines = Vec::new();
        let mut s = String::new();
        while self.stdout.read_line(&mut s)? > 0 {
            lines.push(s.trim().to_string());
            s.clear();
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("helper failed: {status}; output: {lines:?}");
        }
        Ok(lines)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The standard peer services: TCP echo on port 80, UDP echo on port 7, DNS on port 53 that
/// answers every A query with the peer's address.
pub fn start_peer_services(lab: &Lab) -> Result<Helper> {
    // Bound to its own address: a wildcard UDP server would answer from the primary address.
    let dns = format!("dns:{DNS_V4}:53={PEER_V4}");
    let mut h = Helper::spawn(&lab.peer, None, &["serve", "tcp:[::]:80", "udp:[::]:7", &dns])?;
    let ready = h.line()?;
    if ready != "ready" {
        bail!("peer services: expected `ready`, got `{ready}`");
    }
    Ok(h)
}

/// Connects from the peer host to `addr` and exchanges `rounds` messages (an inbound
/// connection, from the audited side's point of view). Returns the open stream.
pub fn connect_from_peer(lab: &Lab, addr: &str) -> Result<Helper> {
    Helper::spawn(&lab.peer, None, &["hold-tcp", addr])
}
