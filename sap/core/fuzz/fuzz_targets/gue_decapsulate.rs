//! Any datagram from the underlay through GUE decoding, the ingress and the SaP paths
//! (`keyway_core::fuzzing::gue_decapsulate`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyway_core::fuzzing::gue_decapsulate(data));
