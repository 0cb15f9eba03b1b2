//! Packet classification on arbitrary bytes (`keyway_core::fuzzing::classify_packet`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyway_core::fuzzing::classify_packet(data));
