//! The traffic helper the real-kernel tests run inside network namespaces and audited cgroups.
//! It executes its arguments as a script of steps, in order, and exits non-zero when any step
//! fails (so a test notices traffic that did not get through).
//!
//! Steps:
//!   serve tcp:ADDR udp:ADDR dns:ADDR=IP ...   echo / DNS servers; prints `ready`, runs until killed
//!   tcp ADDR N            N TCP connections, one echo round trip each
//!   udp ADDR N            N request/response datagrams from one unconnected socket
//!   udp-connected ADDR N  the same from a connected socket
//!   udp-ports IP BASE N   one datagram to each of N ports starting at BASE (no replies)
//!   dns SERVER NAME       an A query; later steps may write `@resolved` for the answer
//!   hold-tcp ADDR         connect, round trip, print `connected`, wait for a stdin line, 5 more round trips
//!   hold-udp ADDR N       connected UDP socket: rounds of N echo datagrams, each ended by printing
//!                         `sent`; after each, a stdin line `more` asks for another round, any other
//!                         line closes the socket (then `closed`)
//!   serve-once ADDR       listen, print `listening`, echo one connection until it closes
//!   bulk ADDR BYTES       send BYTES over TCP to an echo server and check they all come back
//!   wait                  print `waiting`, wait for a stdin line
//!   ping IP N             N ICMP / ICMPv6 echo requests from a raw socket, each answered

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("netaudit-traffic: {e:#}");
        std::process::exit(1);
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: &[String]) -> Result<()> {
    let mut resolved: Option<String> = None;
    let mut i = 0;
    let arg = |i: usize| args.get(i).cloned().with_context(|| format!("step {}: missing argument", args[0]));
    while i < args.len() {
        let sub = |s: String| match &resolved {
            Some(ip) => s.replace("@resolved", ip),
            None => s,
        };
        match args[i].as_str() {
            "serve" => return serve(&args[i + 1..]),
            "tcp" => {
                let addr: SocketAddr = sub(arg(i + 1)?).parse()?;
                for _ in 0..arg(i + 2)?.parse::<u32>()? {
                    let mut s =
                        TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connect {addr}"))?;
                    round_trip(&mut s)?;
                }
                i += 3;
            }
            "udp" | "udp-connected" => {
                let addr: SocketAddr = sub(arg(i + 1)?).parse()?;
                udp_echo(addr, arg(i + 2)?.parse()?, args[i] == "udp-connected")?;
                i += 3;
            }
            "udp-ports" => {
                let ip = sub(arg(i + 1)?);
                let base: u16 = arg(i + 2)?.parse()?;
                let n: u16 = arg(i + 3)?.parse()?;
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                for p in base..base + n {
                    sock.send_to(b"x", format!("{ip}:{p}"))?;
                }
                i += 4;
            }
            "dns" => {
                let server: SocketAddr = arg(i + 1)?.parse()?;
                let name = arg(i + 2)?;
                let ip = resolve(server, &name)?;
                say(&format!("resolved {ip}"));
                resolved = Some(ip);
                i += 3;
            }
            "hold-tcp" => {
                let addr: SocketAddr = sub(arg(i + 1)?).parse()?;
                let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connect {addr}"))?;
                round_trip(&mut s)?;
                say("connected");
                wait_for_go()?;
                for _ in 0..5 {
                    round_trip(&mut s)?;
                }
                say("done");
                i += 2;
            }
            "hold-udp" => {
                let addr: SocketAddr = sub(arg(i + 1)?).parse()?;
                hold_udp(addr, arg(i + 2)?.parse()?)?;
                i += 3;
            }
            "serve-once" => {
                let l = TcpListener::bind(arg(i + 1)?)?;
                say("listening");
                let (mut s, _) = l.accept()?;
                echo(&mut s);
                i += 2;
            }
            "bulk" => {
                let addr: SocketAddr = sub(arg(i + 1)?).parse()?;
                let bytes: usize = arg(i + 2)?.parse()?;
                bulk(addr, bytes)?;
                i += 3;
            }
            "ping" => {
                let ip: std::net::IpAddr = sub(arg(i + 1)?).parse()?;
                ping(ip, arg(i + 2)?.parse()?)?;
                i += 3;
            }
            "wait" => {
                say("waiting");
                wait_for_go()?;
                i += 1;
            }
            other => bail!("unknown step `{other}`"),
        }
    }
    Ok(())
}

/// `n` datagrams to an echo server at `addr`, each answered in kind; from a connected socket or
/// with `sendto`.
fn udp_echo(addr: SocketAddr, n: u32, connected: bool) -> Result<()> {
    let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    if connected {
        sock.connect(addr)?;
    }
    udp_rounds(&sock, addr, n, connected)
}

fn hold_udp(addr: SocketAddr, n: u32) -> Result<()> {
    let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    sock.connect(addr)?;
    loop {
        udp_rounds(&sock, addr, n, true)?;
        say("sent");
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "more" {
            break;
        }
    }
    drop(sock);
    say("closed");
    Ok(())
}

fn udp_rounds(sock: &UdpSocket, addr: SocketAddr, n: u32, connected: bool) -> Result<()> {
    sock.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 2048];
    for k in 0..n {
        let msg = format!("ping {k}");
        if connected {
            sock.send(msg.as_bytes())?
        } else {
            sock.send_to(msg.as_bytes(), addr)?
        };
        let got = sock.recv(&mut buf).with_context(|| format!("no UDP reply {k} from {addr}"))?;
        if &buf[..got] != msg.as_bytes() {
            bail!("UDP reply {k} from {addr} differs");
        }
    }
    Ok(())
}

fn wait_for_go() -> Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(())
}

fn round_trip(s: &mut TcpStream) -> Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).context("no TCP echo")?;
    if &buf != b"ping\n" {
        bail!("TCP echo differs");
    }
    Ok(())
}

fn echo(s: &mut TcpStream) {
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn bulk(addr: SocketAddr, bytes: usize) -> Result<()> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    let mut reader = s.try_clone()?;
    reader.set_read_timeout(Some(TIMEOUT))?;
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut s = s;
        let chunk = vec![0x5a_u8; 65536];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = reader.read(&mut buf).context("reading echoed bytes")?;
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.join().unwrap()?;
    if got != bytes {
        bail!("sent {bytes} bytes, {got} came back");
    }
    say(&format!("bulk {got}"));
    Ok(())
}

fn resolve(server: SocketAddr, name: &str) -> Result<String> {
    let sock = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    let mut msg = Message::query();
    msg.metadata.id = 0x4e41;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_str(name)?, RecordType::A));
    sock.send_to(&msg.to_vec()?, server)?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).context("no DNS answer")?;
    let answer = Message::from_vec(&buf[..n])?;
    answer
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .with_context(|| format!("no A record for {name}"))
}

fn serve(specs: &[String]) -> Result<()> {
    let mut threads = Vec::new();
    for spec in specs {
        let (kind, rest) = spec.split_once(':').with_context(|| format!("bad server spec `{spec}`"))?;
        match kind {
            "tcp" => {
                let l = TcpListener::bind(rest).with_context(|| format!("bind tcp {rest}"))?;
                threads.push(std::thread::spawn(move || {
                    for s in l.incoming().flatten() {
                        std::thread::spawn(move || {
                            let mut s = s;
                            echo(&mut s)
                        });
                    }
                }));
            }
            "udp" => {
                let s = UdpSocket::bind(rest).with_context(|| format!("bind udp {rest}"))?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                }));
            }
            "dns" => {
                let (addr, answer) = rest.split_once('=').with_context(|| format!("bad dns spec `{spec}`"))?;
                let answer: std::net::Ipv4Addr = answer.parse()?;
                let s = UdpSocket::bind(addr).with_context(|| format!("bind dns {addr}"))?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                        let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                        for query in &q.queries {
                            r.add_query(query.clone());
                            r.add_answer(Record::from_rdata(query.name().clone(), 30, RData::A(A(answer))));
                        }
                        if let Ok(bytes) = r.to_vec() {
                            let _ = s.send_to(&bytes, from);
                        }
                    }
                }));
            }
            other => bail!("unknown server kind `{other}`"),
        }
    }
    say("ready");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Echo requests over a raw socket (root); the kernel of the peer answers them.
fn ping(ip: std::net::IpAddr, count: u16) -> Result<()> {
    let (family, proto, request, reply) = match ip {
        std::net::IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        std::net::IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8, 129u8),
    };
    // SAFETY: plain socket syscalls on buffers we own.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_RAW, proto);
        anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let addr = socket2_addr(ip);
        for seq in 0..count {
            let mut pkt = [0u8; 16];
            pkt[0] = request;
            pkt[4..6].copy_from_slice(&0x4e41u16.to_be_bytes());
            pkt[6..8].copy_from_slice(&seq.to_be_bytes());
            if family == libc::AF_INET {
                let sum = checksum(&pkt);
                pkt[2..4].copy_from_slice(&sum.to_be_bytes());
            } // ICMPv6 raw sockets get their checksum from the kernel.
            let sent = libc::sendto(fd, pkt.as_ptr().cast(), pkt.len(), 0, addr.0.as_ptr().cast(), addr.1);
            anyhow::ensure!(sent == pkt.len() as isize, "sendto: {}", std::io::Error::last_os_error());
            loop {
                let mut buf = [0u8; 1500];
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                anyhow::ensure!(n > 0, "no echo reply {seq} from {ip}");
                // IPv4 raw sockets deliver the IP header too.
                let icmp = if family == libc::AF_INET {
                    &buf[((buf[0] & 0x0f) as usize) * 4..n as usize]
                } else {
                    &buf[..n as usize]
                };
                if icmp[0] == reply && icmp[6..8] == seq.to_be_bytes() {
                    break;
                }
            }
        }
        libc::close(fd);
    }
    Ok(())
}

fn socket2_addr(ip: std::net::IpAddr) -> (Vec<u8>, u32) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: reading the bytes of a plain C struct.
            let bytes =
                unsafe { std::slice::from_raw_parts((&raw const sa).cast::<u8>(), size_of::<libc::sockaddr_in>()) };
            (bytes.to_vec(), size_of::<libc::sockaddr_in>() as u32)
        }
        std::net::IpAddr::V6(v6) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: reading the bytes of a plain C struct.
            let bytes =
                unsafe { std::slice::from_raw_parts((&raw const sa).cast::<u8>(), size_of::<libc::sockaddr_in6>()) };
            (bytes.to_vec(), size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
