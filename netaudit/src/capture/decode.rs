//! Pure decoding: the kernel's flow keys and counters become flows (addresses by family, the
//! initiator's side as the direction, the monotonic clock as wall time, the DNS names), and a
//! connection recorded at both of its ends inside the audited cgroups becomes one internal flow.
//! No kernel and no root needed: unit-tested here.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use foldhash::{HashMap, HashSet};
use netaudit_ebpf::{Family, FlowKey, FlowStats, Initiator};

use super::DnsNames;
use crate::model::{Direction, Endpoint, Flow, Protocol, Timestamp};

/// The flows of `entries` (flow map keys and counters), internal connections merged, in a stable
/// order: by cgroup name, direction, protocol number, service address and port, client address.
/// `cgroups` names each audited cgroup id; entries with values this build does not know
/// (another layout) are skipped. A drain holds up to a full map, so the entries are merged and
/// sorted by their [`Shape`]s (integers), and only the flows kept are built, in their order.
pub fn flows<'a>(
    entries: impl IntoIterator<Item = (&'a FlowKey, &'a FlowStats)>,
    clock: &Clock,
    dns: &DnsNames,
    cgroups: &BTreeMap<u64, Arc<str>>,
) -> Vec<Flow> {
    let mut decoded = Decoded::default();
    decoded.decode_all(entries, clock, dns, &Ranks::of(cgroups));
    decoded.flows
}

/// Each audited cgroup's rank in name order, from 1 (0: not an audited cgroup), and its name.
struct Ranks<'c> {
    by_id: HashMap<u64, u32>,
    names: Vec<&'c Arc<str>>,
}

impl<'c> Ranks<'c> {
    fn of(cgroups: &'c BTreeMap<u64, Arc<str>>) -> Ranks<'c> {
        let mut names: Vec<(&Arc<str>, u64)> = cgroups.iter().map(|(id, name)| (name, *id)).collect();
        names.sort();
        let by_id = names.iter().zip(1..).map(|((_, id), rank)| (*id, rank)).collect();
        Ranks { by_id, names: names.into_iter().map(|(name, _)| name).collect() }
    }

    fn shape(&self, key: &FlowKey) -> Option<Shape> {
        Shape::of(key, self.by_id.get(&key.cgroup_id).copied().unwrap_or(0))
    }

    fn name(&self, s: &Shape) -> Option<&'c Arc<str>> {
        s.cgroup.checked_sub(1).map(|rank| self.names[rank as usize])
    }
}

/// The flows of the last drain, kept so the next drain's few changed entries update them in
/// place: a look at a full map with 1 % changed decodes 1 %, not the map.
#[derive(Default)]
pub struct Decoded {
    /// The flows' shapes, sorted; `flows[i]` is `shapes[i]`'s.
    shapes: Vec<Shape>,
    flows: Vec<Flow>,
    /// The connections recorded at both ends (see [`internal_connections`]).
    internal: HashSet<Shape>,
    basis: Option<Basis>,
}

/// What flows were decoded with: the audited cgroups (id, name) and how many DNS names were
/// known.
type Basis = (Vec<(u64, Arc<str>)>, usize);

impl Decoded {
    /// The flows after a drain, and the indexes of those that changed (None: any may have).
    /// `changed` are the entries that changed since the last call (None: every entry may have,
    /// decode `entries`, the whole map, again). Decodes everything also when the cgroups or
    /// the DNS names moved, or a change makes a connection internal.
    pub fn update<'a, I>(
        &mut self,
        entries: impl FnOnce() -> I,
        changed: Option<&[(FlowKey, FlowStats)]>,
        clock: &Clock,
        dns: &DnsNames,
        cgroups: &BTreeMap<u64, Arc<str>>,
    ) -> (&[Flow], Option<Vec<usize>>)
    where
        I: IntoIterator<Item = (&'a FlowKey, &'a FlowStats)>,
    {
        let ranks = Ranks::of(cgroups);
        let basis = Some((cgroups.iter().map(|(id, n)| (*id, n.clone())).collect(), dns.len()));
        let applied = changed.filter(|_| self.basis == basis).and_then(|c| self.apply(c, clock, dns, &ranks));
        if applied.is_none() {
            self.decode_all(entries(), clock, dns, &ranks);
        }
        self.basis = basis;
        let indexes = applied.map(|shapes| {
            let mut at: Vec<usize> = shapes.iter().filter_map(|s| self.shapes.binary_search(s).ok()).collect();
            at.sort_unstable();
            at.dedup();
            at
        });
        (&self.flows, indexes)
    }

    fn decode_all<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a FlowKey, &'a FlowStats)>,
        clock: &Clock,
        dns: &DnsNames,
        ranks: &Ranks<'_>,
    ) {
        // Sorted with their counters, so the flows are then built reading memory in order.
        let mut shapes: Vec<(Shape, FlowStats)> =
            entries.into_iter().filter_map(|(key, stats)| Some((ranks.shape(key)?, *stats))).collect();
        let internal = internal_connections(&shapes);
        shapes.retain(|(s, _)| s.direction != Initiator::Remote as u8 || !internal.contains(&s.connection()));
        shapes.sort_unstable_by_key(|(s, _)| *s);
        self.flows = shapes.iter().map(|(s, stats)| s.flow_of(stats, clock, dns, ranks, &internal)).collect();
        self.shapes = shapes.into_iter().map(|(s, _)| s).collect();
        self.internal = internal;
    }

    /// Applies changed entries in place; returns the shapes of the flows that changed. None when
    /// one cannot be applied (a new flow whose other end is known: a new internal connection; a
    /// shape two entries share): decode everything.
    fn apply(
        &mut self,
        changed: &[(FlowKey, FlowStats)],
        clock: &Clock,
        dns: &DnsNames,
        ranks: &Ranks<'_>,
    ) -> Option<Vec<Shape>> {
        let (mut new, mut touched) = (Vec::new(), Vec::new());
        for (key, stats) in changed {
            let Some(s) = ranks.shape(key) else { continue };
            if s.direction == Initiator::Remote as u8 && self.internal.contains(&s.connection()) {
                continue;
            }
            match self.shapes.binary_search(&s) {
                Ok(i) if self.shapes.get(i + 1) == Some(&s) || (i > 0 && self.shapes[i - 1] == s) => return None,
                Ok(i) => {
                    self.flows[i] = s.flow_of(stats, clock, dns, ranks, &self.internal);
                    touched.push(s);
                }
                Err(_) => new.push((s, *stats)),
            }
        }
        if new.is_empty() {
            return Some(touched);
        }
        let other_end = |s: &Shape| Shape { direction: s.direction ^ 1, ..*s };
        let new_shapes: HashSet<Shape> = new.iter().map(|(s, _)| *s).collect();
        let twinned =
            |s: &Shape| self.shapes.binary_search(&other_end(s)).is_ok() || new_shapes.contains(&other_end(s));
        if new_shapes.len() != new.len() || new.iter().any(|(s, _)| s.cgroup == 0 || twinned(s)) {
            return None;
        }
        new.sort_unstable_by_key(|(s, _)| *s);
        touched.extend(new.iter().map(|(s, _)| *s));
        self.merge(new, clock, dns, ranks);
        Some(touched)
    }

    /// Merges new flows (sorted, none known) into the sorted ones.
    fn merge(&mut self, new: Vec<(Shape, FlowStats)>, clock: &Clock, dns: &DnsNames, ranks: &Ranks<'_>) {
        let n = self.shapes.len() + new.len();
        let (mut shapes, mut flows) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut old = std::mem::take(&mut self.shapes).into_iter().zip(std::mem::take(&mut self.flows)).peekable();
        for (s, stats) in new {
            while let Some((o, f)) = old.next_if(|(o, _)| *o < s) {
                shapes.push(o);
                flows.push(f);
            }
            flows.push(s.flow_of(&stats, clock, dns, ranks, &self.internal));
            shapes.push(s);
        }
        for (o, f) in old {
            shapes.push(o);
            flows.push(f);
        }
        (self.shapes, self.flows) = (shapes, flows);
    }
}

/// A flow map key as integers, in the order flows sort (the fields' order) and without
/// allocating: enough to merge and sort a full map cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Shape {
    /// The cgroup's rank by name (0: not an audited cgroup).
    cgroup: u32,
    /// The initiator: 0 local (egress), 1 remote (ingress).
    direction: u8,
    protocol: u8,
    family: u8,
    /// The side that was connected to, its address as big-endian bytes (IPv4 in the first four).
    dst: u128,
    /// 0 where the protocol has no ports.
    service_port: u16,
    src: u128,
}

impl Shape {
    /// None when the key's family or initiator is not one this build knows.
    fn of(key: &FlowKey, cgroup: u32) -> Option<Shape> {
        Family::try_from(key.family).ok()?;
        let initiator = Initiator::try_from(key.initiator).ok()?;
        let (local, remote) = (u128::from_be_bytes(key.local_addr), u128::from_be_bytes(key.remote_addr));
        let (src, dst) = match initiator {
            Initiator::Local => (local, remote),
            Initiator::Remote => (remote, local),
        };
        let service_port = if Protocol::from_number(key.protocol).has_ports() { key.service_port } else { 0 };
        let (direction, protocol, family) = (initiator as u8, key.protocol, key.family);
        Some(Shape { cgroup, direction, protocol, family, dst, service_port, src })
    }

    /// The connection, the same whichever end recorded it.
    fn connection(&self) -> Shape {
        Shape { direction: 0, ..*self }
    }
}

/// One flow map entry as a flow; none when its family or initiator is not one this build knows.
pub fn to_flow(
    key: &FlowKey,
    stats: &FlowStats,
    clock: &Clock,
    dns: &DnsNames,
    cgroup: Option<&Arc<str>>,
) -> Option<Flow> {
    Some(Shape::of(key, 0)?.flow(stats, clock, dns, cgroup))
}

impl Shape {
    fn ip(&self, addr: u128) -> IpAddr {
        if self.family == Family::V4 as u8 {
            IpAddr::V4(Ipv4Addr::from((addr >> 96) as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(addr))
        }
    }

    /// The flow, marked internal when its connection is.
    fn flow_of(
        &self,
        stats: &FlowStats,
        clock: &Clock,
        dns: &DnsNames,
        ranks: &Ranks<'_>,
        internal: &HashSet<Shape>,
    ) -> Flow {
        let mut flow = self.flow(stats, clock, dns, ranks.name(self));
        flow.internal = internal.contains(&self.connection());
        flow
    }

    /// The flow, counted by `stats`, in `cgroup`.
    fn flow(&self, stats: &FlowStats, clock: &Clock, dns: &DnsNames, cgroup: Option<&Arc<str>>) -> Flow {
        let endpoint = |addr: u128, port: Option<u16>| {
            let ip = self.ip(addr);
            Endpoint { ip, port, names: dns.names_of(&ip), identity: None }
        };
        let service_port = (self.service_port != 0).then_some(self.service_port);
        let outbound = self.direction == Initiator::Local as u8;
        let (ps, bs, pd, bd) = if outbound {
            (stats.packets_out, stats.bytes_out, stats.packets_in, stats.bytes_in)
        } else {
            (stats.packets_in, stats.bytes_in, stats.packets_out, stats.bytes_out)
        };
        Flow {
            protocol: Protocol::from_number(self.protocol),
            src: endpoint(self.src, None),
            dst: endpoint(self.dst, service_port),
            direction: Some(if outbound { Direction::Egress } else { Direction::Ingress }),
            packets: ps + pd,
            bytes: bs + bd,
            packets_from_src: ps,
            bytes_from_src: bs,
            packets_from_dst: pd,
            bytes_from_dst: bd,
            connections: stats.connections,
            first_seen: Some(Timestamp(clock.wall(stats.first_ns))),
            last_seen: Some(Timestamp(clock.wall(stats.last_ns))),
            cgroup: cgroup.cloned(),
            internal: false,
        }
    }
}

/// A connection between two sockets of one audited cgroup passes its egress hook at the client
/// and its ingress hook at the server, so it is recorded twice: once as the client's egress flow
/// and once as the server's ingress flow, with the same initiator address and service endpoint.
/// Those connections: their client's flow is kept, marked internal, the server's dropped. An
/// ingress flow from outside the cgroup has no egress twin and stays as it is.
fn internal_connections(shapes: &[(Shape, FlowStats)]) -> HashSet<Shape> {
    let (egress, ingress): (Vec<&Shape>, Vec<&Shape>) =
        shapes.iter().map(|(s, _)| s).partition(|s| s.direction == Initiator::Local as u8);
    // Probe the larger side against a set of the smaller (usually the few inbound flows).
    let (small, large) = if egress.len() < ingress.len() { (egress, ingress) } else { (ingress, egress) };
    let small: HashSet<Shape> = small.iter().map(|s| s.connection()).collect();
    if small.is_empty() {
        return small;
    }
    large.iter().map(|s| s.connection()).filter(|c| small.contains(c)).collect()
}

/// Converts the kernel's CLOCK_MONOTONIC nanoseconds to wall-clock time.
pub struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock { wall: SystemTime::now(), mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns <= self.mono_ns {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        }
    }
}

/// `t` in the flow file's time format ([`Timestamp`]).
pub fn rfc3339(t: SystemTime) -> String {
    Timestamp(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use netaudit_ebpf::IPPROTO_TCP;

    use super::*;

    /// A v4 TCP key of cgroup 7: `initiator` local (egress) or remote (ingress), the service
    /// at `port`.
    fn tcp_key(initiator: Initiator, local: [u8; 4], remote: [u8; 4], port: u16) -> FlowKey {
        FlowKey { service_port: port, ..key(Family::V4 as u8, initiator as u8, v4(local), v4(remote)) }
    }

    #[test]
    fn only_connections_seen_from_both_ends_are_internal_and_flows_come_sorted() {
        let entries: Vec<_> = [
            // A real client outside the pod, and a real egress.
            tcp_key(Initiator::Remote, [192, 0, 2, 5], [192, 0, 2, 30], 8080),
            tcp_key(Initiator::Local, [192, 0, 2, 5], [192, 0, 2, 2], 6443),
            // Loopback inside the pod: the client's egress and the server's ingress record.
            tcp_key(Initiator::Local, [127, 0, 0, 1], [127, 0, 0, 1], 8080),
            tcp_key(Initiator::Remote, [127, 0, 0, 1], [127, 0, 0, 1], 8080),
        ]
        .into_iter()
        .map(|k| (k, FlowStats::default()))
        .collect();
        let clock = Clock { wall: SystemTime::UNIX_EPOCH, mono_ns: 0 };
        let cgroups = BTreeMap::from([(7, Arc::from("/cg"))]);
        let flows = flows(entries.iter().map(|(k, v)| (k, v)), &clock, &DnsNames::default(), &cgroups);
        let got: Vec<_> = flows.iter().map(|f| (f.direction, f.src.ip.to_string(), f.internal)).collect();
        assert_eq!(
            got,
            [
                (Some(Direction::Egress), "127.0.0.1".to_string(), true),
                (Some(Direction::Egress), "192.0.2.5".to_string(), false),
                (Some(Direction::Ingress), "192.0.2.30".to_string(), false),
            ]
        );
        assert!(flows.iter().all(|f| f.cgroup.as_deref() == Some("/cg")));
    }

    /// Updating the last drain's flows with the changed entries gives what decoding the whole
    /// map gives: counters grown, new flows in their place, a new internal connection.
    #[test]
    fn changes_applied_in_place_equal_a_whole_decode() {
        let clock = Clock { wall: SystemTime::UNIX_EPOCH, mono_ns: 0 };
        let (dns, cgroups) = (DnsNames::default(), BTreeMap::from([(7, Arc::from("/cg"))]));
        let stats = |n: u64| FlowStats { packets_out: n, bytes_out: 10 * n, ..FlowStats::default() };
        let mut map: BTreeMap<[u8; 4], (FlowKey, FlowStats)> = BTreeMap::new();
        let mut decoded = Decoded::default();
        let mut step = |map: &mut BTreeMap<[u8; 4], (FlowKey, FlowStats)>, changes: Vec<(FlowKey, FlowStats)>| {
            for (k, v) in &changes {
                map.insert([k.remote_addr[0], k.remote_addr[3], k.initiator, k.local_addr[3]], (*k, *v));
            }
            let entries = || map.values().map(|(k, v)| (k, v));
            let (got, changed) = decoded.update(entries, Some(&changes), &clock, &dns, &cgroups);
            let got = got.to_vec();
            assert_eq!(got, flows(entries(), &clock, &dns, &cgroups));
            // The flows said to have changed are those of the changes (when applied in place).
            if let Some(at) = changed {
                let shapes = |f: &Flow| (f.src.ip, f.dst.ip, f.dst.port, f.direction);
                let said: BTreeSet<_> = at.iter().map(|&i| shapes(&got[i])).collect();
                let want: BTreeSet<_> = flows(changes.iter().map(|(k, v)| (k, v)), &clock, &dns, &cgroups)
                    .iter()
                    .filter(|f| got.contains(f))
                    .map(shapes)
                    .collect();
                assert_eq!(said, want);
            }
            got
        };
        let egress = |last: u8, port| tcp_key(Initiator::Local, [192, 0, 2, 5], [198, 51, 100, last], port);
        let first: Vec<_> = (10..20).map(|i| (egress(i, 443), stats(1))).collect();
        assert_eq!(step(&mut map, first).len(), 10);
        // Grown, and new ones before, between and after the known.
        let next = vec![(egress(12, 443), stats(5)), (egress(1, 443), stats(1)), (egress(30, 80), stats(1))];
        let got = step(&mut map, next);
        assert_eq!((got.len(), got.iter().map(|f| f.packets).sum::<u64>()), (12, 16));
        // Both ends of a loopback connection, one drain after the other: one internal flow.
        let lo = |initiator| tcp_key(initiator, [127, 0, 0, 1], [127, 0, 0, 1], 8080);
        step(&mut map, vec![(lo(Initiator::Remote), stats(2))]);
        let got = step(&mut map, vec![(lo(Initiator::Local), stats(2))]);
        assert_eq!(got.iter().filter(|f| f.internal).count(), 1);
        assert_eq!(step(&mut map, vec![(lo(Initiator::Remote), stats(3))]).len(), 13);
    }

    fn key(family: u8, initiator: u8, local: [u8; 16], remote: [u8; 16]) -> FlowKey {
        let (cgroup_id, service_port, protocol, _pad) = (7, 443, IPPROTO_TCP, [0; 3]);
        FlowKey { cgroup_id, local_addr: local, remote_addr: remote, service_port, family, protocol, initiator, _pad }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&a);
        b
    }

    /// The initiator decides the direction and which counters are the source's; the clock maps
    /// kernel time to the wall; keys of another layout are skipped, not misread.
    #[test]
    fn keys_decode_by_family_and_initiator() {
        let stats = FlowStats {
            packets_out: 3,
            bytes_out: 300,
            packets_in: 2,
            bytes_in: 200,
            first_ns: 1_000,
            last_ns: 2_000,
            connections: 1,
            epoch: 0,
        };
        let clock = Clock { wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000), mono_ns: 2_000 };
        let dns = DnsNames::default();
        let (local, remote) = (v4([192, 0, 2, 5]), v4([198, 51, 100, 7]));
        let out = to_flow(&key(Family::V4 as u8, Initiator::Local as u8, local, remote), &stats, &clock, &dns, None);
        let out = out.unwrap();
        assert_eq!(
            (out.direction, out.src.ip.to_string(), out.dst.port),
            (Some(Direction::Egress), "192.0.2.5".into(), Some(443))
        );
        assert_eq!((out.packets_from_src, out.bytes_from_dst, out.packets), (3, 200, 5));
        assert_eq!(out.last_seen.map(|t| t.to_string()).as_deref(), Some("1970-01-01T00:16:40.000Z"));
        let inbound =
            to_flow(&key(Family::V4 as u8, Initiator::Remote as u8, local, remote), &stats, &clock, &dns, None);
        let inbound = inbound.unwrap();
        assert_eq!((inbound.direction, inbound.src.ip.to_string()), (Some(Direction::Ingress), "198.51.100.7".into()));
        assert_eq!((inbound.packets_from_src, inbound.bytes_from_src), (2, 200));
        let v6 = to_flow(&key(Family::V6 as u8, 0, [0x20; 16], [0x20; 16]), &stats, &clock, &dns, None).unwrap();
        assert!(v6.src.ip.is_ipv6());
        assert!(to_flow(&key(5, 0, local, remote), &stats, &clock, &dns, None).is_none(), "unknown family");
        assert!(to_flow(&key(4, 2, local, remote), &stats, &clock, &dns, None).is_none(), "unknown initiator");
    }
}
