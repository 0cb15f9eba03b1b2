//! Any text as the file source's YAML, then the policy compiler on what parses
//! (`keyway_agent::fuzzing::file_source`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyway_agent::fuzzing::file_source(data));
