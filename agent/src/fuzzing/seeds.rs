//! The fuzz targets' seed inputs (fuzz/seeds/TARGET/NAME): small valid conversations, made here
//! from the protocols' test captures and hand-written messages, so each target starts from inputs
//! that reach deep into its parser. The tests check that every seed still gives spans and that
//! the committed files are the ones made here (`ZEROTEL_BLESS_SEEDS=1` rewrites them).

use std::{fs, path::PathBuf};

use zerotel_abi::{
    direction, kind, protocol, role, ConnCloseEvent, ConnOpenEvent, DataEvent, DataMeta, Endpoint, EventHeader,
    PgMessageHead, SpanIds, StreamChunkHead, MAX_CAPTURE,
};

use crate::protocols::test_rng::XorShift;

/// A fuzz target: its name (fuzz/fuzz_targets/NAME.rs) and driver.
type Target = (&'static str, fn(&[u8]) -> usize);
/// Seeds of one target: file name, input.
type Seeds = Vec<(&'static str, Vec<u8>)>;

const TARGETS: [Target; 5] = [
    ("http1", super::http1),
    ("http2", super::http2),
    ("kafka", super::kafka),
    ("postgres", super::postgres),
    ("event_decode", super::events),
];

const CLIENT: u8 = 0;
const SERVER: u8 = 1;

/// A syscall record of a stream input (`control` bit 0: received).
fn call(control: u8, at_ns: u64, bytes: &[u8]) -> Vec<u8> {
    let head = [&[control][..], &at_ns.to_be_bytes(), &(at_ns + 5).to_be_bytes(), &(bytes.len() as u32).to_be_bytes()];
    [&head.concat()[..], bytes].concat()
}

/// A conversation: the role byte, then syscalls 10 ns apart, each (sent by the traced process, bytes).
fn conversation(role_byte: Option<u8>, calls: &[(bool, &[u8])]) -> Vec<u8> {
    let mut input: Vec<u8> = role_byte.into_iter().collect();
    for (index, (sent, bytes)) in calls.iter().enumerate() {
        input.extend(call(u8::from(!sent), 100 + 10 * index as u64, bytes));
    }
    input
}

fn http1_seeds() -> Seeds {
    let served = conversation(
        Some(SERVER),
        &[
            (false, b"GET /users/123?debug=1 HTTP/1.1\r\nHost: shop\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"),
            (true, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            (false, b"POST /orders HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            (true, b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
        ],
    );
    let sent = conversation(
        Some(CLIENT),
        &[
            (true, b"POST /upload HTTP/1.1\r\nHost: api:8080\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"),
            (false, b"HTTP/1.1 100 Continue\r\n\r\n"),
            (true, b"data"),
            (false, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
            (true, b"HEAD /x HTTP/1.0\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n"),
            (false, b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n"),
        ],
    );
    // A body mostly left in the kernel (a fifteenth captured), then a request whose event was lost.
    let mut blind = conversation(Some(SERVER), &[(false, b"GET /big HTTP/1.1\r\n\r\n")]);
    let body = [b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n".as_slice(), &[b'x'; 3000]].concat();
    blind.extend(call(0x10, 200, &body));
    blind.extend(call(0xf1, 300, b"GET /lost HTTP/1.1\r\n\r\n"));
    blind.extend(call(1, 400, b"GET /after HTTP/1.1\r\n\r\n"));
    blind.extend(call(0, 500, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"));
    vec![("served", served), ("sent", sent), ("blind", blind)]
}

/// An HTTP/2 frame (RFC 9113 §4.1).
fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    [&length[1..], &[frame_type, flags], &stream_id.to_be_bytes(), payload].concat()
}

/// An HPACK string literal, not Huffman-coded (shorter than 127 bytes).
fn string(text: &str) -> Vec<u8> {
    [&[text.len() as u8][..], text.as_bytes()].concat()
}

/// A gRPC call and a second one reusing the first's dynamic table entries, then reset.
fn grpc_conversation() -> Vec<u8> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    // :method POST, :scheme http (static), :path and content-type added to the table, te and
    // traceparent as literals without indexing.
    let request = [
        &[0x83, 0x86, 0x44][..],
        &string("/helloworld.Greeter/SayHello"),
        &[0x5f],
        &string("application/grpc"),
        &[0x00],
        &string("te"),
        &string("trailers"),
        &[0x00],
        &string("traceparent"),
        &string("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]
    .concat();
    let message = [0, 0, 0, 0, 3, 0x0a, 0x01, b'x'];
    let response = [&[0x88, 0x5f][..], &string("application/grpc")].concat();
    let trailers =
        [&[0x00][..], &string("grpc-status"), &string("0"), &[0x00], &string("grpc-message"), &string("")].concat();
    // Stream 3: :path (table index 63) and content-type (62) from the table.
    let second = [0x83, 0x86, 0xbf, 0xbe];
    let client_start = [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat();
    let server_start = [frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]), frame(SETTINGS, ACK, 0, &[])].concat();
    let first_call = [frame(HEADERS, END_HEADERS, 1, &request), frame(DATA, END_STREAM, 1, &message)].concat();
    let answer = [
        frame(HEADERS, END_HEADERS, 1, &response),
        frame(DATA, 0, 1, &message),
        frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers),
    ]
    .concat();
    let second_call = [frame(HEADERS, END_HEADERS, 3, &second), frame(DATA, END_STREAM, 3, &message)].concat();
    conversation(
        Some(CLIENT),
        &[
            (true, &client_start),
            (false, &server_start),
            (true, &first_call),
            (false, &answer),
            (true, &second_call),
            (false, &frame(RST_STREAM, 0, 3, &8u32.to_be_bytes())),
        ],
    )
}

/// A capture of the protocols' testdata as a stream input (same record format).
fn capture(role_byte: Option<u8>, records: &[u8]) -> Vec<u8> {
    [role_byte.into_iter().collect(), records.to_vec()].concat()
}

fn http2_seeds() -> Seeds {
    let testdata = |name: &str| -> &'static [u8] {
        match name {
            "curl_get" => include_bytes!("../protocols/http2/testdata/curl_get.capture"),
            "curl_post" => include_bytes!("../protocols/http2/testdata/curl_post.capture"),
            "h2load_server" => include_bytes!("../protocols/http2/testdata/h2load_server.capture"),
            _ => include_bytes!("../protocols/http2/testdata/nghttp_push.capture"),
        }
    };
    vec![
        ("curl_get", capture(Some(CLIENT), testdata("curl_get"))),
        ("curl_post", capture(Some(CLIENT), testdata("curl_post"))),
        ("h2load_server", capture(Some(SERVER), testdata("h2load_server"))),
        ("nghttp_push", capture(Some(CLIENT), testdata("nghttp_push"))),
        ("grpc", grpc_conversation()),
    ]
}

fn kafka_seeds() -> Seeds {
    macro_rules! testdata {
        ($($name:literal),*) => {
            vec![$(($name, include_bytes!(concat!("../protocols/kafka/testdata/", $name, ".capture")).to_vec())),*]
        };
    }
    testdata!("produce_v2_legacy", "produce_v10_none", "produce_v10_zstd", "fetch_v5", "metadata_v13", "group_v3")
}

/// A PostgreSQL message record of the postgres input: (sent by the client, type, bulk before, body).
fn pg_message(frontend: bool, msg_type: u8, bulk_before: u8, body: &[u8]) -> Vec<u8> {
    let flags = (bulk_before << 1) | u8::from(!frontend);
    let len = (body.len() as u32 + 4).to_be_bytes();
    [&[flags, msg_type][..], &len, &(body.len() as u16).to_be_bytes(), body].concat()
}

fn cstrings(parts: &[&str]) -> Vec<u8> {
    parts.iter().flat_map(|part| [part.as_bytes(), b"\0"].concat()).collect()
}

fn postgres_seeds() -> Seeds {
    let startup = [&196_608u32.to_be_bytes()[..], &cstrings(&["user", "app", "database", "shop", ""])].concat();
    let ready = pg_message(false, b'Z', 0, b"I");
    let simple = [
        pg_message(true, 0, 0, &startup),
        ready.clone(),
        pg_message(true, b'Q', 0, &cstrings(&["SELECT name FROM users WHERE id = 42; UPDATE users SET seen = now()"])),
        pg_message(false, b'C', 1, &cstrings(&["SELECT 1"])),
        pg_message(false, b'C', 0, &cstrings(&["UPDATE 3"])),
        ready.clone(),
        pg_message(true, b'Q', 0, &cstrings(&["SELECT * FROM missing"])),
        pg_message(false, b'E', 0, &cstrings(&["SERROR", "C42P01", "Mrelation \"missing\" does not exist", ""])),
        ready.clone(),
    ]
    .concat();
    let bind = [&cstrings(&["", "s1"])[..], &[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]].concat();
    let extended = [
        pg_message(true, b'P', 0, &[&cstrings(&["s1", "DELETE FROM carts WHERE id = $1"])[..], &[0, 0]].concat()),
        pg_message(true, b'B', 0, &bind),
        pg_message(true, b'E', 0, &[&cstrings(&[""])[..], &[0, 0, 0, 0]].concat()),
        pg_message(true, b'S', 0, &[]),
        pg_message(false, b'1', 0, &[]),
        pg_message(false, b'C', 0, &cstrings(&["DELETE 1"])),
        ready,
    ]
    .concat();
    vec![("simple_query", simple), ("extended_query", extended)]
}

/// The bytes of a plain-old-data event struct (explicit padding: every byte is a field).
fn pod_bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is one of the abi's #[repr(C)] event structs, made of integers and byte arrays.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

/// A record of the event_decode input: length, then the record.
fn record(bytes: &[u8]) -> Vec<u8> {
    [&(bytes.len() as u16).to_be_bytes()[..], bytes].concat()
}

fn header(kind: u32, ts_ns: u64) -> EventHeader {
    EventHeader { kind, pid: 7, tid: 7, ts_ns, ..Default::default() }
}

fn endpoint(last: u8, port: u16) -> Endpoint {
    let mut endpoint = Endpoint { family: 2, port, ..Default::default() };
    endpoint.addr[..4].copy_from_slice(&[127, 0, 0, last]);
    endpoint
}

fn data(conn_id: u64, dir: u8, seq: u64, at_ns: u64, payload: &[u8]) -> Vec<u8> {
    let meta = DataMeta {
        header: header(kind::DATA, at_ns + 5),
        conn_id,
        start_ns: at_ns,
        len: payload.len() as u64,
        seq,
        direction: dir,
        protocol: protocol::HTTP1,
        captured: payload.len() as u16,
        ..Default::default()
    };
    let mut event = DataEvent { meta, ids: SpanIds::default(), payload: [0; MAX_CAPTURE] };
    event.payload[..payload.len()].copy_from_slice(payload);
    let mut bytes = pod_bytes(&event);
    bytes.truncate(std::mem::offset_of!(DataEvent, payload) + payload.len());
    bytes
}

fn pg(conn_id: u64, dir: u8, msg_type: u8, at_ns: u64, body: &[u8]) -> Vec<u8> {
    let head = PgMessageHead {
        header: header(kind::PG_MESSAGE, at_ns + 5),
        conn_id,
        start_ns: at_ns,
        len: body.len() as u32 + 4,
        direction: dir,
        msg_type,
        captured: body.len() as u16,
        ..Default::default()
    };
    [pod_bytes(&head), body.to_vec()].concat()
}

fn chunk(conn_id: u64, dir: u8, offset: u64, at_ns: u64, bytes: &[u8]) -> Vec<u8> {
    let head = StreamChunkHead {
        header: header(kind::STREAM_CHUNK, at_ns + 5),
        conn_id,
        start_ns: at_ns,
        offset,
        syscall_end: offset + bytes.len() as u64,
        direction: dir,
        protocol: protocol::KAFKA,
        captured: bytes.len() as u16,
        ..Default::default()
    };
    [pod_bytes(&head), bytes.to_vec()].concat()
}

fn open(conn_id: u64, conn_role: u8, at_ns: u64) -> Vec<u8> {
    let event = ConnOpenEvent {
        header: header(kind::CONN_OPEN, at_ns),
        conn_id,
        fd: conn_id as u32 + 2,
        role: conn_role,
        local: endpoint(1, 40000),
        remote: endpoint(2, 8080),
        ..Default::default()
    };
    pod_bytes(&event)
}

fn close(conn_id: u64, at_ns: u64) -> Vec<u8> {
    pod_bytes(&ConnCloseEvent { header: header(kind::CONN_CLOSE, at_ns), conn_id, fd: conn_id as u32 + 2, _pad: 0 })
}

/// A served HTTP/1 exchange, a PostgreSQL query and a Kafka request, interleaved as the ring
/// buffer holds them.
fn event_seeds() -> Seeds {
    let (egress, ingress) = (direction::EGRESS, direction::INGRESS);
    let request = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
    let query = cstrings(&["SELECT 1"]);
    let kafka_request = [&[0, 0, 0, 10][..], &[0, 18, 0, 3, 0, 0, 0, 1, 0xff, 0xff]].concat();
    let records = [
        open(1, role::SERVER, 10),
        open(2, role::CLIENT, 11),
        open(3, role::CLIENT, 12),
        data(1, ingress, 0, 20, request),
        pg(2, egress, b'Q', 21, &query),
        chunk(3, egress, 0, 22, &kafka_request),
        data(1, egress, 0, 30, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        pg(2, ingress, b'C', 31, &cstrings(&["SELECT 1"])),
        pg(2, ingress, b'Z', 32, b"I"),
        close(1, 40),
    ];
    vec![("mixed", records.iter().flat_map(|r| record(r)).collect())]
}

fn all_seeds() -> Vec<(Target, Seeds)> {
    let seeds = [http1_seeds(), http2_seeds(), kafka_seeds(), postgres_seeds(), event_seeds()];
    TARGETS.into_iter().zip(seeds).collect()
}

fn seeds_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target)
}

#[test]
fn every_seed_gives_spans() {
    for ((target, driver), seeds) in all_seeds() {
        for (name, input) in seeds {
            assert!(driver(&input) > 0, "{target}/{name} gives nothing");
        }
    }
}

#[test]
fn committed_seeds_are_the_ones_made_here() {
    let bless = std::env::var_os("ZEROTEL_BLESS_SEEDS").is_some();
    for ((target, _), seeds) in all_seeds() {
        let dir = seeds_dir(target);
        if bless {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
        }
        let mut names: Vec<String> = Vec::new();
        for (name, input) in seeds {
            let path = dir.join(name);
            if bless {
                fs::write(&path, &input).unwrap();
            }
            let committed = fs::read(&path).unwrap_or_default();
            assert!(
                committed == input,
                "{} differs from its seed: run ZEROTEL_BLESS_SEEDS=1 cargo test -p zerotel seeds",
                path.display()
            );
            names.push(name.to_string());
        }
        let mut present: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        names.sort();
        assert_eq!(present, names, "{} holds files no seed makes", dir.display());
    }
}

/// A quick stand-in for the fuzzer in every `cargo test`: mutated seeds never panic a driver.
#[test]
fn mutated_seeds_never_panic() {
    let mut rng = XorShift(0x5EED_F022_0000_0001);
    for ((_, driver), seeds) in all_seeds() {
        for (_, seed) in &seeds {
            for _ in 0..200 {
                let mut input = seed.clone();
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(input.len());
                    match rng.below(3) {
                        0 => input[at] = rng.next() as u8,
                        1 => input.truncate(at),
                        _ => input.insert(at, rng.next() as u8),
                    }
                    if input.is_empty() {
                        break;
                    }
                }
                driver(&input);
            }
        }
    }
}
