//! `cargo xtask bench`: what the programs cost, measured against a baseline in the same run.
//!
//! A. BPF_PROG_TEST_RUN (kernel-timed, repeat N): the egress program on an existing flow and on
//!    new flows, next to an empty program (the floor). Under test-run the skb carries a dummy
//!    socket, so this times the parse-and-classify path; the per-socket fast path needs real
//!    sockets and is timed in B.
//! B. Real loopback traffic from this process in a cgroup, in alternating rounds with nothing
//!    attached, with the floor (empty programs at the same two hooks, egress and ingress: what
//!    any cgroup_skb design pays) and with netaudit's programs: 64-byte UDP datagrams from a
//!    connected sender to an unconnected receiver, 64-byte writes on one established TCP
//!    connection (no Nagle: one segment each), and TCP bulk throughput; plus the kernel's own
//!    run-time stats per program run, floor against netaudit.
//!
//! C. The fast path's price, step by step: on the TCP 64-byte workload, the kernel's ns per run
//!    of the floor, of each rung above it (full socket, + socket storage, + clock, + two atomic
//!    adds: `netaudit-floor`'s rung programs) and of netaudit's programs, in alternating rounds.
//!
//! Root only. Prints a table; BENCHMARKS.md records a run and how to read it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    EbpfLoader,
    maps::HashMap,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError, TestRun, TestRunOptions},
};
use netaudit::capture::{Capture, CaptureConfig, EBPF_OBJECT, FLOOR_OBJECT, cgroup};
use netaudit_ebpf::names;
use netaudit_tests::{Cgroup, require_kernel, test_cgroup};

const ROUNDS: usize = 5;
const UDP_PACKETS: u32 = 200_000;
const TCP_SECONDS: f64 = 1.0;
const TCP_WRITES: u32 = 200_000;

fn main() -> Result<()> {
    if !require_kernel() {
        anyhow::bail!("the benchmarks need root");
    }
    let cg = test_cgroup()?;
    // This whole process moves into the bench cgroup: test-run skbs and real sockets then belong to it.
    std::fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string())?;
    let _restore = Restore;

    println!("netaudit bench — kernel {}, {} CPUs", kernel(), std::thread::available_parallelism()?.get());
    println!();
    test_run(&cg)?;
    println!();
    real_traffic(&cg)?;
    println!();
    steps(&cg)?;
    Ok(())
}

/// Moves this process back to the cgroup root so the bench cgroup can be removed.
struct Restore;
impl Drop for Restore {
    fn drop(&mut self) {
        if let Ok(root) = cgroup::cgroup2_mount() {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// An IPv4/TCP ACK packet with a 64-byte payload, behind an Ethernet header (test-run strips it).
fn frame(dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + 64];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 20 + 64).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[192, 0, 2, 1]);
    ip[16..20].copy_from_slice(&[198, 51, 100, 7]);
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    f
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn test_run(cg: &Cgroup) -> Result<()> {
    let mut ebpf = EbpfLoader::new().map_max_entries(names::FLOWS, 1 << 17).load(EBPF_OBJECT)?;
    let mut floor = EbpfLoader::new().load(FLOOR_OBJECT)?;
    let id = cgroup::cgroup_id(&cg.path)?;
    HashMap::<_, u64, u8>::try_from(ebpf.map_mut(names::AUDITED).unwrap())?.insert(id, 1, 0)?;
    for (object, name) in [(&mut floor, names::FLOOR[0]), (&mut ebpf, names::EGRESS)] {
        let p: &mut CgroupSkb = object.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    let run = |name: &str, data: &[u8], repeat: u32| -> Result<Duration, ProgramError> {
        let object = if name == names::FLOOR[0] { &floor } else { &ebpf };
        let p: &CgroupSkb = object.program(name).unwrap().try_into().unwrap();
        let r = p.test_run(TestRunOptions { data_in: Some(data), repeat, ..Default::default() })?;
        assert_eq!(r.return_value, 1, "{name} must pass the packet");
        Ok(r.duration)
    };
    let existing = frame(443);
    let mut pass = Vec::new();
    let mut hit = Vec::new();
    for _ in 0..ROUNDS {
        pass.push(run(names::FLOOR[0], &existing, 1_000_000)?.as_nanos() as f64);
        hit.push(run(names::EGRESS, &existing, 1_000_000)?.as_nanos() as f64);
    }
    // New flows: one run per distinct destination port, averaged.
    let mut new = Vec::new();
    let mut port = 1u16;
    for _ in 0..ROUNDS {
        let mut kernel = Duration::ZERO;
        for _ in 0..10_000 {
            kernel += run(names::EGRESS, &frame(port), 1)?;
            port = port.wrapping_add(1).max(1);
        }
        new.push(kernel.as_nanos() as f64 / 10_000.0);
    }
    let (pass, hit, new) = (median(pass), median(hit), median(new));
    println!("A. BPF_PROG_TEST_RUN, ns per run (median of {ROUNDS} rounds; IPv4/TCP, 64-byte payload)");
    println!("   {:<46} {:>8}", "empty program (floor)", format!("{pass:.0}"));
    println!(
        "   {:<46} {:>8}   (+{:.0} over floor)",
        "egress, existing flow (parse+classify+update)",
        format!("{hit:.0}"),
        hit - pass
    );
    println!("   {:<46} {:>8}   (+{:.0} over floor)", "egress, new flow (insert)", format!("{new:.0}"), new - pass);
    println!(
        "   note: 1-run timings include the kernel's per-call overhead; compare them with each other, not with repeat runs"
    );
    Ok(())
}

/// What is attached to the bench cgroup during a round.
#[derive(Clone, Copy, PartialEq)]
enum Attached {
    Nothing,
    Floor,
    Netaudit,
}

/// One round's figures per workload (UDP ns/packet, TCP ns/write, TCP bulk MB/s), each with the
/// kernel's ns per program run during it (when programs were attached).
type Figures = [(f64, Option<f64>); 3];

fn real_traffic(cg: &Cgroup) -> Result<()> {
    // Stats add their own cost to every run, so they are on only for this part.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    let states = [Attached::Nothing, Attached::Floor, Attached::Netaudit];
    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); states.len()];
    for _ in 0..ROUNDS {
        for (i, &state) in states.iter().enumerate() {
            rounds[i].push(round(cg, state)?);
        }
    }
    println!(
        "B. Real loopback traffic, alternating rounds: nothing / floor (empty programs, same hooks) / netaudit (median of {ROUNDS})"
    );
    let labels = [
        (format!("64-byte UDP, connected sender -> unconnected receiver, {UDP_PACKETS} datagrams"), "ns/packet", true),
        (format!("TCP, 64-byte writes on one connection, {TCP_WRITES} writes"), "ns/write", true),
        (format!("TCP bulk, {TCP_SECONDS} s, 64 KiB writes (cost: throughput lost)"), "MB/s", false),
    ];
    for (w, (label, unit, lower_is_better)) in labels.iter().enumerate() {
        let med = |i: usize| median(rounds[i].iter().map(|r| r[w].0).collect());
        let kernel = |i: usize| median(rounds[i].iter().filter_map(|r| r[w].1).collect());
        let (n, e, a) = (med(0), med(1), med(2));
        let pct = |x: f64| if *lower_is_better { (x / n - 1.0) * 100.0 } else { (1.0 - x / n) * 100.0 };
        println!("   {label}");
        println!(
            "     nothing {n:>7.0} {unit:<9} floor {e:>7.0} ({:+.1} %)   netaudit {a:>7.0} ({:+.1} %)   over the floor {:.1} points",
            pct(e),
            pct(a),
            pct(a) - pct(e)
        );
        let (kf, kn) = (kernel(1), kernel(2));
        println!(
            "     kernel bpf_stats per program run: floor {kf:.0} ns, netaudit {kn:.0} ns, over the floor {:.0} ns",
            kn - kf
        );
    }
    Ok(())
}

/// One round of every workload with `state` attached; with each, the kernel's ns per run of
/// what was attached (egress and ingress programs together).
fn round(cg: &Cgroup, state: Attached) -> Result<Figures> {
    let mut floor = None;
    let mut capture = None;
    match state {
        Attached::Nothing => {}
        Attached::Floor => floor = Some(attach_floor(cg)?),
        Attached::Netaudit => capture = Some(Capture::start(&CaptureConfig::new(vec![cg.path.clone()]))?),
    }
    let stats = || -> Result<(Duration, u64)> {
        match (&floor, &capture) {
            (Some(f), _) => floor_stats(f),
            (_, Some(c)) => skb_stats(c),
            _ => Ok((Duration::ZERO, 0)),
        }
    };
    let workloads: [fn() -> Result<f64>; 3] = [udp_ns_per_packet, tcp_ns_per_write, tcp_mbytes_per_sec];
    let mut figures = [(0.0, None); 3];
    for (w, workload) in workloads.iter().enumerate() {
        let before = stats()?;
        let figure = workload()?;
        let after = stats()?;
        let runs = after.1 - before.1;
        figures[w] = (figure, (runs > 0).then(|| (after.0 - before.0).as_nanos() as f64 / runs as f64));
    }
    Ok(figures)
}

fn steps(cg: &Cgroup) -> Result<()> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    let mut object = EbpfLoader::new().load(FLOOR_OBJECT)?;
    for name in names::RUNGS {
        let p: &mut CgroupSkb = object.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let file = std::fs::File::open(&cg.path)?;
    let mut per_rung: Vec<Vec<f64>> = vec![Vec::new(); names::RUNGS.len() + 2];
    for _ in 0..ROUNDS {
        let floor = attach_floor(cg)?;
        per_rung[0].push(kernel_ns_during(|| floor_stats(&floor), tcp_ns_per_write)?);
        drop(floor);
        for (i, name) in names::RUNGS.into_iter().enumerate() {
            let p: &mut CgroupSkb = object.program_mut(name).context(name)?.try_into()?;
            let links = [CgroupSkbAttachType::Egress, CgroupSkbAttachType::Ingress]
                .map(|hook| p.attach(&file, hook, CgroupAttachMode::Single));
            let p: &CgroupSkb = object.program(name).context(name)?.try_into()?;
            let ns = kernel_ns_during(|| Ok(p.info().map(|i| (i.run_time(), i.run_count()))?), tcp_ns_per_write)?;
            per_rung[i + 1].push(ns);
            let p: &mut CgroupSkb = object.program_mut(name).context(name)?.try_into()?;
            for link in links {
                p.detach(link?)?;
            }
        }
        let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()]))?;
        let ns = kernel_ns_during(|| skb_stats(&capture), tcp_ns_per_write)?;
        per_rung[names::RUNGS.len() + 1].push(ns);
    }
    println!("C. The fast path step by step: kernel ns per program run on 64-byte TCP writes (median of {ROUNDS})");
    let labels = ["floor (empty)", "+ full socket", "+ socket storage", "+ clock", "+ two atomic adds", "netaudit"];
    let floor = median(per_rung[0].clone());
    for (label, runs) in labels.iter().zip(&per_rung) {
        let ns = median(runs.clone());
        println!("   {label:<20} {ns:>6.0} ns   (+{:.0} over the floor)", ns - floor);
    }
    Ok(())
}

fn floor_stats(floor: &aya::Ebpf) -> Result<(Duration, u64)> {
    let mut total = (Duration::ZERO, 0);
    for name in names::FLOOR {
        let info = floor.program(name).context(name)?.info()?;
        total = (total.0 + info.run_time(), total.1 + info.run_count());
    }
    Ok(total)
}

/// Total run time and runs of a capture's two cgroup_skb programs.
fn skb_stats(capture: &Capture) -> Result<(Duration, u64)> {
    let skb = capture.program_stats()?.into_iter().filter(|(n, _, _)| *n == names::EGRESS || *n == names::INGRESS);
    Ok(skb.fold((Duration::ZERO, 0), |(t, n), (_, dt, dn)| (t + dt, n + dn)))
}

/// Runs `workload` and returns the kernel's ns per program run meanwhile, from `stats` (total
/// run time and runs) read before and after.
fn kernel_ns_during(stats: impl Fn() -> Result<(Duration, u64)>, workload: fn() -> Result<f64>) -> Result<f64> {
    let before = stats()?;
    workload()?;
    let after = stats()?;
    Ok((after.0 - before.0).as_nanos() as f64 / (after.1 - before.1).max(1) as f64)
}

/// The floor's two programs attached to the bench cgroup (detached when dropped).
fn attach_floor(cg: &Cgroup) -> Result<aya::Ebpf> {
    let mut floor = EbpfLoader::new().load(FLOOR_OBJECT)?;
    let file = std::fs::File::open(&cg.path)?;
    for (name, hook) in names::FLOOR.into_iter().zip([CgroupSkbAttachType::Egress, CgroupSkbAttachType::Ingress]) {
        let p: &mut CgroupSkb = floor.program_mut(name).context(name)?.try_into()?;
        p.load()?;
        p.attach(&file, hook, CgroupAttachMode::Single)?;
    }
    Ok(floor)
}

/// A loopback TCP listener whose one connection is read to its end on a thread; the thread
/// returns the bytes it read.
fn tcp_sink() -> Result<(std::net::SocketAddr, std::thread::JoinHandle<u64>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> u64 {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    Ok((addr, reader))
}

/// 64-byte writes on one established TCP connection (Nagle off: a segment each), read by a sink;
/// returns ns per write.
fn tcp_ns_per_write() -> Result<f64> {
    let (addr, reader) = tcp_sink()?;
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let payload = [0x5au8; 64];
    let start = Instant::now();
    for _ in 0..TCP_WRITES {
        s.write_all(&payload)?;
    }
    let elapsed = start.elapsed();
    drop(s);
    let received = reader.join().unwrap();
    anyhow::ensure!(received == 64 * TCP_WRITES as u64, "TCP lost bytes: received {received}");
    Ok(elapsed.as_nanos() as f64 / TCP_WRITES as f64)
}

/// Sends UDP_PACKETS 64-byte datagrams from a connected socket to an unconnected one over
/// loopback; returns ns/packet.
fn udp_ns_per_packet() -> Result<f64> {
    // The receiver stays unconnected, as a UDP server's socket is.
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(rx.local_addr()?)?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        let mut n = 0u32;
        while rx.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    let payload = [0u8; 64];
    let start = Instant::now();
    for _ in 0..UDP_PACKETS {
        // A full receive queue makes send fail with ENOBUFS only on some paths; keep sending.
        let _ = tx.send(&payload);
    }
    let elapsed = start.elapsed();
    let _received = reader.join().unwrap();
    Ok(elapsed.as_nanos() as f64 / UDP_PACKETS as f64)
}

/// TCP throughput over loopback for TCP_SECONDS; returns MB/s.
fn tcp_mbytes_per_sec() -> Result<f64> {
    let (addr, reader) = tcp_sink()?;
    let mut s = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 16];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < TCP_SECONDS {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    drop(s);
    let received = reader.join().unwrap();
    anyhow::ensure!(received == sent, "TCP lost bytes: sent {sent}, received {received}");
    Ok(sent as f64 / start.elapsed().as_secs_f64() / 1e6)
}
