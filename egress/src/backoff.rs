//! How long to wait before the next attempt: exponential backoff with full
//! jitter, or what the platform asked for in `Retry-After`. Pure functions,
//! no clock of their own: callers pass `now` and the random source.

use rand::Rng;
use std::time::{Duration, SystemTime};

/// The largest wait before attempt `attempt + 1`, after `attempt` failures
/// (1-based): `base * 2^(attempt - 1)`, at most `cap`.
pub fn ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << doublings).min(cap)
}

/// Full jitter: a wait drawn uniformly from `0..=ceiling(base, cap, attempt)`,
/// so replicas that failed together do not retry together.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling_ms = ceiling(base, cap, attempt).as_millis() as u64;
    Duration::from_millis(rng.random_range(0..=ceiling_ms))
}

/// A `Retry-After` value: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`), as a wait from `now`. A date in the
/// past means no wait; anything unreadable means the header is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_ceiling(base_ms: u64, cap_ms: u64, attempt: u32, expected_ms: u64) {
        let got = ceiling(
            Duration::from_millis(base_ms),
            Duration::from_millis(cap_ms),
            attempt,
        );
        assert_eq!(
            got,
            Duration::from_millis(expected_ms),
            "base {base_ms} cap {cap_ms} attempt {attempt}"
        );
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        check_ceiling(100, 10_000, 0, 100);
        check_ceiling(100, 10_000, 1, 100);
        check_ceiling(100, 10_000, 2, 200);
        check_ceiling(100, 10_000, 3, 400);
        check_ceiling(100, 10_000, 7, 6_400);
        check_ceiling(100, 10_000, 8, 10_000);
        check_ceiling(100, 10_000, 40, 10_000);
        check_ceiling(100, 10_000, u32::MAX, 10_000);
        check_ceiling(250, 250, 5, 250);
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        let mut rng = rand::rng();
        let (base, cap) = (Duration::from_millis(100), Duration::from_millis(1_000));
        for attempt in 1..10 {
            for _ in 0..100 {
                let wait = full_jitter(base, cap, attempt, &mut rng);
                assert!(wait <= ceiling(base, cap, attempt), "{wait:?} at {attempt}");
            }
        }
    }

    /// 2015-10-21T07:28:00Z, the example date of RFC 9110.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
    }

    fn check_retry_after(value: &str, expected_secs: Option<u64>) {
        assert_eq!(
            parse_retry_after(value, now()),
            expected_secs.map(Duration::from_secs),
            "{value:?}"
        );
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        check_retry_after("1", Some(1));
        check_retry_after("0", Some(0));
        check_retry_after(" 120 ", Some(120));
        check_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", Some(0));
        check_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", Some(30));
        check_retry_after("Wed, 21 Oct 2015 08:28:00 GMT", Some(3_600));
        check_retry_after("Tue, 20 Oct 2015 07:28:00 GMT", Some(0));
        check_retry_after("Wednesday, 21-Oct-15 07:28:10 GMT", Some(10));
        check_retry_after("", None);
        check_retry_after("-1", None);
        check_retry_after("1.5", None);
        check_retry_after("soon", None);
        check_retry_after("99999999999999999999999", Some(u64::MAX));
    }
}
