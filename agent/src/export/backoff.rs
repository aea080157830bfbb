//! Exponential backoff with jitter between retries of a failed export, as the OTLP
//! specification asks of exporters; a throttling hint from the backend takes precedence.

use std::time::Duration;

const INITIAL: Duration = Duration::from_secs(1);
const MAX: Duration = Duration::from_secs(30);
/// A backend may ask for longer than `MAX`, but not for an hour: beyond this the hint is
/// more likely a bug than a plan, and the queue bound handles the rest.
const MAX_HINT: Duration = Duration::from_secs(300);
/// Each delay is drawn from ±20 % of the nominal one, so agents on many nodes that lost the
/// backend together do not all come back in the same instant.
const JITTER: f64 = 0.2;

#[derive(Debug, Default)]
pub(super) struct Backoff {
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    /// The wait before the next attempt, after one more failure.
    pub(super) fn next_delay(&mut self, hint: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if let Some(hint) = hint {
            return hint.min(MAX_HINT);
        }
        let nominal = INITIAL.saturating_mul(1 << (self.failures - 1).min(16)).min(MAX);
        nominal.mul_f64(1.0 + JITTER * (2.0 * rand::random::<f64>() - 1.0))
    }

    pub(super) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(super) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within_jitter(delay: Duration, nominal: Duration) -> bool {
        delay >= nominal.mul_f64(1.0 - JITTER) && delay <= nominal.mul_f64(1.0 + JITTER)
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::default();
        for nominal in [1, 2, 4, 8, 16, 30, 30, 30] {
            let delay = backoff.next_delay(None);
            assert!(within_jitter(delay, Duration::from_secs(nominal)), "{delay:?} for {nominal} s");
        }
        for _ in 0..100 {
            assert!(backoff.next_delay(None) <= MAX.mul_f64(1.0 + JITTER), "no overflow after many failures");
        }
        backoff.reset();
        assert!(within_jitter(backoff.next_delay(None), INITIAL));
    }

    #[test]
    fn a_hint_wins_but_is_capped() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_delay(Some(Duration::from_millis(1500))), Duration::from_millis(1500));
        assert_eq!(backoff.next_delay(Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(86_400))), MAX_HINT);
        assert_eq!(backoff.failures(), 3);
    }
}
