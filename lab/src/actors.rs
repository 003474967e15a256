//! The processes of the lab, run as `netaudit lab-actor <role>` inside the lab's namespaces:
//!
//! - `cluster`: the cluster's side — DNS for the lab's names, the apiserver endpoint, the
//!   source-controller, the OTLP collector, S3 and the unexpected SSH host; on `clients` it plays
//!   the controller's callers (Prometheus, Flagger, the kubelet, the apiserver's webhook call).
//! - `controller`: the stand-in for the audited controller, in the audited cgroup. It serves its
//!   ports, opens its apiserver watch at once (before recording starts, like the real one), and
//!   on `go` makes the controller's kinds of flows plus one the matrix does not expect.
//!
//! They speak line by line on stdin/stdout with the demo: `ready`, `watching`, `done`.

use std::{
    io::{BufRead, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

use crate::{EXTERNAL, INGRESS_CLIENTS, POD_IP, SERVICES};
use netaudit::model::{DNS_PORT, Protocol};

const TIMEOUT: Duration = Duration::from_secs(5);

/// `args`: the controller's ports as `name=port` (from the chart's values, via the demo).
pub fn run(role: &str, args: &[String]) -> Result<()> {
    let mut ports = Vec::new();
    for a in args {
        let (name, port) = a.split_once('=').with_context(|| format!("bad port argument `{a}`"))?;
        ports.push((name.to_string(), port.parse::<u16>().with_context(|| format!("bad port in `{a}`"))?));
    }
    match role {
        "cluster" => cluster(&ports),
        "controller" => controller(&ports),
        other => bail!("unknown lab actor `{other}`"),
    }
}

type Ports = [(String, u16)];

fn port_of(ports: &Ports, name: &str) -> Result<u16> {
    ports
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| *p)
        .with_context(|| format!("the lab's port for {name} is not set"))
}

fn say(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

fn stdin_lines() -> impl Iterator<Item = String> {
    std::io::stdin().lock().lines().map_while(Result::ok).collect::<Vec<_>>().into_iter()
}

fn next_line() -> Option<String> {
    let mut s = String::new();
    match std::io::stdin().lock().read_line(&mut s) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(s.trim().to_string()),
    }
}

fn cluster(ports: &Ports) -> Result<()> {
    let dns_backend = SERVICES.iter().find(|s| s.name == "kube-dns").context("kube-dns in the lab")?.backend;
    let records: Vec<(String, Ipv4Addr)> = super::dns_records()
        .iter()
        .filter_map(|r| r.split_once('=').and_then(|(n, ip)| Some((n.to_string(), ip.parse().ok()?))))
        .collect();
    // Bound to its own address: a wildcard UDP server would answer from the primary address.
    let dns = UdpSocket::bind(SocketAddrV4::new(dns_backend, DNS_PORT)).context("binding the lab's DNS server")?;
    std::thread::spawn(move || serve_dns(dns, records));
    for s in &SERVICES {
        for (_, _, proto, target) in s.ports {
            if *proto == Protocol::Tcp && s.name != "kube-dns" {
                serve_tcp(SocketAddrV4::new(s.backend, *target), None)?;
            }
        }
    }
    for (ip, port, _, _) in EXTERNAL {
        let banner = (port == 22).then_some("SSH-2.0-lab\r\n");
        serve_tcp(SocketAddrV4::new(ip, port), banner)?;
    }
    say("ready");
    while let Some(line) = next_line() {
        if line == "clients" {
            for (src, port_name, _) in INGRESS_CLIENTS {
                let port = port_of(ports, port_name)?;
                call_from(src, SocketAddrV4::new(POD_IP, port))
                    .with_context(|| format!("calling {port_name} from {src}"))?;
            }
            say("done");
        }
    }
    Ok(())
}

fn serve_dns(sock: UdpSocket, records: Vec<(String, Ipv4Addr)>) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
        let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        for query in &q.queries {
            r.add_query(query.clone());
            let name = query.name().to_string();
            let name = name.trim_end_matches('.');
            if let Some((_, ip)) = records.iter().find(|(n, _)| n == name) {
                r.add_answer(Record::from_rdata(query.name().clone(), 30, RData::A(A(*ip))));
            }
        }
        if let Ok(bytes) = r.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

/// A TCP server answering every request with a short reply (or first sending a banner).
fn serve_tcp(addr: SocketAddrV4, banner: Option<&'static str>) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding the lab's server on {addr}"))?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                if let Some(b) = banner {
                    let _ = s.write_all(b.as_bytes());
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// One request from `src` (bound before connecting, so the controller sees that caller).
fn call_from(src: Ipv4Addr, dst: SocketAddrV4) -> Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from(SocketAddrV4::new(src, 0)).into())?;
    sock.connect_timeout(&SocketAddr::from(dst).into(), TIMEOUT)?;
    let mut s: TcpStream = sock.into();
    request(&mut s, "GET / HTTP/1.1\r\nHost: controller\r\n\r\n")
}

fn request(s: &mut TcpStream, req: &str) -> Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(req.as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf)?;
    if n == 0 {
        bail!("no reply from {}", s.peer_addr()?);
    }
    Ok(())
}

fn controller(ports: &Ports) -> Result<()> {
    for (_, port) in ports {
        serve_tcp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *port), None)?;
    }
    let svc = |name: &str| SERVICES.iter().find(|s| s.name == name).expect("lab service");
    // The long-lived apiserver watch, open before recording starts (no SYN will be seen).
    let api = svc("kubernetes");
    let mut watch =
        TcpStream::connect_timeout(&SocketAddr::from(SocketAddrV4::new(api.cluster_ip, api.ports[0].1)), TIMEOUT)
            .context("opening the apiserver watch")?;
    request(&mut watch, "GET /apis/stages.metio.wtf/v1/stagesets?watch=true HTTP/1.1\r\n\r\n")?;
    say("watching");
    if next_line().as_deref() != Some("go") {
        return Ok(());
    }
    let dns = SocketAddr::from(SocketAddrV4::new(svc("kube-dns").cluster_ip, DNS_PORT));
    let source = resolve(dns, svc("source-controller").dns_name)?;
    let otel = resolve(dns, svc("otel-collector").dns_name)?;
    let (_, s3_port, s3_name, _) = EXTERNAL[0];
    let s3 = resolve(dns, s3_name)?;
    for i in 0..3 {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(SocketAddrV4::new(source, 80)), TIMEOUT)?;
        request(&mut s, &format!("GET /gitrepository/flux-system/stages/{i}.tar.gz HTTP/1.1\r\n\r\n"))?;
    }
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(SocketAddrV4::new(s3, s3_port)), TIMEOUT)?;
    request(&mut s, "PUT /rollbacks/stageset-a/1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")?;
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(SocketAddrV4::new(otel, 4317)), TIMEOUT)?;
    request(&mut s, "POST /opentelemetry.proto.collector.trace.v1.TraceService/Export HTTP/2\r\n\r\n")?;
    request(&mut watch, "GET /apis/stages.metio.wtf/v1/stagesets/status HTTP/1.1\r\n\r\n")?;
    let (ssh, ssh_port, _, _) = EXTERNAL[1];
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(SocketAddrV4::new(ssh, ssh_port)), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut banner = [0u8; 64];
    let _ = s.read(&mut banner)?;
    say("done");
    // Keep the watch open until the demo is finished with us.
    for _ in stdin_lines() {}
    drop(watch);
    Ok(())
}

fn resolve(server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    let mut msg = Message::query();
    msg.metadata.id = 0x4e41;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_str(&format!("{name}."))?, RecordType::A));
    sock.send_to(&msg.to_vec()?, server)?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).with_context(|| format!("no DNS answer for {name}"))?;
    Message::from_vec(&buf[..n])?
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .with_context(|| format!("no A record for {name}"))
}
