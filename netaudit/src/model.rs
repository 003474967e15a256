//! The flow model every stage shares, and the flow file: netaudit's stable interface.
//!
//! A flow is a connection-level aggregate: `src` is always the side that opened the connection,
//! `dst` the side that served it; the ephemeral client port is `null`.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, str::FromStr, sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{FieldError, InputError};

/// The flow file's format version. Readers reject files with a newer major version.
pub const FLOW_FILE_VERSION: u32 = 1;

pub use netaudit_ebpf::DNS_PORT;
/// The protocols DNS answers on, in the order rules list them.
pub const DNS_PROTOCOLS: [Protocol; 2] = [Protocol::Udp, Protocol::Tcp];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlowFile {
    /// Format version ([`FLOW_FILE_VERSION`]).
    pub version: u32,
    /// When recording ran (RFC 3339), absent in hand-written files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// The audited sources (cgroups) the flows come from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// What could not be recorded. All zero means the flows are complete.
    #[serde(default)]
    pub losses: Losses,
    pub flows: Vec<Flow>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub start: String,
    pub end: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Source {
    /// cgroup v2 directory.
    pub cgroup: String,
    /// Its cgroup id (directory inode), as the kernel reports it.
    pub cgroup_id: u64,
}

/// Loss counters: each names something the kernel saw but could not record.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Losses {
    /// New flows dropped because the flow map was full.
    #[serde(default)]
    pub flows: u64,
    /// Packets of those flows.
    #[serde(default)]
    pub packets: u64,
    /// Bytes of those flows.
    #[serde(default)]
    pub bytes: u64,
    /// DNS answers dropped because the ring buffer was full (names may be missing).
    #[serde(default)]
    pub dns_events: u64,
    /// Packets whose headers could not be parsed.
    #[serde(default)]
    pub unparsed_packets: u64,
}

impl Losses {
    pub fn any(&self) -> bool {
        *self != Losses::default()
    }
}

/// `2 flows (7 packets, 700 bytes) not recorded, 1 DNS answer lost, 0 packets unparsed`.
impl fmt::Display for Losses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |n: u64| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} flow{} ({} packets, {} bytes) not recorded, {} DNS answer{} lost, {} packet{} unparsed",
            self.flows,
            s(self.flows),
            self.packets,
            self.bytes,
            self.dns_events,
            s(self.dns_events),
            self.unparsed_packets,
            s(self.unparsed_packets)
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Flow {
    pub protocol: Protocol,
    /// The initiator.
    pub src: Endpoint,
    /// The side that was connected to; its port is the service port.
    pub dst: Endpoint,
    /// `egress` when the audited workload opened the connection, `ingress` when a peer did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub packets_from_src: u64,
    #[serde(default)]
    pub bytes_from_src: u64,
    #[serde(default)]
    pub packets_from_dst: u64,
    #[serde(default)]
    pub bytes_from_dst: u64,
    /// Distinct connections (TCP) or connected sockets (UDP) seen; 0 where not applicable.
    #[serde(default)]
    pub connections: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
    /// The audited cgroup the flow was recorded in (shared by its flows: a drain makes many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Arc<str>>,
    /// Both ends are inside the same audited cgroup (e.g. over loopback): recorded once, from
    /// the initiating side. No network policy applies to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `null` for an ephemeral client port or where ports do not exist (ICMP).
    #[serde(default)]
    pub port: Option<u16>,
    /// DNS names the audited workload resolved to this address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Who this address is in the cluster, where known (the agent enriches flows live; shared
    /// by every flow of the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<Identity>>,
}

/// A point in time, written as RFC 3339 in UTC with milliseconds (`2026-12-01T20:25:07.123Z`):
/// kept as a time, so a drain formats nothing and comparisons are exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl FromStr for Timestamp {
    type Err = humantime::TimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339(s).map(Timestamp)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not an RFC 3339 timestamp in UTC ({e}); write it as 2026-12-01T20:25:07.000Z"
            ))
        })
    }
}

/// The Kubernetes identity behind an address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub kind: IdentityKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A pod's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    Pod,
    /// A Service's ClusterIP (before the dataplane translates it to a backend).
    Service,
    Node,
    /// The apiserver's endpoint (also a node address on most clusters).
    Apiserver,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// IP protocol, written by name in the flow file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    /// Any other IP protocol number, written `IP-<n>`.
    Other(u8),
}

impl Protocol {
    pub fn from_number(n: u8) -> Self {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            1 => Protocol::Icmp,
            58 => Protocol::Icmpv6,
            n => Protocol::Other(n),
        }
    }

    /// Whether the protocol has ports (and so a service port).
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("TCP"),
            Protocol::Udp => f.write_str("UDP"),
            Protocol::Sctp => f.write_str("SCTP"),
            Protocol::Icmp => f.write_str("ICMP"),
            Protocol::Icmpv6 => f.write_str("ICMPv6"),
            Protocol::Other(n) => write!(f, "IP-{n}"),
        }
    }
}

impl FromStr for Protocol {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ICMPV6" => Protocol::Icmpv6,
            other => match other.strip_prefix("IP-").and_then(|n| n.parse().ok()) {
                Some(n) => Protocol::from_number(n),
                None => {
                    return Err(FieldError::whole(format!(
                        "unknown protocol `{s}` (expected TCP, UDP, SCTP, ICMP, ICMPv6 or IP-<number>)"
                    )));
                }
            },
        })
    }
}

impl TryFrom<String> for Protocol {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Self, FieldError> {
        s.parse()
    }
}

impl From<Protocol> for String {
    fn from(p: Protocol) -> String {
        p.to_string()
    }
}

impl Default for FlowFile {
    /// An empty flow file of the current version.
    fn default() -> FlowFile {
        FlowFile::new(Vec::new())
    }
}

impl Flow {
    /// A flow from `src` to `dst:port` with nothing counted yet; the builder methods fill in the
    /// rest (`Flow::new(Protocol::Tcp, src, dst, Some(443)).with_direction(Direction::Egress)`).
    pub fn new(protocol: Protocol, src: IpAddr, dst: IpAddr, port: Option<u16>) -> Flow {
        let end = |ip, port| Endpoint { ip, port, names: Vec::new(), identity: None };
        Flow {
            protocol,
            src: end(src, None),
            dst: end(dst, port),
            direction: None,
            packets: 0,
            bytes: 0,
            packets_from_src: 0,
            bytes_from_src: 0,
            packets_from_dst: 0,
            bytes_from_dst: 0,
            connections: 0,
            first_seen: None,
            last_seen: None,
            cgroup: None,
            internal: false,
        }
    }

    pub fn with_direction(mut self, d: Direction) -> Flow {
        self.direction = Some(d);
        self
    }

    /// Packets and bytes sent by each end; the totals follow.
    pub fn with_traffic(mut self, from_src: (u64, u64), from_dst: (u64, u64)) -> Flow {
        (self.packets_from_src, self.bytes_from_src) = from_src;
        (self.packets_from_dst, self.bytes_from_dst) = from_dst;
        (self.packets, self.bytes) = (from_src.0 + from_dst.0, from_src.1 + from_dst.1);
        self
    }

    pub fn with_connections(mut self, n: u64) -> Flow {
        self.connections = n;
        self
    }

    pub fn in_cgroup(mut self, cgroup: &str) -> Flow {
        self.cgroup = Some(cgroup.into());
        self
    }

    /// DNS names the workload resolved to the destination.
    pub fn with_dst_names(mut self, names: Vec<String>) -> Flow {
        self.dst.names = names;
        self
    }
}

impl FlowFile {
    /// A hand-made flow file: no window, no sources, nothing lost.
    pub fn new(flows: Vec<Flow>) -> FlowFile {
        FlowFile { version: FLOW_FILE_VERSION, window: None, sources: Vec::new(), losses: Losses::default(), flows }
    }

    /// The file's window, sources and losses, without its flows.
    pub fn clone_header(&self) -> FlowFile {
        FlowFile {
            version: self.version,
            window: self.window.clone(),
            sources: self.sources.clone(),
            losses: self.losses,
            flows: Vec::new(),
        }
    }

    /// The flows recorded under `cgroups` (one pod's), with their sources, as a file of their own.
    pub fn of_cgroups(&self, cgroups: &[String]) -> FlowFile {
        let of = |c: Option<&str>| c.is_some_and(|c| cgroups.iter().any(|x| x == c));
        let flows = self.flows.iter().filter(|f| of(f.cgroup.as_deref())).cloned().collect();
        let sources = self.sources.iter().filter(|s| of(Some(&s.cgroup))).cloned().collect();
        FlowFile { flows, sources, ..self.clone_header() }
    }

    /// One file from several (pods, nodes, replicas): flows side by side, losses summed, the
    /// window spanning all of them.
    pub fn merge(files: impl IntoIterator<Item = FlowFile>) -> FlowFile {
        let mut out = FlowFile {
            version: FLOW_FILE_VERSION,
            window: None,
            sources: vec![],
            losses: Losses::default(),
            flows: vec![],
        };
        for f in files {
            let l = &mut out.losses;
            l.flows += f.losses.flows;
            l.packets += f.losses.packets;
            l.bytes += f.losses.bytes;
            l.dns_events += f.losses.dns_events;
            l.unparsed_packets += f.losses.unparsed_packets;
            for s in f.sources {
                if !out.sources.contains(&s) {
                    out.sources.push(s);
                }
            }
            // RFC 3339 in UTC (as written here) orders as text.
            if let Some(w) = f.window {
                out.window = Some(match out.window.take() {
                    None => w,
                    Some(o) => Window { start: o.start.min(w.start), end: o.end.max(w.end) },
                });
            }
            out.flows.extend(f.flows);
        }
        out
    }

    /// Reads a flow file, naming the file, line and column of any problem.
    pub fn read(path: &Path) -> Result<FlowFile, InputError> {
        let origin = format!("flow file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| InputError::new(&origin, format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(|e| InputError::at(origin, None, e))
    }

    pub fn parse(text: &str) -> Result<FlowFile, FieldError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let file: FlowFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            FieldError::new(format!("line {}, column {}, at `{path}`", inner.line(), inner.column()), inner.to_string())
        })?;
        if file.version > FLOW_FILE_VERSION {
            return Err(FieldError::new(
                "version",
                format!(
                    "{} is newer than this netaudit understands ({FLOW_FILE_VERSION}); upgrade netaudit",
                    file.version
                ),
            ));
        }
        Ok(file)
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("flow file serializes");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_hand_written_flows_parse() {
        let f = FlowFile::parse(
            r#"{"version":1,"flows":[{"protocol":"tcp","src":{"ip":"10.0.0.1"},"dst":{"ip":"10.96.0.1","port":443}}]}"#,
        )
        .unwrap();
        assert_eq!(f.flows[0].protocol, Protocol::Tcp);
        assert_eq!(f.flows[0].src.port, None);
        assert_eq!(f.flows[0].dst.port, Some(443));
        assert!(!f.losses.any());
    }

    #[test]
    fn bad_input_names_the_place() {
        let err = FlowFile::parse(
            r#"{"version":1,"flows":[{"protocol":"TCP","src":{"ip":"10.0.0.300"},"dst":{"ip":"10.0.0.2"}}]}"#,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("flows[0].src.ip"), "{msg}");
        let err = FlowFile::parse(
            r#"{"version":1,"flows":[{"protocol":"GRE","src":{"ip":"10.0.0.1"},"dst":{"ip":"10.0.0.2"}}]}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("unknown protocol `GRE`"));
    }

    #[test]
    fn protocol_names_round_trip() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp, Protocol::Icmpv6, Protocol::Other(47)] {
            assert_eq!(p.to_string().parse::<Protocol>().unwrap(), p);
        }
    }
}
