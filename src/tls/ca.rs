//! The per-sandbox CA: created at first use under the sandbox folder (`ca.pem`, `ca.key` mode
//! 0600), loaded on later runs. The private key never leaves Rust.

use std::path::Path;

use crate::error::Result;

/// A sandbox's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
}

impl CertificateAuthority {
    /// Loads `<dir>/ca.pem` + `<dir>/ca.key`, or creates them.
    pub fn load_or_create(dir: &Path, sandbox: &str) -> Result<CertificateAuthority> {
        let _ = (dir, sandbox);
        todo!()
    }

    /// The CA certificate (PEM), which sandboxed clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}
