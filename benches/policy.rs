//! Policy benchmark (issue 2, part 7): `decide()` latency at 1, 100 and 10 000 rules and compile time
//! for 10 000 rules, printed as a markdown table.
//!
//! Run with `cargo bench --bench policy`. std::time only: each decide is timed on its own with
//! `Instant` (the timer's own cost is printed as the first row), after a warm-up pass.
//!
//! Series:
//! 1. `mixed`: exact hosts (some with ports and methods), `*.suffix` rules, CIDR blocks and rules
//!    with path globs, in equal parts; requests hit exact, suffix, CIDR and path rules anywhere in
//!    the list, and miss (default deny, the slowest case: every candidate is tried);
//! 2. `exact`: only exact-host rules, requests for hosts spread over the list; 100 vs 10 000 rules
//!    shows the cost does not grow with the rule count.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hive::config::Config;
use hive::policy::{Policy, Request, Scheme};
use serde_json::{json, Value};

/// Timed decisions per series.
const SAMPLES: usize = 200_000;

/// Rule `i` of the mixed set.
fn mixed_rule(i: usize) -> Value {
    match i % 5 {
        0 => json!({ "access": "allow", "host": format!("svc{i}.example.com") }),
        1 => {
            json!({ "access": "allow", "host": format!("api{i}.example.com"), "ports": [443, 8443], "methods": ["GET", "POST"] })
        }
        2 => json!({ "access": "allow", "host": format!("*.zone{i}.example.net") }),
        3 => {
            json!({ "access": "allow", "host": format!("10.{}.{}.0/24", (i / 256) % 256, i % 256) })
        }
        _ => {
            json!({ "access": if i.is_multiple_of(2) { "deny" } else { "allow" }, "host": format!("paths{i}.example.org"),
                     "paths": ["/v1/**", "/api/*/items", "/workspace/**/*.env"] })
        }
    }
}

/// A request owning its strings.
struct Req {
    host: String,
    method: &'static str,
    path: String,
    ip: Option<IpAddr>,
}

impl Req {
    fn new(host: String, method: &'static str, path: &str, ip: Option<IpAddr>) -> Req {
        Req {
            host,
            method,
            path: path.to_string(),
            ip,
        }
    }

    fn as_request(&self) -> Request<'_> {
        Request {
            host: &self.host,
            port: 443,
            method: self.method,
            path: &self.path,
            scheme: Scheme::Https,
            ip: self.ip,
        }
    }
}

/// Requests over the mixed set of `n` rules: hits of each kind spread over the list, and misses.
fn mixed_requests(n: usize) -> Vec<Req> {
    let mut out = Vec::new();
    let picks = [0, n / 4, n / 2, 3 * n / 4, n.saturating_sub(1)];
    for &at in &picks {
        let base = at - at % 5; // index of a rule of kind 0 in this group of five
        let ip = |i: usize| {
            Some(
                format!("10.{}.{}.7", (i / 256) % 256, i % 256)
                    .parse()
                    .unwrap(),
            )
        };
        out.push(Req::new(format!("svc{base}.example.com"), "GET", "/", None));
        out.push(Req::new(
            format!("api{}.example.com", base + 1),
            "get",
            "/v2/x",
            None,
        ));
        out.push(Req::new(
            format!("deep.a.zone{}.example.net", base + 2),
            "GET",
            "/",
            None,
        ));
        out.push(Req::new("internal.corp".into(), "GET", "/", ip(base + 3)));
        out.push(Req::new(
            format!("paths{}.example.org", base + 4),
            "GET",
            "/v1/models/x?key=1",
            None,
        ));
        out.push(Req::new(
            format!("paths{}.example.org", base + 4),
            "GET",
            "/workspace/a/b/.env",
            None,
        ));
        out.push(Req::new(
            format!("paths{}.example.org", base + 4),
            "GET",
            "/v1/%2e%2e/admin",
            None,
        ));
    }
    out.push(Req::new("unknown.example.com".into(), "GET", "/", None));
    out.push(Req::new(
        "x.y.z.unknown.example.net".into(),
        "GET",
        "/",
        Some("192.0.2.1".parse().unwrap()),
    ));
    out
}

fn compile(rules: Vec<Value>) -> Policy {
    let config = Config::from_json(&json!({ "egress": rules })).expect("valid benchmark config");
    Policy::compile(&config)
}

/// (median, p99, batched mean) in ns of deciding `requests` round-robin.
fn time_decide(policy: &Policy, requests: &[Req]) -> (u128, u128, u128) {
    let requests: Vec<Request<'_>> = requests.iter().map(Req::as_request).collect();
    for r in requests.iter().cycle().take(SAMPLES / 10) {
        black_box(policy.decide(black_box(r)));
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    for r in requests.iter().cycle().take(SAMPLES) {
        let start = Instant::now();
        black_box(policy.decide(black_box(r)));
        samples.push(start.elapsed());
    }
    let start = Instant::now();
    for r in requests.iter().cycle().take(SAMPLES) {
        black_box(policy.decide(black_box(r)));
    }
    let mean = start.elapsed().as_nanos() / SAMPLES as u128;
    let (median, p99) = percentiles(samples);
    (median, p99, mean)
}

fn percentiles(mut samples: Vec<Duration>) -> (u128, u128) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_nanos();
    (at(0.5), at(0.99))
}

fn main() {
    println!("| series | rules | median ns/decide | p99 ns/decide | mean ns/decide (batched) |");
    println!("| --- | ---: | ---: | ---: | ---: |");

    let mut overhead = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        black_box(());
        overhead.push(start.elapsed());
    }
    let (m, p) = percentiles(overhead);
    println!("| timer overhead (empty) | - | {m} | {p} | - |");

    for n in [1, 100, 10_000] {
        let policy = compile((0..n).map(mixed_rule).collect());
        let (m, p, mean) = time_decide(&policy, &mixed_requests(n));
        println!("| mixed (exact, wildcard, CIDR, paths) | {n} | {m} | {p} | {mean} |");
    }
    for n in [100, 10_000] {
        let policy = compile(
            (0..n)
                .map(|i| json!({ "access": "allow", "host": format!("host{i}.example.com") }))
                .collect(),
        );
        let requests: Vec<Req> = (0..64)
            .map(|k| {
                Req::new(
                    format!("host{}.example.com", (k * 7919) % n),
                    "GET",
                    "/",
                    None,
                )
            })
            .collect();
        let (m, p, mean) = time_decide(&policy, &requests);
        println!("| exact hosts only | {n} | {m} | {p} | {mean} |");
    }

    let rules: Vec<Value> = (0..10_000).map(mixed_rule).collect();
    let config = Config::from_json(&json!({ "egress": rules })).expect("valid benchmark config");
    let mut compile_times = Vec::new();
    let mut validate_times = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        black_box(Policy::compile(black_box(&config)));
        compile_times.push(start.elapsed());
        let start = Instant::now();
        black_box(Config::from_json(black_box(&json!({ "egress": rules }))).is_ok());
        validate_times.push(start.elapsed());
    }
    compile_times.sort_unstable();
    validate_times.sort_unstable();
    println!();
    println!("| step (10 000 mixed rules) | median ms |");
    println!("| --- | ---: |");
    println!(
        "| Policy::compile | {:.2} |",
        compile_times[compile_times.len() / 2].as_secs_f64() * 1e3
    );
    println!(
        "| Config::from_json (validation, incl. JSON clone) | {:.2} |",
        validate_times[validate_times.len() / 2].as_secs_f64() * 1e3
    );
}
