//! systemd's service watchdog (`WatchdogSec=` in vmm-fleet.service): the supervisor's
//! event loop sends `WATCHDOG=1` every half interval, so a hung loop gets the service
//! restarted. Off (no wake-ups, nothing sent) unless systemd set `WATCHDOG_USEC`.

use std::time::{Duration, Instant};

/// The next `WATCHDOG=1` the event loop owes systemd.
#[derive(Debug, Clone)]
pub struct Watchdog {
    every: Duration,
    next: Instant,
}

impl Watchdog {
    /// From `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must name this process when
    /// set), as systemd sets them. `None` when the watchdog is off. The variables are
    /// left in place: a re-exec on the same pid reads them again.
    pub fn from_env(now: Instant) -> Option<Self> {
        sd_notify::watchdog_enabled()
            .filter(|t| !t.is_zero())
            .map(|t| Self::new(t, now))
    }

    /// A watchdog of timeout `timeout`, first due at `now`; pings every `timeout / 2`
    /// (systemd's advice), at least every millisecond apart.
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            every: (timeout / 2).max(Duration::from_millis(1)),
            next: now,
        }
    }

    /// When the loop must be awake to ping next.
    pub fn due(&self) -> Instant {
        self.next
    }

    /// Sends `WATCHDOG=1` when due; true when it did.
    pub fn ping_if_due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        // Nothing to do about a failed send: systemd restarts us if pings stop arriving.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        self.next = now + self.every;
        true
    }
}

/// The earlier of the loop's own next deadline and the watchdog's.
pub fn earliest(deadline: Option<Instant>, watchdog: Option<&Watchdog>) -> Option<Instant> {
    match (deadline, watchdog.map(Watchdog::due)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_every_half_interval_and_not_before() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(Duration::from_secs(30), t0);
        assert_eq!(w.due(), t0);
        assert!(w.ping_if_due(t0));
        assert_eq!(w.due(), t0 + Duration::from_secs(15));
        assert!(!w.ping_if_due(t0 + Duration::from_secs(14)));
        assert!(w.ping_if_due(t0 + Duration::from_secs(16)));
        assert_eq!(w.due(), t0 + Duration::from_secs(31));
    }

    #[test]
    fn earliest_takes_the_sooner_of_both() {
        let t0 = Instant::now();
        let w = Watchdog::new(Duration::from_secs(2), t0 + Duration::from_secs(5));
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(earliest(Some(soon), Some(&w)), Some(soon));
        assert_eq!(earliest(None, Some(&w)), Some(w.due()));
        assert_eq!(earliest(Some(soon), None), Some(soon));
        assert_eq!(earliest(None, None), None);
    }
}
