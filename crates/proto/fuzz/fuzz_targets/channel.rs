//! A frame with fds attached goes through a real `SOCK_SEQPACKET` pair and is read the way the
//! primary reads a worker's channel: `sys::recv_frame` into a 64 KiB buffer, then
//! `decode_worker_frame` with the number of fds that arrived. Checks: the receive reports the
//! true length and truncation, every attached fd arrives as an `OwnedFd`, and once they are
//! dropped the process holds exactly the fds it held before (nothing leaks on any input).
//!
//! Input: byte 0 = fds to attach (mod 41: `send_frame` takes at most 40), byte 1 bit 0 = use a
//! 16-byte receive buffer (to exercise truncation), the rest = the frame.
#![no_main]

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use libfuzzer_sys::fuzz_target;
use roundhouse_proto::{frame, sys};

#[allow(dead_code)] // each target uses part of it
#[path = "../../tests/support/canonical.rs"]
mod canonical;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 || data.len() - 2 > frame::MAX_FRAME + 1024 {
        return;
    }
    let n = data[0] as usize % 41;
    let small = data[1] & 1 == 1;
    let payload = &data[2..];
    if payload.is_empty() {
        return; // a zero-length frame reads as end-of-file
    }
    let before = open_fds();
    {
        let (a, b) = sys::seqpacket_pair().expect("socketpair");
        let extra: Vec<OwnedFd> = (0..n)
            .map(|_| {
                // SAFETY: dup of stdin returns a fresh fd that we own at once.
                let fd = unsafe { libc::dup(0) };
                assert!(fd >= 0);
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect();
        let raw: Vec<i32> = extra.iter().map(|f| f.as_raw_fd()).collect();
        if sys::send_frame(a.as_fd(), payload, &raw).is_err() {
            return; // e.g. EMSGSIZE for a frame larger than the socket buffer
        }
        drop(extra);
        let mut buf = vec![0u8; if small { 16 } else { frame::MAX_FRAME }];
        let mut fds = Vec::new();
        let meta = sys::recv_frame(b.as_fd(), &mut buf, &mut fds).expect("recv");
        assert_eq!(meta.len, payload.len().min(buf.len()));
        assert_eq!(meta.truncated, payload.len() > buf.len());
        assert!(!meta.fds_truncated);
        assert_eq!(fds.len(), n, "every attached fd arrives");
        if !meta.truncated {
            assert_eq!(&buf[..meta.len], payload);
            canonical::check_worker_frame(&buf[..meta.len], fds.len());
        }
    }
    assert_eq!(open_fds(), before, "an fd leaked");
});
