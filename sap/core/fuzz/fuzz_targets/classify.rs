//! Packet classification on arbitrary bytes: never panics; what it accepts is consistent.
#![no_main]

use keyway_core::packet::{Transport, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = classify(data) {
        assert_eq!(c.src.is_ipv4(), data[0] >> 4 == 4);
        if c.opens_flow {
            assert!(matches!(
                c.transport,
                Transport::Ports { .. } | Transport::Echo { reply: false, .. }
            ));
        }
    }
});
