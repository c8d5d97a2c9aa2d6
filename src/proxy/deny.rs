//! The answers the proxy writes itself: `403` policy denials, `400` malformed requests, `407`
//! missing proxy credentials and `502`/`504` upstream failures (docs/network-access.md).
//!
//! A denial is `403 Blocked by hive egress policy` (HTTP/1.1 reason phrase; h2 has none) with an
//! `X-Hive-Denied: <reason>` header and a one-line body naming the method, host, path and why:
//! `hive: GET github.com/login denied by this sandbox's egress policy (no rule matches host
//! github.com)`. An upstream failure is `502` (`504` for a timeout) with an
//! `X-Hive-Upstream-Error: <cause>` header and a body naming the cause.
//!
//! # Security
//! Every body here is fixed text plus the host, method and path the client itself sent: no
//! secrets, no addresses the proxy resolved, no error chains from inside the proxy.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// The header naming the reason of a denial, so an agent can tell policy from network failure.
pub const DENIED_HEADER: &str = "x-hive-denied";
/// The header naming the cause of an upstream failure (`dns`, `refused`, …).
pub const UPSTREAM_ERROR_HEADER: &str = "x-hive-upstream-error";
/// The HTTP/1.1 reason phrase of a policy `403`.
pub const DENIED_REASON_PHRASE: &str = "Blocked by hive egress policy";

/// The body type every proxy response uses (streamed upstream bodies and our own short texts).
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which upstream failure a `502`/`504` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Name resolution failed.
    Resolve,
    /// The upstream refused the TCP connection (or no route led to it).
    ConnectRefused,
    /// The upstream's certificate did not verify against the trusted roots.
    TlsVerification,
    /// The TLS handshake with the upstream failed for another reason.
    TlsHandshake,
    /// Connecting or the handshake took longer than `upstream.connectTimeoutMs`.
    Timeout,
    /// The response head took longer than `upstream.responseTimeoutMs`.
    ResponseTimeout,
    /// The connection was reset or closed while the request was exchanged.
    Exchange,
}

impl UpstreamFailure {
    /// The fixed sentence of the body.
    pub const fn describe(self) -> &'static str {
        match self {
            UpstreamFailure::Resolve => "the upstream host name could not be resolved",
            UpstreamFailure::ConnectRefused => "the upstream refused the connection",
            UpstreamFailure::TlsVerification => {
                "the upstream's TLS certificate could not be verified"
            }
            UpstreamFailure::TlsHandshake => "the TLS handshake with the upstream failed",
            UpstreamFailure::Timeout => "connecting to the upstream timed out",
            UpstreamFailure::ResponseTimeout => "the upstream did not answer in time",
            UpstreamFailure::Exchange => "the upstream connection was reset during the exchange",
        }
    }

    /// The cause as events and the `X-Hive-Upstream-Error` header name it.
    pub const fn cause(self) -> &'static str {
        match self {
            UpstreamFailure::Resolve => "dns",
            UpstreamFailure::ConnectRefused => "refused",
            UpstreamFailure::TlsVerification => "tls-verify",
            UpstreamFailure::TlsHandshake => "tls",
            UpstreamFailure::Timeout | UpstreamFailure::ResponseTimeout => "timeout",
            UpstreamFailure::Exchange => "reset",
        }
    }

    /// `504` for timeouts, else `502`.
    pub const fn status(self) -> StatusCode {
        match self {
            UpstreamFailure::Timeout | UpstreamFailure::ResponseTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Why a request was denied, in words, from the decision's reason (the `X-Hive-Denied` value).
pub fn explain(reason: &str, host: &str) -> String {
    match reason {
        "no-rule" => format!("no rule matches host {host}"),
        "rule" => "a deny rule matches".to_string(),
        "method" => format!("a rule names {host} but not this method"),
        "path" => format!("a rule names {host} but not this path"),
        "port" => format!("a rule names {host} but not this port"),
        "private-address" => format!("{host} resolves to a private address no rule names"),
        "host-mismatch" => "the TLS name, tunnel target and Host header disagree".to_string(),
        "proxy-loop" => "the request is aimed at the proxy itself".to_string(),
        "plaintext-credentials" => {
            "the rule injects credentials, which never travel over plain HTTP".to_string()
        }
        "path-ambiguous" => "the path reads differently on common servers".to_string(),
        "method-override" => "a method-override header names a denied method".to_string(),
        "upgrade" => "the rule cannot inspect this protocol upgrade".to_string(),
        "trace-with-credentials" => "TRACE would echo the injected credentials".to_string(),
        other => format!("reason: {other}"),
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

/// `403 Blocked by hive egress policy` for a request the egress policy denied, naming method,
/// host, path and why.
pub fn forbidden(
    reason: &'static str,
    host: &str,
    method: &str,
    path: &str,
) -> Response<ProxyBody> {
    let text = format!(
        "hive: {method} {host}{path} denied by this sandbox's egress policy ({})\n",
        explain(reason, host)
    );
    let mut res = text_response(StatusCode::FORBIDDEN, sanitize(&text));
    res.headers_mut()
        .insert(DENIED_HEADER, HeaderValue::from_static(reason));
    res.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            DENIED_REASON_PHRASE.as_bytes(),
        ));
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

/// `502` (`504` for a timeout) naming the cause of an upstream failure.
pub fn bad_gateway(
    failure: UpstreamFailure,
    host: &str,
    method: &str,
    path: &str,
) -> Response<ProxyBody> {
    let text = format!(
        "hive: {method} {host}{path} failed upstream ({}): {}\n",
        failure.cause(),
        failure.describe()
    );
    let mut res = text_response(failure.status(), sanitize(&text));
    res.headers_mut().insert(
        UPSTREAM_ERROR_HEADER,
        HeaderValue::from_static(failure.cause()),
    );
    let phrase: &'static [u8] = match failure {
        UpstreamFailure::Timeout | UpstreamFailure::ResponseTimeout => b"Upstream timed out",
        UpstreamFailure::Resolve => b"Upstream name not resolvable",
        UpstreamFailure::ConnectRefused => b"Upstream refused the connection",
        UpstreamFailure::TlsVerification => b"Upstream certificate not verified",
        UpstreamFailure::TlsHandshake => b"Upstream TLS handshake failed",
        UpstreamFailure::Exchange => b"Upstream connection reset",
    };
    res.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(phrase));
    res
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
                "GET api.github.com/zen denied by this sandbox's egress policy (no rule matches host api.github.com)",
                "no-rule",
            ),
            (
                "host-mismatch",
                "pypi.org",
                "CONNECT",
                "",
                "CONNECT pypi.org denied",
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
            let phrase = res.extensions().get::<hyper::ext::ReasonPhrase>().cloned();
            assert_eq!(
                phrase.as_ref().map(|p| p.as_bytes()),
                Some(DENIED_REASON_PHRASE.as_bytes())
            );
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
            (
                UpstreamFailure::ConnectRefused,
                502,
                "(refused): the upstream refused",
            ),
            (UpstreamFailure::Resolve, 502, "(dns): "),
            (UpstreamFailure::TlsVerification, 502, "(tls-verify): "),
            (UpstreamFailure::Timeout, 504, "(timeout): connecting"),
            (
                UpstreamFailure::ResponseTimeout,
                504,
                "(timeout): the upstream did not",
            ),
            (UpstreamFailure::Exchange, 502, "(reset): "),
        ];
        for (failure, status, want) in cases {
            let res = bad_gateway(failure, "pypi.org", "GET", "/simple/");
            assert_eq!(res.status().as_u16(), status);
            assert_eq!(res.headers()[UPSTREAM_ERROR_HEADER], failure.cause());
            let body = futures_body(res);
            assert!(body.contains(want), "{body}");
            assert!(
                body.starts_with("hive: GET pypi.org/simple/ failed upstream"),
                "{body}"
            );
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
