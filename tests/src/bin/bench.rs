//! `cargo xtask bench`: what the programs cost, measured against a baseline in the same run.
//!
//! A. BPF_PROG_TEST_RUN (kernel-timed, repeat N): the egress program on an existing flow and on
//!    new flows, next to an empty program (the floor). Under test-run the skb carries a dummy
//!    socket, so this times the parse-and-classify path; the per-socket fast path needs real
//!    sockets and is timed in B.
//! B. Real loopback traffic from this process in a cgroup, programs attached vs. detached,
//!    alternating rounds: 64-byte UDP datagrams (connected sockets: the established fast path)
//!    and TCP bulk throughput; plus the kernel's own run-time stats per program run.
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
    programs::{CgroupSkb, ProgramError, TestRun, TestRunOptions},
};
use netaudit::capture::{Capture, CaptureConfig, EBPF_OBJECT, FLOOR_OBJECT, cgroup};
use netaudit_ebpf::names;
use netaudit_tests::{Cgroup, require_kernel, test_cgroup};

const ROUNDS: usize = 5;
const UDP_PACKETS: u32 = 200_000;
const TCP_SECONDS: f64 = 1.0;

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
    for (object, name) in [(&mut floor, names::FLOOR), (&mut ebpf, names::EGRESS)] {
        let p: &mut CgroupSkb = object.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    let run = |name: &str, data: &[u8], repeat: u32| -> Result<Duration, ProgramError> {
        let object = if name == names::FLOOR { &floor } else { &ebpf };
        let p: &CgroupSkb = object.program(name).unwrap().try_into().unwrap();
        let r = p.test_run(TestRunOptions { data_in: Some(data), repeat, ..Default::default() })?;
        assert_eq!(r.return_value, 1, "{name} must pass the packet");
        Ok(r.duration)
    };
    let existing = frame(443);
    let mut pass = Vec::new();
    let mut hit = Vec::new();
    for _ in 0..ROUNDS {
        pass.push(run(names::FLOOR, &existing, 1_000_000)?.as_nanos() as f64);
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

fn real_traffic(cg: &Cgroup) -> Result<()> {
    // Stats add their own cost to every run, so they are on only for this part.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    let mut udp_off = Vec::new();
    let mut udp_on = Vec::new();
    let mut tcp_off = Vec::new();
    let mut tcp_on = Vec::new();
    let mut kernel_ns = Vec::new();
    for _ in 0..ROUNDS {
        udp_off.push(udp_ns_per_packet()?);
        tcp_off.push(tcp_mbytes_per_sec()?);
        let capture = Capture::start(&CaptureConfig::new(vec![cg.path.clone()]))?;
        let before = capture.program_stats()?;
        udp_on.push(udp_ns_per_packet()?);
        let after = capture.program_stats()?;
        tcp_on.push(tcp_mbytes_per_sec()?);
        let (name, t0, n0) = before[0];
        let (_, t1, n1) = after[0];
        assert_eq!(name, "netaudit_egress");
        kernel_ns.push((t1 - t0).as_nanos() as f64 / (n1 - n0).max(1) as f64);
        drop(capture);
    }
    let (uoff, uon, toff, ton, kns) =
        (median(udp_off), median(udp_on), median(tcp_off), median(tcp_on), median(kernel_ns));
    println!("B. Real loopback traffic, alternating detached/attached rounds (median of {ROUNDS})");
    println!("   64-byte UDP, connected sockets, {UDP_PACKETS} datagrams per round (sender + receiver audited)");
    println!("     detached: {uoff:>8.0} ns/packet  {:>10.0} packets/s", 1e9 / uoff);
    println!(
        "     attached: {uon:>8.0} ns/packet  {:>10.0} packets/s   (+{:.0} ns, {:+.1} %)",
        1e9 / uon,
        uon - uoff,
        (uon / uoff - 1.0) * 100.0
    );
    println!("     kernel bpf_stats, egress program on these packets: {kns:.0} ns per run (established fast path)");
    println!("   TCP bulk over loopback, {TCP_SECONDS} s per round, 64 KiB writes");
    println!("     detached: {toff:>8.0} MB/s");
    println!("     attached: {ton:>8.0} MB/s   ({:+.1} %)", (ton / toff - 1.0) * 100.0);
    Ok(())
}

/// Sends UDP_PACKETS 64-byte datagrams between two connected loopback sockets; returns ns/packet.
fn udp_ns_per_packet() -> Result<f64> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(rx.local_addr()?)?;
    rx.connect(tx.local_addr()?)?;
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
