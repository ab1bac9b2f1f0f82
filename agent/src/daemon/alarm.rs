//! A wall-clock alarm: wakes the event loop at a wall-clock instant even
//! across a suspend, and at once when the system clock is set.
//!
//! tokio's timers run on `CLOCK_MONOTONIC`, which stands still while the
//! machine is suspended: a laptop suspended at 23:00 and woken at 07:05 would
//! otherwise sleep on past a 07:00 schedule boundary. A `timerfd` on
//! `CLOCK_REALTIME` with `TFD_TIMER_ABSTIME` fires at the policy's next change
//! (a wall-clock instant) however long the machine slept, and
//! `TFD_TIMER_CANCEL_ON_SET` makes it fire when the clock jumps (NTP, a manual
//! `date -s`), so the presence is re-evaluated exactly when it can change.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use jiff::Timestamp;
use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;

/// One armed `timerfd`, re-armed only when the wanted instant changes.
pub struct WallAlarm {
    fd: AsyncFd<Timer>,
    armed: Option<Timestamp>,
}

/// The `timerfd`, as the reactor needs to see it.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl WallAlarm {
    /// Creates the timer; fails where `timerfd` is unavailable (the event
    /// loop then relies on its capped monotonic sleep alone).
    #[allow(
        unsafe_code,
        reason = "AsyncFd::register needs the descriptor to outlive it"
    )]
    pub fn new() -> std::io::Result<WallAlarm> {
        let timer = TimerFd::new(
            ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: the `TimerFd` owns its descriptor and is neither closed
        // nor replaced while the `AsyncFd` holds it (it is dropped with it).
        let fd = unsafe { AsyncFd::register(Timer(timer))? };
        Ok(WallAlarm { fd, armed: None })
    }

    /// Makes the alarm go off at `at` (or when the clock is set before
    /// then). Cheap when `at` is what is armed already.
    pub fn arm(&mut self, at: Timestamp) -> std::io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // An absolute time of zero would disarm the timer: never ask for it.
        let seconds = at.as_second().max(1);
        let nanos = i64::from(at.subsec_nanosecond().max(0));
        self.fd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::new(seconds, nanos)),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
        )?;
        self.armed = Some(at);
        Ok(())
    }

    /// Waits until the alarm goes off or the clock is set; afterwards the
    /// alarm is disarmed until the next [`WallAlarm::arm`].
    pub async fn fired(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match nix::unistd::read(guard.get_inner().0.as_fd(), &mut expirations) {
                // Expired, or cancelled by a clock change (the timer must be
                // armed again either way).
                Ok(_) | Err(Errno::ECANCELED) => {
                    self.armed = None;
                    return Ok(());
                }
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(Errno::EINTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_alarm_goes_off_at_its_wall_clock_instant() {
        let mut alarm = WallAlarm::new().unwrap();
        let at = Timestamp::now() + jiff::SignedDuration::from_millis(150);
        alarm.arm(at).unwrap();
        tokio::time::timeout(Duration::from_secs(30), alarm.fired())
            .await
            .expect("the alarm goes off")
            .unwrap();
        assert!(Timestamp::now() >= at, "it went off before its instant");
        assert_eq!(alarm.armed, None);
    }

    #[tokio::test]
    async fn an_alarm_in_the_past_goes_off_at_once_and_rearming_moves_it() {
        let mut alarm = WallAlarm::new().unwrap();
        alarm
            .arm(Timestamp::now() + jiff::SignedDuration::from_hours(5))
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), alarm.fired())
                .await
                .is_err(),
            "an alarm five hours away went off"
        );
        alarm
            .arm(Timestamp::now() - jiff::SignedDuration::from_secs(1))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), alarm.fired())
            .await
            .expect("an instant already past goes off at once")
            .unwrap();
    }
}
