//! An open-loop HTTP/1.1 client for the fixed-rate rounds: `connections` keep-alive
//! connections, one thread each, send GETs on a fixed schedule totalling `rate` req/s.
//! Latency counts from each request's scheduled send time, so a stalled server shows up as
//! latency instead of silently lowering the offered load (wrk's coordinated omission).
//! Plaintext or TLS (rustls: the load itself never runs OpenSSL, so never hits its uprobes).

use std::{
    io::{self, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::http1;
use crate::signals;

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Lets every thread start before the first scheduled request.
const START_DELAY: Duration = Duration::from_millis(100);

pub struct RateLoad<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    /// Total requests per second over all connections.
    pub rate: u32,
    pub connections: u32,
    pub duration_s: u64,
    /// HTTPS, trusting whatever certificate the server shows (the bench's own, self-signed).
    pub tls: bool,
    /// `Connection: close`: a new connection per request (opened on its schedule, so its
    /// connect time counts in its latency).
    pub close: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RateResult {
    pub target_per_s: f64,
    /// Achieved: successful responses per second of wall time.
    pub requests_per_s: f64,
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// I/O errors, timeouts and non-2xx responses.
    pub errors: u64,
}

/// What one connection's thread measured.
#[derive(Default)]
struct ConnStats {
    latencies_ns: Vec<u64>,
    errors: u64,
}

pub fn run(load: &RateLoad) -> Result<RateResult> {
    if load.rate == 0 || load.connections == 0 {
        bail!("the fixed-rate load needs --rate >= 1 and --connections >= 1");
    }
    let connection = if load.close { "Connection: close\r\n" } else { "" };
    let request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n{connection}\r\n", load.path, load.addr);
    // Seconds between two requests on one connection; connections are staggered evenly.
    let interval = Duration::from_secs_f64(f64::from(load.connections) / f64::from(load.rate));
    let start = Instant::now() + START_DELAY;
    let end = start + Duration::from_secs(load.duration_s);
    let tls = load.tls.then(tls_config);
    let conns: Vec<Conn> = (0..load.connections)
        .map(|_| Conn::open(load.addr, tls.clone()))
        .collect::<Result<_>>()?;
    let stats = thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                let first = start + interval.mul_f64(i as f64 / f64::from(load.connections));
                let request = request.as_bytes();
                let close = load.close;
                s.spawn(move || drive(conn, request, close, first, interval, end))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked"))
            })
            .collect::<Result<Vec<ConnStats>>>()
    })?;
    signals::check()?;
    let elapsed = start.elapsed().as_secs_f64().max(1e-3);
    Ok(summarize(stats, f64::from(load.rate), elapsed))
}

/// A keep-alive connection; reopened after an error.
struct Conn {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    stream: BufReader<Stream>,
}

impl Conn {
    fn open(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self> {
        let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        let stream = match &tls {
            None => Stream::Plain(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let session = rustls::ClientConnection::new(config.clone(), name)
                    .context("cannot start a TLS session")?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(session, tcp)))
            }
        };
        Ok(Self { addr, tls, stream: BufReader::new(stream) })
    }

    /// One request-response exchange; Ok(false) for a non-2xx answer.
    fn exchange(&mut self, request: &[u8]) -> Result<bool> {
        let stream = self.stream.get_mut();
        stream.write_all(request)?;
        stream.flush()?;
        let head = http1::read_head(&mut self.stream)?.context("connection closed")?;
        http1::read_body(&mut self.stream, &head, false)?;
        Ok(head.status().is_some_and(|s| (200..300).contains(&s)))
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// The bench talks to its own server on 127.0.0.1 with a throwaway self-signed certificate:
/// any certificate is taken; the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends on `conn` at `first`, `first + interval`, ... until `end`; with `close`, on a new
/// connection each time.
fn drive(
    mut conn: Conn,
    request: &[u8],
    close: bool,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> ConnStats {
    // The default 50 us timer slack would add to every measured latency.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut stats = ConnStats::default();
    let mut due = first;
    while due < end && !signals::interrupted() {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        if close && stats.latencies_ns.len() as u64 + stats.errors > 0 {
            match Conn::open(conn.addr, conn.tls.clone()) {
                Ok(fresh) => conn = fresh,
                Err(_) => {
                    stats.errors += 1;
                    due += interval;
                    continue;
                }
            }
        }
        match conn.exchange(request) {
            Ok(true) => stats.latencies_ns.push(due.elapsed().as_nanos() as u64),
            Ok(false) => stats.errors += 1,
            Err(_) => {
                stats.errors += 1;
                // Reopen; if that fails too the next exchange errors and retries.
                if let Ok(fresh) = Conn::open(conn.addr, conn.tls.clone()) {
                    conn = fresh;
                }
            }
        }
        due += interval;
    }
    stats
}

fn summarize(stats: Vec<ConnStats>, target_per_s: f64, elapsed_s: f64) -> RateResult {
    let errors = stats.iter().map(|s| s.errors).sum();
    let mut ns: Vec<u64> = stats.into_iter().flat_map(|s| s.latencies_ns).collect();
    ns.sort_unstable();
    let us = |q: f64| percentile(&ns, q).map_or(f64::NAN, |v| v as f64 / 1e3);
    RateResult {
        target_per_s,
        requests_per_s: ns.len() as f64 / elapsed_s,
        requests: ns.len() as u64,
        p50_us: us(0.50),
        p99_us: us(0.99),
        max_us: us(1.0),
        errors,
    }
}

/// Nearest-rank percentile of sorted values, `q` in (0, 1].
fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn paces_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = conn.unwrap();
                thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    while let Ok(Some(_)) = http1::read_head(&mut r) {
                        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .unwrap();
                    }
                });
            }
        });
        let load = RateLoad {
            addr,
            path: "/",
            rate: 200,
            connections: 4,
            duration_s: 1,
            tls: false,
            close: false,
        };
        let r = run(&load).unwrap();
        assert_eq!((r.requests, r.errors), (200, 0));
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
    }
}
