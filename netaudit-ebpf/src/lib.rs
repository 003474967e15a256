//! Types shared between netaudit's kernel programs and userspace.
//!
//! Every type here is `#[repr(C)]` with explicit padding, because the kernel and userspace read
//! the same bytes. Change a layout and bump [`LAYOUT_VERSION`] (pinned maps are keyed on it).
#![no_std]

/// Bumped whenever a map key or value layout changes.
pub const LAYOUT_VERSION: u32 = 4;

/// Who opened the connection, seen from the audited cgroup ([`FlowKey::initiator`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initiator {
    Local = 0,
    Remote = 1,
}

impl TryFrom<u8> for Initiator {
    type Error = u8;
    fn try_from(v: u8) -> Result<Initiator, u8> {
        match v {
            0 => Ok(Initiator::Local),
            1 => Ok(Initiator::Remote),
            other => Err(other),
        }
    }
}

/// A flow's address family: its IP version ([`FlowKey::family`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

impl TryFrom<u8> for Family {
    type Error = u8;
    fn try_from(v: u8) -> Result<Family, u8> {
        match v {
            4 => Ok(Family::V4),
            6 => Ok(Family::V6),
            other => Err(other),
        }
    }
}

/// The names userspace finds the object's maps and programs by: the kernel's statics and
/// functions carry exactly these (a test in `netaudit` reads them back from the object).
pub mod names {
    pub const AUDITED: &str = "AUDITED";
    pub const FLOWS: &str = "FLOWS";
    pub const LISTEN: &str = "LISTEN";
    pub const LOSSES: &str = "LOSSES";
    pub const DNS: &str = "DNS";
    pub const SOCKS: &str = "SOCKS";
    /// Every map a persistent capture pins (what the data path records).
    pub const MAPS: [&str; 6] = [AUDITED, FLOWS, LISTEN, LOSSES, DNS, SOCKS];
    /// The drain's own maps, never pinned (each process drains for itself): its epoch and
    /// overflow flag ([`super::drain`] slots), and the ring the changed flows' keys come out on.
    pub const DRAIN: &str = "DRAIN";
    pub const CHANGED_FLOWS: &str = "CHANGED_FLOWS";
    pub const DRAIN_MAPS: [&str; 2] = [DRAIN, CHANGED_FLOWS];
    /// cgroup_skb, per direction.
    pub const EGRESS: &str = "netaudit_egress";
    pub const INGRESS: &str = "netaudit_ingress";
    /// cgroup_sock_addr bind (before the bind), per family: learns UDP server ports.
    pub const BIND4: &str = "netaudit_bind4";
    pub const BIND6: &str = "netaudit_bind6";
    /// cgroup_sock sock_release: folds a closing socket's counts into FLOWS.
    pub const RELEASE: &str = "netaudit_release";
    /// The socket iterators userspace runs before it reads FLOWS, in each audited network
    /// namespace: they fold every live socket's pending counts. (A bpf_sk_storage_map iterator
    /// would need no namespaces, but map iterators are refused here: EPERM at load.)
    pub const FOLD_TCP: &str = "netaudit_fold_tcp";
    pub const FOLD_UDP: &str = "netaudit_fold_udp";
    /// Each fold iterator with the kernel's name of what it iterates.
    pub const FOLDS: [(&str, &str); 2] = [(FOLD_TCP, "tcp"), (FOLD_UDP, "udp")];
    /// The read-only global (a `u8`, set at load) that turns per-socket counting on: only a
    /// capture that can enter the audited pods' network namespaces to fold (CAP_SYS_ADMIN) sets
    /// it; otherwise a connection's packets update FLOWS directly, exact without folds.
    pub const PER_SOCKET_COUNTS: &str = "PER_SOCKET_COUNTS";
    /// The benchmarks' empty cgroup_skb programs (egress, ingress), in an object of its own
    /// (`netaudit-floor`) that a capture never loads.
    pub const FLOOR: [&str; 2] = ["netaudit_floor_egress", "netaudit_floor_ingress"];
    /// In the same object, the rungs between the floor and the fast path, each one step more
    /// (each attached at both hooks): full socket, + socket storage, + clock, + atomic adds.
    pub const RUNGS: [&str; 4] =
        ["netaudit_rung_fullsock", "netaudit_rung_storage", "netaudit_rung_clock", "netaudit_rung_adds"];
}

/// The maps' default capacities.
pub mod capacity {
    /// Flows (a capture sets its own at load).
    pub const FLOWS: u32 = 65536;
    /// Audited cgroups.
    pub const AUDITED: u32 = 1024;
    /// Serving ports.
    pub const LISTEN: u32 = 8192;
    /// The DNS answers' ring buffer, bytes.
    pub const DNS_RING_BYTES: u32 = 256 * 1024;
    /// The changed flows' ring buffer, bytes (a capture sizes it to its flow map at load).
    pub const CHANGED_RING_BYTES: u32 = 1024 * 1024;
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// The DNS port (UDP and TCP): answers from it are captured; policies and the matrix use it too.
pub const DNS_PORT: u16 = 53;

/// One connection-level flow: (audited cgroup, initiator, protocol, local address, peer address,
/// service port). The ephemeral port is deliberately not part of the key, so repeated connections
/// to one service aggregate into one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// cgroup v2 id (directory inode) of the audited cgroup the socket lives under.
    pub cgroup_id: u64,
    /// Address inside the audited cgroup; IPv4 uses the first four bytes.
    pub local_addr: [u8; 16],
    /// Address of the peer.
    pub remote_addr: [u8; 16],
    /// The port the initiator connected to (host byte order); 0 where ports do not exist.
    pub service_port: u16,
    /// A [`Family`].
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// An [`Initiator`].
    pub initiator: u8,
    pub _pad: [u8; 3],
}

/// Counters of one flow. "Out" is what the audited cgroup sent, "in" what it received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// CLOCK_MONOTONIC (coarse) nanoseconds.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Distinct sockets (TCP connections, connected UDP sockets) seen for this flow.
    pub connections: u64,
    /// The drain epoch (`DRAIN[EPOCH]`) in which these counters last changed: a flow's first
    /// change in an epoch puts its key on CHANGED_FLOWS, so a drain reads only what changed.
    pub epoch: u64,
}

/// Ports on which the audited cgroup accepts connections: a packet on such a local port belongs
/// to a connection the peer opened. Filled by userspace from a socket snapshot at attach and by
/// the programs whenever a listening socket or a server-side bind is seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub cgroup_id: u64,
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

/// What the per-socket storage remembers, so a connection's packets skip parsing, classifying
/// and the flow map: they count here, and [`Pending`] is folded into the flow at `key` when the
/// socket is released and whenever userspace drains (the fold iterator).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockState {
    pub key: FlowKey,
    pub pending: Pending,
    /// Non-zero once the socket was released: from then on its packets go to FLOWS directly.
    pub released: u32,
    /// A [`Memo`].
    pub memo: u32,
}

/// What a socket's [`SockState::key`] stands for.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memo {
    /// The one flow of a connection (TCP, connected UDP): packets count in `pending`.
    Connection = 0,
    /// An unconnected UDP socket, whose packets go to many peers: only the audited cgroup and
    /// the socket's role (`initiator`: a server port or not) are kept; each packet is parsed
    /// for its peer and counted in FLOWS.
    Unconnected = 1,
}

/// A socket's counts not yet in FLOWS. Packets add atomically; a fold takes each counter with an
/// atomic exchange, so every count lands in FLOWS exactly once whoever folds (release, the
/// iterator, a packet that raced the release).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the first packet counted here since the last
    /// fold (a clock read per packet would be the fast path's costliest step); 0 when none.
    pub last_ns: u64,
}

/// A flow that changed in a drain epoch, as CHANGED_FLOWS carries it: its first change in the
/// epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ChangedFlow {
    pub key: FlowKey,
    pub epoch: u64,
}

/// The slots of the `DRAIN` array.
pub mod drain {
    /// Set by userspace as each drain begins (before its fold), a value no earlier drain used:
    /// the changes from then on are the next drain's.
    pub const EPOCH: u32 = 0;
    /// Set by the programs when a changed flow did not fit CHANGED_FLOWS: the next drain reads
    /// the whole map.
    pub const OVERFLOWED: u32 = 1;
    pub const SLOTS: u32 = 2;
}

/// Largest DNS message prefix copied to userspace.
pub const DNS_CAPTURE_LEN: usize = 512;

/// A DNS answer delivered to the audited cgroup (UDP or TCP from port 53).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    pub cgroup_id: u64,
    /// Bytes of `data` that hold the message (a prefix when the message is longer).
    pub len: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub data: [u8; DNS_CAPTURE_LEN],
}

/// Indexes into the `LOSSES` per-CPU array. Each slot counts something that was not recorded.
pub mod loss {
    /// New flows that could not be inserted (flow map full).
    pub const FLOWS: u32 = 0;
    /// Packets of those flows.
    pub const PACKETS: u32 = 1;
    /// Bytes of those flows.
    pub const BYTES: u32 = 2;
    /// DNS answers dropped because the ring buffer was full.
    pub const DNS_EVENTS: u32 = 3;
    /// Packets whose headers could not be parsed (truncated, unknown family).
    pub const UNPARSED_PACKETS: u32 = 4;
    /// Number of slots.
    pub const COUNT: u32 = 5;
}

/// Deepest cgroup level searched for an audited ancestor.
pub const MAX_CGROUP_LEVEL: u32 = 16;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, padding is explicit.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: plain-old-data, `#[repr(C)]`, two u64 counters.
    unsafe impl aya::Pod for super::FlowStats {}
    // SAFETY: plain-old-data, `#[repr(C)]`, padding is explicit.
    unsafe impl aya::Pod for super::ListenKey {}
}
