//! The DNS wire codec: queries from the sandbox's stub resolver and responses. A parsed query is
//! answered, and the answer must parse back with the same id and question.
#![no_main]
use hive::dns::wire::{self, Answer, RData};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_response(data);
    match wire::parse_query(data) {
        Ok(query) => {
            let answers = [
                Answer {
                    ttl: 5,
                    data: RData::A([127, 0, 0, 1].into()),
                },
                Answer {
                    ttl: 5,
                    data: RData::Ptr(query.question.name.clone()),
                },
            ];
            let out = wire::encode_response(&query, 0, &answers, query.udp_limit());
            assert!(out.len() <= query.udp_limit().max(512) || out.len() <= 12 + 260 + 4 + 11);
            let back = wire::parse_response(&out).expect("our own response parses");
            assert_eq!(back.id, query.id);
            assert_eq!(back.question.as_ref(), Some(&query.question));
            let _ = query.question.name.to_hostname();
            let _ = query.question.name.to_presentation();
            let _ = query.question.name.reverse_address();
        }
        Err(wire::Reject::Error(reply)) => {
            let _ = wire::parse_response(&wire::encode_error(&reply));
        }
        Err(wire::Reject::Ignore) => {}
    }
});
