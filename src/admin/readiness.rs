//! What `/ready` answers: whether this instance should get new
//! connections.

use std::cell::RefCell;
use std::rc::Rc;

/// Whether this instance should get new connections, as `/ready` says:
/// 200 while it serves and every pool has a backend up; 503, with the
/// reason, while it starts, once it drains, and while a pool has none.
/// Set by the control plane, read by the admin endpoint on the same
/// thread.
#[derive(Clone, Default)]
pub struct Readiness(Rc<RefCell<ReadyState>>);

#[derive(Default)]
struct ReadyState {
    phase: Phase,
    /// Pools with no backend up, by name.
    pools_down: Vec<String>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Starting,
    Serving,
    Draining,
}

impl Readiness {
    /// Every listener accepts.
    pub fn serving(&self) {
        self.0.borrow_mut().phase = Phase::Serving;
    }

    /// A stop signal came: never ready again.
    pub fn draining(&self) {
        self.0.borrow_mut().phase = Phase::Draining;
    }

    /// The pools that have no backend up now.
    pub fn pools_down<'a>(&self, pools: impl IntoIterator<Item = &'a String>) {
        let mut pools: Vec<String> = pools.into_iter().cloned().collect();
        pools.sort();
        self.0.borrow_mut().pools_down = pools;
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        let state = self.0.borrow();
        match state.phase {
            Phase::Starting => Some("starting".to_owned()),
            Phase::Draining => Some("draining".to_owned()),
            Phase::Serving if !state.pools_down.is_empty() => Some(format!(
                "no backend up in pool {}",
                state.pools_down.join(", ")
            )),
            Phase::Serving => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving_with_a_backend_up_in_every_pool() {
        let readiness = Readiness::default();
        assert_eq!(readiness.not_ready().as_deref(), Some("starting"));
        readiness.serving();
        assert_eq!(readiness.not_ready(), None);
        let down = ["redis".to_owned(), "pg".to_owned()];
        readiness.pools_down(&down);
        assert_eq!(
            readiness.not_ready().as_deref(),
            Some("no backend up in pool pg, redis")
        );
        readiness.pools_down(&[]);
        assert_eq!(readiness.not_ready(), None);
        readiness.draining();
        assert_eq!(readiness.not_ready().as_deref(), Some("draining"));
    }
}
