//! Any record on the agent's socket, with any count of descriptors, goes through the handoff
//! decoder: it returns a request or a reason to refuse, never panics, and what it accepts
//! encodes back to the same record.
#![no_main]

use keyway_protocol::handoff::{Ack, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&fds, record)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds % 3);
    if let Ok(req) = Request::decode(record, fds) {
        let again = req.encode();
        assert_eq!(Request::decode(&again, fds).as_ref(), Ok(&req));
    }
    if let Ok(ack) = Ack::decode(record) {
        assert_eq!(Ack::decode(&ack.encode()).as_ref(), Ok(&ack));
    }
});
