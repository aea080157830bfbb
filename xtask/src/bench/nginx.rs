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

impl Nginx {
    /// Starts nginx with its config, logs, pid and temp files under `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        let bin = find_cmd("nginx").context("nginx is not installed: run `cargo xtask setup`")?;
        let port = free_port()?;
        write_site(dir, port)?;
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
fn write_site(dir: &Path, port: u16) -> Result<()> {
    let static_dir = dir.join("static");
    fs::create_dir_all(&static_dir)?;
    fs::write(static_dir.join("1k.bin"), [b'z'; 1024])?;
    let d = dir.display();
    let conf = format!(
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
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\n"; }}
        location /static/ {{ alias {d}/static/; }}
    }}
}}
"#
    );
    fs::write(dir.join("nginx.conf"), conf).context("cannot write nginx.conf")
}

/// `nginx version: nginx/1.22.1`.
pub fn version() -> String {
    find_cmd("nginx")
        .and_then(|bin| crate::util::any_output_of(bin, &["-v"]))
        .map(|v| v.trim_start_matches("nginx version: ").to_string())
        .unwrap_or_else(|| "unknown".into())
}
