//! Publishing: the next routing snapshot, from the configuration, the
//! registries of listeners and backends, and the snapshot in use.
//!
//! Pure functions of their inputs: nothing here touches a socket, a task
//! or a clock, so the routing rules (which backends a pool routes over,
//! what a listener keeps across a reload) are tested on their own.

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::ListenerStats;
use crate::snapshot::{self, Pool, Snapshot};

use super::backends::Backends;

/// The snapshot for `config`, given the backend registry, each listener's
/// metric handles (`listener_stats`) and the snapshot in use (`previous`),
/// whose listener gates carry over.
pub fn snapshot(
    config: &Config,
    backends: &Backends,
    listener_stats: impl Fn(&str) -> Arc<ListenerStats>,
    previous: Option<&Snapshot>,
) -> Snapshot {
    let pools = config
        .pools
        .keys()
        .map(|name| Arc::new(pool(config, name, backends)))
        .collect();
    let routes = snapshot::routes(config, previous, listener_stats);
    Snapshot::new(routes, pools)
}

/// Pool `name` of `config`, routing over its backends as the registry
/// judges them.
pub fn pool(config: &Config, name: &str, backends: &Backends) -> Pool {
    let settings = &config.pools[name];
    let members = settings
        .endpoints()
        .iter()
        .map(|endpoint| backends.backend(name, endpoint))
        .collect();
    Pool::build(name, settings, members, backends.waiting(name))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use super::*;
    use crate::config::{self, Resolver};
    use crate::metrics::Metrics;

    fn config(text: &str) -> Config {
        config::parse(Path::new("t.yaml"), text, Resolver::Offline).unwrap()
    }

    const THREE: &str = "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p, max_connections: 5 }\npools:\n  p:\n    backends:\n      - { address: 10.0.0.1:1, name: a }\n      - { address: 10.0.0.2:1, name: b }\n      - { address: 10.0.0.3:1, name: c }\n";

    fn publish(config: &Config, backends: &Backends, previous: Option<&Snapshot>) -> Snapshot {
        let metrics = Metrics::new(false);
        snapshot(
            config,
            backends,
            |name| Arc::new(ListenerStats::new(&metrics, name)),
            previous,
        )
    }

    /// The backends every client of `pool` may reach first.
    fn first_choices(snapshot: &Snapshot) -> Vec<String> {
        let pool = snapshot.pool("p").unwrap();
        let mut names: Vec<String> = (0..200u8)
            .filter_map(|i| pool.candidates(SocketAddr::from(([10, 9, 0, i], 1))).next())
            .map(|b| b.name.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn a_down_backend_leaves_the_table_and_all_down_routes_over_all() {
        let config = config(THREE);
        let metrics = Metrics::new(false);
        let mut backends = Backends::default();
        backends.sync(&config, &metrics, None);
        assert_eq!(
            first_choices(&publish(&config, &backends, None)),
            ["a", "b", "c"]
        );
        backends.eject(1);
        let snapshot = publish(&config, &backends, None);
        assert_eq!(first_choices(&snapshot), ["b", "c"]);
        assert!(!snapshot.pool("p").unwrap().panic());
        backends.eject(2);
        backends.eject(3);
        let snapshot = publish(&config, &backends, None);
        assert!(snapshot.pool("p").unwrap().panic());
        assert_eq!(first_choices(&snapshot), ["a", "b", "c"]);
    }

    #[test]
    fn a_listener_keeps_its_count_of_open_connections_by_address() {
        let first = config(THREE);
        let metrics = Metrics::new(false);
        let mut backends = Backends::default();
        backends.sync(&first, &metrics, None);
        let before = publish(&first, &backends, None);
        let addr = "127.0.0.1:7000".parse().unwrap();
        let _open = before.route(addr).unwrap().gate.enter().unwrap();
        // Renamed, with another limit: the same address, the same count.
        let second = config(
            &THREE
                .replace("  l: {", "  renamed: {")
                .replace("max_connections: 5", "max_connections: 1"),
        );
        let after = publish(&second, &backends, Some(&before));
        let route = after.route(addr).unwrap();
        assert_eq!(&*route.listener, "renamed");
        assert!(
            route.gate.enter().is_err(),
            "the connection open before counts against the new limit"
        );
    }
}
