//! Test hosts for the real-kernel tests: network namespaces joined by a veth pair, a fresh
//! cgroup v2 directory, and helper processes placed in them. Everything is removed on drop,
//! also when a test fails.
//!
//! Addresses are documentation ranges inside namespaces this harness creates, with no route
//! off the machine: the "pod" is 192.0.2.1 / 2001:db8::1, its peer 192.0.2.2 / 2001:db8::2,
//! and the peer's DNS server 192.0.2.53.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Result, bail};

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

use netaudit_lab::host::run;

pub mod cluster;
pub mod synthetic;

/// Two distinct free loopback ports (both held while choosing, so they cannot be the same).
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// GET `path` from a local HTTP server (the agent's listeners): the body of a 200, else None.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A private bpffs for one test, unmounted on drop.
pub struct Bpffs(pub tempfile::TempDir);

impl Bpffs {
    pub fn mount() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let ok =
            std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status().unwrap().success();
        assert!(ok, "mounting a bpffs on {}", dir.path().display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// A kubelet-like cgroup tree under a fresh directory of the cgroup2 mount; everything in it is
/// killed and the tree removed (deepest first) on drop.
pub struct KubeletTree {
    pub root: PathBuf,
}

impl KubeletTree {
    pub fn new(tag: &str) -> KubeletTree {
        let root =
            netaudit::capture::cgroup::cgroup2_mount().unwrap().join(unique(&format!("netaudit-test-agent-{tag}-")));
        fs::create_dir(&root).unwrap();
        KubeletTree { root }
    }

    pub fn mkdir(&self, rel: &Path) -> PathBuf {
        let mut p = self.root.clone();
        for c in rel.components() {
            p.push(c);
            if !p.exists() {
                fs::create_dir(&p).unwrap();
            }
        }
        p
    }
}

impl Drop for KubeletTree {
    fn drop(&mut self) {
        let _ = fs::write(self.root.join("cgroup.kill"), "1");
        fn remove(dir: &Path) {
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    }
                }
            }
            for _ in 0..100 {
                if fs::remove_dir(dir).is_ok() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        remove(&self.root);
    }
}

pub use netaudit_lab::host::{Actor, Cgroup, Netns};

/// Two hosts on one link: the audited "pod" and its "peer" (servers, clients, DNS).
pub struct Lab {
    pub pod: Netns,
    pub peer: Netns,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        let pod = Netns::new(unique("nap"))?;
        let peer = Netns::new(unique("naq"))?;
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

/// A fresh cgroup v2 directory for one test; its processes are killed and it is removed on drop.
pub fn test_cgroup() -> Result<Cgroup> {
    Cgroup::new(&unique("netaudit-test-"))
}

/// Starts the traffic helper with `args`, inside `netns`, and inside `cgroup` if given.
pub fn helper(netns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Result<Actor> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Actor::spawn("traffic helper", &traffic_bin(), &args, netns, cgroup)
}

/// The standard peer services: TCP echo on port 80, UDP echo on port 7, DNS on port 53 that
/// answers every A query with the peer's address.
pub fn start_peer_services(lab: &Lab) -> Result<Actor> {
    // Bound to its own address: a wildcard UDP server would answer from the primary address.
    let dns = format!("dns:{DNS_V4}:53={PEER_V4}");
    let mut h = helper(&lab.peer, None, &["serve", "tcp:[::]:80", "udp:[::]:7", &dns])?;
    let ready = h.line()?;
    if ready != "ready" {
        bail!("peer services: expected `ready`, got `{ready}`");
    }
    Ok(h)
}

/// Connects from the peer host to `addr` and exchanges `rounds` messages (an inbound
/// connection, from the audited side's point of view). Returns the open stream.
pub fn connect_from_peer(lab: &Lab, addr: &str) -> Result<Actor> {
    helper(&lab.peer, None, &["hold-tcp", addr])
}

/// A loopback TCP relay standing for the network between the agent and the API server, which a
/// test can cut (every open connection reset, new ones closed at once, as a partition the node
/// notices) and heal. The API server behind it is the real one.
pub struct Partition {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Partition {
    pub fn start(target: std::net::SocketAddr) -> Partition {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (c, o) = (Arc::clone(&cut), Arc::clone(&open));
        // Lives as long as the test process; nothing connects once the test is done.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                let mut open = o.lock().unwrap();
                open.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Partition { port, cut, open }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
