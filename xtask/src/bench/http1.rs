//! Just enough HTTP/1.1 for the OTLP sink, the fixed-rate load client and for polling the
//! agent's /healthz and /metrics, so xtask needs neither an HTTP stack nor curl.

use std::{
    io::{BufRead, BufReader, Read, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// A request or response head: the start line and lower-cased header names.
pub struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The status code of a response head.
    pub fn status(&self) -> Option<u16> {
        self.start.split_whitespace().nth(1)?.parse().ok()
    }
}

/// Reads a head; None on a clean EOF before any byte (keep-alive connection closed).
pub fn read_head(r: &mut impl BufRead) -> Result<Option<Head>> {
    let mut start = String::new();
    if r.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed inside the HTTP head");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(Some(Head {
        start: start.trim_end().to_string(),
        headers,
    }))
}

/// Reads the body framed by Content-Length or chunked encoding; `to_eof` for responses
/// that are delimited by the connection closing.
pub fn read_body(r: &mut impl BufRead, head: &Head, to_eof: bool) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(r, &mut body)?;
    } else if let Some(len) = head.header("content-length") {
        let len: u64 = len.parse().context("bad Content-Length")?;
        r.take(len).read_to_end(&mut body)?;
        if body.len() as u64 != len {
            bail!("connection closed inside the body");
        }
    } else if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

fn read_chunked(r: &mut impl BufRead, body: &mut Vec<u8>) -> Result<()> {
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let hex = size.trim().split(';').next().unwrap_or("");
        let n = u64::from_str_radix(hex, 16).with_context(|| format!("bad chunk size {hex:?}"))?;
        if n == 0 {
            // Trailers until the empty line.
            let mut line = String::new();
            while r.read_line(&mut line)? > 2 {
                line.clear();
            }
            return Ok(());
        }
        r.take(n).read_to_end(body)?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
    }
}

/// GET http://addr/path; returns (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let head = read_head(&mut r)?.context("empty response")?;
    let status = head
        .status()
        .with_context(|| format!("bad status line {:?}", head.start))?;
    let body = read_body(&mut r, &head, true)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;x=y\r\n!\r\n0\r\n\r\n";
        let mut r = &raw[..];
        let head = read_head(&mut r).unwrap().unwrap();
        assert_eq!(read_body(&mut r, &head, true).unwrap(), b"hello!");
    }

    #[test]
    fn content_length_body() {
        let raw = b"POST /v1/traces HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcNEXT";
        let mut r = &raw[..];
        let head = read_head(&mut r).unwrap().unwrap();
        assert_eq!(read_body(&mut r, &head, false).unwrap(), b"abc");
        assert_eq!(r, b"NEXT");
    }
}
