//! netaudit's kernel programs: cgroup_skb ingress/egress aggregate the audited cgroups' packets
//! into connection-level flows; cgroup_sock_addr bind learns UDP server ports.
//!
//! A connection's first packet is parsed and classified once; its flow key is then memoized in
//! the socket's storage. With per-socket counting on (`PER_SOCKET_COUNTS`, set at load) its
//! later packets only add to counters there, folded into FLOWS when the socket is released
//! (`netaudit_release`) and whenever userspace drains (the `netaudit_fold_tcp`/`_udp` socket
//! iterators, run in each audited network namespace), so FLOWS is exact at every drain without
//! a flow-map update per packet; with it off they update FLOWS directly under the memoized key.
//!
//! Every program returns 1 ("pass") on every path: the auditor observes, it never filters.
//! The statics and program functions carry the names in `netaudit_ebpf::names`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg},
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_coarse_ns, bpf_sk_fullsock, bpf_sk_storage_get,
        bpf_skb_ancestor_cgroup_id, bpf_skb_load_bytes, bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use netaudit_ebpf::{
    ChangedFlow, DNS_CAPTURE_LEN, DNS_PORT, DnsEvent, Family, FlowKey, FlowStats, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Initiator, ListenKey, MAX_CGROUP_LEVEL, Memo, SockState, capacity, drain,
    loss,
};

const PASS: i32 = 1;
const EEXIST: i32 = 17;

// Kernel TCP states (include/net/tcp_states.h); UDP sockets use ESTABLISHED once connected.
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_LISTEN: u32 = 10;

/// The audited cgroups (ids written by userspace before attaching); value unused.
#[map]
static AUDITED: HashMap<u64, u8> = HashMap::with_max_entries(capacity::AUDITED, 0);

/// The flows. A plain hash (not LRU) so that a full map fails inserts visibly (counted in
/// LOSSES) instead of silently evicting recorded flows.
#[map]
static FLOWS: HashMap<FlowKey, FlowStats> = HashMap::with_max_entries(capacity::FLOWS, 0);

#[map]
static LISTEN: HashMap<ListenKey, u8> = HashMap::with_max_entries(capacity::LISTEN, 0);

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// Set by the loader ([`netaudit_ebpf::names::PER_SOCKET_COUNTS`]); read-only, so the verifier
/// prunes the path not taken.
#[unsafe(no_mangle)]
static PER_SOCKET_COUNTS: u8 = 0;

#[map]
static DNS: RingBuf = RingBuf::with_byte_size(capacity::DNS_RING_BYTES, 0);

/// The drain's epoch and overflow flag ([`drain`] slots).
#[map]
static DRAIN: Array<u64> = Array::with_max_entries(drain::SLOTS, 0);

/// The keys of the flows changed in each drain epoch (each flow's first change in it).
#[map]
static CHANGED_FLOWS: RingBuf = RingBuf::with_byte_size(capacity::CHANGED_RING_BYTES, 0);

/// Per-socket memo of the flow key and the counts not yet folded, so an established
/// connection's packets cost one storage lookup and two atomic adds (or, with per-socket counting
/// off, a flow-map update).
#[btf_map]
static SOCKS: SkStorage<SockState> = SkStorage::new();

#[cgroup_skb(egress)]
pub fn netaudit_egress(ctx: SkBuffContext) -> i32 {
    account(&ctx, true);
    PASS
}

#[cgroup_skb(ingress)]
pub fn netaudit_ingress(ctx: SkBuffContext) -> i32 {
    account(&ctx, false);
    PASS
}

/// A UDP socket bound to a port it asked for is a server: packets to that port belong to
/// exchanges the peer started. Seen before the bind (the asked-for port is only visible here; a
/// client's socket is bound to a kernel-chosen port without asking, or asks for port 0), also
/// inside the ephemeral range. A bind that then fails (the port taken) leaves the port marked:
/// a client socket of the cgroup given that port later would be taken for a server.
#[cgroup_sock_addr(bind4)]
pub fn netaudit_bind4(ctx: SockAddrContext) -> i32 {
    learn_bound_port(&ctx);
    PASS
}

#[cgroup_sock_addr(bind6)]
pub fn netaudit_bind6(ctx: SockAddrContext) -> i32 {
    learn_bound_port(&ctx);
    PASS
}

/// A closing socket's pending counts go to its flow; packets after this (a TCP close's last
/// segments) count in FLOWS directly.
#[cgroup_sock(sock_release)]
pub fn netaudit_release(ctx: SockContext) -> i32 {
    // SAFETY: SOCKS is a socket-storage map and the context a full socket; without the create
    // flag the helper only looks up, returning null or this socket's SockState.
    let memo = unsafe { bpf_sk_storage_get(socks(), ctx.sock.cast(), ptr::null_mut(), 0) }.cast::<SockState>();
    if !memo.is_null() {
        // SAFETY: non-null storage of this socket, alive while the program runs. The store
        // comes before the fold's exchanges, so a packet counted after them sees it.
        unsafe { ptr::write_volatile(&raw mut (*memo).released, 1) };
        fold(memo);
    }
    PASS
}

/// The start of a tcp or udp iterator's context (`struct bpf_iter__tcp`, `bpf_iter__udp`): one
/// socket per run (a `sock_common` or a `udp_sock`), null once at the end.
#[repr(C)]
pub struct SocketIter {
    meta: *mut c_void,
    sk: *mut c_void,
}

/// Run by userspace before every drain, in each audited network namespace: folds every live TCP
/// socket's pending counts into FLOWS. aya-ebpf has no iterator macro; the section name is the
/// program type and the iterator.
// SAFETY (both attributes): the loader finds programs by section and symbol; no other symbol is
// named netaudit_fold_tcp.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn netaudit_fold_tcp(ctx: *mut SocketIter) -> i32 {
    // SAFETY: the kernel passes a valid iterator context; `sk` is null or a sock_common.
    let skc = unsafe { (*ctx).sk };
    if skc.is_null() {
        return 0;
    }
    // SAFETY: the helper checks the socket's type: a full TCP socket or null (request and
    // time-wait sockets have no storage).
    let tcp = unsafe { bpf_skc_to_tcp_sock(skc) };
    if !tcp.is_null() {
        fold_socket(tcp.cast());
    }
    0
}

/// As [`netaudit_fold_tcp`], for UDP sockets.
// SAFETY: as above.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn netaudit_fold_udp(ctx: *mut SocketIter) -> i32 {
    // SAFETY: as above; `sk` is null or a udp_sock (a full socket).
    let udp = unsafe { (*ctx).sk };
    if !udp.is_null() {
        fold_socket(udp);
    }
    0
}

#[inline(always)]
fn fold_socket(sk: *mut c_void) {
    // SAFETY: a lookup only (no create flag) in a full socket's storage: null or its SockState.
    let memo = unsafe { bpf_sk_storage_get(socks(), sk, ptr::null_mut(), 0) }.cast::<SockState>();
    if !memo.is_null() {
        fold(memo);
    }
}

#[inline(always)]
fn socks() -> *mut c_void {
    ptr::from_ref(&SOCKS).cast_mut().cast()
}

#[inline(always)]
fn learn_bound_port(ctx: &SockAddrContext) {
    // SAFETY: a bind program's context is the bind's address, valid for the run; `user_port`
    // is the asked-for port in network byte order.
    let (protocol, port) = unsafe { ((*ctx.sock_addr).protocol, u16::from_be((*ctx.sock_addr).user_port as u16)) };
    if protocol != IPPROTO_UDP as u32 || port == 0 {
        return;
    }
    let mut cgroup_id = 0;
    for level in 1..MAX_CGROUP_LEVEL {
        // SAFETY: a helper without pointer arguments; 0 past the deepest level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return;
        }
        // SAFETY: the value is only tested for presence, never read.
        if unsafe { AUDITED.get(&id) }.is_some() {
            cgroup_id = id;
            break;
        }
    }
    if cgroup_id != 0 {
        let key = ListenKey { cgroup_id, port, protocol: IPPROTO_UDP, _pad: [0; 5] };
        let _ = LISTEN.insert(&key, &1, 0);
    }
}

#[inline(always)]
fn bump_loss(slot: u32, n: u64) {
    if let Some(p) = LOSSES.get_ptr_mut(slot) {
        // SAFETY: the pointer is the map's own slot for this CPU: valid, and no other writer.
        unsafe { *p += n };
    }
}

struct Packet {
    len: u64,
    segs: u64,
    egress: bool,
}

/// CLOCK_MONOTONIC, coarse. Read only where a flow map entry is written or a socket's first
/// packet since its last fold is counted: it is the costliest step of the fast path.
#[inline(always)]
fn clock() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn account(ctx: &SkBuffContext, egress: bool) {
    let skb = ctx.skb.skb;
    // SAFETY: the context's skb is valid for the run; these fields are readable by cgroup_skb.
    let (len, gso_segs, sk) = unsafe { ((*skb).len, (*skb).gso_segs, (*skb).__bindgen_anon_2.sk) };
    let pkt = Packet {
        len: len as u64,
        // A GSO super-packet stands for several wire packets.
        segs: if gso_segs > 1 { gso_segs as u64 } else { 1 },
        egress,
    };
    // SAFETY: `sk` is the skb's socket, checked non-null; the helper returns null or a full socket.
    let full: *mut bpf_sock = if sk.is_null() { ptr::null_mut() } else { unsafe { bpf_sk_fullsock(sk) } };
    let mut state = 0;
    let mut protocol = 0;
    if !full.is_null() {
        // SAFETY: `full` is a non-null full socket from bpf_sk_fullsock.
        unsafe {
            state = (*full).state;
            protocol = (*full).protocol;
        }
        if memo_allowed(protocol, state) && state != TCP_SYN_SENT {
            // SAFETY: SOCKS is a socket-storage map and `full` a full socket; without the create
            // flag the helper only looks up, returning null or this socket's SockState.
            let memo = unsafe { bpf_sk_storage_get(socks(), full.cast(), ptr::null_mut(), 0) }.cast::<SockState>();
            // SAFETY: non-null storage of this socket, alive while the program runs.
            if !memo.is_null() && unsafe { (*memo).key.cgroup_id != 0 && (*memo).memo == Memo::Connection as u32 } {
                // The fast path: no parsing, no classification, no flow map.
                count_memoized(memo, &pkt);
                // SAFETY: non-null storage of this socket, alive while the program runs.
                let key = unsafe { &(*memo).key };
                if !egress && key.initiator == Initiator::Local as u8 && key.service_port == DNS_PORT {
                    let _ = capture_dns(ctx, key.cgroup_id);
                }
                return;
            }
        }
    }
    if protocol == IPPROTO_UDP as u32 && !full.is_null() && unconnected_udp(ctx, &pkt, full).is_ok() {
        return;
    }
    if slow_path(ctx, &pkt, full, protocol, state).is_err() {
        bump_loss(loss::UNPARSED_PACKETS, pkt.segs);
    }
}

/// Sockets whose packets all belong to one flow: TCP connections and connected UDP sockets.
#[inline(always)]
fn memo_allowed(protocol: u32, state: u32) -> bool {
    (protocol == IPPROTO_TCP as u32 && state != TCP_LISTEN && state != TCP_SYN_RECV)
        || (protocol == IPPROTO_UDP as u32 && state == TCP_ESTABLISHED)
}

/// A packet of an unconnected UDP socket whose cgroup and role are memoized: parsed for its
/// peer and counted in FLOWS, without the cgroup walk and the serving-port lookup. `Err` when
/// the socket has no such memo yet (the slow path makes one).
#[inline(never)]
fn unconnected_udp(ctx: &SkBuffContext, pkt: &Packet, full: *mut bpf_sock) -> Result<(), ()> {
    // SAFETY: as on the fast path: a lookup in this socket's storage.
    let memo = unsafe { bpf_sk_storage_get(socks(), full.cast(), ptr::null_mut(), 0) }.cast::<SockState>();
    // SAFETY: non-null storage of this socket; an unconnected memo's fields never change.
    if memo.is_null() || unsafe { (*memo).key.cgroup_id == 0 || (*memo).memo != Memo::Unconnected as u32 } {
        return Err(());
    }
    let (h, _) = parse(ctx)?;
    if h.protocol != IPPROTO_UDP {
        return Err(());
    }
    // SAFETY: as above.
    let (cgroup_id, initiator) = unsafe { ((*memo).key.cgroup_id, (*memo).key.initiator) };
    let (local, remote, lport, rport) =
        if pkt.egress { (h.saddr, h.daddr, h.sport, h.dport) } else { (h.daddr, h.saddr, h.dport, h.sport) };
    let key = FlowKey {
        cgroup_id,
        local_addr: local,
        remote_addr: remote,
        service_port: if initiator == Initiator::Remote as u8 { lport } else { rport },
        family: h.family,
        protocol: IPPROTO_UDP,
        initiator,
        _pad: [0; 3],
    };
    record(&key, pkt, false);
    if !pkt.egress && h.sport == DNS_PORT {
        let _ = capture_dns(ctx, cgroup_id);
    }
    Ok(())
}

/// The headers the classification needs.
struct Headers {
    family: u8,
    protocol: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    icmp_type: u8,
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Result<(Headers, usize), ()> {
    // cgroup_skb sees the packet from the network header on.
    let first: u8 = ctx.load(0).map_err(|_| ())?;
    let mut h = Headers {
        family: 0,
        protocol: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
    };
    let mut l4: usize;
    match first >> 4 {
        4 => {
            let ip: [u8; 20] = ctx.load(0).map_err(|_| ())?;
            h.family = Family::V4 as u8;
            h.protocol = ip[9];
            h.saddr[..4].copy_from_slice(&ip[12..16]);
            h.daddr[..4].copy_from_slice(&ip[16..20]);
            l4 = ((ip[0] & 0x0f) as usize) * 4;
        }
        6 => {
            let ip: [u8; 40] = ctx.load(0).map_err(|_| ())?;
            h.family = Family::V6 as u8;
            h.saddr.copy_from_slice(&ip[8..24]);
            h.daddr.copy_from_slice(&ip[24..40]);
            let mut next = ip[6];
            l4 = 40;
            // Walk the extension headers that may precede the transport header.
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 => {
                        let ext: [u8; 2] = ctx.load(l4).map_err(|_| ())?;
                        next = ext[0];
                        l4 += (ext[1] as usize + 1) * 8;
                    }
                    44 => {
                        let ext: [u8; 2] = ctx.load(l4).map_err(|_| ())?;
                        next = ext[0];
                        l4 += 8;
                    }
                    _ => break,
                }
            }
            h.protocol = next;
        }
        _ => return Err(()),
    }
    match h.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
            h.sport = u16::from_be_bytes([ports[0], ports[1]]);
            h.dport = u16::from_be_bytes([ports[2], ports[3]]);
            if h.protocol == IPPROTO_TCP {
                h.tcp_flags = ctx.load(l4 + 13).map_err(|_| ())?;
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            h.icmp_type = ctx.load(l4).map_err(|_| ())?;
        }
        _ => {}
    }
    Ok((h, l4))
}

#[inline(never)]
fn slow_path(ctx: &SkBuffContext, pkt: &Packet, full: *mut bpf_sock, protocol: u32, state: u32) -> Result<(), ()> {
    let (h, _) = parse(ctx)?;
    // ICMPv6 multicast listener and neighbour discovery messages (types 130 and up) are link
    // plumbing that raw sockets happen to receive; no policy governs them.
    if h.protocol == IPPROTO_ICMPV6 && h.icmp_type >= 130 {
        return Ok(());
    }
    let egress = pkt.egress;
    let (local, remote, lport, rport) =
        if egress { (h.saddr, h.daddr, h.sport, h.dport) } else { (h.daddr, h.saddr, h.dport, h.sport) };

    let Some(cgroup_id) = audited_cgroup(ctx) else {
        // Not under an audited cgroup (cannot happen while attached only to audited ones).
        return Ok(());
    };

    if !full.is_null() && protocol == IPPROTO_TCP as u32 && state == TCP_LISTEN {
        let key = ListenKey { cgroup_id, port: lport, protocol: IPPROTO_TCP, _pad: [0; 5] };
        // SAFETY: the value is only tested for presence, never read.
        if unsafe { LISTEN.get(&key) }.is_none() {
            let _ = LISTEN.insert(&key, &1, 0);
        }
    }

    let (initiator, service_port) = match h.protocol {
        IPPROTO_TCP => {
            let syn = h.tcp_flags & 0x02 != 0;
            let ack = h.tcp_flags & 0x10 != 0;
            if syn && !ack {
                // The opening SYN: its sender initiates, its destination port is the service.
                (if egress { Initiator::Local } else { Initiator::Remote }, h.dport)
            } else if syn {
                // SYN-ACK: its sender is the server.
                (if egress { Initiator::Remote } else { Initiator::Local }, h.sport)
            } else {
                by_listening_port(cgroup_id, h.protocol, lport, rport)
            }
        }
        IPPROTO_UDP | IPPROTO_SCTP => by_listening_port(cgroup_id, h.protocol, lport, rport),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // Echo replies belong to the request's sender; every other message to its sender.
            let reply = h.icmp_type == 0 || h.icmp_type == 129;
            let sender = if egress { Initiator::Local } else { Initiator::Remote };
            let other = if egress { Initiator::Remote } else { Initiator::Local };
            (if reply { other } else { sender }, 0)
        }
        _ => (if egress { Initiator::Local } else { Initiator::Remote }, 0),
    };

    let key = FlowKey {
        cgroup_id,
        local_addr: local,
        remote_addr: remote,
        service_port,
        family: h.family,
        protocol: h.protocol,
        initiator: initiator as u8,
        _pad: [0; 3],
    };

    let memo = if memo_allowed(protocol, state) {
        Some(Memo::Connection)
    } else if protocol == IPPROTO_UDP as u32 {
        Some(Memo::Unconnected)
    } else {
        None
    };
    memoize_and_record(&key, pkt, full, memo);

    if !egress && h.sport == DNS_PORT && (h.protocol == IPPROTO_UDP || h.protocol == IPPROTO_TCP) {
        let _ = capture_dns(ctx, cgroup_id);
    }
    Ok(())
}

/// Records the packet in FLOWS and memoizes what the socket's next packets can skip: for a
/// connection the whole key (they take the fast path), for an unconnected UDP socket its cgroup
/// and role. A connection whose flow could not be recorded (flow map full) is not memoized: its
/// packets keep counting as lost.
#[inline(always)]
fn memoize_and_record(key: &FlowKey, pkt: &Packet, full: *mut bpf_sock, memo: Option<Memo>) {
    let Some(memo) = memo.filter(|_| !full.is_null()) else {
        record(key, pkt, false);
        return;
    };
    let sock = full.cast();
    // SAFETY: as on the fast path: a lookup in this socket's storage.
    let existing = unsafe { bpf_sk_storage_get(socks(), sock, ptr::null_mut(), 0) }.cast::<SockState>();
    // A connection is new the first time its socket is seen as one (also after unconnected use).
    // SAFETY: non-null storage of this socket.
    let new_connection =
        memo == Memo::Connection && (existing.is_null() || unsafe { (*existing).memo } != Memo::Connection as u32);
    if !record(key, pkt, new_connection) {
        return;
    }
    if existing.is_null() {
        // Created zeroed (an initial value would cost the stack a whole SockState), then keyed:
        // until the key is written, the fast path takes a zero cgroup id for "not memoized".
        // SAFETY: creates this socket's storage; null or the new, zeroed SockState.
        let created = unsafe { bpf_sk_storage_get(socks(), sock, ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE as u64) }
            .cast::<SockState>();
        if !created.is_null() {
            // SAFETY: non-null storage of this socket, alive while the program runs. The kind
            // comes first: the key's non-zero cgroup id is what makes the memo usable.
            unsafe {
                (*created).memo = memo as u32;
                (*created).key = *key;
            }
        }
    } else {
        // A socket that connects again (after a failed attempt): what it counted belongs to the
        // old key, the new packets to the new one.
        fold(existing);
        // SAFETY: non-null storage of this socket; only this socket's programs write the key.
        unsafe {
            (*existing).memo = memo as u32;
            (*existing).key = *key;
        }
    }
}

/// The fast path's accounting: atomic adds to the socket's pending counts. A released socket's
/// packets go to FLOWS; a packet that raced the release folds what the release may have missed.
#[inline(always)]
fn count_memoized(memo: *mut SockState, pkt: &Packet) {
    // SAFETY: `memo` is this socket's storage (non-null, alive while the program runs); the
    // counters are only ever added to atomically here and exchanged atomically by folds.
    unsafe {
        if ptr::read_volatile(&PER_SOCKET_COUNTS) == 0 || ptr::read_volatile(&raw const (*memo).released) != 0 {
            record(&(*memo).key, pkt, false);
            return;
        }
        let p = &raw mut (*memo).pending;
        if pkt.egress {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).packets_out, pkt.segs);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).bytes_out, pkt.len);
        } else {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).packets_in, pkt.segs);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).bytes_in, pkt.len);
        }
        // The time of the first packet since the last fold: "seen until at least then"; the
        // drains' interval bounds how much later the last packet may have been.
        if (*p).last_ns == 0 {
            (*p).last_ns = clock();
        }
        if ptr::read_volatile(&raw const (*memo).released) != 0 {
            fold(memo);
        }
    }
}

/// Moves a socket's pending counts into its flow. Each counter is taken with an exchange, so
/// concurrent folds (release, iterator, a racing packet) never count anything twice.
#[inline(always)]
fn fold(memo: *mut SockState) {
    // SAFETY: `memo` is a socket's storage, valid for the run; see `count_memoized`.
    let mut delta = unsafe {
        let p = &raw mut (*memo).pending;
        let take = |c: *mut u64| atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(c, 0);
        let last = take(&raw mut (*p).last_ns);
        let delta = FlowStats {
            packets_out: take(&raw mut (*p).packets_out),
            bytes_out: take(&raw mut (*p).bytes_out),
            packets_in: take(&raw mut (*p).packets_in),
            bytes_in: take(&raw mut (*p).bytes_in),
            first_ns: last,
            last_ns: last,
            connections: 0,
            epoch: 0,
        };
        delta
    };
    // Bytes too: a packet racing the exchanges may leave its bytes for the next fold.
    if delta.packets_out != 0 || delta.packets_in != 0 || delta.bytes_out != 0 || delta.bytes_in != 0 {
        // SAFETY: as above; the key is read in place (a copy would cost the stack).
        merge(unsafe { &(*memo).key }, &mut delta);
    }
}

#[inline(always)]
fn by_listening_port(cgroup_id: u64, protocol: u8, lport: u16, rport: u16) -> (Initiator, u16) {
    let key = ListenKey { cgroup_id, port: lport, protocol, _pad: [0; 5] };
    // SAFETY: the value is only tested for presence, never read.
    if unsafe { LISTEN.get(&key) }.is_some() { (Initiator::Remote, lport) } else { (Initiator::Local, rport) }
}

/// The audited cgroup this packet's socket lives under (itself or an ancestor).
#[inline(always)]
fn audited_cgroup(ctx: &SkBuffContext) -> Option<u64> {
    for level in 1..MAX_CGROUP_LEVEL {
        // SAFETY: the context's own skb; the helper returns 0 past the deepest level.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level as i32) };
        if id == 0 {
            return None;
        }
        // SAFETY: the value is only tested for presence, never read.
        if unsafe { AUDITED.get(&id) }.is_some() {
            return Some(id);
        }
    }
    None
}

/// Counts one packet in its flow. Returns whether the flow is in FLOWS (false: map full, lost).
#[inline(always)]
fn record(key: &FlowKey, pkt: &Packet, new_connection: bool) -> bool {
    let (po, bo, pi, bi) = if pkt.egress { (pkt.segs, pkt.len, 0, 0) } else { (0, 0, pkt.segs, pkt.len) };
    let now = clock();
    let mut delta = FlowStats {
        packets_out: po,
        bytes_out: bo,
        packets_in: pi,
        bytes_in: bi,
        first_ns: now,
        last_ns: now,
        connections: new_connection as u64,
        epoch: 0,
    };
    merge(key, &mut delta)
}

/// Adds `delta` to the flow at `key`, inserting it when new. Returns whether the flow is in
/// FLOWS; what could not be inserted is counted in LOSSES.
#[inline(always)]
fn merge(key: &FlowKey, delta: &mut FlowStats) -> bool {
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        add(key, stats, delta);
        return true;
    }
    // A new flow is a change in the epoch read before its insert: put out after it (so the drain
    // that reads the key finds it), and should that epoch end meanwhile, its drain or the next
    // reads it, and the flow's next change, in another epoch, is put out again.
    let epoch = DRAIN.get(drain::EPOCH).copied().unwrap_or(0);
    delta.epoch = epoch;
    match FLOWS.insert(key, &*delta, BPF_NOEXIST as u64) {
        Ok(()) => {
            put_out(key, epoch);
            true
        }
        Err(e) if e == -EEXIST => {
            // Another CPU inserted it first.
            if let Some(stats) = FLOWS.get_ptr_mut(key) {
                add(key, stats, delta);
            }
            true
        }
        Err(_) => {
            bump_loss(loss::FLOWS, 1);
            bump_loss(loss::PACKETS, delta.packets_out + delta.packets_in);
            bump_loss(loss::BYTES, delta.bytes_out + delta.bytes_in);
            false
        }
    }
}

#[inline(always)]
fn add(key: &FlowKey, stats: *mut FlowStats, delta: &FlowStats) {
    // SAFETY: `stats` is a flow map value from get_ptr_mut (valid while the program runs);
    // concurrent CPUs only add atomically, and a lost `last_ns` race costs a nanosecond.
    unsafe {
        if delta.packets_out != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).packets_out, delta.packets_out);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).bytes_out, delta.bytes_out);
        }
        if delta.packets_in != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).packets_in, delta.packets_in);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).bytes_in, delta.bytes_in);
        }
        if delta.connections != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).connections, delta.connections);
        }
        if (*stats).last_ns < delta.last_ns {
            (*stats).last_ns = delta.last_ns;
        }
    }
    changed(key, stats);
}

/// Puts a flow's key on CHANGED_FLOWS at its first change in the drain epoch. The epoch is read
/// after the counters were added: a change that still sees the epoch before is in the map
/// before that epoch ended, so the drain that ended it, reading after, counts it. (On x86 the
/// adds are locked instructions, which order the read after them; elsewhere the window is a
/// store buffer's, against a drain that reads milliseconds after beginning the epoch.)
#[inline(always)]
fn changed(key: &FlowKey, stats: *mut FlowStats) {
    let Some(epoch) = DRAIN.get(drain::EPOCH) else { return };
    let epoch = *epoch;
    // SAFETY: `stats` is a flow map value from get_ptr_mut (valid while the program runs); two
    // CPUs racing here both put the key out, which the drain reads twice, harmlessly.
    unsafe {
        if (*stats).epoch == epoch {
            return;
        }
        (*stats).epoch = epoch;
    }
    put_out(key, epoch);
}

/// Puts `key` out on CHANGED_FLOWS, written in place (no copy on the stack: the slow path's
/// stack is near the verifier's limit).
#[inline(always)]
fn put_out(key: &FlowKey, epoch: u64) {
    match CHANGED_FLOWS.reserve::<ChangedFlow>(0) {
        Some(mut entry) => {
            let out = entry.as_mut_ptr();
            // SAFETY: `out` is the ring entry just reserved for a ChangedFlow, ours until
            // submitted.
            unsafe {
                (*out).key = *key;
                (*out).epoch = epoch;
            }
            entry.submit(0);
        }
        None => {
            if let Some(slot) = DRAIN.get_ptr_mut(drain::OVERFLOWED) {
                // SAFETY: the array's own slot, valid while the program runs; writers write 1.
                unsafe { *slot = 1 };
            }
        }
    }
}

/// Copies a DNS answer (UDP payload, or the message after TCP's length prefix) to userspace.
#[inline(never)]
fn capture_dns(ctx: &SkBuffContext, cgroup_id: u64) -> Result<(), ()> {
    let (h, l4) = parse(ctx)?;
    let payload = if h.protocol == IPPROTO_UDP {
        l4 + 8
    } else {
        let offset_byte: u8 = ctx.load(l4 + 12).map_err(|_| ())?;
        l4 + ((offset_byte >> 4) as usize) * 4 + 2
    };
    let total = ctx.len() as usize;
    if payload >= total {
        return Ok(());
    }
    let Some(mut entry) = DNS.reserve::<DnsEvent>(0) else {
        bump_loss(loss::DNS_EVENTS, 1);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    let mut n = total - payload;
    if n > DNS_CAPTURE_LEN {
        n = DNS_CAPTURE_LEN;
    }
    // Spelled out for the verifier: the copy length must be provably non-zero.
    if n == 0 {
        entry.discard(0);
        return Ok(());
    }
    // SAFETY: `event` is the ring buffer entry just reserved for a DnsEvent, exclusively ours
    // until submitted or discarded; the copy's length is bounded by `data`'s.
    let ret = unsafe {
        (*event).cgroup_id = cgroup_id;
        (*event).protocol = h.protocol;
        (*event).len = n as u32;
        bpf_skb_load_bytes(ctx.skb.skb.cast(), payload as u32, (&raw mut (*event).data).cast(), n as u32)
    };
    if ret == 0 && n > 0 {
        entry.submit(0);
    } else {
        entry.discard(0);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY (both attributes): the loader reads the license from the `license` section; no other
// symbol is named LICENSE.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
