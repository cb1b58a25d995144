//! Re-resolution of backend host names every `resolve_interval`: one task
//! per pool that has host names and an interval. getaddrinfo blocks for as
//! long as the resolver takes, so each lookup runs on a thread of its own
//! and its answers come back to the control plane as an event.

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::config::{self, Config, Resolver};
use crate::shared::Event;

use super::off_thread;

/// The resolver tasks of the configuration in use.
#[derive(Default)]
pub struct Resolvers(Vec<JoinHandle<()>>);

impl Resolvers {
    /// Stops the tasks of the previous configuration and starts those of
    /// `config`. A lookup under way is left to finish on its thread; its
    /// answer is dropped.
    pub fn restart(&mut self, config: &Config, events: &UnboundedSender<Event>) {
        for task in self.0.drain(..) {
            task.abort();
        }
        for (name, pool) in &config.pools {
            let entries: Vec<(usize, String)> = pool
                .backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.has_host_name())
                .map(|(i, b)| (i, b.address.clone()))
                .collect();
            if pool.resolve_interval.is_zero() || entries.is_empty() {
                continue;
            }
            let (pool, every, events) = (name.clone(), pool.resolve_interval, events.clone());
            self.0.push(tokio::task::spawn_local(async move {
                let start = tokio::time::Instant::now() + every;
                let mut ticker = tokio::time::interval_at(start, every);
                loop {
                    ticker.tick().await;
                    let entries = entries.clone();
                    let Ok(answers) = off_thread("sluice-resolve", move || {
                        entries
                            .into_iter()
                            .map(|(i, address)| {
                                let answer = config::resolve(&address, Resolver::Dns);
                                (i, address, answer)
                            })
                            .collect()
                    })
                    .await
                    else {
                        // No thread could start: try again next time.
                        continue;
                    };
                    let event = Event::Resolved {
                        pool: pool.clone(),
                        answers,
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }));
        }
    }
}
