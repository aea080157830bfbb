//! A throwaway nginx on 127.0.0.1 with a generated config, run in the foreground.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::proc::{children_of, free_port, wait_listening, Guard};
use crate::util::{display, find_cmd};

pub struct Nginx {
    pub port: u16,
    pub master: u32,
    pub workers: Vec<u32>,
    /// Stops nginx (and its worker if need be) when the bench ends or fails.
    _guard: Guard,
}

/// What the generated server does.
pub enum Site {
    /// `GET /` answers `hello`, /static/1k.bin is a 1 KiB file (`bench http`).
    Origin,
    /// The same over HTTPS, with a self-signed certificate made in the directory (`bench https`).
    OriginTls,
    /// A backend behind a proxy: `GET /` answers `ok`, /static/ as for Origin, and requests
    /// under [`VERIFY_PREFIX`] also answer `ok` but are logged with their `traceparent` header
    /// to [`VERIFY_LOG`] (nothing else is logged, so the load pays no logging).
    Backend,
    /// A reverse proxy to 127.0.0.1:`upstream` over HTTP/1.1 with a keep-alive pool of
    /// `keepalive` idle connections, each closed after `idle_s` seconds unused.
    Proxy {
        upstream: u16,
        keepalive: u32,
        idle_s: u32,
    },
}

/// Path prefix a [`Site::Backend`] logs, with the request's traceparent, to [`VERIFY_LOG`].
pub const VERIFY_PREFIX: &str = "/zt-verify/";
/// File under the backend's directory with one `URI TRACEPARENT` line per verify request
/// (`-` when the request had none).
pub const VERIFY_LOG: &str = "verify.log";

impl Nginx {
    /// Starts nginx serving [`Site::Origin`], with its config, logs, pid and temp files under
    /// `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_site(dir, &Site::Origin)
    }

    /// Starts nginx serving `site`, with its config, logs, pid and temp files under `dir`.
    pub fn start_site(dir: &Path, site: &Site) -> Result<Self> {
        let bin = find_cmd("nginx").context("nginx is not installed: run `cargo xtask setup`")?;
        let port = free_port()?;
        write_site(dir, port, site)?;
        let log = dir.join("nginx.out");
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        // -e: otherwise nginx opens its default error log before reading our config.
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        let mut guard = Guard::new("nginx", child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let error_log = dir.join("error.log");
        wait_listening(addr, Duration::from_secs(10), || {
            guard.ensure_running(&error_log)
        })
        .context("nginx did not start listening")?;
        let master = guard.pid();
        let workers = wait_workers(master)?;
        guard.also_kill = workers.clone();
        Ok(Self {
            port,
            master,
            workers,
            _guard: guard,
        })
    }

    /// Master and worker pids: what the agent is told to trace.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.master)
            .chain(self.workers.iter().copied())
            .collect()
    }
}

fn wait_workers(master: u32) -> Result<Vec<u32>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let workers = children_of(master);
        if !workers.is_empty() {
            return Ok(workers);
        }
        if Instant::now() > deadline {
            bail!("nginx master {master} has no worker process after 5 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The config, plus a 1 KiB static file at /static/1k.bin.
fn write_site(dir: &Path, port: u16, site: &Site) -> Result<()> {
    let static_dir = dir.join("static");
    fs::create_dir_all(&static_dir)?;
    fs::write(static_dir.join("1k.bin"), [b'z'; 1024])?;
    let d = dir.display();
    let conf = match site {
        Site::Origin => origin_conf(&d, port, ""),
        Site::OriginTls => {
            make_certificate(dir)?;
            let tls = format!(" ssl;\n        ssl_certificate {d}/cert.pem;\n        ssl_certificate_key {d}/key.pem");
            origin_conf(&d, port, &tls)
        }
        Site::Backend => backend_conf(&d, port),
        Site::Proxy {
            upstream,
            keepalive,
            idle_s,
        } => proxy_conf(&d, port, *upstream, *keepalive, *idle_s),
    };
    fs::write(dir.join("nginx.conf"), conf).context("cannot write nginx.conf")
}

/// `cert.pem` and `key.pem` in `dir`: a self-signed certificate for 127.0.0.1 (openssl req).
fn make_certificate(dir: &Path) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = cmd.status().context("cannot run openssl (apt install openssl)")?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(&cmd));
    }
    Ok(())
}

/// `tls`: what follows the listen address (` ssl;` and the certificate lines), or nothing.
fn origin_conf(d: &impl std::fmt::Display, port: u16, tls: &str) -> String {
    format!(
        r#"{head}    server {{
        listen 127.0.0.1:{port}{tls};
        location / {{ return 200 "hello\n"; }}
        location /static/ {{ alias {d}/static/; }}
    }}
}}
"#,
        head = common_head(d)
    )
}

/// The settings every generated config shares, up to the `server` block.
fn common_head(d: &impl std::fmt::Display) -> String {
    format!(
        r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    # wrk keeps its connections alive for the whole run: never recycle them.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fastcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
"#
    )
}

fn backend_conf(d: &impl std::fmt::Display, port: u16) -> String {
    format!(
        r#"{head}    log_format verify '$request_uri $http_traceparent';
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\n"; }}
        location /static/ {{ alias {d}/static/; }}
        location {VERIFY_PREFIX} {{
            access_log {d}/{VERIFY_LOG} verify;
            return 200 "ok\n";
        }}
    }}
}}
"#,
        head = common_head(d)
    )
}

fn proxy_conf(
    d: &impl std::fmt::Display,
    port: u16,
    upstream: u16,
    keepalive: u32,
    idle_s: u32,
) -> String {
    format!(
        r#"{head}    upstream b {{
        server 127.0.0.1:{upstream};
        keepalive {keepalive};
        # Reuse a connection for the whole run (nginx recycles after 1000 by default) ...
        keepalive_requests 1000000;
        # ... but close it once idle, so a bench can empty the pool between rounds.
        keepalive_timeout {idle_s}s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        head = common_head(d)
    )
}

/// `nginx version: nginx/1.22.1`.
pub fn version() -> String {
    find_cmd("nginx")
        .and_then(|bin| crate::util::any_output_of(bin, &["-v"]))
        .map(|v| v.trim_start_matches("nginx version: ").to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_config_is_unchanged() {
        // The config `bench http` always ran with, verbatim.
        let d = "/tmp/x";
        let expected = r#"worker_processes 1;
daemon off;
pid /tmp/x/nginx.pid;
error_log /tmp/x/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    # wrk keeps its connections alive for the whole run: never recycle them.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path /tmp/x/tmp-body;
    proxy_temp_path /tmp/x/tmp-proxy;
    fastcgi_temp_path /tmp/x/tmp-fastcgi;
    uwsgi_temp_path /tmp/x/tmp-uwsgi;
    scgi_temp_path /tmp/x/tmp-scgi;
    server {
        listen 127.0.0.1:8080;
        location / { return 200 "hello\n"; }
        location /static/ { alias /tmp/x/static/; }
    }
}
"#;
        assert_eq!(origin_conf(&d, 8080, ""), expected);
    }

    #[test]
    fn proxy_and_backend_configs() {
        let proxy = proxy_conf(&"/d", 1, 2, 50, 1);
        for line in [
            "server 127.0.0.1:2;",
            "keepalive 50;",
            "proxy_pass http://b;",
            "proxy_http_version 1.1;",
            r#"proxy_set_header Connection "";"#,
        ] {
            assert!(proxy.contains(line), "{line} missing from\n{proxy}");
        }
        let backend = backend_conf(&"/d", 2);
        assert!(backend.contains(r#"return 200 "ok\n";"#), "{backend}");
        assert!(
            backend.contains("access_log /d/verify.log verify;"),
            "{backend}"
        );
    }
}
