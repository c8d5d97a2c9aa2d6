//! The SNI/ClientHello sniff the intercepting proxy does before choosing a certificate: rustls'
//! `Acceptor` reads the hello, and the SNI goes through hive's host normalization.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = data;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                if let Some(sni) = hello.server_name() {
                    if let Some(host) = hive::config::normalize_host(sni) {
                        assert_eq!(
                            hive::config::normalize_host(&host).as_deref(),
                            Some(host.as_str())
                        );
                    }
                }
                let _ = hello.alpn().map(|a| a.count());
                return;
            }
            Err(_) => return,
        }
    }
});
