//! The deadlines of a worker's connections: when a PROXY header is due,
//! or when a connection has been idle too long. Each connection has at
//! most one deadline here (its [`Conn::timer`](super::state::Conn)), moved
//! when it changes and removed when the connection ends, so that neither
//! memory nor wake-ups grow with connections that are gone.
//!
//! An idle deadline moves with every byte relayed; it is not moved here
//! each time, but checked when it comes due and set again for later if
//! bytes moved meanwhile.

use std::collections::BTreeSet;
use std::time::Instant;

#[derive(Default)]
pub struct Timers {
    /// (when, connection slot), earliest first.
    due: BTreeSet<(Instant, u32)>,
}

impl Timers {
    /// Moves the deadline of connection `index` from `old` to `new`
    /// (`None`: it has none).
    pub fn set(&mut self, index: u32, old: Option<Instant>, new: Option<Instant>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            let removed = self.due.remove(&(old, index));
            debug_assert!(removed, "a deadline that was not set");
        }
        if let Some(new) = new {
            self.due.insert((new, index));
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.due.first().map(|&(when, _)| when)
    }

    /// Removes and returns a connection whose deadline is `now` or earlier.
    pub fn pop_due(&mut self, now: Instant) -> Option<u32> {
        match self.due.first() {
            Some(&(when, _)) if when <= now => self.due.pop_first().map(|(_, index)| index),
            _ => None,
        }
    }

    /// Deadlines set.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_deadline_moved_or_removed_leaves_nothing_behind() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut timers = Timers::default();
        for index in 0..1000 {
            // A header deadline, then an idle one, then the connection ends.
            timers.set(index, None, Some(at(5000)));
            timers.set(index, Some(at(5000)), Some(at(u64::from(index) + 10)));
        }
        assert_eq!(timers.len(), 1000, "one deadline per connection");
        for index in 0..1000 {
            timers.set(index, Some(at(u64::from(index) + 10)), None);
        }
        assert_eq!((timers.len(), timers.next()), (0, None));
    }

    #[test]
    fn deadlines_come_due_in_order() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut timers = Timers::default();
        timers.set(7, None, Some(at(30)));
        timers.set(3, None, Some(at(10)));
        timers.set(5, None, Some(at(20)));
        assert_eq!(timers.next(), Some(at(10)));
        assert_eq!(timers.pop_due(at(5)), None);
        assert_eq!(timers.pop_due(at(25)), Some(3));
        assert_eq!(timers.pop_due(at(25)), Some(5));
        assert_eq!(timers.pop_due(at(25)), None);
        assert_eq!(timers.next(), Some(at(30)));
    }
}
