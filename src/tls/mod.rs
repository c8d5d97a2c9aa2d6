//! TLS: the per-sandbox certificate authority and the leaf certificates it mints for interception.

mod ca;

pub use ca::{CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE};
