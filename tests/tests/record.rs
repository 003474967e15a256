//! Real-kernel tests of the capture path: the programs are loaded into this kernel, attached to
//! a fresh cgroup, and real traffic flows between network namespaces the test creates.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use netaudit::{
    capture::{Capture, CaptureConfig},
    model::{Direction, Flow, FlowFile, Protocol},
};
use netaudit_tests::*;

/// (direction, protocol, src ip, dst ip, dst port): what identifies a flow for policy.
type Shape = (Direction, Protocol, String, String, Option<u16>);

fn shape(f: &Flow) -> Shape {
    (f.direction.unwrap(), f.protocol, f.src.ip.to_string(), f.dst.ip.to_string(), f.dst.port)
}

fn shapes(file: &FlowFile) -> BTreeSet<Shape> {
    file.flows.iter().map(shape).collect()
}

fn egress(p: Protocol, src: &str, dst: &str, port: u16) -> Shape {
    (Direction::Egress, p, src.into(), dst.into(), Some(port))
}

fn find<'a>(file: &'a FlowFile, s: &Shape) -> &'a Flow {
    file.flows.iter().find(|f| &shape(f) == s).unwrap_or_else(|| panic!("no flow {s:?} in {:#?}", file.flows))
}

/// Runs `args` in the audited cgroup inside the pod namespace while recording, and returns
/// what was recorded (with the helper's output).
fn record(lab: &Lab, cg: &Cgroup, args: &[&str]) -> (FlowFile, Vec<String>) {
    let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()])).expect("capture starts");
    let helper = helper(&lab.pod, Some(&cg.path), args).expect("spawn helper");
    let out = helper.finish().expect("helper traffic got through");
    (capture.stop().expect("stop"), out)
}

#[test]
fn repeated_tcp_connections_aggregate_into_one_flow() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let (file, _) = record(&lab, &cg, &["tcp", "192.0.2.2:80", "3"]);
    let want = egress(Protocol::Tcp, POD_V4, PEER_V4, 80);
    assert_eq!(shapes(&file), BTreeSet::from([want.clone()]), "{:#?}", file.flows);
    let f = find(&file, &want);
    assert_eq!(f.connections, 3);
    assert_eq!(f.src.port, None, "the ephemeral client port is not part of the flow");
    // Each connection: SYN, ACK, data, FIN, ACK at least from the client; echoes back.
    assert!(f.packets_from_src >= 3 * 4 && f.packets_from_dst >= 3 * 3, "{f:#?}");
    assert!(f.bytes_from_src > 3 * 5 && f.bytes_from_dst > 3 * 5);
    assert!(!file.losses.any(), "{:?}", file.losses);
}

#[test]
fn udp_request_response_is_one_flow_and_replies_add_none() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let (file, _) = record(&lab, &cg, &["udp", "192.0.2.2:7", "4", "udp-connected", "192.0.2.2:7", "3"]);
    let want = egress(Protocol::Udp, POD_V4, PEER_V4, 7);
    assert_eq!(shapes(&file), BTreeSet::from([want.clone()]), "{:#?}", file.flows);
    let f = find(&file, &want);
    assert_eq!((f.packets_from_src, f.packets_from_dst), (7, 7));
    // Each datagram: 20 (IP) + 8 (UDP) + "ping k".
    assert_eq!(f.bytes_from_src, 7 * (28 + 6));
    assert_eq!(f.connections, 1, "one connected UDP socket");
}

/// A connection's packets count in its socket until a drain or its close folds them into the
/// flow: every drain sees exact counts, nothing is counted twice, and the counts after the close
/// are complete.
#[test]
fn an_open_socket_counts_exactly_at_every_drain_and_after_its_close() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let mut capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()])).unwrap();
    let mut sock = helper(&lab.pod, Some(&cg.path), &["hold-udp", "192.0.2.2:7", "3"]).unwrap();
    let want = egress(Protocol::Udp, POD_V4, PEER_V4, 7);
    // Each datagram: 20 (IP) + 8 (UDP) + "ping k".
    let datagram = 28 + 6;
    for round in 1..=3u64 {
        assert_eq!(sock.line().unwrap(), "sent");
        let file = capture.snapshot().unwrap();
        let f = find(&file, &want);
        assert_eq!((f.packets_from_src, f.packets_from_dst), (3 * round, 3 * round), "drain {round}: {f:#?}");
        assert_eq!((f.bytes_from_src, f.bytes_from_dst), (3 * round * datagram, 3 * round * datagram));
        sock.send(if round < 3 { "more" } else { "close" }).unwrap();
    }
    assert_eq!(sock.line().unwrap(), "closed");
    sock.finish().unwrap();
    // Three rounds were drained; the close adds nothing, and a socket gone between drains
    // loses nothing: one more round on a new socket, closed before any drain.
    let more = helper(&lab.pod, Some(&cg.path), &["udp-connected", "192.0.2.2:7", "2"]).unwrap();
    more.finish().unwrap();
    let file = capture.stop().unwrap();
    let f = find(&file, &want);
    assert_eq!((f.packets_from_src, f.packets_from_dst), (11, 11), "{f:#?}");
    assert_eq!(f.bytes_from_src, 11 * datagram);
    assert_eq!(f.connections, 2);
}

#[test]
fn ipv6_flow() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let (file, _) = record(&lab, &cg, &["tcp", "[2001:db8::2]:80", "2", "udp", "[2001:db8::2]:7", "1"]);
    assert_eq!(
        shapes(&file),
        BTreeSet::from([egress(Protocol::Tcp, POD_V6, PEER_V6, 80), egress(Protocol::Udp, POD_V6, PEER_V6, 7)]),
        "{:#?}",
        file.flows
    );
    assert_eq!(find(&file, &egress(Protocol::Tcp, POD_V6, PEER_V6, 80)).connections, 2);
}

#[test]
fn inbound_connection_is_initiated_by_the_peer_on_the_listening_port() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()])).unwrap();
    let mut server = helper(&lab.pod, Some(&cg.path), &["serve-once", "[::]:8080"]).unwrap();
    assert_eq!(server.line().unwrap(), "listening");
    let client = helper(&lab.peer, None, &["tcp", "192.0.2.1:8080", "1"]).unwrap();
    client.finish().unwrap();
    server.finish().unwrap();
    let file = capture.stop().unwrap();
    let want = (Direction::Ingress, Protocol::Tcp, PEER_V4.to_string(), POD_V4.to_string(), Some(8080));
    assert_eq!(shapes(&file), BTreeSet::from([want.clone()]), "{:#?}", file.flows);
    assert_eq!(find(&file, &want).connections, 1);
    // The client is outside the audited cgroup: the flow is not internal.
    assert!(!find(&file, &want).internal, "{:#?}", file.flows);
}

/// A UDP server bound explicitly to a port inside the ephemeral range is still a server: the
/// bind asked for that port (a client's socket gets one without asking), so the peers that send
/// to it started the exchanges.
#[test]
fn a_udp_server_on_an_ephemeral_port_is_the_side_that_was_connected_to() {
    if !require_kernel() {
        return;
    }
    let (low, high) = netaudit::capture::sockets::ephemeral_range();
    let port = low + (high - low) / 2;
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()])).unwrap();
    let mut server = helper(&lab.pod, Some(&cg.path), &["serve", &format!("udp:[::]:{port}")]).unwrap();
    assert_eq!(server.line().unwrap(), "ready");
    helper(&lab.peer, None, &["udp", &format!("192.0.2.1:{port}"), "3"]).unwrap().finish().unwrap();
    drop(server);
    let file = capture.stop().unwrap();
    let want = (Direction::Ingress, Protocol::Udp, PEER_V4.to_string(), POD_V4.to_string(), Some(port));
    assert_eq!(shapes(&file), BTreeSet::from([want.clone()]), "{:#?}", file.flows);
    let f = find(&file, &want);
    assert_eq!((f.packets_from_src, f.packets_from_dst), (3, 3), "{f:#?}");
}

#[test]
fn connections_open_before_recording_keep_their_initiator() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    // Outbound: the audited process opens a long-lived connection (an apiserver watch, say)...
    let mut watch = helper(&lab.pod, Some(&cg.path), &["hold-tcp", "192.0.2.2:80"]).unwrap();
    assert_eq!(watch.line().unwrap(), "connected");
    // ...and inbound: a peer is connected to the audited process's server.
    let mut server = helper(&lab.pod, Some(&cg.path), &["serve-once", "[::]:9443"]).unwrap();
    assert_eq!(server.line().unwrap(), "listening");
    let mut client = helper(&lab.peer, None, &["hold-tcp", "192.0.2.1:9443"]).unwrap();
    assert_eq!(client.line().unwrap(), "connected");

    // Only now does recording start; no SYN of either connection will be seen.
    let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()])).unwrap();
    watch.send("go").unwrap();
    client.send("go").unwrap();
    assert_eq!(watch.line().unwrap(), "done");
    assert_eq!(client.line().unwrap(), "done");
    let file = capture.stop().unwrap();
    drop((watch, client, server));

    let out = egress(Protocol::Tcp, POD_V4, PEER_V4, 80);
    let inbound = (Direction::Ingress, Protocol::Tcp, PEER_V4.to_string(), POD_V4.to_string(), Some(9443));
    assert_eq!(shapes(&file), BTreeSet::from([out.clone(), inbound.clone()]), "{:#?}", file.flows);
    // 5 round trips each way were made during recording.
    assert!(find(&file, &out).packets_from_src >= 5);
    assert!(find(&file, &inbound).packets_from_src >= 5);
    assert!(!find(&file, &out).internal && !find(&file, &inbound).internal, "{:#?}", file.flows);
}

#[test]
fn dns_answers_put_names_on_peers() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    let (file, out) = record(&lab, &cg, &["dns", "192.0.2.53:53", "api.lab.test", "tcp", "@resolved:80", "1"]);
    assert_eq!(out, ["resolved 192.0.2.2"]);
    let dns = egress(Protocol::Udp, POD_V4, DNS_V4, 53);
    let api = egress(Protocol::Tcp, POD_V4, PEER_V4, 80);
    assert_eq!(shapes(&file), BTreeSet::from([dns.clone(), api.clone()]), "{:#?}", file.flows);
    assert_eq!(find(&file, &api).dst.names, ["api.lab.test"]);
    assert!(find(&file, &dns).dst.names.is_empty());
}

#[test]
fn a_full_flow_map_counts_losses() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    let capture = Capture::start(&CaptureConfig { max_flows: 2, ..CaptureConfig::new(vec![cg.path.clone()]) }).unwrap();
    helper(&lab.pod, Some(&cg.path), &["udp-ports", PEER_V4, "10000", "5"]).unwrap().finish().unwrap();
    let file = capture.stop().unwrap();
    assert_eq!(file.flows.len(), 2);
    assert_eq!(file.losses.flows, 3, "{:?}", file.losses);
    assert_eq!(file.losses.packets, 3);
    assert_eq!(file.losses.bytes, 3 * 29);
}

/// A drain reads only the flows changed since the one before, and the whole map when more
/// changed than its ring holds: exact counts either way, every flow kept.
#[test]
fn drains_that_read_only_what_changed_keep_every_flow_exact() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    // 16384 flows: the changed-flows ring holds about 4 000 of their keys.
    let config = CaptureConfig { max_flows: 16384, ..CaptureConfig::new(vec![cg.path.clone()]) };
    let mut capture = Capture::start(&config).unwrap();
    let send = |base: u32, n: u32| {
        let args = ["udp-ports", PEER_V4, &base.to_string(), &n.to_string()];
        helper(&lab.pod, Some(&cg.path), &args).unwrap().finish().unwrap();
    };
    let packets = |file: &FlowFile| -> BTreeMap<u16, u64> {
        file.flows.iter().map(|f| (f.dst.port.unwrap(), f.packets_from_src)).collect()
    };
    let mut drain = || packets(&capture.snapshot().unwrap());
    let mut want: BTreeMap<u16, u64> = BTreeMap::new();
    let mut sent = |base: u16, n: u16| {
        send(base.into(), n.into());
        (base..base + n).for_each(|p| *want.entry(p).or_default() += 1);
        want.clone()
    };
    // More than the ring holds before the first drain (which reads the whole map anyway).
    let all = sent(10000, 6000);
    assert_eq!(drain(), all);
    // A few changed, some of them new: their keys come from the ring.
    sent(10000, 10);
    let few = sent(15990, 20);
    assert_eq!(drain(), few);
    assert_eq!(drain(), few, "nothing changed");
    // More changed than the ring holds: the whole map is read.
    let many = sent(10000, 5000);
    assert_eq!(drain(), many);
    let want = sent(11000, 5);
    assert_eq!(packets(&capture.stop().unwrap()), want);
}

#[test]
fn every_packet_still_arrives_fail_open() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let cg = test_cgroup().unwrap();
    // The helper fails unless every datagram is answered and every byte echoed back.
    let (file, out) = record(&lab, &cg, &["udp", "192.0.2.2:7", "2000", "bulk", "192.0.2.2:80", "4000000"]);
    assert_eq!(out, ["bulk 4000000"]);
    let udp = find(&file, &egress(Protocol::Udp, POD_V4, PEER_V4, 7));
    assert_eq!((udp.packets_from_src, udp.packets_from_dst), (2000, 2000));
    let tcp = find(&file, &egress(Protocol::Tcp, POD_V4, PEER_V4, 80));
    // Payload plus headers, both ways.
    assert!(tcp.bytes_from_src > 4_000_000 && tcp.bytes_from_dst > 4_000_000, "{tcp:#?}");
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn a_connection_inside_the_cgroup_is_recorded_once_as_internal() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()])).unwrap();
    let mut server = helper(&lab.pod, Some(&cg.path), &["serve-once", "127.0.0.1:8080"]).unwrap();
    assert_eq!(server.line().unwrap(), "listening");
    helper(&lab.pod, Some(&cg.path), &["tcp", "127.0.0.1:8080", "1"]).unwrap().finish().unwrap();
    server.finish().unwrap();
    let file = capture.stop().unwrap();
    let want = egress(Protocol::Tcp, "127.0.0.1", "127.0.0.1", 8080);
    assert_eq!(shapes(&file), BTreeSet::from([want.clone()]), "{:#?}", file.flows);
    let f = find(&file, &want);
    assert!(f.internal);
    assert_eq!(f.connections, 1);
}

#[test]
fn icmp_echo_is_one_flow_per_peer_initiated_by_the_requester() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    let (file, _) = record(&lab, &cg, &["ping", PEER_V4, "3", "ping", PEER_V6, "2"]);
    let v4 = (Direction::Egress, Protocol::Icmp, POD_V4.to_string(), PEER_V4.to_string(), None);
    let v6 = (Direction::Egress, Protocol::Icmpv6, POD_V6.to_string(), PEER_V6.to_string(), None);
    assert_eq!(shapes(&file), BTreeSet::from([v4.clone(), v6.clone()]), "{:#?}", file.flows);
    assert_eq!((find(&file, &v4).packets_from_src, find(&file, &v4).packets_from_dst), (3, 3));
    assert_eq!((find(&file, &v6).packets_from_src, find(&file, &v6).packets_from_dst), (2, 2));
}

#[test]
fn pods_are_attached_and_detached_while_recording() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _peer = start_peer_services(&lab).unwrap();
    let (first, second) = (test_cgroup().unwrap(), test_cgroup().unwrap());
    let tcp =
        |cg: &Cgroup, n: &str| helper(&lab.pod, Some(&cg.path), &["tcp", "192.0.2.2:80", n]).unwrap().finish().unwrap();
    let mut capture = Capture::start(&CaptureConfig::new(vec![first.path.clone()])).unwrap();
    tcp(&first, "1");
    // A second pod starts: attach to it.
    capture.add_cgroup(&second.path).unwrap();
    tcp(&second, "2");
    // The first pod goes: detach; its later traffic is not recorded, its earlier flow stays.
    capture.remove_cgroup(&first.path).unwrap();
    tcp(&first, "4");
    // A cgroup inside an audited one would count twice: refused.
    let nested = second.path.join("container");
    std::fs::create_dir(&nested).unwrap();
    let err = capture.add_cgroup(&nested).unwrap_err();
    std::fs::remove_dir(&nested).unwrap();
    assert!(format!("{err:#}").contains("inside"), "{err:#}");
    assert_eq!(capture.attached(), std::slice::from_ref(&second.path));
    let file = capture.stop().unwrap();
    let connections = |cg: &Cgroup| {
        file.flows.iter().find(|f| f.cgroup.as_deref() == Some(cg.path.to_str().unwrap())).map(|f| f.connections)
    };
    assert_eq!((connections(&first), connections(&second)), (Some(1), Some(2)), "{:#?}", file.flows);
    assert_eq!(file.sources.len(), 2);
}
