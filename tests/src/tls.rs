//! TLS test material: a self-signed certificate made by `openssl req` for 127.0.0.1 and
//! localhost, valid two days, in a temporary directory.

use std::path::PathBuf;
use std::process::Command;

use crate::util::TempDir;

pub struct SelfSignedCert {
    dir: TempDir,
}

impl SelfSignedCert {
    pub fn new() -> SelfSignedCert {
        let dir = TempDir::new("tls-cert");
        let output = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .output()
            .unwrap_or_else(|e| panic!("run openssl (apt install openssl): {e}"));
        assert!(output.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&output.stderr));
        SelfSignedCert { dir }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// `ZT_TLS_CERT` and `ZT_TLS_KEY`: where the tests' script servers find it.
    pub fn script_env(&self) -> [(&'static str, String); 2] {
        let path = |path: PathBuf| path.to_str().expect("utf-8 path").to_owned();
        [("ZT_TLS_CERT", path(self.cert())), ("ZT_TLS_KEY", path(self.key()))]
    }
}

impl Default for SelfSignedCert {
    fn default() -> Self {
        Self::new()
    }
}
