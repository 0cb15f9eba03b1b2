//! `keyway-agnhost`: the only binary in the lab's images (statically linked, no registry needed).
//!
//! - `pause`: the sandbox's process: waits for SIGTERM/SIGINT, reaps children.
//! - `serve --port P --protocol TCP|UDP|SCTP`, or `serve P/PROTO...`: answers on exactly those
//!   ports, IPv4 and IPv6 (or only on `--bind ADDR`). TCP and UDP answer with the pod's hostname
//!   (UDP echoes `soak-client`'s datagrams instead);
//!   SCTP completes the association set-up (see `sctp`).
//! - `probe --protocol P [--timeout-ms T] [--device IF] TARGET:PORT...`: probes every target in
//!   parallel (with `--device`, from sockets bound to that interface) and prints one line per
//!   target: `TARGET:PORT ok` or `TARGET:PORT fail REASON`. A target is an address or a name,
//!   resolved through the pod's `/etc/resolv.conf` (see `dns`).
//! - `dns-server --zone FILE [--port P]`: the lab's cluster DNS (see `dns`).
//! - `bench-server --port P` and `bench-client --target ADDR:PORT --mode rr|http|stream`: request/
//!   response latency, HTTP latency and TCP throughput, printed as one JSON line. `--cpu N` on
//!   either pins it to CPU N: on a small machine a round trip's time depends mostly on whether
//!   client and server share a CPU, so the bench pins them to two, as two nodes would be.
//! - `soak-client --target ADDR:PORT --rate R --seconds S [--tcp ADDR:PORT --tcp-rate R]`:
//!   sequence-numbered UDP datagrams at a fixed rate to a UDP `serve` port (which echoes them),
//!   and which of them were lost; with `--tcp`, at the same time, one TCP connection to a
//!   `bench-server` carrying a request/response at a fixed rate, and every connection error and
//!   slow answer with its time. One JSON line: the soak's exact loss count.
#![forbid(unsafe_code)]

mod dns;
mod sctp;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

/// A read that ran out of time (a socket read timeout reports either kind).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: keyway-agnhost pause\n       keyway-agnhost serve [--bind ADDR] (--port P --protocol TCP|UDP|SCTP | P/PROTO...)\n       keyway-agnhost probe --protocol TCP|UDP|SCTP [--timeout-ms T] [--device IF] TARGET:PORT...\n       keyway-agnhost dns-server --zone FILE [--port P]\n       keyway-agnhost bench-server --port P [--cpu N]\n       keyway-agnhost bench-client --target ADDR:PORT --mode rr|http|crr|stream [--count N] [--seconds S] [--size B] [--cpu N]\n       keyway-agnhost soak-client --target ADDR:PORT --rate R --seconds S [--tcp ADDR:PORT] [--tcp-rate R]"
    );
    ExitCode::from(64)
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "pod".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "pause" => pause(),
        "serve" => {
            let bind: Option<IpAddr> = flag(rest, "--bind").and_then(|a| a.parse().ok());
            let mut listen: Vec<(u16, String)> = rest
                .iter()
                .filter_map(|a| a.split_once('/'))
                .filter_map(|(p, proto)| Some((p.parse().ok()?, proto.to_string())))
                .collect();
            if let (Some(port), Some(proto)) = (
                flag(rest, "--port").and_then(|p| p.parse().ok()),
                flag(rest, "--protocol"),
            ) {
                listen.push((port, proto));
            }
            if listen.is_empty() {
                return usage();
            }
            let handles: Vec<_> = listen
                .into_iter()
                .map(|(port, proto)| std::thread::spawn(move || serve(port, &proto, bind)))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("server panicked")))
            })
        }
        "probe" => return probe(rest),
        "dns-server" => match flag(rest, "--zone") {
            Some(zone) => dns::serve(
                std::path::Path::new(&zone),
                flag(rest, "--port")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(53),
            ),
            None => return usage(),
        },
        "bench-server" => match flag(rest, "--port").and_then(|p| p.parse().ok()) {
            Some(port) => {
                pin(rest);
                bench_server(port)
            }
            None => return usage(),
        },
        "bench-client" => {
            pin(rest);
            return bench_client(rest);
        }
        "soak-client" => return soak_client(rest),
        _ => return usage(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-agnhost {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pause() -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    set.thread_block()?;
    loop {
        match set.wait()? {
            Signal::SIGCHLD => {
                while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if s == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            _ => return Ok(()),
        }
    }
}

/// A socket on `port` for both families when the namespace has IPv6, IPv4 only otherwise; or on
/// `addr` alone.
fn bind_on(ty: Type, port: u16, addr: Option<IpAddr>) -> std::io::Result<Socket> {
    let Some(addr) = addr else {
        return bind_any(ty, port);
    };
    let s = Socket::new(
        if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        },
        ty,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(addr, port).into())?;
    Ok(s)
}

/// A socket on `port` for both families when the namespace has IPv6, IPv4 only otherwise.
fn bind_any(ty: Type, port: u16) -> std::io::Result<Socket> {
    let dual = Socket::new(Domain::IPV6, ty, None).and_then(|s| {
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
        Ok(s)
    });
    match dual {
        Ok(s) => Ok(s),
        Err(_) => {
            let s = Socket::new(Domain::IPV4, ty, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port).into())?;
            Ok(s)
        }
    }
}

fn serve(port: u16, proto: &str, bind: Option<IpAddr>) -> std::io::Result<()> {
    let name = hostname();
    match proto {
        "TCP" => {
            let s = bind_on(Type::STREAM, port, bind)?;
            s.listen(1024)?;
            let l: TcpListener = s.into();
            eprintln!("serving TCP {port}");
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || tcp_conn(conn, &name));
            }
            Ok(())
        }
        "UDP" => {
            let u: UdpSocket = bind_on(Type::DGRAM, port, bind)?.into();
            eprintln!("serving UDP {port}");
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(udp_answer(&buf[..n], name.as_bytes()), from);
                }
            }
        }
        "SCTP" => {
            eprintln!("serving SCTP {port} (user space, over raw sockets)");
            sctp::serve(port)
        }
        other => Err(std::io::Error::other(format!("unknown protocol {other}"))),
    }
}

fn tcp_conn(mut c: TcpStream, name: &str) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut first = [0u8; 4];
    let n = c.peek(&mut first).unwrap_or(0);
    if n >= 4 && &first == b"GET " {
        let mut r = BufReader::new(c.try_clone().expect("clone"));
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line == "\r\n" {
                break;
            }
            line.clear();
        }
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
            name.len()
        );
        return;
    }
    let _ = writeln!(c, "{name}");
}

/// A socket for a probe, bound to `device` when given (SO_BINDTODEVICE: it leaves through that
/// interface whatever the routing rules say, as a workload trying to get around keyway would).
fn probe_socket(target: SocketAddr, ty: Type, device: Option<&str>) -> Result<Socket, String> {
    let s = Socket::new(Domain::for_address(target), ty, None).map_err(|e| e.to_string())?;
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes()))
            .map_err(|e| format!("bind to {d}: {e}"))?;
    }
    Ok(s)
}

fn probe_one(
    proto: &str,
    target: SocketAddr,
    timeout: Duration,
    seq: u16,
    device: Option<&str>,
) -> Result<(), String> {
    match proto {
        "TCP" => {
            let s = probe_socket(target, Type::STREAM, device)?;
            s.connect_timeout(&target.into(), timeout)
                .map_err(|e| e.kind().to_string())?;
            let mut s: TcpStream = s.into();
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.write_all(b"probe\n").map_err(|e| e.kind().to_string())?;
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err("closed without answering".into()),
                Err(e) => Err(e.kind().to_string()),
            }
        }
        "UDP" => {
            let any: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let u = probe_socket(target, Type::DGRAM, device)?;
            u.bind(&any.into()).map_err(|e| e.to_string())?;
            let u: UdpSocket = u.into();
            u.connect(target).map_err(|e| e.to_string())?;
            u.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let deadline = Instant::now() + timeout;
            let mut b = [0u8; 256];
            // Retry within the timeout: UDP may lose the first datagram (e.g. while ARP resolves).
            while Instant::now() < deadline {
                u.send(b"probe").map_err(|e| e.to_string())?;
                u.set_read_timeout(Some(
                    Duration::from_millis(300).min(
                        deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(1)),
                    ),
                ))
                .map_err(|e| e.to_string())?;
                match u.recv(&mut b) {
                    Ok(_) => return Ok(()),
                    Err(e) if timed_out(&e) => continue,
                    Err(e) => return Err(e.kind().to_string()),
                }
            }
            Err("timed out".into())
        }
        "SCTP" => sctp::connect(target, 40000 + seq, timeout, device).map_err(|e| e.to_string()),
        other => Err(format!("unknown protocol {other}")),
    }
}

/// A probe target's address: as given, or its name resolved (within `timeout`).
fn target_addr(target: &str, timeout: Duration) -> Result<SocketAddr, String> {
    if let Ok(a) = target.parse() {
        return Ok(a);
    }
    let (host, port) = target.rsplit_once(':').ok_or("no port")?;
    let port: u16 = port.parse().map_err(|_| "bad port")?;
    let ip = dns::resolve(host, timeout).map_err(|e| format!("resolve: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn probe(args: &[String]) -> ExitCode {
    let Some(proto) = flag(args, "--protocol") else {
        return usage();
    };
    let timeout = Duration::from_millis(
        flag(args, "--timeout-ms")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1000),
    );
    let device = flag(args, "--device");
    let mut targets = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a.starts_with("--") {
            skip = true;
            continue;
        }
        let named = a
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty() && !host.contains(':'))
            .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)));
        if a.parse::<SocketAddr>().is_err() && named.is_none() {
            eprintln!("not an ADDR:PORT or NAME:PORT: {a}");
            return ExitCode::from(64);
        }
        targets.push(a.clone());
    }
    let handles: Vec<_> = targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (proto, device) = (proto.clone(), device.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let r = target_addr(&t, timeout).and_then(|addr| {
                    let left = timeout.saturating_sub(started.elapsed());
                    probe_one(&proto, addr, left, i as u16, device.as_deref())
                });
                (t, r)
            })
        })
        .collect();
    let mut out = String::new();
    for h in handles {
        let (t, r) = h.join().expect("probe thread");
        match r {
            Ok(()) => out.push_str(&format!("{t} ok\n")),
            Err(e) => out.push_str(&format!("{t} fail {e}\n")),
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

fn bench_server(port: u16) -> std::io::Result<()> {
    let s = bind_any(Type::STREAM, port)?;
    s.listen(128)?;
    let l: TcpListener = s.into();
    for conn in l.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = bench_conn(conn);
        });
    }
    Ok(())
}

fn bench_conn(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    c.read_exact(&mut mode)?;
    match mode[0] {
        b'R' => {
            let mut sz = [0u8; 4];
            c.read_exact(&mut sz)?;
            let mut buf = vec![0u8; u32::from_be_bytes(sz) as usize];
            loop {
                if c.read_exact(&mut buf).is_err() {
                    return Ok(());
                }
                c.write_all(&buf)?;
            }
        }
        b'H' => {
            let mut r = BufReader::new(c.try_clone()?);
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == "\r\n" {
                    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
                }
            }
        }
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            c.write_all(&total.to_be_bytes())
        }
        _ => Ok(()),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Pins this process (the calling thread, and the threads it starts after) to the CPU `--cpu`
/// names, modulo the CPUs there are. Without the flag, or where it cannot, it runs where the
/// scheduler puts it.
fn pin(args: &[String]) {
    use nix::sched::{CpuSet, sched_setaffinity};
    let Some(cpu) = flag(args, "--cpu").and_then(|c| c.parse::<usize>().ok()) else {
        return;
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = CpuSet::new();
    if set.set(cpu % cpus).is_ok()
        && let Err(e) = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
    {
        eprintln!("cannot pin to CPU {cpu}: {e}");
    }
}

fn bench_client(args: &[String]) -> ExitCode {
    let (Some(target), Some(mode)) = (
        flag(args, "--target").and_then(|t| t.parse::<SocketAddr>().ok()),
        flag(args, "--mode"),
    ) else {
        return usage();
    };
    let count: usize = flag(args, "--count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000);
    let seconds: f64 = flag(args, "--seconds")
        .and_then(|c| c.parse().ok())
        .unwrap_or(3.0);
    let size: usize = flag(args, "--size")
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    let r = (|| -> std::io::Result<serde_json::Value> {
        if mode == "crr" {
            // A connection per request (as TCP_CRR): connect, one HTTP exchange, close. What
            // a flow's first packets cost, where "rr" measures an established flow's.
            let mut lat = Vec::with_capacity(count);
            for i in 0..count + count / 10 {
                let t = Instant::now();
                let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                c.write_all(b"HGET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                let mut resp = [0u8; 40];
                c.read_exact(&mut resp)?;
                drop(c);
                if i >= count / 10 {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            lat.sort_by(f64::total_cmp);
            return Ok(
                serde_json::json!({"mode": mode, "count": lat.len(), "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99)}),
            );
        }
        let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        match mode.as_str() {
            "rr" | "http" => {
                if mode == "rr" {
                    c.write_all(b"R")?;
                    c.write_all(&(size as u32).to_be_bytes())?;
                } else {
                    c.write_all(b"H")?;
                }
                let req = if mode == "rr" {
                    vec![0x5au8; size]
                } else {
                    b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n".to_vec()
                };
                let mut resp = vec![0u8; if mode == "rr" { size } else { 40 }];
                let mut lat = Vec::with_capacity(count);
                for i in 0..count + count / 10 {
                    let t = Instant::now();
                    c.write_all(&req)?;
                    if mode == "rr" {
                        c.read_exact(&mut resp)?;
                    } else {
                        // "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" is 40 bytes.
                        c.read_exact(&mut resp[..40])?;
                    }
                    // The first tenth warms up (ARP, caches, flow state).
                    if i >= count / 10 {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                lat.sort_by(f64::total_cmp);
                let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
                Ok(
                    serde_json::json!({"mode": mode, "count": lat.len(), "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99), "mean_us": mean}),
                )
            }
            "stream" => {
                c.write_all(b"S")?;
                let chunk = vec![0xa5u8; 128 * 1024];
                let t = Instant::now();
                let mut sent: u64 = 0;
                while t.elapsed().as_secs_f64() < seconds {
                    c.write_all(&chunk)?;
                    sent += chunk.len() as u64;
                }
                c.shutdown(std::net::Shutdown::Write)?;
                let mut got = [0u8; 8];
                c.read_exact(&mut got)?;
                let received = u64::from_be_bytes(got);
                let secs = t.elapsed().as_secs_f64();
                Ok(
                    serde_json::json!({"mode": mode, "sent_bytes": sent, "received_bytes": received, "seconds": secs, "gbps": received as f64 * 8.0 / secs / 1e9}),
                )
            }
            other => Err(std::io::Error::other(format!("unknown mode {other}"))),
        }
    })();
    match r {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"mode": mode, "error": e.to_string()})
            );
            ExitCode::FAILURE
        }
    }
}

/// The start of a soak datagram: `soak-client`'s, which a UDP `serve` port echoes whole.
const SOAK_MAGIC: &[u8; 8] = b"KWSOAK1\0";

/// What a UDP `serve` port answers: a soak datagram itself, anything else the pod's name.
fn udp_answer<'a>(datagram: &'a [u8], name: &'a [u8]) -> &'a [u8] {
    if datagram.starts_with(SOAK_MAGIC) {
        datagram
    } else {
        name
    }
}

/// What one soak run saw: datagrams sent, echoes received, and the lost sequence numbers as
/// inclusive ranges.
#[derive(Debug, PartialEq, Eq)]
struct SoakRun {
    sent: u64,
    received: u64,
    lost: Vec<(u64, u64)>,
}

/// Sends `rate` datagrams a second for `seconds` to `target` and waits a second for the last
/// echoes. A datagram is lost when its echo never comes. Sequence number `n` is due `n / rate`
/// seconds after `start`.
fn soak_udp(
    target: SocketAddr,
    rate: u64,
    seconds: f64,
    start: Instant,
) -> std::io::Result<SoakRun> {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let u = UdpSocket::bind(any)?;
    u.connect(target)?;
    u.set_read_timeout(Some(Duration::from_millis(100)))?;
    let total = (rate as f64 * seconds).round() as u64;
    let rx = u.try_clone()?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = vec![false; total as usize];
            let mut buf = [0u8; 64];
            let mut drain_until: Option<Instant> = None;
            loop {
                if drain_until.is_none() && done.load(std::sync::atomic::Ordering::Acquire) {
                    drain_until = Some(Instant::now() + Duration::from_secs(1));
                }
                if drain_until.is_some_and(|d| Instant::now() > d) {
                    return seen;
                }
                if let Ok(n) = rx.recv(&mut buf)
                    && n == 16
                    && buf.starts_with(SOAK_MAGIC)
                {
                    let seq = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
                    if let Some(s) = seen.get_mut(seq as usize) {
                        *s = true;
                    }
                }
            }
        })
    };
    let mut datagram = [0u8; 16];
    datagram[..8].copy_from_slice(SOAK_MAGIC);
    for seq in 0..total {
        let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        datagram[8..].copy_from_slice(&seq.to_be_bytes());
        // A send that fails (no route while an agent restarts) is a loss like any other.
        let _ = u.send(&datagram);
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let seen = receiver
        .join()
        .map_err(|_| std::io::Error::other("receiver panicked"))?;
    let mut lost: Vec<(u64, u64)> = Vec::new();
    for (i, ok) in seen.iter().enumerate() {
        let i = i as u64;
        if *ok {
            continue;
        }
        match lost.last_mut() {
            Some(r) if r.1 + 1 == i => r.1 = i,
            _ => lost.push((i, i)),
        }
    }
    Ok(SoakRun {
        sent: total,
        received: seen.iter().filter(|s| **s).count() as u64,
        lost,
    })
}

/// A round trip slower than this is reported with its time (a retransmission, an outage).
const TCP_SLOW: Duration = Duration::from_millis(200);

/// How long an answer may take before the connection counts as broken.
const TCP_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What one TCP soak run saw: round trips asked and answered, connection errors (each with its
/// time after `start` in ms and its kind; the connection is opened again), and slow round trips
/// (time after `start` in ms, round trip in ms).
#[derive(Debug, Default, PartialEq)]
struct TcpRun {
    requests: u64,
    answered: u64,
    errors: Vec<(u64, String)>,
    slow: Vec<(u64, u64)>,
}

/// The name of a connection error, as the soak reports it.
fn tcp_error_kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset".into(),
        K::ConnectionRefused => "refused".into(),
        K::UnexpectedEof => "closed".into(),
        _ if timed_out(e) => "timeout".into(),
        _ => e.kind().to_string(),
    }
}

/// One `bench-server` connection in request/response mode for `seconds`, a 16-byte round trip
/// `rate` times a second; a connection that fails is counted and opened again.
fn soak_tcp(target: SocketAddr, rate: u64, seconds: f64, start: Instant) -> TcpRun {
    const SIZE: usize = 16;
    let mut run = TcpRun::default();
    let end = start + Duration::from_secs_f64(seconds);
    let ms = |t: Instant| t.saturating_duration_since(start).as_millis() as u64;
    let open = || -> std::io::Result<TcpStream> {
        let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(TCP_ANSWER_TIMEOUT))?;
        c.write_all(b"R")?;
        c.write_all(&(SIZE as u32).to_be_bytes())?;
        Ok(c)
    };
    let mut conn: Option<TcpStream> = None;
    let mut buf = [0u8; SIZE];
    let mut n: u64 = 0;
    loop {
        if Instant::now() >= end {
            return run;
        }
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        if due >= end {
            return run;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        n += 1;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match open() {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    run.errors.push((ms(Instant::now()), tcp_error_kind(&e)));
                    n = skip_missed(n, start, rate);
                    continue;
                }
            },
        };
        run.requests += 1;
        let sent = Instant::now();
        let r = c
            .write_all(&n.to_be_bytes().repeat(2))
            .and_then(|()| c.read_exact(&mut buf));
        match r {
            Ok(()) => {
                run.answered += 1;
                let rtt = sent.elapsed();
                if rtt > TCP_SLOW {
                    run.slow.push((ms(sent), rtt.as_millis() as u64));
                }
            }
            Err(e) => {
                run.errors.push((ms(sent), tcp_error_kind(&e)));
                conn = None;
                n = skip_missed(n, start, rate);
            }
        }
    }
}

/// After a failure: the round trips that fell due meanwhile are not made up in a burst.
fn skip_missed(n: u64, start: Instant, rate: u64) -> u64 {
    n.max((start.elapsed().as_secs_f64() * rate as f64) as u64)
}

/// Milliseconds since the Unix epoch: what the soak maps sequence numbers to.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn soak_client(args: &[String]) -> ExitCode {
    let (Some(target), Some(rate), Some(seconds)) = (
        flag(args, "--target").and_then(|t| t.parse::<SocketAddr>().ok()),
        flag(args, "--rate")
            .and_then(|r| r.parse::<u64>().ok())
            .filter(|r| *r > 0),
        flag(args, "--seconds")
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0),
    ) else {
        return usage();
    };
    let tcp = match flag(args, "--tcp").map(|t| t.parse::<SocketAddr>()) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => return usage(),
    };
    let tcp_rate = match flag(args, "--tcp-rate").map(|r| r.parse::<u64>()) {
        None => 20,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => return usage(),
    };
    let start_unix_ms = unix_ms();
    let start = Instant::now();
    let tcp = tcp.map(|t| std::thread::spawn(move || soak_tcp(t, tcp_rate, seconds, start)));
    let mut v = match soak_udp(target, rate, seconds, start) {
        Ok(r) => serde_json::json!({
            "start_unix_ms": start_unix_ms,
            "sent": r.sent, "received": r.received, "rate": rate,
            "lost": r.lost.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
        }),
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    if let Some(t) = tcp {
        v["tcp"] = match t.join() {
            Ok(r) => serde_json::json!({
                "rate": tcp_rate, "requests": r.requests, "answered": r.answered,
                "errors": r.errors, "slow": r.slow,
            }),
            Err(_) => serde_json::json!({"error": "the TCP thread panicked"}),
        };
    }
    println!("{v}");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback that answers as `serve` does, but drops every `nth` datagram.
    fn echo(nth: u64) -> SocketAddr {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = u.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut k = 0u64;
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                k += 1;
                if nth == 0 || !k.is_multiple_of(nth) {
                    let _ = u.send_to(udp_answer(&buf[..n], b"pod"), from);
                }
            }
        });
        addr
    }

    #[test]
    fn soak_datagrams_are_echoed_and_every_loss_is_named() {
        let clean = soak_udp(echo(0), 500, 0.5, Instant::now()).unwrap();
        assert_eq!((clean.sent, clean.received), (250, 250));
        assert!(clean.lost.is_empty());
        let lossy = soak_udp(echo(10), 500, 0.5, Instant::now()).unwrap();
        assert_eq!(lossy.sent, 250);
        assert_eq!(lossy.received, 225);
        assert_eq!(lossy.lost.len(), 25);
        assert_eq!(lossy.lost[0], (9, 9), "the tenth datagram, sequence 9");
    }

    /// A `bench-server` on loopback whose connections end after `answers` round trips (0: never).
    fn rr_server(answers: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    if answers == 0 {
                        let _ = bench_conn(c);
                        return;
                    }
                    let mut c = c;
                    let mut head = [0u8; 5];
                    let mut req = [0u8; 16];
                    if c.read_exact(&mut head).is_err() {
                        return;
                    }
                    for _ in 0..answers {
                        if c.read_exact(&mut req).is_err() || c.write_all(&req).is_err() {
                            return;
                        }
                    }
                    // Dropped here: the client's next round trip finds the connection closed.
                });
            }
        });
        addr
    }

    #[test]
    fn soak_tcp_answers_every_round_trip_of_a_healthy_connection() {
        let r = soak_tcp(rr_server(0), 100, 0.5, Instant::now());
        assert_eq!(r.requests, 50);
        assert_eq!(r.answered, 50);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    #[test]
    fn soak_tcp_counts_a_broken_connection_and_opens_another() {
        let r = soak_tcp(rr_server(10), 100, 0.5, Instant::now());
        assert_eq!(r.requests, 50);
        // Every eleventh round trip finds its connection closed.
        assert_eq!(r.answered, 50 - 4, "{r:?}");
        assert_eq!(r.errors.len(), 4, "{r:?}");
        assert!(
            r.errors.iter().all(|(_, k)| k == "closed" || k == "reset"),
            "{r:?}"
        );
        assert!(
            r.errors[0].0 >= 100,
            "the first break comes after 10 answers: {r:?}"
        );
    }

    #[test]
    fn other_datagrams_still_get_the_pod_name() {
        assert_eq!(udp_answer(b"probe", b"pod"), b"pod");
        assert_eq!(udp_answer(b"KWSOAK1\0\0\0\0\0\0\0\0\x07", b"pod").len(), 16);
    }
}
