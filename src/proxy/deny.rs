//! The answers the proxy writes itself: `403` policy denials, `400` malformed requests, `407`
//! missing proxy credentials and `502` upstream failures (docs/network-access.md).
//!
//! # Security
//! Every body here is fixed text plus the host, method and path the client itself sent: no
//! secrets, no addresses the proxy resolved, no error chains from inside the proxy.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// The header naming the reason of a denial, so an agent can tell policy from network failure.
pub const DENIED_HEADER: &str = "x-hive-denied";

/// The body type every proxy response uses (streamed upstream bodies and our own short texts).
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which upstream failure a `502` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Name resolution failed.
    Resolve,
    /// The upstream refused or reset the TCP connection.
    ConnectRefused,
    /// The upstream's certificate did not verify against the trusted roots.
    TlsVerification,
    /// The TLS handshake with the upstream failed for another reason.
    TlsHandshake,
    /// Connecting or the handshake took too long.
    Timeout,
    /// The connection broke while the request was exchanged.
    Exchange,
}

impl UpstreamFailure {
    /// The fixed sentence of the `502` body.
    pub const fn describe(self) -> &'static str {
        match self {
            UpstreamFailure::Resolve => "the upstream host name could not be resolved",
            UpstreamFailure::ConnectRefused => "the upstream refused the connection",
            UpstreamFailure::TlsVerification => {
                "the upstream's TLS certificate could not be verified"
            }
            UpstreamFailure::TlsHandshake => "the TLS handshake with the upstream failed",
            UpstreamFailure::Timeout => "connecting to the upstream timed out",
            UpstreamFailure::Exchange => "the upstream connection failed during the exchange",
        }
    }
}

/// A short text body.
pub fn text_body(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty_body() -> ProxyBody {
    text_body(Bytes::new())
}

fn text_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut res = Response::new(text_body(text));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// `403` for a request the egress policy denied, naming host, method and path.
pub fn forbidden(
    reason: &'static str,
    host: &str,
    method: &str,
    path: &str,
) -> Response<ProxyBody> {
    let target = if path.is_empty() {
        host.to_string()
    } else {
        format!("{host}{path}")
    };
    let text = format!(
        "hive: {method} {target} was denied by this sandbox's egress policy (reason: {reason})\n"
    );
    let mut res = text_response(StatusCode::FORBIDDEN, sanitize(&text));
    res.headers_mut()
        .insert(DENIED_HEADER, HeaderValue::from_static(reason));
    res
}

/// `400` for a request the proxy cannot act on; `what` is fixed text.
pub fn bad_request(what: &'static str) -> Response<ProxyBody> {
    text_response(
        StatusCode::BAD_REQUEST,
        format!("hive: bad request: {what}\n"),
    )
}

/// `407` with a `Proxy-Authenticate` challenge (host listener without its credential).
pub fn proxy_auth_required() -> Response<ProxyBody> {
    let mut res = text_response(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "hive: this proxy needs the credential from the URL sandbox.proxy() returned\n".into(),
    );
    res.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"hive\""),
    );
    res
}

/// `502` saying which upstream failure happened.
pub fn bad_gateway(failure: UpstreamFailure, host: &str) -> Response<ProxyBody> {
    text_response(
        StatusCode::BAD_GATEWAY,
        sanitize(&format!("hive: {host}: {}\n", failure.describe())),
    )
}

/// `503` while the proxy shuts down.
pub fn unavailable() -> Response<ProxyBody> {
    text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "hive: the sandbox proxy is closing\n".into(),
    )
}

/// Keeps echoed request parts printable (they come from the client, which may be hostile to
/// terminals that display the body).
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_names_host_method_path_and_reason() {
        let cases = [
            (
                "no-rule",
                "api.github.com",
                "GET",
                "/zen",
                "GET api.github.com/zen",
                "no-rule",
            ),
            (
                "host-mismatch",
                "pypi.org",
                "CONNECT",
                "",
                "CONNECT pypi.org was",
                "host-mismatch",
            ),
            (
                "rule",
                "x.org",
                "POST",
                "/a\u{1b}[2J",
                "POST x.org/a?[2J",
                "rule",
            ),
        ];
        for (reason, host, method, path, want_text, want_header) in cases {
            let res = forbidden(reason, host, method, path);
            assert_eq!(res.status(), StatusCode::FORBIDDEN);
            assert_eq!(res.headers()[DENIED_HEADER], want_header);
            let body = futures_body(res);
            assert!(body.contains(want_text), "{body}");
            assert!(body.contains("egress policy"), "{body}");
        }
    }

    #[test]
    fn proxy_auth_required_challenges_basic() {
        let res = proxy_auth_required();
        assert_eq!(res.status(), StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        assert_eq!(
            res.headers()[header::PROXY_AUTHENTICATE],
            "Basic realm=\"hive\""
        );
    }

    #[test]
    fn bad_gateway_names_the_failure() {
        let cases = [
            (UpstreamFailure::ConnectRefused, "refused"),
            (UpstreamFailure::TlsVerification, "could not be verified"),
            (UpstreamFailure::Timeout, "timed out"),
        ];
        for (failure, want) in cases {
            let body = futures_body(bad_gateway(failure, "pypi.org"));
            assert!(body.contains(want) && body.contains("pypi.org"), "{body}");
        }
    }

    fn futures_body(res: Response<ProxyBody>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes = rt
            .block_on(res.into_body().collect())
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
