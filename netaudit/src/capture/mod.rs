//! Capture: load the kernel programs, attach them to the audited cgroups, and turn what they
//! aggregate (flow map, DNS ring buffer, loss counters) into the flow model.

pub mod cgroup;
pub mod decode;
pub mod dns;
pub mod drain;
pub mod fold;
pub mod loader;
pub mod pins;
pub mod sockets;
pub mod sys;

use std::{
    collections::BTreeMap,
    fs::File,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSock, CgroupSockAddr, cgroup_skb::CgroupSkbLinkId,
        cgroup_sock::CgroupSockLinkId, cgroup_sock_addr::CgroupSockAddrLinkId, links::FdLink,
    },
};
use netaudit_ebpf::{ListenKey, capacity, loss};

use self::{
    decode::Clock,
    loader::{BIND_PROGRAMS, Maps, SKB_PROGRAMS, SOCK_PROGRAMS},
    pins::{Pins, SavedState, unpin_links},
};
pub use self::{
    decode::rfc3339,
    dns::DnsNames,
    loader::{EBPF_OBJECT, FLOOR_OBJECT, preflight},
    pins::check_bpffs,
};
use crate::model::{FLOW_FILE_VERSION, FlowFile, Losses, Source, Timestamp, Window};

/// Default capacity of the in-kernel flow map.
pub const DEFAULT_MAX_FLOWS: u32 = capacity::FLOWS;

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

/// A running capture. Dropping it detaches every program it attached without pinning.
pub struct Capture {
    ebpf: Ebpf,
    maps: Maps,
    /// Every cgroup audited during this capture (also those detached since: their flows stay).
    sources: Vec<Source>,
    /// The cgroups audited now, by cgroup id.
    attached: BTreeMap<u64, Attached>,
    dns: DnsNames,
    started: SystemTime,
    persisted: Option<Persisted>,
    ephemeral: (u16, u16),
    mount: PathBuf,
    /// Whether connections count in their sockets (then every read of FLOWS folds first).
    per_socket: bool,
    /// FLOWS as of the last drain, and its flows.
    mirror: drain::Mirror,
    decoded: decode::Decoded,
    /// Snapshots taken.
    snapshots: u64,
}

/// One audited cgroup's links: owned by the programs, or pinned (persistent captures).
struct Attached {
    dir: PathBuf,
    skb: Vec<(&'static str, CgroupSkbLinkId)>,
    sock: Vec<(&'static str, CgroupSockLinkId)>,
    bind: Vec<(&'static str, CgroupSockAddrLinkId)>,
    pinned: Vec<PathBuf>,
}

struct Persisted {
    pins: Pins,
    /// The sizes (DNS names, sources) last written to the state file (written again only on
    /// change).
    saved: Option<(usize, usize)>,
}

/// Which flows of a snapshot changed since the capture's snapshot before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    /// The snapshot's number in this capture (from 1).
    pub seq: u64,
    /// Indexes into the snapshot's flows of those that changed; None: any may have.
    pub flows: Option<Vec<usize>>,
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

        let mut started = SystemTime::now();
        let mut dns = DnsNames::default();
        let mut sources = Vec::new();
        let persisted = match &config.persist {
            None => None,
            Some(p) => {
                let pins = Pins::new(p);
                pins.create()?;
                if let Some(saved) = pins.read_state()? {
                    started = saved.started.parse::<Timestamp>().map_or(started, |t| t.0);
                    dns = saved.names;
                    sources = saved.sources;
                    tracing::info!("resuming the capture pinned in {}", pins.root().display());
                }
                Some(Persisted { pins, saved: None })
            }
        };
        let ephemeral = sockets::ephemeral_range();
        let per_socket = fold::can_enter_namespaces();
        if !per_socket {
            tracing::info!(
                "counting every packet in the flow map: counting per socket needs the fold to enter the pods' \
                 network namespaces (CAP_SYS_ADMIN)"
            );
        }
        let (ebpf, maps) = loader::load(config.max_flows, persisted.as_ref().map(|p| &p.pins), per_socket)?;
        let mut capture = Capture {
            ebpf,
            maps,
            sources,
            attached: BTreeMap::new(),
            dns,
            started,
            persisted,
            ephemeral,
            mount,
            per_socket,
            mirror: drain::Mirror::default(),
            decoded: decode::Decoded::default(),
            snapshots: 0,
        };
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
        self.maps.audited.insert(id, 1, 0)?;
        // Seed the serving ports before attaching, so the first packet of a connection that is
        // already open is classified right.
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
            self.maps.listen.insert(ListenKey { cgroup_id: id, port, protocol, _pad: [0; 5] }, 1, 0)?;
        }
        let cg = File::open(&dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
        let mut links =
            Attached { dir: dir.clone(), skb: Vec::new(), sock: Vec::new(), bind: Vec::new(), pinned: Vec::new() };
        self.attach_programs(id, &cg, &mut links)?;
        tracing::debug!(cgroup = %dir.display(), id, "attached");
        self.attached.insert(id, links);
        if !self.sources.iter().any(|s| s.cgroup_id == id) {
            self.sources.push(source.clone());
        }
        self.save_state()?;
        Ok(source)
    }

    /// Attaches every program to the cgroup `cg` (id `id`), or keeps an earlier run's pinned
    /// links: those programs keep counting into the same maps.
    fn attach_programs(&mut self, id: u64, cg: &File, links: &mut Attached) -> Result<()> {
        let dir = links.dir.clone();
        let at = |name: &str| format!("attaching {name} to {}", dir.display());
        for (name, attach) in SKB_PROGRAMS {
            let Some(pin) = self.unpinned(id, name, links) else { continue };
            let prog: &mut CgroupSkb = self.ebpf.program_mut(name).context(name)?.try_into()?;
            // Single: cgroup links are multi-attach anyway; AllowMultiple fails on the link path.
            let link = prog.attach(cg, attach, CgroupAttachMode::Single).with_context(|| at(name))?;
            match pin {
                Some(path) => links.pinned.push(pin_link(prog.take_link(link)?.try_into()?, path)?),
                None => links.skb.push((name, link)),
            }
        }
        for name in SOCK_PROGRAMS {
            let Some(pin) = self.unpinned(id, name, links) else { continue };
            let prog: &mut CgroupSock = self.ebpf.program_mut(name).context(name)?.try_into()?;
            let link = prog.attach(cg, CgroupAttachMode::Single).with_context(|| at(name))?;
            match pin {
                Some(path) => links.pinned.push(pin_link(prog.take_link(link)?.try_into()?, path)?),
                None => links.sock.push((name, link)),
            }
        }
        for name in BIND_PROGRAMS {
            let Some(pin) = self.unpinned(id, name, links) else { continue };
            let prog: &mut CgroupSockAddr = self.ebpf.program_mut(name).context(name)?.try_into()?;
            let link = prog.attach(cg, CgroupAttachMode::Single).with_context(|| at(name))?;
            match pin {
                Some(path) => links.pinned.push(pin_link(prog.take_link(link)?.try_into()?, path)?),
                None => links.bind.push((name, link)),
            }
        }
        Ok(())
    }

    /// None when `program` is still attached to cgroup `id` by an earlier run (its pinned link is
    /// kept in `links`); else where to pin its new link, if this capture pins.
    fn unpinned(&self, id: u64, program: &str, links: &mut Attached) -> Option<Option<PathBuf>> {
        let pin = self.link_pin(id, program);
        if let Some(path) = pin.as_ref().filter(|l| l.exists()) {
            links.pinned.push(path.clone());
            return None;
        }
        Some(pin)
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
        for (name, link) in links.bind {
            let prog: &mut CgroupSockAddr = self.ebpf.program_mut(name).context(name)?.try_into()?;
            prog.detach(link).with_context(|| format!("detaching {name} from {}", dir.display()))?;
        }
        unpin_links(&links.pinned)?;
        let _ = self.maps.audited.remove(&id);
        // Its sockets count no more packets; what they counted since the last drain goes to
        // FLOWS now, before a socket that closes later (no release hook any more) takes it away.
        if self.per_socket {
            self.maps.fold.run(&fold::network_namespaces([dir]))?;
        }
        Ok(())
    }

    /// Detaches what an earlier run pinned for cgroups this run does not audit (their pods went
    /// while no agent ran). Call it once the cgroups to audit have been added. Returns the
    /// cgroup ids released.
    pub fn prune_pins(&mut self) -> Result<Vec<u64>> {
        let Some(p) = &self.persisted else { return Ok(Vec::new()) };
        let stale = p.pins.links_except(|id| self.attached.contains_key(&id))?;
        for (id, links) in &stale {
            unpin_links(links)?;
            let _ = self.maps.audited.remove(id);
        }
        Ok(stale.into_keys().collect())
    }

    fn link_pin(&self, cgroup_id: u64, program: &str) -> Option<PathBuf> {
        self.persisted.as_ref().map(|p| p.pins.link(cgroup_id, program))
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
        while let Some(item) = self.maps.dns.next() {
            let Some(event) = loader::dns_event(&item) else { continue };
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
        p.pins.write_state(&state)?;
        p.saved = Some(size);
        Ok(())
    }

    pub fn progress(&self) -> Result<Progress> {
        let flows = self.maps.flows.keys().count();
        Ok(Progress { flows, losses: self.losses()? })
    }

    fn losses(&self) -> Result<Losses> {
        let sum = |slot: u32| -> Result<u64> { Ok(self.maps.losses.get(&slot, 0)?.iter().sum()) };
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
        Ok(self.snapshot_changed()?.0)
    }

    /// [`Capture::snapshot`], and which of its flows changed since the snapshot before.
    pub fn snapshot_changed(&mut self) -> Result<(FlowFile, Changed)> {
        self.poll()?;
        let by_id: BTreeMap<u64, Arc<str>> =
            self.sources.iter().map(|s| (s.cgroup_id, s.cgroup.as_str().into())).collect();
        if self.per_socket {
            let namespaces = fold::network_namespaces(self.attached.values().map(|a| a.dir.as_path()));
            self.maps.fold.run(&namespaces)?;
        }
        let maps =
            drain::DrainMaps { flows: &self.maps.flows, drain: &mut self.maps.drain, changed: &mut self.maps.changed };
        let changed = match self.mirror.drain(maps)? {
            drain::Drained::Whole => None,
            drain::Drained::Changed(changed) => Some(changed),
        };
        let losses = self.losses()?;
        let mirror = &self.mirror;
        let (flows, changed) =
            self.decoded.update(|| mirror.entries(), changed.as_deref(), &Clock::now(), &self.dns, &by_id);
        let file = FlowFile {
            version: FLOW_FILE_VERSION,
            window: Some(Window { start: rfc3339(self.started), end: rfc3339(SystemTime::now()) }),
            sources: self.sources.clone(),
            losses,
            flows: flows.to_vec(),
        };
        self.snapshots += 1;
        Ok((file, Changed { seq: self.snapshots, flows: changed }))
    }

    /// Takes the final snapshot and detaches; a persistent capture also removes its pins and state.
    pub fn stop(mut self) -> Result<FlowFile> {
        let file = self.snapshot()?;
        if let Some(p) = self.persisted.take() {
            for a in self.attached.values() {
                unpin_links(&a.pinned)?;
            }
            p.pins.remove_maps_and_state();
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
            tracing::info!("leaving the capture pinned in {} for the next run", p.pins.root().display());
        }
        Ok(())
    }

    /// Removes what persistent captures left behind (uninstalling): unpinning the links detaches
    /// their programs; the maps and the state go too.
    pub fn remove_persisted(persist: &Persist) -> Result<()> {
        let pins = Pins::new(persist);
        unpin_links(&pins.all_links())?;
        pins.remove_maps_and_state();
        Ok(())
    }

    /// Kernel run statistics per attached program: (name, total run time, runs). Counted only
    /// while BPF stats are enabled (`aya::sys::enable_stats` or kernel.bpf_stats_enabled).
    pub fn program_stats(&self) -> Result<Vec<(&'static str, Duration, u64)>> {
        SKB_PROGRAMS
            .iter()
            .map(|&(name, _)| name)
            .chain(SOCK_PROGRAMS)
            .chain(BIND_PROGRAMS)
            .map(|name| {
                let info = self.ebpf.program(name).context(name)?.info()?;
                Ok((name, info.run_time(), info.run_count()))
            })
            .collect()
    }
}

/// Pins a program's link at `path`, so it outlives this process; returns the path.
fn pin_link(link: FdLink, path: PathBuf) -> Result<PathBuf> {
    link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
    Ok(path)
}
