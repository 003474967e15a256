//! The bpf(2) commands aya 0.14 does not wrap: creating an iterator link and starting an
//! iteration (the fold), and reading a whole hash map in a few calls (every drain).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per BPF_MAP_LOOKUP_BATCH call: a full default flow map in 16 calls.
const BATCH: u32 = 4096;

/// bpf(2) with `attr`.
pub fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr for `cmd`, its size passed alongside; the kernel reads
    // it and writes back only the fields the command defines as outputs.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, std::ptr::from_mut(attr), size_of::<bpf_attr>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// The bpf(2) commands that return a new file descriptor.
pub fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: on success these commands return a new file descriptor this process now owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Every entry of a (not per-CPU) hash map, read with BPF_MAP_LOOKUP_BATCH (Linux 5.6): a few
/// calls for the whole map, where aya's iterator makes two per entry. Each bucket is read under
/// its lock, so an entry updated meanwhile is read whole, before or after.
pub fn read_hash_map<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> io::Result<Vec<(K, V)>> {
    use aya::maps::IterableMap;
    let fd = map.map().fd().as_fd().as_raw_fd() as u32;
    // The kernel's resume token: a bucket index for hash maps; sized as a key to be safe.
    let token_len = size_of::<K>().max(8).div_ceil(8);
    let (mut token_in, mut token_out) = (vec![0u64; token_len], vec![0u64; token_len]);
    let mut capacity = BATCH;
    // SAFETY: K and V are Pod (plain old data: every bit pattern is a valid value, aya's
    // contract for map keys and values), so zeroed buffers are valid ones.
    let zeroed =
        |n: u32| unsafe { (vec![std::mem::zeroed::<K>(); n as usize], vec![std::mem::zeroed::<V>(); n as usize]) };
    let (mut keys, mut values) = zeroed(capacity);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        // SAFETY: bpf_attr is plain old data; all-zero is its documented "unset" state.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the `batch` arm of the union (plain integers).
        let batch = unsafe { &mut attr.batch };
        batch.in_batch = if first { 0 } else { token_in.as_ptr() as u64 };
        batch.out_batch = token_out.as_mut_ptr() as u64;
        batch.keys = keys.as_mut_ptr() as u64;
        batch.values = values.as_mut_ptr() as u64;
        batch.count = capacity;
        batch.map_fd = fd;
        let result = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: the kernel wrote back how many entries it copied (also when it returns ENOENT).
        let count = unsafe { attr.batch.count } as usize;
        let done = match result {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than asked for: ask for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count == 0 => {
                capacity *= 2;
                (keys, values) = zeroed(capacity);
                continue;
            }
            Err(e) => return Err(e),
        };
        out.extend(keys.iter().copied().zip(values.iter().copied()).take(count));
        if done {
            return Ok(out);
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}
