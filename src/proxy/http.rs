//! Request dispatch and HTTP forwarding: the proxy credential check, `CONNECT` hand-off,
//! absolute-form requests, requests decrypted from an intercepted tunnel, and the forwarding of an
//! allowed request to the upstream (headers rewritten, bodies streamed and counted, `Upgrade`
//! carried through).
//!
//! # Security
//! Every request is decided against the policy loaded at the moment it arrives (README.md#api
//! `applyConfig`). Inside a tunnel the `Host` / `:authority` must name the tunnel's host and port
//! (`host-mismatch`, no domain fronting). Override headers are set only after the decision, after
//! hop-by-hop stripping, and only for HTTPS upstream legs or rules with `allowPlaintext`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::config::normalize_host;
use crate::policy::{reason, Decision, Scheme};

use super::audit::{Auditor, CountingBody, Direction, Exchange, Subject};
use super::deny::{self, ProxyBody};
use super::gate::{self, Ask, Outcome};
use super::headers;
use super::listener::Conn;
use super::{connect, resend, scrub, substitute, upstream};

/// The tunnel a decrypted request arrived through.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// Normalized CONNECT host.
    pub host: Arc<str>,
    pub port: u16,
    /// The TLS SNI, when it named another host than the CONNECT target.
    pub sni_mismatch: Option<Arc<str>>,
    /// `Https` for an intercepted TLS tunnel, `Http` for plain HTTP spoken inside a tunnel.
    pub scheme: Scheme,
    /// Set when the tunnel was accepted only to answer every request with this refusal.
    pub refusal: Option<connect::Refusal>,
}

/// Answers one request on a proxy connection (`tunnel: None`) or inside an intercepted tunnel.
///
/// Boxed: a tunnel's decrypted connection is served by this same function again, and the boxed
/// future breaks the type recursion.
pub fn handle(
    conn: Conn,
    tunnel: Option<Tunnel>,
    req: Request<Incoming>,
) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> {
    Box::pin(async move {
        match tunnel {
            None => handle_proxy_request(conn, req).await,
            Some(tunnel) => handle_tunneled_request(conn, tunnel, req).await,
        }
    })
}

async fn handle_proxy_request(conn: Conn, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(expected) = &conn.ctl.credential {
        if !headers::has_credential(req.headers(), expected) {
            return deny::proxy_auth_required();
        }
    }
    if conn.ctl.is_closed() {
        return deny::unavailable();
    }
    if req.method() == Method::CONNECT {
        return connect::handle(conn, req).await;
    }
    let uri = req.uri();
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        Some(_) => return deny::bad_request("only http:// and https:// URLs can be proxied"),
        None => return deny::bad_request(
            "this is an HTTP proxy: send absolute-form requests (GET http://host/path) or CONNECT",
        ),
    };
    let Some(host) = uri.host().and_then(normalize_host) else {
        return deny::bad_request("the request URL has no valid host");
    };
    let port = uri.port_u16().unwrap_or(default_port(scheme));
    forward(&conn, req, &host, port, scheme).await
}

async fn handle_tunneled_request(
    conn: Conn,
    tunnel: Tunnel,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return deny::bad_request("CONNECT inside a tunnel is not supported");
    }
    // h2 carries :authority in the URI; HTTP/1.1 in Host (or an absolute-form URI).
    let authority = match req.uri().authority() {
        Some(a) => Some(a.as_str().to_string()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string),
    };
    let Some(authority) = authority else {
        return deny::bad_request("the request has no Host header");
    };
    let Some((named_host, named_port)) = split_authority(&authority) else {
        return deny::bad_request("the Host header is not a valid host");
    };
    if let Some(refusal) = &tunnel.refusal {
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // A transparent connection's name may only be the DNS responder's: show the name the
        // client meant (everything here is refused whatever it names).
        let shown = if conn.via() == super::Via::Transparent {
            Tunnel {
                host: Arc::from(named_host.as_str()),
                ..tunnel.clone()
            }
        } else {
            tunnel.clone()
        };
        let method = req.method().as_str();
        return connect::refuse_request(&conn, &shown, refusal, method, path_and_query).await;
    }
    let port_ok = named_port.is_none_or(|p| p == tunnel.port);
    let mismatch = named_host != *tunnel.host || !port_ok || tunnel.sni_mismatch.is_some();
    if mismatch {
        let path = req.uri().path().to_string();
        let subject = Subject {
            host: &named_host,
            port: named_port.unwrap_or(tunnel.port),
            method: req.method().as_str(),
            path: &path,
            scheme: tunnel.scheme,
            via: conn.via(),
            origin: conn.origin().await,
            config_hash: Some(conn.engine.cell.load().hash.clone()),
        };
        Auditor::new(conn.engine.events.clone()).request(
            &subject,
            &gate::denied(reason::HOST_MISMATCH),
            &[],
        );
        return deny::forbidden(
            reason::HOST_MISMATCH,
            &named_host,
            req.method().as_str(),
            &path,
        );
    }
    forward(&conn, req, &tunnel.host, tunnel.port, tunnel.scheme).await
}

/// Decides one request and, if allowed, forwards it to `scheme://host:port` and streams the
/// answer back.
pub async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
    host: &str,
    port: u16,
    scheme: Scheme,
) -> Response<ProxyBody> {
    let engine = &conn.engine;
    let auditor = Auditor::new(engine.events.clone());
    let method = req.method().clone();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let event_path = path_and_query.split('?').next().unwrap_or("/").to_string();
    let compiled = engine.cell.load_full();
    let subject = Subject {
        host,
        port,
        method: method.as_str(),
        path: &event_path,
        scheme,
        via: conn.via(),
        origin: conn.origin().await,
        config_hash: Some(compiled.hash.clone()),
    };

    let refuse = |decision: &Decision| {
        auditor.request(&subject, decision, &[]);
        deny::forbidden(decision.reason, host, method.as_str(), &event_path)
    };

    // An h2c upgrade is taken out: the request goes on as HTTP/1.1 (see `headers::strip_h2c`).
    headers::strip_h2c(req.headers_mut());
    let Ok(overrides) = headers::override_methods(req.headers(), req.uri().query()) else {
        return refuse(&gate::denied(reason::METHOD_OVERRIDE));
    };

    let request = crate::policy::Request {
        host,
        port,
        method: method.as_str(),
        path: &path_and_query,
        scheme,
        ip: None,
    };
    let (decision, client) = match gate::check_from(
        engine,
        &compiled,
        host,
        port,
        Ask::Request(request, &overrides),
        subject.origin.clone(),
    )
    .await
    {
        Outcome::Denied(decision) => return refuse(&decision),
        Outcome::Unreachable(decision, failure) => {
            if let Some(ex) = auditor.request(&subject, &decision, &[]) {
                ex.fail(failure, host, port, failure.describe());
            }
            return deny::bad_gateway(failure, host, method.as_str(), &event_path);
        }
        Outcome::Allowed {
            decision, client, ..
        } => (decision, client),
    };

    // Under a rule that inspects HTTP, the only upgrade that may follow is WebSocket: after any
    // other switch, later bytes on the connection would reach the upstream undecided.
    let upgrade = req.version() <= Version::HTTP_11 && headers::is_upgrade(req.headers());
    let inspected = decision
        .rule
        .is_some_and(|i| compiled.policy.inspects_http(i));
    if upgrade && inspected && !only_websocket(&headers::upgrade_protocols(req.headers())) {
        return refuse(&Decision::denied(decision.rule, reason::UPGRADE));
    }

    // Rewrite the request for the upstream.
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::HOST);
    let over = decision
        .rule
        .filter(|_| compiled.policy.may_inject(&decision))
        .and_then(|i| compiled.policy.rule(i))
        .and_then(|r| r.override_.as_ref());
    let may_send = scheme == Scheme::Https || over.is_some_and(|o| o.allow_plaintext);
    let secrets = &compiled.secrets;
    let mut path_and_query = path_and_query;
    let (substituted, body) = match substitute::outgoing(
        secrets,
        &engine.events,
        host,
        may_send,
        &mut parts.headers,
        &mut path_and_query,
        body,
    )
    .await
    {
        Ok(checked) => checked,
        Err(()) => return refuse(&gate::denied(substitute::SECRET_BLOCKED)),
    };
    let injected = match over {
        Some(over) if may_send => {
            if substitute::check_override(secrets, &engine.events, over, host).is_err() {
                return refuse(&gate::denied(substitute::SECRET_BLOCKED));
            }
            headers::inject(&mut parts.headers, over, secrets)
        }
        _ => Vec::new(),
    };
    let scrubbing = (substituted || !injected.is_empty())
        .then(|| secrets.patterns().cloned())
        .flatten();
    if scrubbing.is_some() {
        scrub::limit_accept_encoding(&mut parts.headers);
    }
    let Some(exchange) = auditor.request(&subject, &decision, &injected) else {
        return deny::forbidden(decision.reason, host, method.as_str(), &event_path);
    };
    parts.uri = match upstream_uri(scheme, host, port, &path_and_query) {
        Some(uri) => uri,
        None => {
            exchange.set_status(400);
            return deny::bad_request("the request target cannot be forwarded");
        }
    };
    parts.version = Version::HTTP_11;

    // A small body is read whole, so that a request the upstream refuses unprocessed can be sent
    // again (`resend`; only HTTP/2 refuses so, and only HTTPS legs speak it). Its bytes are
    // counted once, for the attempt that is answered.
    let may_resend = !upgrade && scheme == Scheme::Https;
    let mut body = body;
    if may_resend && !parts.headers.contains_key(header::EXPECT) {
        body.read_ahead(resend::MAX_BODY, resend::BODY_WAIT).await;
    }
    let resend = may_resend
        .then(|| resend::Resend::new(&parts, &body))
        .flatten();
    let counted = resend.is_none().then(|| exchange.clone());
    let body = CountingBody::new(body, counted, Direction::Out)
        .map_err(|e| Box::new(e) as deny::BoxError)
        .boxed_unsync();

    let deadline = tokio::time::Instant::now() + compiled.config.upstream.response_timeout;
    let send = |req| tokio::time::timeout_at(deadline, client.client(upgrade).request(req));
    let mut result = send(Request::from_parts(parts, body)).await;
    if let Some(again) = &resend {
        for _ in 0..resend::MAX_RESENDS {
            if !matches!(&result, Ok(Err(e)) if resend::unprocessed(e)) {
                break;
            }
            tracing::debug!(
                host,
                port,
                "the upstream refused the request unprocessed, sending it again"
            );
            result = send(again.request()).await;
        }
        if matches!(result, Ok(Ok(_))) {
            exchange.add_out(again.body_len);
        }
    }
    let mut res = match result {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => {
            let failure = upstream::classify(&e);
            exchange.fail(failure, host, port, &super::audit::error_chain(&e));
            let mut answer = deny::bad_gateway(failure, host, method.as_str(), &event_path);
            if resend::unprocessed(&e) {
                // Not sent again (a streamed body, or refused each time): an HTTP/2 client is
                // told the same, so that it may send the request again itself.
                answer.extensions_mut().insert(resend::Refused);
            }
            return answer;
        }
        Err(_) => {
            let failure = deny::UpstreamFailure::ResponseTimeout;
            let detail = format!(
                "no response head within upstream.responseTimeoutMs ({} ms)",
                compiled.config.upstream.response_timeout.as_millis()
            );
            exchange.fail(failure, host, port, &detail);
            return deny::bad_gateway(failure, host, method.as_str(), &event_path);
        }
    };
    exchange.set_status(res.status().as_u16());

    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        let followable = !inspected || only_websocket(&headers::upgrade_protocols(res.headers()));
        let Some(client_upgrade) = client_upgrade.filter(|_| followable) else {
            // A switch nobody asked for, or to something the rule cannot follow: cut it.
            exchange.set_status(StatusCode::BAD_GATEWAY.as_u16());
            return deny::bad_gateway(
                deny::UpstreamFailure::Exchange,
                host,
                method.as_str(),
                &event_path,
            );
        };
        let upstream_upgrade = hyper::upgrade::on(&mut res);
        conn.ctl.spawn(splice_upgrade(
            client_upgrade,
            upstream_upgrade,
            exchange,
            conn.clone(),
        ));
        let (mut parts, _) = res.into_parts();
        parts.version = Version::HTTP_11;
        return Response::from_parts(parts, deny::empty_body());
    }

    let (mut parts, body) = res.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    let body = CountingBody::new(body, Some(exchange.clone()), Direction::In);
    let Some(patterns) = scrubbing else {
        let body = body.map_err(|e| Box::new(e) as deny::BoxError);
        return Response::from_parts(parts, body.boxed_unsync());
    };
    let report = scrub::Report {
        events: engine.events.clone(),
        host: host.to_string(),
    };
    let body_follows = method != Method::HEAD
        && !matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    match scrub::response(&mut parts, body, patterns, report, body_follows) {
        Ok(body) => Response::from_parts(parts, body.boxed_unsync()),
        Err(()) => {
            let failure = deny::UpstreamFailure::Exchange;
            exchange.fail(
                failure,
                host,
                port,
                "response content encoding hive cannot scan for secrets",
            );
            deny::bad_gateway(failure, host, method.as_str(), &event_path)
        }
    }
}

/// Whether an upgrade names WebSocket and nothing else.
fn only_websocket(protocols: &[String]) -> bool {
    !protocols.is_empty() && protocols.iter().all(|p| p == "websocket")
}

/// Copies bytes both ways between an upgraded client and upstream (WebSocket), counting them.
async fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    exchange: Exchange,
    _conn: Conn,
) {
    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Ok((out, inn)) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        exchange.add_out(out);
        exchange.add_in(inn);
    }
}

/// `scheme://host[:port]path?query` (the default port left out, IPv6 bracketed).
pub(super) fn upstream_uri(
    scheme: Scheme,
    host: &str,
    port: u16,
    path_and_query: &str,
) -> Option<http::Uri> {
    let scheme_str = if scheme == Scheme::Https {
        "https"
    } else {
        "http"
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let authority = if port == default_port(scheme) {
        host
    } else {
        format!("{host}:{port}")
    };
    let path = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        "/"
    };
    format!("{scheme_str}://{authority}{path}").parse().ok()
}

/// 443 for https, 80 otherwise.
pub fn default_port(scheme: Scheme) -> u16 {
    if scheme == Scheme::Https {
        443
    } else {
        80
    }
}

/// Splits `host[:port]` (IPv6 in brackets) and normalizes the host.
pub fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse().ok()?)),
            None => (authority, None),
        }
    };
    Some((normalize_host(host)?, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_cases() {
        let cases = [
            (
                Scheme::Https,
                "api.github.com",
                443,
                "/zen?x=1",
                "https://api.github.com/zen?x=1",
            ),
            (
                Scheme::Http,
                "pypi.org",
                8080,
                "/simple/",
                "http://pypi.org:8080/simple/",
            ),
            (Scheme::Http, "::1", 80, "/", "http://[::1]/"),
            (
                Scheme::Https,
                "10.0.0.1",
                8443,
                "*",
                "https://10.0.0.1:8443/",
            ),
        ];
        for (scheme, host, port, path, want) in cases {
            assert_eq!(
                upstream_uri(scheme, host, port, path)
                    .map(|u| u.to_string())
                    .as_deref(),
                Some(want)
            );
        }
    }
}
