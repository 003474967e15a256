//! The drain: FLOWS as userspace knows it, brought up to date by reading only the flows that
//! changed since the last drain. The kernel walks the map (`netaudit_changed`, run with
//! BPF_PROG_TEST_RUN) and puts out each entry whose `updated_ns` is at or after the time the
//! previous drain began; this side keeps the whole map's last values (entries are never removed
//! from FLOWS, so the last value read is the entry's value until it changes again).
//!
//! Exact across drains: a change after the kernel's walk passed an entry carries a time after
//! the drain began (the clock is read before the fold and the walk), so the next drain reads
//! it. Reading an unchanged entry again is harmless (values are totals, not increments).

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{CgroupSkb, TestRun, TestRunOptions},
};
use netaudit_ebpf::{ChangedFlow, FlowKey, FlowStats, drain};

use super::sys;

/// How much earlier than the previous drain's start a change still counts: covers a packet
/// whose program read the clock just before that drain began (nanoseconds, in practice).
const SINCE_MARGIN_NS: u64 = 20_000_000;

/// A frame for the walk's test run: the program ignores it; the kernel wants one (at least an
/// Ethernet header).
const EMPTY_FRAME: [u8; 64] = [0; 64];

/// The changed flows' ring, sized to its flow map at load: about one entry in seven fits, and
/// a drain with more changes than fit reads the whole map instead.
pub fn ring_bytes(max_flows: u32) -> u32 {
    (u64::from(max_flows) * 16).next_power_of_two().clamp(256 << 10, 64 << 20) as u32
}

/// FLOWS as of the last drain, and when that drain began.
#[derive(Default)]
pub struct Mirror {
    entries: foldhash::HashMap<FlowKey, FlowStats>,
    /// CLOCK_MONOTONIC_COARSE nanoseconds before the last drain's fold (0: none yet).
    began_ns: u64,
}

/// What one drain read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drained {
    /// The whole map (the first drain, or more changes than the ring holds).
    Whole,
    /// The entries changed since the drain before, as they are now.
    Changed(Vec<(FlowKey, FlowStats)>),
}

/// The handles a drain uses.
pub struct DrainMaps<'a> {
    pub flows: &'a HashMap<MapData, FlowKey, FlowStats>,
    pub drain: &'a mut Array<MapData, u64>,
    pub changed: &'a mut RingBuf<MapData>,
    pub walk: &'a CgroupSkb,
}

impl Mirror {
    /// Every entry, as of the last drain.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&FlowKey, &FlowStats)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The time to take before folding: a drain counts changes from the one before's.
    pub fn begin() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec. CLOCK_MONOTONIC_COARSE is the programs' clock
        // (bpf_ktime_get_coarse_ns).
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Reads what changed since the last drain (everything the first time); `began_ns` is
    /// [`Mirror::begin`]'s time, taken before the fold that preceded this call.
    pub fn drain(&mut self, maps: DrainMaps<'_>, began_ns: u64) -> Result<Drained> {
        let since = if self.began_ns == 0 { 0 } else { self.began_ns.saturating_sub(SINCE_MARGIN_NS).max(1) };
        let drained = if since == 0 { self.read_whole(maps.flows)? } else { self.read_changed(maps, since)? };
        self.began_ns = began_ns;
        Ok(drained)
    }

    fn read_changed(&mut self, maps: DrainMaps<'_>, since: u64) -> Result<Drained> {
        maps.drain.set(drain::SINCE, since, 0).context("setting the drain's start (DRAIN map)")?;
        maps.drain.set(drain::OVERFLOWED, 0, 0).context("resetting the drain's overflow flag")?;
        let run = TestRunOptions { data_in: Some(&EMPTY_FRAME), ..TestRunOptions::new() };
        maps.walk.test_run(run).context("running the changed-flows walk (BPF_PROG_TEST_RUN)")?;
        let mut changed = Vec::new();
        while let Some(item) = maps.changed.next() {
            if item.len() < size_of::<ChangedFlow>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole ChangedFlow (plain old data); read unaligned.
            let c: ChangedFlow = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            changed.push((c.key, c.stats));
        }
        if maps.drain.get(&drain::OVERFLOWED, 0).context("reading the drain's overflow flag")? != 0 {
            return self.read_whole(maps.flows);
        }
        self.entries.extend(changed.iter().copied());
        Ok(Drained::Changed(changed))
    }

    fn read_whole(&mut self, flows: &HashMap<MapData, FlowKey, FlowStats>) -> Result<Drained> {
        let entries = sys::read_hash_map(flows).context("reading the flow map (BPF_MAP_LOOKUP_BATCH)")?;
        self.entries.extend(entries);
        Ok(Drained::Whole)
    }
}
