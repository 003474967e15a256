//! Capture: load the kernel programs, attach them to the audited cgroups, and turn what they
//! aggregate (flow map, DNS ring buffer, loss counters) into the flow model.

pub mod cgroup;
pub mod dns;
pub mod sockets;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        cgroup_skb::CgroupSkbLinkId,
        cgroup_sock::CgroupSockLinkId,
        links::{FdLink, PinnedLink},
    },
};
use netaudit_ebpf::{
    DnsEvent, FAMILY_V4, FlowKey, FlowStats, INITIATOR_LOCAL, LAYOUT_VERSION, ListenKey, config, loss,
};

pub use self::dns::DnsNames;
use crate::model::{Direction, Endpoint, FLOW_FILE_VERSION, Flow, FlowFile, Losses, Protocol, Source, Window};

/// The kernel object built by build.rs from `netaudit-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netaudit-ebpf"));

/// The programs a capture loads and attaches: packet accounting per direction, and the bind hooks
/// that learn UDP server ports.
const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] =
    [("netaudit_egress", CgroupSkbAttachType::Egress), ("netaudit_ingress", CgroupSkbAttachType::Ingress)];
const BIND_PROGRAMS: [&str; 2] = ["netaudit_bind4", "netaudit_bind6"];

/// Default capacity of the in-kernel flow map.
pub const DEFAULT_MAX_FLOWS: u32 = 65536;

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// cgroup v2 directories to audit (not nested in one another).
    pub cgroups: Vec<PathBuf>,
    /// Capacity of the in-kernel flow map; new flows beyond it are counted as lost.
    pub max_flows: u32,
    /// Survive the recorder's death: see [`Persist`].
    pub persist: Option<Persist>,
}

impl CaptureConfig {
    pub fn new(cgroups: Vec<PathBuf>) -> Self {
        CaptureConfig { cgroups, max_flows: DEFAULT_MAX_FLOWS, persist: None }
    }
}

/// Where a capture keeps what must outlive its process. Maps and links are pinned under
/// `pin_dir/v<LAYOUT_VERSION>/` (on a bpffs): the programs stay attached and keep counting while
/// no recorder runs, and the next capture with the same directories reopens them instead of
/// attaching twice. DNS names and the window's start go to `state_dir` (a node-local directory).
/// A clean [`Capture::stop`] removes both; a killed recorder leaves them for the next one.
#[derive(Clone, Debug)]
pub struct Persist {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

/// The maps a persistent capture pins (all of the object's).
const MAPS: [&str; 7] = ["AUDITED", "FLOWS", "LISTEN", "LOSSES", "CONFIG", "DNS", "SOCKS"];
/// The capture's file in the state directory.
const STATE_FILE: &str = "capture-state.json";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A running capture. Dropping it detaches every program it attached without pinning.
pub struct Capture {
    ebpf: Ebpf,
    /// Every cgroup audited during this capture (also those detached since: their flows stay).
    sources: Vec<Source>,
    /// The cgroups audited now, by cgroup id.
    attached: BTreeMap<u64, Attached>,
    dns: DnsNames,
    started: SystemTime,
    persisted: Option<Persisted>,
    ephemeral: (u16, u16),
    mount: PathBuf,
}

/// One audited cgroup's links: owned by the programs, or pinned (persistent captures).
struct Attached {
    dir: PathBuf,
    skb: Vec<(&'static str, CgroupSkbLinkId)>,
    sock: Vec<(&'static str, CgroupSockLinkId)>,
    pinned: Vec<PathBuf>,
}

struct Persisted {
    /// `pin_dir/v<LAYOUT_VERSION>`.
    pins: PathBuf,
    state_file: PathBuf,
    /// The sizes (DNS names, sources) last written to the state file (written again only on
    /// change).
    saved: Option<(usize, usize)>,
}

/// DNS names and the window's start, kept across recorder restarts.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedState {
    started: String,
    names: DnsNames,
    /// Every cgroup audited so far, so flows of one that went while no recorder ran keep their
    /// name.
    #[serde(default)]
    sources: Vec<Source>,
}

/// Counts for a progress line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub flows: usize,
    pub losses: Losses,
}

impl Capture {
    /// Loads the programs and attaches them to every cgroup in `config`.
    pub fn start(config: &CaptureConfig) -> Result<Capture> {
        let mount = cgroup::cgroup2_mount()?;
        let dirs = config.cgroups.iter().map(|d| cgroup::validate(d, &mount)).collect::<Result<Vec<_>>>()?;
        cgroup::reject_nesting(&dirs)?;
        raise_memlock_limit();

        let mut started = SystemTime::now();
        let mut dns = DnsNames::default();
        let mut sources = Vec::new();
        let persisted = match &config.persist {
            None => None,
            Some(p) => {
                let pins = p.pin_dir.join(format!("v{LAYOUT_VERSION}"));
                check_bpffs(&p.pin_dir)?;
                for d in [pins.join("maps"), pins.join("links")] {
                    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                }
                std::fs::create_dir_all(&p.state_dir).with_context(|| format!("creating {}", p.state_dir.display()))?;
                let state_file = p.state_dir.join(STATE_FILE);
                if let Ok(text) = std::fs::read_to_string(&state_file) {
                    let saved: SavedState = serde_json::from_str(&text).with_context(|| {
                        format!("{}: not a netaudit capture state; remove it", state_file.display())
                    })?;
                    started = humantime::parse_rfc3339(&saved.started).unwrap_or(started);
                    dns = saved.names;
                    sources = saved.sources;
                    tracing::info!("resuming the capture pinned in {}", pins.display());
                }
                Some(Persisted { pins, state_file, saved: None })
            }
        };
        let map_pins: Vec<(&str, PathBuf)> = match &persisted {
            Some(p) => MAPS.iter().map(|m| (*m, p.pins.join("maps").join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("FLOWS", config.max_flows.max(1));
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, with BPF enabled in this kernel?)")?;

        let ephemeral = sockets::ephemeral_range();
        {
            let mut cfg: Array<_, u32> = Array::try_from(ebpf.map_mut("CONFIG").context("map CONFIG")?)?;
            cfg.set(config::EPHEMERAL_LOW, ephemeral.0 as u32, 0)?;
            cfg.set(config::EPHEMERAL_HIGH, ephemeral.1 as u32, 0)?;
        }

        for (name, _) in SKB_PROGRAMS {
            let prog: &mut CgroupSkb = ebpf.program_mut(name).context(name)?.try_into()?;
            prog.load().with_context(|| format!("loading program {name} (the kernel's verifier log says why)"))?;
        }
        for name in BIND_PROGRAMS {
            let prog: &mut CgroupSock = ebpf.program_mut(name).context(name)?.try_into()?;
            prog.load().with_context(|| format!("loading program {name}"))?;
        }
        let mut capture =
            Capture { ebpf, sources, attached: BTreeMap::new(), dns, started, persisted, ephemeral, mount };
        for dir in &dirs {
            capture.add_cgroup(dir)?;
        }
        capture.save_state()?;
        Ok(capture)
    }

    /// Starts auditing one more cgroup (a pod that just started): marks it audited, seeds its
    /// serving ports from a socket snapshot, and attaches the programs (pinned when persistent;
    /// a link an earlier run pinned is taken over, not attached twice).
    pub fn add_cgroup(&mut self, dir: &std::path::Path) -> Result<Source> {
        let dir = cgroup::validate(dir, &self.mount)?;
        let mut all: Vec<PathBuf> = self.attached.values().map(|a| a.dir.clone()).collect();
        all.push(dir.clone());
        cgroup::reject_nesting(&all)?;
        let id = cgroup::cgroup_id(&dir)?;
        let source = Source { cgroup: dir.display().to_string(), cgroup_id: id };
        if self.attached.contains_key(&id) {
            return Ok(source);
        }
        let mut audited: HashMap<_, u64, u8> = HashMap::try_from(self.ebpf.map_mut("AUDITED").context("map AUDITED")?)?;
        audited.insert(id, 1, 0)?;
        // Seed the serving ports before attaching, so the first packet of a connection that is
        // already open is classified right.
        let mut listen: HashMap<_, ListenKey, u8> =
            HashMap::try_from(self.ebpf.map_mut("LISTEN").context("map LISTEN")?)?;
        let serving = sockets::serving_ports(&cgroup::pids_under(&dir), self.ephemeral);
        if !serving.unreadable.is_empty() {
            tracing::warn!(
                "cannot read the sockets of process(es) {} in {} (they belong to another user: reading them \
                 needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH); connections they opened before recording may be \
                 recorded with the wrong initiator",
                serving.unreadable.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
                dir.display()
            );
        }
        for (protocol, port) in serving.ports {
            listen.insert(ListenKey { cgroup_id: id, port, protocol, _pad: [0; 5] }, 1, 0)?;
        }
        let cg = File::open(&dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
        let mut links = Attached { dir: dir.clone(), skb: Vec::new(), sock: Vec::new(), pinned: Vec::new() };
        for (name, attach) in SKB_PROGRAMS {
            let pin = self.link_pin(id, name);
            if pin.as_ref().is_some_and(|l| l.exists()) {
                // Still attached by an earlier run: its program keeps counting into the same maps.
                links.pinned.push(pin.expect("pinned"));
                continue;
            }
            let prog: &mut CgroupSkb = self.ebpf.program_mut(name).context(name)?.try_into()?;
            // Single: cgroup links are multi-attach anyway; AllowMultiple fails on the link path.
            let link = prog
                .attach(&cg, attach, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", dir.display()))?;
            match pin {
                Some(path) => {
                    let fd: FdLink = prog.take_link(link)?.try_into()?;
                    fd.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
                    links.pinned.push(path);
                }
                None => links.skb.push((name, link)),
            }
        }
        for name in BIND_PROGRAMS {
            let pin = self.link_pin(id, name);
            if pin.as_ref().is_some_and(|l| l.exists()) {
                links.pinned.push(pin.expect("pinned"));
                continue;
            }
            let prog: &mut CgroupSock = self.ebpf.program_mut(name).context(name)?.try_into()?;
            let link = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", dir.display()))?;
            match pin {
                Some(path) => {
                    let fd: FdLink = prog.take_link(link)?.try_into()?;
                    fd.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
                    links.pinned.push(path);
                }
                None => links.sock.push((name, link)),
            }
        }
        tracing::debug!(cgroup = %dir.display(), id, "attached");
        self.attached.insert(id, links);
        if !self.sources.iter().any(|s| s.cgroup_id == id) {
            self.sources.push(source.clone());
        }
        self.save_state()?;
        Ok(source)
    }

    /// Stops auditing a cgroup (its pod went away): detaches the programs and unpins their
    /// links. The flows already recorded for it stay in the report.
    pub fn remove_cgroup(&mut self, dir: &std::path::Path) -> Result<()> {
        let Some((&id, _)) = self.attached.iter().find(|(_, a)| a.dir == dir) else { return Ok(()) };
        let links = self.attached.remove(&id).expect("found");
        for (name, link) in links.skb {
            let prog: &mut CgroupSkb = self.ebpf.program_mut(name).context(name)?.try_into()?;
            prog.detach(link).with_context(|| format!("detaching {name} from {}", dir.display()))?;
        }
        for (name, link) in links.sock {
            let prog: &mut CgroupSock = self.ebpf.program_mut(name).context(name)?.try_into()?;
            prog.detach(link).with_context(|| format!("detaching {name} from {}", dir.display()))?;
        }
        unpin_links(&links.pinned)?;
        let mut audited: HashMap<_, u64, u8> = HashMap::try_from(self.ebpf.map_mut("AUDITED").context("map AUDITED")?)?;
        let _ = audited.remove(&id);
        Ok(())
    }

    /// Detaches what an earlier run pinned for cgroups this run does not audit (their pods went
    /// while no agent ran). Call it once the cgroups to audit have been added. Returns the
    /// cgroup ids released.
    pub fn prune_pins(&mut self) -> Result<Vec<u64>> {
        let Some(p) = &self.persisted else { return Ok(Vec::new()) };
        let mut stale: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
        for entry in std::fs::read_dir(p.pins.join("links"))?.flatten() {
            let name = entry.file_name();
            let id = name.to_str().and_then(|n| n.split('-').next()).and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id.filter(|id| !self.attached.contains_key(id)) {
                stale.entry(id).or_default().push(entry.path());
            }
        }
        let mut audited: HashMap<_, u64, u8> = HashMap::try_from(self.ebpf.map_mut("AUDITED").context("map AUDITED")?)?;
        for (id, links) in &stale {
            unpin_links(links)?;
            let _ = audited.remove(id);
        }
        Ok(stale.into_keys().collect())
    }

    fn link_pin(&self, cgroup_id: u64, program: &str) -> Option<PathBuf> {
        self.persisted.as_ref().map(|p| p.pins.join("links").join(format!("{cgroup_id}-{program}")))
    }

    /// The cgroups currently audited.
    pub fn attached(&self) -> Vec<PathBuf> {
        self.attached.values().map(|a| a.dir.clone()).collect()
    }

    /// The audited cgroups.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Drains the DNS ring buffer. Call it regularly so answers do not pile up and get dropped.
    pub fn poll(&mut self) -> Result<()> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut("DNS").context("map DNS")?)?;
        while let Some(item) = ring.next() {
            if item.len() < size_of::<DnsEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole DnsEvent; read it unaligned from the ring.
            let event: DnsEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let len = (event.len as usize).min(event.data.len());
            self.dns.add_message(&event.data[..len]);
        }
        self.save_state()
    }

    /// Writes the DNS names, the audited cgroups and the window's start to the state file when
    /// they changed.
    fn save_state(&mut self) -> Result<()> {
        let Some(p) = &mut self.persisted else { return Ok(()) };
        let size = (self.dns.len(), self.sources.len());
        if p.saved == Some(size) {
            return Ok(());
        }
        let state =
            SavedState { started: rfc3339(self.started), names: self.dns.clone(), sources: self.sources.clone() };
        crate::output::write_atomically(&p.state_file, &serde_json::to_string(&state)?)?;
        p.saved = Some(size);
        Ok(())
    }

    pub fn progress(&self) -> Result<Progress> {
        let flows =
            HashMap::<_, FlowKey, FlowStats>::try_from(self.ebpf.map("FLOWS").context("map FLOWS")?)?.keys().count();
        Ok(Progress { flows, losses: self.losses()? })
    }

    fn losses(&self) -> Result<Losses> {
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("LOSSES").context("map LOSSES")?)?;
        let sum = |slot: u32| -> Result<u64> { Ok(counters.get(&slot, 0)?.iter().sum()) };
        Ok(Losses {
            flows: sum(loss::FLOWS)?,
            packets: sum(loss::PACKETS)?,
            bytes: sum(loss::BYTES)?,
            dns_events: sum(loss::DNS_EVENTS)?,
            unparsed_packets: sum(loss::UNPARSED_PACKETS)?,
        })
    }

    /// The flows recorded so far, as a flow file.
    pub fn snapshot(&mut self) -> Result<FlowFile> {
        self.poll()?;
        let flows_map: HashMap<&MapData, FlowKey, FlowStats> =
            HashMap::try_from(self.ebpf.map("FLOWS").context("map FLOWS")?)?;
        let clock = Clock::now();
        let by_id: BTreeMap<u64, &str> = self.sources.iter().map(|s| (s.cgroup_id, s.cgroup.as_str())).collect();
        let mut flows = Vec::new();
        for entry in flows_map.iter() {
            // An entry deleted while iterating is skipped; the map is never shrunk while recording.
            let Ok((key, stats)) = entry else { continue };
            flows.push(to_flow(&key, &stats, &clock, &self.dns, by_id.get(&key.cgroup_id).copied()));
        }
        merge_internal(&mut flows);
        flows.sort_by(|a, b| flow_order(a).cmp(&flow_order(b)));
        Ok(FlowFile {
            version: FLOW_FILE_VERSION,
            window: Some(Window { start: rfc3339(self.started), end: rfc3339(SystemTime::now()) }),
            sources: self.sources.clone(),
            losses: self.losses()?,
            flows,
        })
    }

    /// Takes the final snapshot and detaches; a persistent capture also removes its pins and state.
    pub fn stop(mut self) -> Result<FlowFile> {
        let file = self.snapshot()?;
        if let Some(p) = self.persisted.take() {
            for a in self.attached.values() {
                unpin_links(&a.pinned)?;
            }
            remove_maps_and_state(&p.pins, &p.state_file);
        }
        drop(self);
        Ok(file)
    }

    /// Ends this process's part and leaves the recording running: a persistent capture's pinned
    /// links keep counting into the pinned maps until the next capture (an upgraded agent)
    /// resumes them. Without persistence this is [`Capture::stop`] minus the snapshot.
    pub fn suspend(&mut self) -> Result<()> {
        self.poll()?;
        if let Some(p) = &self.persisted {
            tracing::info!("leaving the capture pinned in {} for the next run", p.pins.display());
        }
        Ok(())
    }

    /// Removes what persistent captures left behind (uninstalling): unpinning the links detaches
    /// their programs; the maps and the state go too.
    pub fn remove_persisted(persist: &Persist) -> Result<()> {
        let pins = persist.pin_dir.join(format!("v{LAYOUT_VERSION}"));
        let links: Vec<PathBuf> = match std::fs::read_dir(pins.join("links")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        unpin_links(&links)?;
        remove_maps_and_state(&pins, &persist.state_dir.join(STATE_FILE));
        Ok(())
    }

    /// Kernel run statistics per attached program: (name, total run time, runs). Counted only
    /// while BPF stats are enabled (`aya::sys::enable_stats` or kernel.bpf_stats_enabled).
    pub fn program_stats(&self) -> Result<Vec<(&'static str, Duration, u64)>> {
        SKB_PROGRAMS
            .iter()
            .map(|&(name, _)| name)
            .chain(BIND_PROGRAMS)
            .map(|name| {
                let info = self.ebpf.program(name).context(name)?.info()?;
                Ok((name, info.run_time(), info.run_count()))
            })
            .collect()
    }
}

/// Removes a persistent capture's pinned maps, its (by then empty) pin directories and its state
/// file; the links are unpinned first by the caller.
fn remove_maps_and_state(pins: &std::path::Path, state_file: &std::path::Path) {
    for m in MAPS {
        let _ = std::fs::remove_file(pins.join("maps").join(m));
    }
    for d in [pins.join("maps"), pins.join("links"), pins.to_path_buf()] {
        let _ = std::fs::remove_dir(d);
    }
    let _ = std::fs::remove_file(state_file);
}

/// Unpinning a pinned link and dropping it detaches its program.
fn unpin_links(paths: &[PathBuf]) -> Result<()> {
    for link in paths {
        let pinned = PinnedLink::from_pin(link).with_context(|| format!("opening {}", link.display()))?;
        drop(pinned.unpin().with_context(|| format!("unpinning {}", link.display()))?);
    }
    Ok(())
}

/// Pins must live on a bpffs; say how to get one rather than failing in the middle of a pin.
pub fn check_bpffs(dir: &std::path::Path) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).context("pin directory path")?;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a struct we own for statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        anyhow::bail!("pin directory {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        anyhow::bail!(
            "pin directory {} is not on a bpffs: mount one (`mount -t bpf bpf /sys/fs/bpf`) and pin below it",
            dir.display()
        );
    }
    Ok(())
}

/// A connection between two sockets of one audited cgroup passes its egress hook at the client
/// and its ingress hook at the server, so it is recorded twice: once as the client's egress flow
/// and once as the server's ingress flow, with the same initiator address and service endpoint.
/// Keep the client's, mark it internal.
fn merge_internal(flows: &mut Vec<Flow>) {
    let conn = |f: &Flow| (f.cgroup.clone(), f.protocol, f.src.ip, f.dst.ip, f.dst.port);
    let egress: std::collections::HashSet<_> =
        flows.iter().filter(|f| f.direction == Some(Direction::Egress)).map(conn).collect();
    let ingress: std::collections::HashSet<_> =
        flows.iter().filter(|f| f.direction == Some(Direction::Ingress)).map(conn).collect();
    flows.retain(|f| f.direction != Some(Direction::Ingress) || !egress.contains(&conn(f)));
    // Only a client's flow with a server-side twin is internal; an ingress flow from outside
    // the cgroup has no egress twin and stays as it is.
    for f in flows.iter_mut() {
        if f.direction == Some(Direction::Egress) && ingress.contains(&conn(f)) {
            f.internal = true;
        }
    }
}

fn flow_order(f: &Flow) -> impl Ord + '_ {
    (&f.cgroup, f.direction, f.protocol, &f.dst.ip, f.dst.port, &f.src.ip)
}

fn to_flow(key: &FlowKey, stats: &FlowStats, clock: &Clock, dns: &DnsNames, cgroup: Option<&str>) -> Flow {
    let ip = |bytes: &[u8; 16]| -> IpAddr {
        if key.family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*bytes))
        }
    };
    let protocol = Protocol::from_number(key.protocol);
    let service_port = (protocol.has_ports() && key.service_port != 0).then_some(key.service_port);
    let endpoint =
        |addr: IpAddr, port: Option<u16>| Endpoint { ip: addr, port, names: dns.names_of(&addr), identity: None };
    let local = ip(&key.local_addr);
    let remote = ip(&key.remote_addr);
    let outbound = key.initiator == INITIATOR_LOCAL;
    let (src, dst, direction) = if outbound {
        (endpoint(local, None), endpoint(remote, service_port), Direction::Egress)
    } else {
        (endpoint(remote, None), endpoint(local, service_port), Direction::Ingress)
    };
    let (ps, bs, pd, bd) = if outbound {
        (stats.packets_out, stats.bytes_out, stats.packets_in, stats.bytes_in)
    } else {
        (stats.packets_in, stats.bytes_in, stats.packets_out, stats.bytes_out)
    };
    Flow {
        protocol,
        src,
        dst,
        direction: Some(direction),
        packets: ps + pd,
        bytes: bs + bd,
        packets_from_src: ps,
        bytes_from_src: bs,
        packets_from_dst: pd,
        bytes_from_dst: bd,
        connections: stats.connections,
        first_seen: Some(rfc3339(clock.wall(stats.first_ns))),
        last_seen: Some(rfc3339(clock.wall(stats.last_ns))),
        cgroup: cgroup.map(str::to_string),
        internal: false,
    }
}

/// Converts the kernel's CLOCK_MONOTONIC nanoseconds to wall-clock time.
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn now() -> Self {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock { wall: SystemTime::now(), mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 }
    }

    fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns <= self.mono_ns {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it where allowed.
fn raise_memlock_limit() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: valid pointer; failure only matters on old kernels and is reported by the load.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

/// Whether this process can load BPF programs here (root / CAP_BPF and a cgroup v2 mount).
pub fn preflight() -> Result<()> {
    cgroup::cgroup2_mount()?;
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

    fn flow(direction: Direction, src: &str, dst: &str, port: u16) -> Flow {
        Flow::new(Protocol::Tcp, src.parse().unwrap(), dst.parse().unwrap(), Some(port))
            .with_direction(direction)
            .with_traffic((1, 1), (0, 0))
            .with_connections(1)
            .in_cgroup("/cg")
    }

    #[test]
    fn only_connections_seen_from_both_ends_are_internal() {
        let mut flows = vec![
            // Loopback inside the pod: the client's egress and the server's ingress record.
            flow(Direction::Egress, "127.0.0.1", "127.0.0.1", 8080),
            flow(Direction::Ingress, "127.0.0.1", "127.0.0.1", 8080),
            // A real client outside the pod, and a real egress.
            flow(Direction::Ingress, "192.0.2.30", "192.0.2.5", 8080),
            flow(Direction::Egress, "192.0.2.5", "192.0.2.2", 6443),
        ];
        merge_internal(&mut flows);
        let got: Vec<_> = flows.iter().map(|f| (f.direction, f.src.ip.to_string(), f.internal)).collect();
        assert_eq!(
            got,
            [
                (Some(Direction::Egress), "127.0.0.1".to_string(), true),
                (Some(Direction::Ingress), "192.0.2.30".to_string(), false),
                (Some(Direction::Egress), "192.0.2.5".to_string(), false),
            ]
        );
    }
}
