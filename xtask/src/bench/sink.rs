//! A do-nothing OTLP/HTTP receiver: accepts POSTs, discards the body, answers 200, so the
//! traced rounds pay the agent's real export cost without a collector or console output.
//! On request it also counts the spans of each body (`start_counting`), for a bench that must
//! show an exporter other than the agent really delivered.

use std::{
    io::{BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
};

use anyhow::{Context as _, Result};

use super::http1;

#[derive(Default)]
struct Counters {
    posts: AtomicU64,
    bytes: AtomicU64,
    spans: AtomicU64,
}

/// Spans in one OTLP request body.
pub type SpanCounter = fn(&[u8]) -> u64;

pub struct Sink {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Sink {
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// A sink that also counts the spans of every POST with `count` (see [`Sink::spans`]).
    pub fn start_counting(count: SpanCounter) -> Result<Self> {
        Self::start_with(Some(count))
    }

    fn start_with(count: Option<SpanCounter>) -> Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("OTLP sink: cannot bind 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (s, c) = (stop.clone(), counters.clone());
        thread::Builder::new()
            .name("otlp-sink".into())
            .spawn(move || accept_loop(listener, s, c, count))
            .context("cannot start the OTLP sink thread")?;
        Ok(Self {
            addr,
            stop,
            counters,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (POSTs received, body bytes received) so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.counters.posts.load(Ordering::Relaxed),
            self.counters.bytes.load(Ordering::Relaxed),
        )
    }

    /// Spans received so far; always 0 unless started with [`Sink::start_counting`].
    pub fn spans(&self) -> u64 {
        self.counters.spans.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake accept()
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    count: Option<SpanCounter>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let c = counters.clone();
        // One thread per connection: the exporter keeps few, long-lived connections.
        let _ = thread::Builder::new()
            .name("otlp-conn".into())
            .spawn(move || serve(conn, &c, count));
    }
}

/// Serves keep-alive requests until the peer closes; errors just drop the connection.
fn serve(conn: TcpStream, counters: &Counters, count: Option<SpanCounter>) -> Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    while let Some(head) = http1::read_head(&mut reader)? {
        if head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = http1::read_body(&mut reader, &head, false)?;
        if head.start.starts_with("POST ") {
            counters.posts.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            if let Some(count) = count {
                counters.spans.fetch_add(count(&body), Ordering::Relaxed);
            }
        }
        writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, Read as _};

    #[test]
    fn answers_keep_alive_posts() {
        let sink = Sink::start().unwrap();
        let mut s = TcpStream::connect(sink.addr).unwrap();
        for _ in 0..2 {
            s.write_all(b"POST /v1/traces HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
                .unwrap();
        }
        let mut r = BufReader::new(s);
        for _ in 0..2 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "HTTP/1.1 200 OK\r\n");
            let mut rest = [0u8; 21];
            r.read_exact(&mut rest).unwrap();
        }
        assert_eq!(sink.totals(), (2, 8));
    }
}
