//! The proxy bench's floor (`benches/proxy.mjs`): the least an HTTP/1.1 proxy that terminates
//! TLS on both legs can do per request, so that hive's CPU per request is read against what the
//! same requests cost any intercepting relay on the same machine, in the same minutes.
//!
//! `hive-floor-relay UPSTREAM_HTTP_PORT UPSTREAM_HTTPS_PORT` listens on a free loopback port,
//! prints it on stdout and relays:
//! - `CONNECT host:port`: answers `200`, accepts TLS with a self-signed certificate (the client
//!   runs with `--insecure`), opens one TLS connection to `127.0.0.1:UPSTREAM_HTTPS_PORT` (not
//!   verified) and relays requests over it for the client connection's life;
//! - `GET http://host/path`: the same over plain TCP to `127.0.0.1:UPSTREAM_HTTP_PORT`, with the
//!   request line in origin form.
//!
//! Per request it parses both heads with `httparse`, writes the request upstream in one write and
//! the response to the client in one write: two reads and two writes, the system calls any relay
//! needs. Nothing else: no policy, no events, no pool, no timers, no hop-by-hop filtering, and
//! only `Content-Length` framing (what nginx sends the bench). Not a proxy to use: it verifies
//! nothing.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Error = Box<dyn std::error::Error + Send + Sync>;

const MAX_HEADERS: usize = 64;

struct Relay {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    upstream_http: u16,
    upstream_https: u16,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [http, https] = args.as_slice() else {
        return Err("usage: hive-floor-relay UPSTREAM_HTTP_PORT UPSTREAM_HTTPS_PORT".into());
    };
    let relay = Arc::new(Relay::new(http.parse()?, https.parse()?)?);
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    println!("{}", listener.local_addr()?.port());
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let relay = relay.clone();
        tokio::spawn(async move {
            // A connection that fails just ends: the bench counts errors on the client's side.
            let _ = relay.serve(stream).await;
        });
    }
}

impl Relay {
    fn new(upstream_http: u16, upstream_https: u16) -> Result<Relay, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let leaf = rcgen::generate_simple_self_signed(vec!["bench.hive.test".to_owned()])?;
        let cert = CertificateDer::from(leaf.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.signing_key.serialize_der()));
        // No resumption, as hive's side runs in the bench (HIVE_BENCH_NO_RESUMPTION).
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Relay {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            upstream_http,
            upstream_https,
        })
    }

    async fn serve(&self, mut client: TcpStream) -> Result<(), Error> {
        let mut buf = Vec::with_capacity(8 * 1024);
        let Some(len) = read_head(&mut client, &mut buf, Kind::Request).await? else {
            return Ok(());
        };
        let (connect, target) = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(&buf)?;
            (
                req.method == Some("CONNECT"),
                req.path.unwrap_or("").to_owned(),
            )
        };
        if !connect {
            let upstream = connect_tcp(self.upstream_http).await?;
            return relay(client, upstream, buf, true).await;
        }
        buf.drain(..len);
        client.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
        let client = self.acceptor.accept(client).await?;
        let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
        let upstream = connect_tcp(self.upstream_https).await?;
        let upstream = self
            .connector
            .connect(ServerName::try_from(host.to_owned())?, upstream)
            .await?;
        relay(client, upstream, buf, false).await
    }
}

async fn connect_tcp(port: u16) -> Result<TcpStream, Error> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response,
}

/// Parses the head at the start of `buf`: its length and `Content-Length`, or `None` while
/// incomplete.
fn parse_head(buf: &[u8], kind: Kind) -> Result<Option<(usize, usize)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (status, headers) = match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut headers);
            (req.parse(buf)?, req.headers)
        }
        Kind::Response => {
            let mut res = httparse::Response::new(&mut headers);
            (res.parse(buf)?, res.headers)
        }
    };
    let httparse::Status::Complete(len) = status else {
        return Ok(None);
    };
    let body = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).map(|v| v.trim().parse::<usize>()))
        .transpose()?
        .transpose()?
        .unwrap_or(0);
    Ok(Some((len, body)))
}

/// Reads until `buf` starts with a complete head; its length, or `None` at a clean end.
async fn read_head<S>(stream: &mut S, buf: &mut Vec<u8>, kind: Kind) -> Result<Option<usize>, Error>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some((len, _)) = parse_head(buf, kind)? {
            return Ok(Some(len));
        }
        buf.reserve(8 * 1024);
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("the connection ended inside a head".into())
            };
        }
    }
}

/// Reads a whole message (head and `Content-Length` body) into `buf`; its length.
async fn read_message<S>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    kind: Kind,
) -> Result<Option<usize>, Error>
where
    S: AsyncRead + Unpin,
{
    if read_head(stream, buf, kind).await?.is_none() {
        return Ok(None);
    }
    let (len, body) = parse_head(buf, kind)?.ok_or("the head went away")?;
    while buf.len() < len + body {
        buf.reserve(len + body - buf.len());
        if stream.read_buf(buf).await? == 0 {
            return Err("the connection ended inside a body".into());
        }
    }
    Ok(Some(len + body))
}

/// Relays requests from `client` (whose first bytes are in `pending`) over `upstream` until the
/// client closes. `absolute`: request lines are in absolute form, sent upstream in origin form.
async fn relay<C, U>(
    mut client: C,
    mut upstream: U,
    mut pending: Vec<u8>,
    absolute: bool,
) -> Result<(), Error>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut response = Vec::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(8 * 1024);
    loop {
        let Some(len) = read_message(&mut client, &mut pending, Kind::Request).await? else {
            return Ok(());
        };
        out.clear();
        if absolute {
            origin_form(&pending[..len], &mut out);
        } else {
            out.extend_from_slice(&pending[..len]);
        }
        pending.drain(..len);
        upstream.write_all(&out).await?;
        upstream.flush().await?;
        let len = read_message(&mut upstream, &mut response, Kind::Response)
            .await?
            .ok_or("the upstream closed")?;
        client.write_all(&response[..len]).await?;
        client.flush().await?;
        response.drain(..len);
    }
}

/// `message` with its request line's absolute-form target (`http://host/path`) in origin form.
fn origin_form(message: &[u8], out: &mut Vec<u8>) {
    let Some(space) = message.iter().position(|&b| b == b' ') else {
        out.extend_from_slice(message);
        return;
    };
    let (method, rest) = message.split_at(space + 1);
    let Some(after) = rest.strip_prefix(b"http://") else {
        out.extend_from_slice(message);
        return;
    };
    let path = after
        .iter()
        .position(|&b| b == b'/' || b == b' ')
        .unwrap_or(after.len());
    out.extend_from_slice(method);
    if after.get(path) != Some(&b'/') {
        out.push(b'/');
    }
    out.extend_from_slice(&after[path..]);
}

/// Accepts any upstream certificate (the bench's nginx on loopback), checking only signatures.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_the_path_and_the_rest_of_the_message() {
        let mut out = Vec::new();
        origin_form(
            b"GET http://bench.hive.test/a?b HTTP/1.1\r\nhost: x\r\n\r\n",
            &mut out,
        );
        assert_eq!(out, b"GET /a?b HTTP/1.1\r\nhost: x\r\n\r\n");
        out.clear();
        origin_form(b"GET http://bench.hive.test HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        out.clear();
        origin_form(b"GET /already HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(out, b"GET /already HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_head_is_complete_with_its_body_length() {
        let res = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(parse_head(res, Kind::Response).unwrap(), Some((38, 2)));
        assert_eq!(parse_head(&res[..20], Kind::Response).unwrap(), None);
        assert!(parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            Kind::Response
        )
        .is_err());
    }
}
