//! Pure decoding: the kernel's flow keys and counters become flows (addresses by family, the
//! initiator's side as the direction, the monotonic clock as wall time, the DNS names), and a
//! connection recorded at both of its ends inside the audited cgroups becomes one internal flow.
//! No kernel and no root needed: unit-tested here.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use netaudit_ebpf::{Family, FlowKey, FlowStats, Initiator};

use super::DnsNames;
use crate::model::{Direction, Endpoint, Flow, Protocol};

/// The flows of `entries` (flow map keys and counters), internal connections merged, in a stable
/// order. `cgroups` names each audited cgroup id; entries with values this build does not know
/// (another layout) are skipped.
pub fn flows(
    entries: impl IntoIterator<Item = (FlowKey, FlowStats)>,
    clock: &Clock,
    dns: &DnsNames,
    cgroups: &BTreeMap<u64, &str>,
) -> Vec<Flow> {
    let mut flows: Vec<Flow> = (entries.into_iter())
        .filter_map(|(key, stats)| to_flow(&key, &stats, clock, dns, cgroups.get(&key.cgroup_id).copied()))
        .collect();
    merge_internal(&mut flows);
    flows.sort_by(|a, b| flow_order(a).cmp(&flow_order(b)));
    flows
}

/// One flow map entry as a flow; none when its family or initiator is not one this build knows.
pub fn to_flow(key: &FlowKey, stats: &FlowStats, clock: &Clock, dns: &DnsNames, cgroup: Option<&str>) -> Option<Flow> {
    let family = Family::try_from(key.family).ok()?;
    let initiator = Initiator::try_from(key.initiator).ok()?;
    let ip = |bytes: &[u8; 16]| -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(*bytes)),
        }
    };
    let protocol = Protocol::from_number(key.protocol);
    let service_port = (protocol.has_ports() && key.service_port != 0).then_some(key.service_port);
    let endpoint =
        |addr: IpAddr, port: Option<u16>| Endpoint { ip: addr, port, names: dns.names_of(&addr), identity: None };
    let (local, remote) = (ip(&key.local_addr), ip(&key.remote_addr));
    let outbound = initiator == Initiator::Local;
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
    Some(Flow {
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
    })
}

/// A connection between two sockets of one audited cgroup passes its egress hook at the client
/// and its ingress hook at the server, so it is recorded twice: once as the client's egress flow
/// and once as the server's ingress flow, with the same initiator address and service endpoint.
/// Keep the client's, mark it internal.
fn merge_internal(flows: &mut Vec<Flow>) {
    let conn = |f: &Flow| (f.cgroup.clone(), f.protocol, f.src.ip, f.dst.ip, f.dst.port);
    let egress: HashSet<_> = flows.iter().filter(|f| f.direction == Some(Direction::Egress)).map(conn).collect();
    let ingress: HashSet<_> = flows.iter().filter(|f| f.direction == Some(Direction::Ingress)).map(conn).collect();
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

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use netaudit_ebpf::IPPROTO_TCP;

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
        assert_eq!(out.last_seen.as_deref(), Some("1970-01-01T00:16:40.000Z"));
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
