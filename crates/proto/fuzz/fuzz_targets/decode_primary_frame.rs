//! `decode_primary_frame` on any bytes with any fd count: never panics; what it accepts is
//! canonical and carries exactly the fds its kind says. Input: one byte = the fd count, then
//! the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses part of it
#[path = "../../tests/support/canonical.rs"]
mod canonical;

fuzz_target!(|data: &[u8]| {
    let Some((&n, frame)) = data.split_first() else {
        return;
    };
    canonical::check_primary_frame(frame, n as usize);
});
