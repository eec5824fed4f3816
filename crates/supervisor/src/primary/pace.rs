//! Accept pacing: under load, take connections from the kernel's backlog in batches.
//!
//! Every wake-up of the primary costs a context switch in and out, and every batch it hands a
//! worker wakes that worker once. When the primary answers each new connection at once, a busy
//! small machine pays those wake-ups for every two or three connections: measured on 2 cores
//! (2 workers, `wrk -t1 -c32`, `Connection: close`), the primary woke 0.5 times per connection,
//! and making it *quicker* (no acknowledgement wake-ups) made it wake once per connection and
//! cost more. So once a burst shows that connections arrive faster than the primary comes
//! back for them, it waits a little before it accepts again, and hands each worker a bigger
//! batch per wake-up.
//!
//! The rule, after each burst of `accept` calls (until `EAGAIN`):
//! - fewer than [`MIN_BURST`] connections were waiting: go on at once. So a load of fewer than
//!   [`MIN_BURST`] concurrent clients never waits here (it cannot queue that many), and latency
//!   at low load is what it was;
//! - otherwise the next burst starts no sooner than [`PAUSE`] after this one started. The
//!   primary sleeps for the rest of that time, after it has handed this burst out (the workers
//!   serve meanwhile; frames from them wait in the channel). At an arrival rate below
//!   `MIN_BURST / PAUSE` (24,000 connections per second) a pause collects fewer than
//!   [`MIN_BURST`] and pacing switches itself off; a primary that needed longer than [`PAUSE`]
//!   for the burst (its core saturated) never sleeps, so pacing cannot lower its ceiling.
//!
//! Why 12 and 500 µs: a closed loop of N clients that are all waiting in the backlog gets
//! nothing from a pause but dead time, so pacing caps it at N per [`PAUSE`]. With
//! [`MIN_BURST`] = 8, 8 clients (`wrk -c8`) were capped at 16,000 connections per second
//! against 17,000 unpaced (p50 0.22 → 0.43 ms); from 12 up, the cap (24,000 and more) is above
//! what this 2-core machine does unpaced, and a shorter pause (250 µs) no longer sustains
//! batching at `-c32`.
//!
//! The sleep blocks the owner loop, deliberately and at most [`PAUSE`]: a timer on the
//! reactor would not do, because the reactor wakes the thread for every frame a worker sends
//! meanwhile (its acknowledgements), which is the cost this saves, and tokio's timers have a
//! millisecond's resolution. Nothing waits on the loop longer than [`PAUSE`] because of it.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Connections taken in one burst from which the next burst waits.
pub(crate) const MIN_BURST: u64 = 12;
/// Least time from the start of one paced burst to the start of the next.
pub(crate) const PAUSE: Duration = Duration::from_micros(500);

/// How long to sleep after a burst that took `accepted` connections and started at `started`
/// (`None`: go on at once).
pub(crate) fn after_burst(accepted: u64, started: Instant, now: Instant) -> Option<Duration> {
    if accepted < MIN_BURST {
        return None;
    }
    (started + PAUSE)
        .checked_duration_since(now)
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bursts_never_wait() {
        let t = Instant::now();
        for n in 0..MIN_BURST {
            assert_eq!(after_burst(n, t, t), None, "{n}");
        }
    }

    #[test]
    fn a_big_burst_waits_for_the_rest_of_the_pause() {
        let t = Instant::now();
        assert_eq!(after_burst(MIN_BURST, t, t), Some(PAUSE));
        let spent = Duration::from_micros(120);
        assert_eq!(after_burst(200, t, t + spent), Some(PAUSE - spent));
    }

    #[test]
    fn a_saturated_primary_never_waits() {
        let t = Instant::now();
        assert_eq!(after_burst(256, t, t + PAUSE), None);
        assert_eq!(after_burst(256, t, t + 2 * PAUSE), None);
    }
}
