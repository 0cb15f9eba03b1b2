//! Any bytes as the plugin's stdin: the network configuration and its `prevResult`
//! (`config::check_any_stdin`).
#![no_main]
#![allow(dead_code)]

#[path = "../../src/spec.rs"]
mod spec;

#[path = "../../src/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| config::check_any_stdin(data));
