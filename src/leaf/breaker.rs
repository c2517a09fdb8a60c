//! A small circuit breaker: after `threshold` consecutive failures it opens for `cool_down`,
//! then lets a single probe through (half-open); the probe's outcome closes or re-opens it.
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Shared breaker state.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cool_down: Duration,
}

/// Permission to make one call; report its outcome (dropping it unreported counts as success).
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: std::cell::Cell<bool>,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            cool_down,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the breaker currently refuses calls.
    pub fn is_open(&self) -> bool {
        matches!(*self.lock(), State::Open { until } if until > Instant::now())
    }

    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Some(Permit {
                breaker: self,
                probe: false,
                reported: false.into(),
            }),
            State::Open { until } if until <= Instant::now() => {
                *s = State::HalfOpen;
                Some(Permit {
                    breaker: self,
                    probe: true,
                    reported: false.into(),
                })
            }
            State::Open { .. } | State::HalfOpen => None,
        }
    }

    fn report(&self, probe: bool, ok: bool) {
        let mut s = self.lock();
        *s = match (*s, ok) {
            (_, true) => State::Closed { failures: 0 },
            (State::HalfOpen, false) if probe => State::Open {
                until: Instant::now() + self.cool_down,
            },
            (State::Closed { failures }, false) if failures + 1 >= self.threshold => {
                tracing::warn!("circuit breaker open: Leaf keeps failing");
                State::Open {
                    until: Instant::now() + self.cool_down,
                }
            }
            (State::Closed { failures }, false) => State::Closed {
                failures: failures + 1,
            },
            (other, false) => other,
        };
    }
}

impl Permit<'_> {
    pub fn success(&self) {
        if !self.reported.replace(true) {
            self.breaker.report(self.probe, true);
        }
    }
    pub fn failure(&self) {
        if !self.reported.replace(true) {
            self.breaker.report(self.probe, false);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported.get() {
            // A call abandoned half-way (caller went away) says nothing about Leaf; free the probe slot.
            if self.probe {
                self.breaker.report(true, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_once() {
        let b = Breaker::new(2, Duration::from_millis(30));
        b.try_acquire().unwrap().failure();
        assert!(b.try_acquire().is_some_and(|p| {
            p.failure();
            true
        }));
        assert!(b.try_acquire().is_none());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none(), "only one probe while half-open");
        probe.success();
        assert!(b.try_acquire().is_some());
    }
}
