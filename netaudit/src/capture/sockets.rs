//! The socket snapshot taken at attach time: which ports the audited processes serve on.
//!
//! Connections that were open before recording started show no SYN. A packet on one of them is
//! classified in the kernel by its local port: a port the cgroup listens on means the peer
//! opened the connection. This snapshot seeds that table with the listeners that already exist.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
};

use netaudit_ebpf::{IPPROTO_TCP, IPPROTO_UDP};

const TCP_LISTEN: u8 = 0x0a;
const UDP_UNCONNECTED: u8 = 0x07;

/// The kernel's ephemeral port range (net.ipv4.ip_local_port_range).
pub fn ephemeral_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|p| p.parse().ok());
            Some((it.next()?, it.next()?))
        })
        .unwrap_or((32768, 60999))
}

/// What the socket snapshot found.
#[derive(Debug, Default)]
pub struct Serving {
    /// (protocol, port) pairs the processes serve on.
    pub ports: BTreeSet<(u8, u16)>,
    /// Processes whose sockets could not be read (another user's process without
    /// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH): their open connections may get the wrong
    /// initiator.
    pub unreadable: Vec<u32>,
}

/// (protocol, port) pairs the given processes serve on: TCP listeners, and UDP sockets bound to
/// a port outside the ephemeral range with no fixed peer.
pub fn serving_ports(pids: &[u32], ephemeral: (u16, u16)) -> Serving {
    let mut unreadable = Vec::new();
    // Socket inodes owned by the processes, grouped by network namespace.
    let mut by_netns: HashMap<u64, (u32, HashSet<u64>)> = HashMap::new();
    for &pid in pids {
        // A process gone in the meantime is fine; a live one we cannot look into is not.
        let mut cannot_look = |pid: u32| {
            if fs::metadata(format!("/proc/{pid}")).is_ok() {
                unreadable.push(pid);
            }
        };
        let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            cannot_look(pid);
            continue;
        };
        let entry = by_netns.entry(ns.ino()).or_insert_with(|| (pid, HashSet::new()));
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            cannot_look(pid);
            continue;
        };
        let mut denied = false;
        for fd in fds.flatten() {
            let target = fs::read_link(fd.path());
            if matches!(&target, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied) {
                denied = true;
            }
            if let Ok(target) = target {
                let t = target.to_string_lossy();
                if let Some(Ok(inode)) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).map(str::parse) {
                    entry.1.insert(inode);
                }
            }
        }
        if denied {
            unreadable.push(pid);
        }
    }
    let mut ports = BTreeSet::new();
    for (pid, inodes) in by_netns.values() {
        for (file, protocol) in
            [("tcp", IPPROTO_TCP), ("tcp6", IPPROTO_TCP), ("udp", IPPROTO_UDP), ("udp6", IPPROTO_UDP)]
        {
            let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else { continue };
            for socket in table.lines().skip(1).filter_map(parse_line) {
                if !inodes.contains(&socket.inode) {
                    continue;
                }
                let serving = match protocol {
                    IPPROTO_TCP => socket.state == TCP_LISTEN,
                    _ => {
                        socket.state == UDP_UNCONNECTED
                            && socket.remote_port == 0
                            && socket.local_port != 0
                            && !(ephemeral.0..=ephemeral.1).contains(&socket.local_port)
                    }
                };
                if serving {
                    ports.insert((protocol, socket.local_port));
                }
            }
        }
    }
    Serving { ports, unreadable }
}

struct SocketLine {
    local_port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
}

/// One line of /proc/net/{tcp,udp}{,6}: `sl local_address rem_address st ... uid timeout inode`.
fn parse_line(line: &str) -> Option<SocketLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    Some(SocketLine {
        local_port: port(f.get(1)?)?,
        remote_port: port(f.get(2)?)?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_lines() {
        let l = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        let s = parse_line(l).unwrap();
        assert_eq!((s.local_port, s.remote_port, s.state, s.inode), (8080, 0, 0x0a, 12345));
    }
}
