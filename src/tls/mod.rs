//! TLS: the per-sandbox certificate authority and the leaf certificates it mints for interception.

mod ca;

pub use ca::CertificateAuthority;
