//! The drain: FLOWS as userspace knows it, brought up to date by reading only the flows that
//! changed since the last drain. A flow's first change in a drain epoch (`DRAIN[EPOCH]`) puts
//! its key on CHANGED_FLOWS. Each drain, after its fold, begins a new epoch and reads the
//! values of the keys put out in the epochs before; the keys put out in the new one (changes
//! racing this drain) are read at the next. The whole map's last values are kept here (entries
//! are never removed from FLOWS, so the last value read is the entry's until it changes again).
//!
//! Exact across drains: a change that saw the epoch before is in the map before that epoch
//! ended, so the drain that ended it reads it; one that saw the new epoch puts its key out for
//! the next drain. A ring too small for the changes sets `DRAIN[OVERFLOWED]`: then the whole
//! map is read. Reading an unchanged entry again is harmless (values are totals).

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, MapData, RingBuf};
use netaudit_ebpf::{ChangedFlow, FlowKey, FlowStats, drain};

use super::sys;

/// The changed flows' ring, sized to its flow map at load: about a quarter of the map's keys
/// fit, and a drain with more changes than fit reads the whole map instead.
pub fn ring_bytes(max_flows: u32) -> u32 {
    (u64::from(max_flows) * 16).next_power_of_two().clamp(256 << 10, 64 << 20) as u32
}

/// FLOWS as of the last drain, and the keys to read at the next.
#[derive(Default)]
pub struct Mirror {
    entries: foldhash::HashMap<FlowKey, FlowStats>,
    /// The keys put out in the current epoch that the last drain took off the ring.
    next: Vec<FlowKey>,
    /// The current epoch (0: none yet).
    epoch: u64,
}

/// What one drain read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drained {
    /// The whole map (the first drain, or more changes than the ring holds).
    Whole,
    /// The entries changed since the drain before (some perhaps unchanged), as they are now.
    Changed(Vec<(FlowKey, FlowStats)>),
}

/// The handles a drain uses.
pub struct DrainMaps<'a> {
    pub flows: &'a HashMap<MapData, FlowKey, FlowStats>,
    pub drain: &'a mut Array<MapData, u64>,
    pub changed: &'a mut RingBuf<MapData>,
}

impl Mirror {
    /// Every entry, as of the last drain.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&FlowKey, &FlowStats)> {
        self.entries.iter()
    }

    /// Reads what changed since the last drain (everything the first time). Call it after the
    /// fold, whose changes it then reads.
    pub fn drain(&mut self, maps: DrainMaps<'_>) -> Result<Drained> {
        self.begin(maps.drain)?;
        let mut keys = std::mem::take(&mut self.next);
        while let Some(item) = maps.changed.next() {
            if item.len() >= size_of::<ChangedFlow>() {
                // SAFETY: the kernel wrote a whole ChangedFlow (plain old data); read unaligned.
                let c = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ChangedFlow>()) };
                if c.epoch == self.epoch { self.next.push(c.key) } else { keys.push(c.key) }
            }
        }
        let overflowed = maps.drain.get(&drain::OVERFLOWED, 0).context("reading the drain's overflow flag")? != 0;
        if overflowed || self.entries.is_empty() {
            // Cleared before the read: what overflows from now on is the next drain's.
            maps.drain.set(drain::OVERFLOWED, 0, 0).context("clearing the drain's overflow flag")?;
            let entries = sys::read_hash_map(maps.flows).context("reading the flow map (BPF_MAP_LOOKUP_BATCH)")?;
            self.entries.extend(entries);
            return Ok(Drained::Whole);
        }
        keys.sort_unstable_by_key(bytes_of);
        keys.dedup();
        let mut changed = Vec::with_capacity(keys.len());
        for key in keys {
            match maps.flows.get(&key, 0) {
                Ok(stats) => {
                    self.entries.insert(key, stats);
                    changed.push((key, stats));
                }
                // Cannot be: keys are put out after their insert, and never removed.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading a changed flow (BPF_MAP_LOOKUP_ELEM)"),
            }
        }
        Ok(Drained::Changed(changed))
    }

    /// Begins a new epoch. An epoch is the monotonic clock's nanoseconds, so none comes again,
    /// not even one of an earlier capture (pinned flows keep their epochs across restarts).
    fn begin(&mut self, drain: &mut Array<MapData, u64>) -> Result<()> {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        self.epoch = now.max(self.epoch + 1);
        drain.set(drain::EPOCH, self.epoch, 0).context("beginning a drain epoch (DRAIN map)")
    }
}

/// A key's bytes, to sort and deduplicate keys by (FlowKey is plain old data).
fn bytes_of(key: &FlowKey) -> [u8; size_of::<FlowKey>()] {
    // SAFETY: FlowKey is #[repr(C)] plain old data with explicit padding: every byte is
    // initialized.
    unsafe { std::mem::transmute_copy(key) }
}
