//! Test support: the captured connections in `testdata/` (see its README), ways to replay them, and
//! hand-made conversations.

use super::{frames::PREFACE, H2Connection, H2Event, Piece, Role};
pub use crate::protocols::replay::{plan, syscalls, whole, PlannedPiece, Syscall};

macro_rules! capture {
    ($name:literal, $role:expr) => {
        ($name, $role, include_bytes!(concat!("testdata/", $name, ".capture")).as_slice())
    };
}

/// Every capture: name, the traced process's role, records.
pub const CAPTURES: [(&str, Role, &[u8]); 9] = [
    capture!("grpc_client", Role::Client),
    capture!("grpc_server", Role::Server),
    capture!("curl_get", Role::Client),
    capture!("curl_post", Role::Client),
    capture!("curl_big", Role::Client),
    capture!("h2load", Role::Client),
    capture!("h2load_server", Role::Server),
    capture!("nghttp_continuation", Role::Client),
    capture!("nghttp_push", Role::Client),
];

pub fn capture(name: &str) -> (Role, &'static [u8]) {
    CAPTURES.iter().find(|(known, ..)| *known == name).map(|(_, role, bytes)| (*role, *bytes)).expect("a known capture")
}

pub fn push_all(connection: &mut H2Connection, pieces: &[PlannedPiece]) -> Vec<H2Event> {
    let mut out = Vec::new();
    for planned in pieces {
        let piece = Piece {
            outgoing: planned.outgoing,
            offset: planned.offset,
            bytes: &planned.bytes,
            syscall_end: planned.syscall_end,
            start_ns: planned.start_ns,
            end_ns: planned.end_ns,
        };
        connection.push(&piece, &mut out);
    }
    out
}

pub fn replay_pieces(role: Role, pieces: &[PlannedPiece]) -> (H2Connection, Vec<H2Event>) {
    let mut connection = H2Connection::new(role);
    let out = push_all(&mut connection, pieces);
    (connection, out)
}

/// Replays a capture one piece per syscall.
pub fn replay(name: &str) -> (H2Connection, Vec<H2Event>) {
    let (role, bytes) = capture(name);
    replay_pieces(role, &whole(&syscalls(bytes)))
}

/// A frame (RFC 9113 §4.1).
pub fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    [&length[1..], &[kind, flags], &stream_id.to_be_bytes(), payload].concat()
}

/// An HPACK integer with a `prefix_bits` prefix, the first byte's other bits from `first`.
pub fn integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 128 {
        out.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of literal fields without indexing, new names, raw strings: it leaves the
/// decoder's table as it was.
pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        for text in [name, value] {
            integer(&mut out, 0, 7, text.len());
            out.extend_from_slice(text.as_bytes());
        }
    }
    out
}

/// A hand-made conversation, seen from the client: syscalls in order, 10 ns apart, each 5 ns long.
#[derive(Debug, Default)]
pub struct Script {
    pub calls: Vec<Syscall>,
}

impl Script {
    /// Starts with the client preface and both sides' empty SETTINGS.
    pub fn new() -> Self {
        let settings = frame(0x4, 0, 0, &[]);
        Self::default().client(&[PREFACE, &settings].concat()).server(&settings)
    }

    pub fn client(self, bytes: &[u8]) -> Self {
        self.call(true, bytes)
    }

    pub fn server(self, bytes: &[u8]) -> Self {
        self.call(false, bytes)
    }

    fn call(mut self, outgoing: bool, bytes: &[u8]) -> Self {
        let start_ns = self.calls.len() as u64 * 10 + 100;
        self.calls.push(Syscall { outgoing, start_ns, end_ns: start_ns + 5, bytes: bytes.to_vec() });
        self
    }

    /// The same conversation as the server sees it.
    pub fn as_server(&self) -> Vec<Syscall> {
        self.calls.iter().map(|call| Syscall { outgoing: !call.outgoing, ..call.clone() }).collect()
    }

    /// Replays it as the client, closing the connection after the last syscall.
    pub fn run(&self) -> (H2Connection, Vec<H2Event>) {
        let (mut connection, mut out) = replay_pieces(Role::Client, &whole(&self.calls));
        connection.close(1_000_000, &mut out);
        (connection, out)
    }
}
