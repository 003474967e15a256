//! The benchmarks' floor: an empty cgroup_skb program, the least any cgroup_skb design pays per
//! packet. An object of its own, so that no capture ever loads it.
#![no_std]
#![no_main]

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

/// Named `netaudit_ebpf::names::FLOOR`.
#[cgroup_skb(egress)]
pub fn netaudit_floor(_ctx: SkBuffContext) -> i32 {
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
