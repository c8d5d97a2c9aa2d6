//! The per-sandbox CA: created at first use under the sandbox folder (`ca.pem`, `ca.key` mode
//! 0600), loaded on later runs. The private key never leaves Rust.
//!
//! How it works:
//! 1. [`CertificateAuthority::load_or_create`] loads `<dir>/ca.pem` + `<dir>/ca.key` when both exist
//!    and checks that they belong together and to this sandbox; otherwise it creates an ECDSA P-256
//!    CA (pathlen 0, cert sign + CRL sign, valid from a day ago for ten years, before 2049 so the
//!    dates stay UTCTime) and writes the key with mode 0600 through a temp file and a rename.
//! 2. At load it also generates one ECDSA P-256 leaf key, kept in memory only, shared by every leaf.
//! 3. [`CertificateAuthority::leaf`] mints a certificate for a DNS name (DNS SAN) or an IP literal
//!    (IP SAN — rustls matches IPs only against IP SANs), valid from an hour ago for 30 days, chain
//!    `[leaf, CA]`, and caches it per host (bounded, re-minted weekly, well before expiry).
//! 4. [`CertificateAuthority::server_config`] wraps a leaf in a rustls `ServerConfig` (ring provider,
//!    safe default protocol versions), cached per host and ALPN list.
//!
//! # Security
//! The CA key can sign a certificate for any host the sandbox trusts, so: it is written 0600 and
//! created exclusively; there is no getter for it; `Debug` prints the subject only; it is never
//! logged or put into an event. The CA is per sandbox, with path length 0, so a leaked sandbox CA
//! cannot vouch for anything outside that sandbox and cannot mint intermediates.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::error::{HiveError, Result};

/// File name of the CA certificate (PEM) in the sandbox folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PKCS#8 PEM, mode 0600) in the sandbox folder.
pub const CA_KEY_FILE: &str = "ca.key";

/// Leaves kept per CA (a bounded per-host cache).
const LEAF_CACHE_CAPACITY: u64 = 1024;
/// A cached leaf is re-minted after this long, well inside its validity.
const LEAF_CACHE_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// CA validity.
const CA_BACKDATE: time::Duration = time::Duration::days(1);
const CA_LIFETIME: time::Duration = time::Duration::days(3650);
/// Dates from 2050 on are GeneralizedTime; stay before 2049 so every client parses them.
const CA_NOT_AFTER_CAP: OffsetDateTime = time::macros::datetime!(2049-01-01 00:00:00 UTC);
/// Leaf validity.
const LEAF_BACKDATE: time::Duration = time::Duration::hours(1);
const LEAF_LIFETIME: time::Duration = time::Duration::days(30);
/// X.520 upper bound of a common name; longer names go only in the SAN.
const MAX_COMMON_NAME: usize = 64;

/// A sandbox's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    subject: String,
    issuer: Issuer<'static, KeyPair>,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn SigningKey>,
    provider: Arc<CryptoProvider>,
    leaves: moka::sync::Cache<String, Arc<CertifiedKey>>,
    configs: moka::sync::Cache<(String, Vec<Vec<u8>>), Arc<ServerConfig>>,
}

impl CertificateAuthority {
    /// Loads `<dir>/ca.pem` + `<dir>/ca.key`, or creates them.
    pub fn load_or_create(dir: &Path, sandbox: &str) -> Result<CertificateAuthority> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let params = ca_params(sandbox)?;
        let subject = ca_common_name(sandbox);
        let (cert_pem, key) = if cert_path.exists() && key_path.exists() {
            load(&cert_path, &key_path, &params)?
        } else {
            create(dir, &cert_path, &key_path, &params)?
        };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            internal(format!(
                "{}: not a PEM certificate: {e}",
                cert_path.display()
            ))
        })?;
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| internal(format!("generating the leaf key: {e}")))?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = rustls::crypto::ring::sign::any_supported_type(&leaf_der)
            .map_err(|e| internal(format!("loading the leaf key: {e}")))?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            subject,
            issuer: Issuer::new(params, key),
            leaf_key,
            leaf_signer,
            provider: Arc::new(interception_provider()),
            leaves: moka::sync::Cache::builder()
                .max_capacity(LEAF_CACHE_CAPACITY)
                .time_to_live(LEAF_CACHE_TTL)
                .build(),
            configs: moka::sync::Cache::builder()
                .max_capacity(LEAF_CACHE_CAPACITY)
                .time_to_live(LEAF_CACHE_TTL)
                .build(),
        })
    }

    /// The CA certificate (PEM), which sandboxed clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A leaf certificate for `host` (a DNS name, or an IPv4/IPv6 literal with or without
    /// brackets), signed by this CA, with chain `[leaf, CA]`. Cached per normalized host.
    ///
    /// # Security
    /// Only the proxy calls this, for a host the policy already allowed to be intercepted; the
    /// leaf is valid only for that one name.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>> {
        let (name, san) = leaf_name(host)?;
        self.leaves
            .try_get_with(name.clone(), || self.mint(&name, san))
            .map_err(unshare)
    }

    /// A rustls server config presenting the leaf for `host` and offering `alpn` (in order of
    /// preference). Cached per host and ALPN list.
    pub fn server_config(&self, host: &str, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>> {
        let (name, _) = leaf_name(host)?;
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        self.configs
            .try_get_with((name.clone(), alpn.clone()), || {
                let leaf = self.leaf(&name)?;
                let mut config = ServerConfig::builder_with_provider(self.provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| internal(format!("TLS server config: {e}")))?
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(SingleCertAndKey::from(leaf)));
                config.alpn_protocols = alpn;
                // Our order (see `interception_provider`), not the client's.
                config.ignore_client_order = true;
                if resumption_switched_off() {
                    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
                    config.send_tls13_tickets = 0;
                }
                Ok(Arc::new(config))
            })
            .map_err(unshare)
    }

    /// Signs a new leaf for an already-normalized name.
    fn mint(&self, name: &str, san: SanType) -> Result<Arc<CertifiedKey>> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if name.len() <= MAX_COMMON_NAME {
            dn.push(DnType::CommonName, name);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        // Every leaf shares one key, and rcgen's default serial derives from the key: set a random
        // one so no two certificates of this CA share a serial.
        params.serial_number = Some(random_serial()?);
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| internal(format!("signing a leaf for {name}: {e}")))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            self.leaf_signer.clone(),
        )))
    }
}

/// `HIVE_BENCH_NO_RESUMPTION=1` (read once): the intercepting side resumes no TLS session, so
/// `benches/proxy.mjs` compares full handshakes with an upstream that resumes none either.
fn resumption_switched_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("HIVE_BENCH_NO_RESUMPTION").is_some_and(|v| v == "1"))
}

/// ring's provider with `TLS13_AES_128_GCM_SHA256` first. This leg of an intercepted connection
/// never leaves the machine, and SHA-256's key schedule runs on the SHA extensions of x86-64 and
/// ARMv8 where SHA-384's does not (6.5 % of a new connection's CPU went to SHA-512 blocks);
/// clients commonly ask for AES-256 first. Every suite of the default stays offered.
fn interception_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

fn internal(message: String) -> HiveError {
    HiveError::Internal(message)
}

/// Gets a `HiveError` back out of the cache's shared error.
fn unshare(e: Arc<HiveError>) -> HiveError {
    Arc::try_unwrap(e).unwrap_or_else(|shared| internal(shared.to_string()))
}

fn ca_common_name(sandbox: &str) -> String {
    format!("hive sandbox {sandbox} CA")
}

/// The CA's parameters. Subject, key usages and key-id method are what a reloaded CA signs with,
/// so they must not depend on anything but the sandbox name.
fn ca_params(sandbox: &str) -> Result<CertificateParams> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ca_common_name(sandbox));
    dn.push(DnType::OrganizationName, "hive");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - CA_BACKDATE;
    params.not_after = (now + CA_LIFETIME).min(CA_NOT_AFTER_CAP);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// 16 random bytes, positive.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| internal(format!("random serial: {e}")))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, so the DER length is fixed
    Ok(SerialNumber::from_slice(&bytes))
}

/// Normalizes a host for a leaf: lowercase, no brackets around IPv6, no trailing dot; returns the
/// cache key and the SAN it needs.
fn leaf_name(host: &str) -> Result<(String, SanType)> {
    let invalid =
        || HiveError::InvalidArgument(format!("{host:?} is not a hostname or IP address"));
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok((ip.to_string(), SanType::IpAddress(ip)));
    }
    let name = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
    if name.is_empty() || name.contains('*') {
        return Err(invalid());
    }
    rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|_| invalid())?;
    let ia5 = name.as_str().try_into().map_err(|_| invalid())?;
    Ok((name, SanType::DnsName(ia5)))
}

/// Loads and checks a stored CA.
fn load(
    cert_path: &Path,
    key_path: &Path,
    params: &CertificateParams,
) -> Result<(String, KeyPair)> {
    let cert_pem = fs::read_to_string(cert_path)
        .map_err(|e| HiveError::io(format!("reading {}", cert_path.display()), e))?;
    let key_pem = fs::read_to_string(key_path)
        .map_err(|e| HiveError::io(format!("reading {}", key_path.display()), e))?;
    tighten_mode(key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        internal(format!(
            "{}: not a usable private key: {e}",
            key_path.display()
        ))
    })?;

    // A reloaded CA signs with the issuer name rebuilt from the sandbox name, so the stored
    // certificate must carry exactly that subject and the stored key's public key. Compare both
    // with a throwaway certificate made from the same parameters and key.
    let stored = trust_anchor_parts(cert_pem.as_bytes())
        .ok_or_else(|| internal(format!("{}: not a CA certificate", cert_path.display())))?;
    let probe = params
        .self_signed(&key)
        .map_err(|e| internal(format!("checking the CA: {e}")))?;
    let expected = trust_anchor_parts(probe.pem().as_bytes())
        .ok_or_else(|| internal("checking the CA: cannot parse the probe".into()))?;
    if stored != expected {
        return Err(internal(format!(
            "{} and {} do not belong together or to this sandbox; remove both to make a new CA",
            cert_path.display(),
            key_path.display()
        )));
    }
    Ok((cert_pem, key))
}

/// The (subject, subject public key info) of a PEM certificate, as webpki reads them.
fn trust_anchor_parts(pem: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let der = CertificateDer::from_pem_slice(pem).ok()?;
    let mut store = RootCertStore::empty();
    store.add(der).ok()?;
    let anchor = store.roots.first()?;
    Some((
        anchor.subject.as_ref().to_vec(),
        anchor.subject_public_key_info.as_ref().to_vec(),
    ))
}

/// Creates a new CA and writes it: the key first (0600), then the certificate (0644).
fn create(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    params: &CertificateParams,
) -> Result<(String, KeyPair)> {
    fs::create_dir_all(dir).map_err(|e| HiveError::io(format!("creating {}", dir.display()), e))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| internal(format!("generating the CA key: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| internal(format!("signing the CA certificate: {e}")))?;
    let cert_pem = cert.pem();
    write_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(cert_path, cert_pem.as_bytes(), 0o644)?;
    if let Ok(dir) = File::open(dir) {
        // Make the renames durable; failing here loses nothing that a rerun would not redo.
        let _ = dir.sync_all();
    }
    Ok((cert_pem, key))
}

/// Writes `bytes` to a fresh temp file created exclusively with `mode`, fsyncs it and renames it
/// over `path`, so `path` is never seen half-written or with a wider mode.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; it can only have removed bits, but make it exact.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| HiveError::io(format!("writing {}", path.display()), e))
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| internal(format!("random temp name: {e}")))?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.{suffix}.tmp")))
}

/// Puts a stored key back to 0600 if something widened it.
fn tighten_mode(key_path: &Path) -> Result<()> {
    let meta = fs::metadata(key_path)
        .map_err(|e| HiveError::io(format!("reading {}", key_path.display()), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %key_path.display(), "CA key was readable by others; resetting to 0600");
        fs::set_permissions(key_path, fs::Permissions::from_mode(0o600))
            .map_err(|e| HiveError::io(format!("securing {}", key_path.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::{ClientConfig, ClientConnection, ServerConnection};
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;

    fn new_ca() -> (tempfile::TempDir, CertificateAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "sb").unwrap();
        (dir, ca)
    }

    fn roots(ca: &CertificateAuthority) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        Arc::new(roots)
    }

    fn verify(ca: &CertificateAuthority, leaf: &CertifiedKey, name: &str) -> bool {
        let verifier = WebPkiServerVerifier::builder_with_provider(
            roots(ca),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], UnixTime::now())
            .is_ok()
    }

    // --- CA invariants ---

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CertificateAuthority>();
    }

    #[test]
    fn reload_gives_the_same_ca() {
        let (dir, ca) = new_ca();
        let again = CertificateAuthority::load_or_create(dir.path(), "sb").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        // A leaf minted by the reloaded CA chains to the original certificate.
        assert!(verify(
            &ca,
            &again.leaf("example.com").unwrap(),
            "example.com"
        ));
    }

    #[test]
    fn files_have_tight_modes_and_no_temp_files_remain() {
        let (dir, ca) = new_ca();
        let mode = |f: &str| {
            fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(fs::read_to_string(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .contains("PRIVATE KEY"));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn reload_resets_a_widened_key_mode() {
        let (dir, _ca) = new_ca();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        CertificateAuthority::load_or_create(dir.path(), "sb").unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn ca_is_a_pathlen_zero_ca() {
        let (_dir, ca) = new_ca();
        // basicConstraints value: SEQUENCE { BOOLEAN TRUE, INTEGER 0 }.
        let der = ca.cert_der().as_ref();
        let constraints = [0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00];
        assert!(der.windows(constraints.len()).any(|w| w == constraints));
        let cn = b"hive sandbox sb CA";
        assert!(der.windows(cn.len()).any(|w| w == cn));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let (_dir, ca) = new_ca();
        let debug = format!("{ca:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(debug.contains("hive sandbox sb CA"), "{debug}");
    }

    #[test]
    fn mismatched_files_are_rejected() {
        let (a, _) = new_ca();
        let (b, _) = new_ca();
        // Another CA's key next to this certificate.
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(a.path(), "sb").unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::Internal);
        // The CA of another sandbox name.
        let err = CertificateAuthority::load_or_create(b.path(), "other").unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::Internal);
    }

    #[test]
    fn garbage_files_are_rejected() {
        for (case, cert, key) in [
            ("cert not PEM", "nonsense", None),
            ("key not PEM", "", Some("nonsense")),
        ] {
            let (dir, _) = new_ca();
            if !cert.is_empty() {
                fs::write(dir.path().join(CA_CERT_FILE), cert).unwrap();
            }
            if let Some(key) = key {
                fs::write(dir.path().join(CA_KEY_FILE), key).unwrap();
            }
            assert!(
                CertificateAuthority::load_or_create(dir.path(), "sb").is_err(),
                "{case}"
            );
        }
    }

    // --- leaves ---

    #[test]
    fn leaves_verify_against_the_ca() {
        let (_dir, ca) = new_ca();
        for (host, name) in [
            ("api.github.com", "api.github.com"),
            ("API.GitHub.com.", "api.github.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("localhost", "localhost"),
        ] {
            let leaf = ca.leaf(host).unwrap();
            assert_eq!(leaf.cert.len(), 2, "{host}: chain is [leaf, CA]");
            assert_eq!(&leaf.cert[1], ca.cert_der(), "{host}");
            assert!(leaf.keys_match().is_ok(), "{host}");
            assert!(verify(&ca, &leaf, name), "{host} verifies as {name}");
        }
    }

    #[test]
    fn leaves_are_only_valid_for_their_host() {
        let (_dir, ca) = new_ca();
        for (host, other) in [
            ("api.github.com", "github.com"),
            ("api.github.com", "evil.api.github.com"),
            ("127.0.0.1", "127.0.0.2"),
            ("127.0.0.1", "localhost"),
        ] {
            assert!(
                !verify(&ca, &ca.leaf(host).unwrap(), other),
                "{host} as {other}"
            );
        }
        let (_other_dir, other_ca) = new_ca();
        assert!(
            !verify(&other_ca, &ca.leaf("a.example").unwrap(), "a.example"),
            "another sandbox's CA does not vouch for it"
        );
    }

    #[test]
    fn invalid_hosts_are_rejected() {
        let (_dir, ca) = new_ca();
        for host in [
            "",
            ".",
            "*.example.com",
            "a b",
            "exa mple.com",
            "[]",
            "héllo.com",
        ] {
            let err = ca.leaf(host).unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::InvalidArgument, "{host:?}");
        }
    }

    #[test]
    fn leaf_cache_returns_the_same_arc() {
        let (_dir, ca) = new_ca();
        let a = ca.leaf("api.github.com").unwrap();
        assert!(Arc::ptr_eq(&a, &ca.leaf("api.github.com").unwrap()));
        assert!(
            Arc::ptr_eq(&a, &ca.leaf("API.github.com.").unwrap()),
            "normalized"
        );
        assert!(!Arc::ptr_eq(&a, &ca.leaf("github.com").unwrap()));
        assert!(Arc::ptr_eq(
            &ca.leaf("::1").unwrap(),
            &ca.leaf("[::1]").unwrap()
        ));
    }

    #[test]
    fn leaves_have_distinct_serials() {
        let (_dir, ca) = new_ca();
        let a = ca.leaf("a.example").unwrap().cert[0].clone();
        let b = ca.leaf("b.example").unwrap().cert[0].clone();
        // The serial is the first INTEGER of the TBS; compare the bytes that follow its header.
        let serial = |der: &[u8]| -> Vec<u8> {
            let at = der.windows(2).position(|w| w == [0x02, 0x10]).unwrap();
            der[at..at + 18].to_vec()
        };
        assert_ne!(serial(a.as_ref()), serial(b.as_ref()));
    }

    // --- server configs ---

    #[test]
    fn server_config_is_cached_per_host_and_alpn() {
        let (_dir, ca) = new_ca();
        let h2: &[&[u8]] = &[b"h2", b"http/1.1"];
        let a = ca.server_config("example.com", h2).unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &ca.server_config("EXAMPLE.com", h2).unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &a,
            &ca.server_config("example.com", &[b"http/1.1"]).unwrap()
        ));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn server_config_completes_a_handshake() {
        let (_dir, ca) = new_ca();
        let server_config = ca
            .server_config("api.github.com", &[b"h2", b"http/1.1"])
            .unwrap();
        let mut client_config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots(&ca))
                .with_no_client_auth();
        client_config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from("api.github.com").unwrap();
        let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
        let mut server = ServerConnection::new(server_config).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(client.alpn_protocol(), Some(&b"h2"[..]));
        // ring's default client order asks for AES-256 first; the interception side picks.
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}
