//! Cluster DNS for the lab, both sides of it, as small as RFC 1035 allows.
//!
//! - [`serve`]: the lab's cluster DNS server. It answers A and AAAA questions from a zone file the
//!   lab keeps current (one record per line: `NAME A|AAAA ADDRESS`, names without the final dot),
//!   re-read when it changes, the way CoreDNS's `kubernetes` plugin answers from the API: a name
//!   it does not hold is NXDOMAIN, a name it holds without that type has no answers.
//! - [`resolve`]: a stub resolver that reads `/etc/resolv.conf` as glibc does (the first
//!   `nameserver`, the `search` list, `options ndots:N`), so a probe given `web.x` finds
//!   `web.x.svc.cluster.local` through the pod's search path, as an application would.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_FORMERR: u8 = 1;
/// Answers are short-lived: endpoints move.
const TTL: u32 = 5;

/// What a zone holds: lower-case names to their addresses.
pub type Zone = BTreeMap<String, Vec<IpAddr>>;

/// Reads a zone file; lines that do not parse are skipped.
pub fn parse_zone(text: &str) -> Zone {
    let mut zone = Zone::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(name), Some(ty), Some(value)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(ip) = value.parse::<IpAddr>() else {
            continue;
        };
        if (ty == "A" && ip.is_ipv4()) || (ty == "AAAA" && ip.is_ipv6()) {
            zone.entry(name.trim_end_matches('.').to_ascii_lowercase())
                .or_default()
                .push(ip);
        }
    }
    zone
}

/// A question: its id, flags, name, type, and where the question section ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    pub recursion_desired: bool,
    pub name: String,
    pub qtype: u16,
    end: usize,
}

/// Reads the first question of a query; `None` if it is not one.
pub fn parse_question(msg: &[u8]) -> Option<Question> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression is not allowed in a question's name here
        }
        labels.push(
            std::str::from_utf8(msg.get(at..at + len)?)
                .ok()?
                .to_string(),
        );
        at += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    let _class = u16::from_be_bytes([*msg.get(at + 2)?, *msg.get(at + 3)?]);
    Some(Question {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        recursion_desired: msg[2] & 0x01 != 0,
        name: labels.join(".").to_ascii_lowercase(),
        qtype,
        end: at + 4,
    })
}

/// The answer to `query` from `zone`.
pub fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    let Some(q) = parse_question(query) else {
        // A header we can answer, with a question we cannot read: FORMERR.
        let header = query.get(..12)?;
        let mut r = header.to_vec();
        r[2] = 0x80 | (header[2] & 0x01);
        r[3] = RCODE_FORMERR;
        r[4..12].fill(0);
        return Some(r);
    };
    let records: Vec<IpAddr> = zone
        .get(&q.name)
        .map(|ips| {
            ips.iter()
                .copied()
                .filter(|ip| match q.qtype {
                    TYPE_A => ip.is_ipv4(),
                    TYPE_AAAA => ip.is_ipv6(),
                    _ => false,
                })
                .collect()
        })
        .unwrap_or_default();
    let rcode = if zone.contains_key(&q.name) {
        0
    } else {
        RCODE_NXDOMAIN
    };
    let mut r = Vec::with_capacity(q.end + records.len() * 28);
    r.extend_from_slice(&q.id.to_be_bytes());
    r.push(0x84 | u8::from(q.recursion_desired)); // QR, AA, RD as asked
    r.push(rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(records.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&query[12..q.end]);
    for ip in records {
        r.extend_from_slice(&[0xc0, 12]); // the question's name
        let (ty, data) = match ip {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    Some(r)
}

/// Serves `zone_file` on UDP `port` (both families), re-reading it when it changes.
pub fn serve(zone_file: &Path, port: u16) -> std::io::Result<()> {
    let sock: UdpSocket = crate::bind_any(socket2::Type::DGRAM, port)?.into();
    eprintln!("serving DNS on UDP {port} from {}", zone_file.display());
    let mut zone = Zone::new();
    let mut loaded: Option<SystemTime> = None;
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let modified = std::fs::metadata(zone_file).and_then(|m| m.modified()).ok();
        if modified != loaded {
            zone = parse_zone(&std::fs::read_to_string(zone_file).unwrap_or_default());
            loaded = modified;
        }
        if let Some(r) = answer(&buf[..n], &zone) {
            let _ = sock.send_to(&r, from);
        }
    }
}

/// A query for `name` of `qtype`, with `id`.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// What an answer says: `Err(true)` for NXDOMAIN, `Err(false)` for no records of the type (or
/// another failure), else the addresses.
pub fn addresses(reply: &[u8], id: u16) -> Result<Vec<IpAddr>, bool> {
    let q = reply_question_end(reply, id).ok_or(false)?;
    if reply[3] & 0x0f == RCODE_NXDOMAIN {
        return Err(true);
    }
    let count = u16::from_be_bytes([reply[6], reply[7]]);
    let mut at = q;
    let mut out = Vec::new();
    for _ in 0..count {
        at = skip_name(reply, at).ok_or(false)?;
        let head = reply.get(at..at + 10).ok_or(false)?;
        let ty = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[8], head[9]]) as usize;
        let data = reply.get(at + 10..at + 10 + len).ok_or(false)?;
        match (ty, len) {
            (TYPE_A, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data).expect("4"))),
            (TYPE_AAAA, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data).expect("16"))),
            _ => {}
        }
        at += 10 + len;
    }
    if out.is_empty() { Err(false) } else { Ok(out) }
}

/// Where the question section of a reply to `id` ends.
fn reply_question_end(reply: &[u8], id: u16) -> Option<usize> {
    if reply.len() < 12 || u16::from_be_bytes([reply[0], reply[1]]) != id || reply[2] & 0x80 == 0 {
        return None;
    }
    Some(skip_name(reply, 12)? + 4)
}

fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        at += 1 + len as usize;
        if len == 0 {
            return Some(at);
        }
    }
}

/// `/etc/resolv.conf` as a resolver reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameserver: Option<IpAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
}

pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut rc = ResolvConf {
        nameserver: None,
        search: Vec::new(),
        ndots: 1,
    };
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") if rc.nameserver.is_none() => {
                rc.nameserver = f.next().and_then(|a| a.parse().ok());
            }
            Some("search") => rc.search = f.map(str::to_string).collect(),
            Some("options") => {
                for o in f {
                    if let Some(n) = o.strip_prefix("ndots:").and_then(|n| n.parse().ok()) {
                        rc.ndots = n;
                    }
                }
            }
            _ => {}
        }
    }
    rc
}

/// The names to try for `name`, in order: with fewer than `ndots` dots, the search list first.
pub fn candidates(name: &str, rc: &ResolvConf) -> Vec<String> {
    if let Some(absolute) = name.strip_suffix('.') {
        return vec![absolute.to_string()];
    }
    let searched = rc.search.iter().map(|s| format!("{name}.{s}"));
    if name.matches('.').count() >= rc.ndots {
        std::iter::once(name.to_string()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(name.to_string())).collect()
    }
}

/// Resolves `name` through the pod's resolver configuration within `timeout`: the first address
/// of the first candidate name that has one (A, then AAAA).
pub fn resolve(name: &str, timeout: Duration) -> Result<IpAddr, String> {
    let rc = parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    let server = rc.nameserver.ok_or("no nameserver in /etc/resolv.conf")?;
    let deadline = Instant::now() + timeout;
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .map_err(|e| e.to_string())?;
    sock.connect(SocketAddr::new(server, 53))
        .map_err(|e| e.to_string())?;
    let mut id = (std::process::id() as u16) ^ (name.len() as u16).rotate_left(7);
    for candidate in candidates(name, &rc) {
        for qtype in [TYPE_A, TYPE_AAAA] {
            id = id.wrapping_add(1);
            match ask(&sock, &query(id, &candidate, qtype), id, deadline)? {
                Ok(ips) => return Ok(ips[0]),
                Err(true) => break, // NXDOMAIN: the next candidate
                Err(false) => continue,
            }
        }
    }
    Err(format!("{name}: no such name"))
}

/// One question, asked again every 300 ms until answered or the deadline passes.
fn ask(
    sock: &UdpSocket,
    q: &[u8],
    id: u16,
    deadline: Instant,
) -> Result<Result<Vec<IpAddr>, bool>, String> {
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send(q).map_err(|e| e.to_string())?;
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_millis(300));
        sock.set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        match sock.recv(&mut buf) {
            Ok(n) if reply_question_end(&buf[..n], id).is_some() => {
                return Ok(addresses(&buf[..n], id));
            }
            Ok(_) => continue,
            Err(e) if crate::timed_out(&e) => continue,
            Err(e) => return Err(format!("DNS: {}", e.kind())),
        }
    }
    Err("DNS: timed out".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        parse_zone(
            "s-a.x.svc.cluster.local A 10.96.0.1\n\
             db.x.svc.cluster.local A 10.244.1.2\n\
             db.x.svc.cluster.local A 10.244.2.2\n\
             six.x.svc.cluster.local AAAA fd00::5\n\
             garbage line\n",
        )
    }

    #[test]
    fn answers_hold_the_zones_records_and_say_nxdomain_for_unknown_names() {
        let z = zone();
        let a = answer(&query(7, "DB.x.svc.cluster.local", TYPE_A), &z).unwrap();
        let got = addresses(&a, 7).unwrap();
        assert_eq!(
            got,
            [
                "10.244.1.2".parse::<IpAddr>().unwrap(),
                "10.244.2.2".parse().unwrap()
            ]
        );
        let six = answer(&query(8, "six.x.svc.cluster.local", TYPE_AAAA), &z).unwrap();
        assert_eq!(
            addresses(&six, 8).unwrap(),
            ["fd00::5".parse::<IpAddr>().unwrap()]
        );
        // The name exists without an A record: no answers, not NXDOMAIN.
        let nodata = answer(&query(9, "six.x.svc.cluster.local", TYPE_A), &z).unwrap();
        assert_eq!(addresses(&nodata, 9), Err(false));
        let nx = answer(&query(10, "nope.x.svc.cluster.local", TYPE_A), &z).unwrap();
        assert_eq!(addresses(&nx, 10), Err(true));
        // A reply to another question is not taken.
        assert_eq!(addresses(&a, 8), Err(false));
        // What is not a query gets FORMERR, and a runt gets nothing.
        let bad = answer(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &z).unwrap();
        assert_eq!(bad[3], RCODE_FORMERR);
        assert!(answer(&[0, 1, 2], &z).is_none());
    }

    #[test]
    fn the_search_path_is_tried_as_glibc_tries_it() {
        let rc = parse_resolv_conf(
            "nameserver 10.96.0.10\nsearch x.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        );
        assert_eq!(rc.nameserver, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(rc.ndots, 5);
        assert_eq!(
            candidates("s-a.y", &rc),
            [
                "s-a.y.x.svc.cluster.local",
                "s-a.y.svc.cluster.local",
                "s-a.y.cluster.local",
                "s-a.y"
            ]
        );
        assert_eq!(candidates("example.com.", &rc), ["example.com"]);
        let few = ResolvConf { ndots: 1, ..rc };
        assert_eq!(candidates("a.b", &few)[0], "a.b");
    }
}
