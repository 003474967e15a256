//! Loading the kernel object: the programs loaded once, the maps taken once as typed handles
//! (so the rest of the capture never looks a map up by name or re-checks its types).

use anyhow::{Context, Result};
use std::os::fd::AsFd;

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Iter},
};
use netaudit_ebpf::{DnsEvent, FlowKey, FlowStats, ListenKey, names};

use super::{drain::ring_bytes, fold::Folder, pins::Pins};

/// The kernel object built by build.rs from `netaudit-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netaudit-ebpf"));
/// The benchmarks' empty programs ([`names::FLOOR`]), an object of its own: never loaded by a
/// capture.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netaudit-floor"));

/// Packet accounting per direction.
pub const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] =
    [(names::EGRESS, CgroupSkbAttachType::Egress), (names::INGRESS, CgroupSkbAttachType::Ingress)];
/// Before each bind (learning UDP server ports), per family.
pub const BIND_PROGRAMS: [&str; 2] = [names::BIND4, names::BIND6];
/// The socket hooks: the release (folding a closing socket's counts).
pub const SOCK_PROGRAMS: [&str; 1] = [names::RELEASE];

/// The maps userspace reads and writes, taken from the object once.
pub struct Maps {
    /// Audited cgroup ids.
    pub audited: HashMap<MapData, u64, u8>,
    pub flows: HashMap<MapData, FlowKey, FlowStats>,
    /// Serving ports, seeded at attach.
    pub listen: HashMap<MapData, ListenKey, u8>,
    pub losses: PerCpuArray<MapData, u64>,
    /// DNS answers.
    pub dns: RingBuf<MapData>,
    /// The fold iterators: run them before reading `flows`.
    pub fold: Folder,
    /// The drain's epoch and overflow flag, and the ring the changed flows' keys come out on.
    pub drain: Array<MapData, u64>,
    pub changed: RingBuf<MapData>,
}

/// What the size of [`DnsEvent`] says about a ring buffer item: whole, or cut short.
pub fn dns_event(item: &[u8]) -> Option<DnsEvent> {
    if item.len() < size_of::<DnsEvent>() {
        return None;
    }
    // SAFETY: the kernel wrote a whole DnsEvent (plain old data); read it unaligned from the ring.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) })
}

/// Loads the object (its maps pinned under `pins` when given: reopened if an earlier capture
/// pinned them), configures it, loads every program, and takes the maps.
/// With `per_socket`, established connections count in their sockets (see
/// [`names::PER_SOCKET_COUNTS`]): the caller must then fold before every read of `flows`.
pub fn load(max_flows: u32, pins: Option<&Pins>, per_socket: bool) -> Result<(Ebpf, Maps)> {
    raise_memlock_limit();
    let map_pins: Vec<(&str, std::path::PathBuf)> = match pins {
        Some(p) => names::MAPS.iter().map(|m| (*m, p.map(m))).collect(),
        None => Vec::new(),
    };
    let per_socket = per_socket as u8;
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(names::FLOWS, max_flows.max(1));
    loader.map_max_entries(names::CHANGED_FLOWS, ring_bytes(max_flows));
    loader.override_global(names::PER_SOCKET_COUNTS, &per_socket, true);
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf =
        loader.load(EBPF_OBJECT).context("loading the eBPF object (are you root, with BPF enabled in this kernel?)")?;
    for (name, _) in SKB_PROGRAMS {
        let prog: &mut CgroupSkb = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("loading program {name} (the kernel's verifier log says why)"))?;
    }
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSock = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("loading program {name}"))?;
    }
    for name in BIND_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("loading program {name}"))?;
    }
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux), needed by iterators")?;
    for (name, iterates) in names::FOLDS {
        let prog: &mut Iter = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load(iterates, &btf).with_context(|| format!("loading program {name}"))?;
    }
    let fold = {
        let programs = names::FOLDS.iter().map(|(name, _)| -> Result<_> {
            let prog: &Iter = ebpf.program(name).context(*name)?.try_into()?;
            Ok(prog.fd()?.as_fd())
        });
        Folder::new(programs.collect::<Result<Vec<_>>>()?)?
    };
    let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} in the eBPF object"));
    let maps = Maps {
        audited: HashMap::try_from(take(names::AUDITED)?)?,
        flows: HashMap::try_from(take(names::FLOWS)?)?,
        listen: HashMap::try_from(take(names::LISTEN)?)?,
        losses: PerCpuArray::try_from(take(names::LOSSES)?)?,
        dns: RingBuf::try_from(take(names::DNS)?)?,
        fold,
        drain: Array::try_from(take(names::DRAIN)?)?,
        changed: RingBuf::try_from(take(names::CHANGED_FLOWS)?)?,
    };
    Ok((ebpf, maps))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it where allowed.
fn raise_memlock_limit() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: valid pointer; failure only matters on old kernels and is reported by the load.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

/// Whether this process can load BPF programs here (root / CAP_BPF and a cgroup v2 mount).
pub fn preflight() -> Result<()> {
    super::cgroup::cgroup2_mount()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "netaudit must run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load cgroup eBPF programs"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names userspace looks maps and programs up by are the object's own (no root needed
    /// to parse it), and the floor program is only in its own object.
    #[test]
    fn the_object_has_every_named_map_and_program() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        for m in names::MAPS.into_iter().chain(names::DRAIN_MAPS) {
            assert!(object.maps.contains_key(m), "map {m}: {:?}", object.maps.keys().collect::<Vec<_>>());
        }
        let programs: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        for p in SKB_PROGRAMS
            .map(|(n, _)| n)
            .into_iter()
            .chain(SOCK_PROGRAMS)
            .chain(BIND_PROGRAMS)
            .chain(names::FOLDS.map(|(n, _)| n))
        {
            assert!(programs.contains(&p), "program {p}: {programs:?}");
        }
        let floor = aya_obj::Object::parse(FLOOR_OBJECT).unwrap();
        for p in names::FLOOR {
            assert!(!programs.contains(&p));
            assert!(floor.programs.contains_key(p));
        }
    }
}
