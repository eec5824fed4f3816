//! The channel between the roundhouse primary and its workers.
//!
//! Both sides use this crate, so the wire format lives in exactly one place: [`frame`] encodes and
//! decodes frames (pure, no I/O, fuzzable) and [`sys`] is the one module that sends and receives
//! file descriptors over the `SOCK_SEQPACKET` channel. The format itself is documented for other
//! languages in `docs/protocol.md`; this crate is its reference implementation.
//!
//! Why `SOCK_SEQPACKET`: one `sendmsg` is one frame and the fds attached to it cannot be
//! confused with the next frame's, so there is no stream reassembly and no question of which
//! bytes an fd belongs to. Why a binary header: the hot path (a batch of connections, a batch of
//! acks) is a few fixed-size records that cost nothing to encode and decode without allocating.

pub mod frame;
pub mod policy;
pub mod sys;

pub use frame::{
    ConnRecord, FrameError, IdList, PrimaryFrame, Recipient, WorkerFrame, ACK_MAX_IDS, CONNS_MAX,
    HEADER_LEN, MAX_FRAME, PROTOCOL_VERSION, RECORD_LEN,
};
pub use policy::Policy;
