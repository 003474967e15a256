//! The benchmarks' floor: empty cgroup_skb programs at netaudit's two hooks, the least any
//! cgroup_skb design pays per packet, and the rungs above it: programs that each add one step
//! of the established fast path (full socket, socket storage, clock, atomic adds), so the bench
//! can price each step. An object of its own, so that no capture ever loads it.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_sk_fullsock, bpf_sk_storage_get},
    macros::{btf_map, cgroup_skb},
    programs::SkBuffContext,
};

/// Two counters and a time per socket, as the fast path keeps.
#[btf_map]
static RUNG_SOCKS: SkStorage<[u64; 3]> = SkStorage::new();

/// How far up the fast path a rung goes.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Step {
    FullSock,
    Storage,
    Clock,
    Adds,
}

#[inline(always)]
fn rung(ctx: &SkBuffContext, upto: Step) -> i32 {
    // SAFETY: the context's skb is valid for the run; `sk` is readable by cgroup_skb.
    let (sk, len) = unsafe { ((*ctx.skb.skb).__bindgen_anon_2.sk, (*ctx.skb.skb).len) };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: `sk` is the skb's socket, non-null; the helper returns null or a full socket.
    let full: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() || upto == Step::FullSock {
        return 1;
    }
    let map = ptr::from_ref(&RUNG_SOCKS).cast_mut().cast();
    // SAFETY: a socket-storage map and a full socket: null or this socket's counters (created).
    let memo = unsafe { bpf_sk_storage_get(map, full.cast(), ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE as u64) }
        .cast::<[u64; 3]>();
    if memo.is_null() || upto == Step::Storage {
        return 1;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if upto == Step::Clock {
        // SAFETY: this socket's storage, alive for the run.
        unsafe { (*memo)[2] = now };
        return 1;
    }
    // SAFETY: as above; counters only ever added to atomically.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*memo)[0], 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*memo)[1], len as u64);
        if (*memo)[2] < now {
            (*memo)[2] = now;
        }
    }
    1
}

// Attachable at either hook (no attach type in the section): the bench attaches each at both.
#[cgroup_skb]
pub fn netaudit_rung_fullsock(ctx: SkBuffContext) -> i32 {
    rung(&ctx, Step::FullSock)
}

#[cgroup_skb]
pub fn netaudit_rung_storage(ctx: SkBuffContext) -> i32 {
    rung(&ctx, Step::Storage)
}

#[cgroup_skb]
pub fn netaudit_rung_clock(ctx: SkBuffContext) -> i32 {
    rung(&ctx, Step::Clock)
}

#[cgroup_skb]
pub fn netaudit_rung_adds(ctx: SkBuffContext) -> i32 {
    rung(&ctx, Step::Adds)
}

/// Named in `netaudit_ebpf::names::FLOOR`, as the next.
#[cgroup_skb(egress)]
pub fn netaudit_floor_egress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(ingress)]
pub fn netaudit_floor_ingress(_ctx: SkBuffContext) -> i32 {
    1
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
