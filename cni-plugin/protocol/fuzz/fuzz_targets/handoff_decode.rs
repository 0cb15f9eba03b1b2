//! Any record on the agent's socket through the handoff decoder
//! (`keyway_protocol::fuzzing::handoff_decode`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyway_protocol::fuzzing::handoff_decode(data));
