//! Connection table: per tracked connection, its addresses, role, protocol decoder and the byte
//! offsets that reveal lost events.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustc_hash::FxHashMap;

use zerotel_abi::{direction, role, DataMeta, Endpoint};

use crate::protocols::{
    http1::{Http1Connection, Segment, Side},
    http2::H2Connection,
    kafka::KafkaConnection,
    postgres::PgConnection,
};

/// Connections tracked at once; matches the kernel's CONNS bound.
pub const MAX_CONNS: usize = zerotel_abi::limits::CONNS as usize;

pub struct Connection {
    pub pid: u32,
    pub fd: u32,
    pub is_server: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Addresses as span attributes show them, formatted once per connection.
    pub local_ip: String,
    pub remote_ip: String,
    pub http: Http1Connection,
    /// The PostgreSQL decoder, made on the connection's first PostgreSQL message.
    pub postgres: Option<Box<PgConnection>>,
    /// The Kafka decoder, made on the connection's first captured Kafka bytes.
    pub kafka: Option<Box<KafkaConnection>>,
    /// The HTTP/2 decoder, made on the connection's first captured HTTP/2 bytes.
    pub h2: Option<Box<H2Connection>>,
    /// TLS: its data events are the plaintext OpenSSL read or wrote.
    pub tls: bool,
    /// The kernel's ids for the request whose first byte came at this time: a head read in
    /// several pieces completes (and is reported) on a later segment than the one carrying them.
    pub kernel_ids: Option<(u64, zerotel_abi::SpanIds)>,
    /// Next expected byte offset per direction; None until the first event.
    next_seq: [Option<u64>; 2],
}

impl Connection {
    pub fn new(pid: u32, fd: u32, conn_role: u8, local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            pid,
            fd,
            is_server: conn_role == role::SERVER,
            local,
            remote,
            local_ip: local.ip().to_canonical().to_string(),
            remote_ip: remote.ip().to_canonical().to_string(),
            http: Http1Connection::new(),
            postgres: None,
            kafka: None,
            h2: None,
            tls: false,
            kernel_ids: None,
            next_seq: [None; 2],
        }
    }

    /// The connection carries TLS: what comes next is its plaintext, a stream of its own.
    pub fn start_tls(&mut self) {
        self.tls = true;
        self.next_seq = [None; 2];
        // A PostgreSQL session starts over inside TLS (its StartupMessage comes next).
        self.http = Http1Connection::new();
        self.postgres = None;
        self.kafka = None;
        self.h2 = None;
    }

    /// Turn a data event into a decoder segment: which side of the exchange it carries, when its
    /// first and last bytes count, and whether bytes before it were lost.
    pub fn segment<'a>(&mut self, meta: &DataMeta, payload: &'a [u8]) -> Segment<'a> {
        let egress = meta.direction == direction::EGRESS;
        let dir = usize::from(!egress);
        let gap_before = self.next_seq[dir].is_some_and(|expected| expected != meta.seq);
        self.next_seq[dir] = Some(meta.seq.saturating_add(meta.len));
        let side = if egress == self.is_server { Side::Response } else { Side::Request };
        // A write's first byte leaves at entry; a read's bytes are known only at exit.
        let first_byte_ns = if egress { meta.start_ns } else { meta.header.ts_ns };
        Segment { side, first_byte_ns, last_byte_ns: meta.header.ts_ns, len: meta.len, payload, gap_before }
    }
}

/// All tracked connections by conn_id, bounded, with an index by process and fd.
#[derive(Default)]
pub struct ConnTable {
    conns: FxHashMap<u64, Connection>,
    by_fd: FxHashMap<(u32, u32), u64>,
    by_pid: FxHashMap<u32, Vec<u64>>,
}

impl ConnTable {
    /// The connection that holds `fd` of `pid` now, if any. A new connection on the same fd means
    /// the old one was closed even if its close event was lost: the caller ends it first.
    pub fn holding(&self, pid: u32, fd: u32) -> Option<u64> {
        self.by_fd.get(&(pid, fd)).copied()
    }

    /// Insert; returns false (and inserts nothing) when the table is full.
    pub fn insert(&mut self, conn_id: u64, conn: Connection) -> bool {
        if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&conn_id) {
            return false;
        }
        self.by_pid.entry(conn.pid).or_default().push(conn_id);
        self.by_fd.insert((conn.pid, conn.fd), conn_id);
        self.conns.insert(conn_id, conn);
        true
    }

    pub fn get_mut(&mut self, conn_id: u64) -> Option<&mut Connection> {
        self.conns.get_mut(&conn_id)
    }

    pub fn remove(&mut self, conn_id: u64) -> Option<Connection> {
        let conn = self.conns.remove(&conn_id)?;
        if self.by_fd.get(&(conn.pid, conn.fd)) == Some(&conn_id) {
            self.by_fd.remove(&(conn.pid, conn.fd));
        }
        if let Some(ids) = self.by_pid.get_mut(&conn.pid) {
            ids.retain(|id| *id != conn_id);
            if ids.is_empty() {
                self.by_pid.remove(&conn.pid);
            }
        }
        Some(conn)
    }

    /// Ids of the connections a process still holds.
    pub fn ids_of(&self, pid: u32) -> Vec<u64> {
        self.by_pid.get(&pid).cloned().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }
}

/// The kernel's endpoint as a socket address (IPv4-mapped IPv6 stays as the kernel says).
pub fn socket_addr(e: &Endpoint) -> SocketAddr {
    const AF_INET6: u16 = 10;
    let ip = if e.family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(e.addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]))
    };
    SocketAddr::new(ip, e.port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerotel_abi::EventHeader;

    fn meta(direction: u8, seq: u64, len: u64) -> DataMeta {
        DataMeta { header: EventHeader { ts_ns: 20, ..Default::default() }, start_ns: 10, len, seq, direction, ..Default::default() }
    }

    #[test]
    fn sides_times_and_gaps() {
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let mut server = Connection::new(1, 3, role::SERVER, addr, addr);
        let s = server.segment(&meta(direction::INGRESS, 0, 5), b"");
        assert_eq!((s.side, s.first_byte_ns, s.gap_before), (Side::Request, 20, false));
        let s = server.segment(&meta(direction::EGRESS, 0, 5), b"");
        assert_eq!((s.side, s.first_byte_ns), (Side::Response, 10));
        let s = server.segment(&meta(direction::INGRESS, 9, 5), b"");
        assert!(s.gap_before, "offset 9 after 5 bytes is a gap");
        let mut client = Connection::new(1, 4, role::CLIENT, addr, addr);
        assert_eq!(client.segment(&meta(direction::EGRESS, 0, 1), b"").side, Side::Request);
    }

    #[test]
    fn table_tracks_pids() {
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let mut table = ConnTable::default();
        table.insert(7, Connection::new(42, 3, role::CLIENT, addr, addr));
        assert_eq!(table.ids_of(42), vec![7]);
        assert_eq!(table.holding(42, 3), Some(7));
        assert!(table.remove(7).is_some());
        assert!(table.ids_of(42).is_empty());
        assert_eq!(table.holding(42, 3), None);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn endpoints_convert() {
        let mut e = Endpoint { family: 2, port: 8080, ..Default::default() };
        e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(socket_addr(&e), "127.0.0.1:8080".parse().unwrap());
    }
}
