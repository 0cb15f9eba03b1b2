//! The checks the fuzz target makes, on arbitrary input: shared by the libFuzzer target
//! (`cni-plugin/protocol/fuzz/`, `make fuzz`) and the short run in `make test`
//! (`conformance/tests/fuzz.rs`).

use crate::handoff::{Ack, MAGIC, Request, VERSION};

/// Message types: the seven requests, the acknowledgement, and one that does not exist.
const TYPES: [u8; 9] = [1, 2, 3, 4, 5, 6, 7, 0x80, 0x42];

fn framed(t: u8, body: &[u8]) -> Vec<u8> {
    let mut rec = MAGIC.to_vec();
    rec.push(VERSION);
    rec.push(TYPES[usize::from(t) % TYPES.len()]);
    rec.push(0);
    rec.extend_from_slice(&(body.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    rec.extend_from_slice(body);
    rec
}

/// Any record on the agent's socket, with any count of descriptors, through the handoff decoder:
/// a request or a reason to refuse, never a panic, and what it accepts decodes the same after
/// encoding again. The input's first byte is the descriptor count; half the inputs (by the
/// second byte) get a well-formed header with a type taken from the input, so that the bodies'
/// parsing is explored, not only the header's checks.
pub fn handoff_decode(data: &[u8]) {
    let [fds, shape, rest @ ..] = data else {
        return;
    };
    let fds = usize::from(fds % 3);
    let owned;
    let record = if shape & 1 == 0 {
        owned = framed(shape >> 1, rest);
        &owned[..]
    } else {
        rest
    };
    if let Ok(req) = Request::decode(record, fds) {
        assert_eq!(Request::decode(&req.encode(), fds).as_ref(), Ok(&req));
    }
    if let Ok(ack) = Ack::decode(record) {
        assert_eq!(Ack::decode(&ack.encode()).as_ref(), Ok(&ack));
    }
}
