//! Host plumbing for a lab: network namespaces, a cgroup, and processes placed in them. Each
//! removes itself on drop, also when the demo fails or is interrupted.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Runs a command, failing with its stderr.
pub fn run(cmd: &[&str]) -> Result<()> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a command with `input` on stdin.
pub fn run_with_input(cmd: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`{}` failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
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

    pub fn exec_with_input(&self, cmd: &[&str], input: &str) -> Result<()> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run_with_input(&full, input)
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

/// A fresh cgroup v2 directory; its processes are killed and the directory removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Cgroup> {
        let mount = netaudit::capture::cgroup::cgroup2_mount()?;
        let path = mount.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!("could not remove cgroup {}", self.path.display());
    }
}

/// A process started inside a network namespace (and a cgroup), talking line by line over
/// stdin/stdout; killed on drop.
pub struct Actor {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
    name: String,
}

impl Actor {
    pub fn spawn(name: &str, program: &Path, args: &[String], netns: &Netns, cgroup: Option<&Path>) -> Result<Actor> {
        let ns = fs::File::open(netns.path()).with_context(|| format!("opening {}", netns.path().display()))?;
        let procs =
            cgroup.map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_encoded_bytes()).expect("no NUL"));
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let ns_fd = ns.as_raw_fd();
        // SAFETY: only async-signal-safe calls (setns, open, write, close) between fork and exec.
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
        let mut child = cmd.spawn().with_context(|| format!("starting the lab's {name}"))?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let stdin = child.stdin.take();
        Ok(Actor { child, stdout, stdin, name: name.to_string() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line the actor prints; fails if it exits first.
    pub fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            bail!("the lab's {} exited unexpectedly", self.name);
        }
        Ok(s.trim().to_string())
    }

    /// Waits for `want`, failing on anything else.
    pub fn expect(&mut self, want: &str) -> Result<()> {
        let got = self.line()?;
        if got != want {
            bail!("the lab's {}: expected `{want}`, got `{got}`", self.name);
        }
        Ok(())
    }

    /// Closes stdin, collects the remaining lines, and fails if the process failed.
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
            bail!("the lab's {} failed: {status}; output:\n{}", self.name, lines.join("\n"));
        }
        Ok(lines)
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
