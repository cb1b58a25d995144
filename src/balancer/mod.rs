//! Choosing a backend for a client.
//!
//! This module owns the mapping from a new connection to an order of
//! backends to try ([`algorithms`]), the Maglev table, and the counts of
//! open connections that load-aware choices read ([`load`]). The hash of the
//! client address (the *key*) is computed here so that Maglev and `sluice
//! explain` agree on it.

pub mod algorithms;
pub mod load;
pub mod maglev;

use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::HashKey;

/// Seed of the client-address hash. Fixed, like the Maglev seeds, so that
/// two sluice processes send a client to the same backend.
const KEY_SEED: u64 = 0x736c_7569_6365_0003;

/// The hash of the part of `client` that `hash_key` selects.
///
/// An IPv4 client seen through an IPv6 socket (`::ffff:a.b.c.d`) hashes as
/// the IPv4 address, so a dual-stack listener does not move it.
#[inline]
pub fn key_hash(hash_key: HashKey, client: SocketAddr) -> u64 {
    let mut bytes = [0u8; 18];
    let ip_len = match client.ip().to_canonical() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    let len = match hash_key {
        HashKey::SourceIp => ip_len,
        HashKey::SourceIpPort => {
            bytes[ip_len..ip_len + 2].copy_from_slice(&client.port().to_be_bytes());
            ip_len + 2
        }
    };
    xxh3_64_with_seed(&bytes[..len], KEY_SEED)
}

#[cfg(test)]
mod tests {
    use super::maglev::{Maglev, Member};
    use super::*;

    #[test]
    fn mapped_ipv4_hashes_as_ipv4() {
        let v4: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        for key in [HashKey::SourceIp, HashKey::SourceIpPort] {
            assert_eq!(key_hash(key, v4), key_hash(key, mapped));
        }
    }

    #[test]
    fn source_ip_ignores_the_port() {
        let a: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let b: SocketAddr = "10.1.2.3:5001".parse().unwrap();
        assert_eq!(
            key_hash(HashKey::SourceIp, a),
            key_hash(HashKey::SourceIp, b)
        );
        assert_ne!(
            key_hash(HashKey::SourceIpPort, a),
            key_hash(HashKey::SourceIpPort, b)
        );
    }

    /// Pinned mappings of client addresses to backends. If this test fails,
    /// the change remaps live clients of every deployed sluice: that must be
    /// a deliberate, announced decision, never an accident of refactoring.
    #[test]
    fn golden_vectors() {
        let names = ["cache-a", "cache-b", "cache-c", "cache-d", "cache-e"];
        let members: Vec<Member> = names
            .iter()
            .map(|name| Member { name, weight: 1 })
            .collect();
        let table = Maglev::build(&members, 65537);
        let route = |client: &str| {
            let addr: SocketAddr = client.parse().unwrap();
            let order: Vec<&str> = table
                .preference(key_hash(HashKey::SourceIp, addr))
                .take(3)
                .map(|i| names[i])
                .collect();
            order.join(" ")
        };
        let golden = [
            ("10.0.0.1:1", "cache-c cache-b cache-a"),
            ("10.0.0.2:1", "cache-d cache-e cache-c"),
            ("10.0.0.3:1", "cache-c cache-a cache-b"),
            ("127.0.0.1:1", "cache-a cache-e cache-c"),
            ("192.168.1.20:1", "cache-e cache-b cache-c"),
            ("172.16.5.4:1", "cache-d cache-a cache-e"),
            ("8.8.8.8:1", "cache-e cache-c cache-b"),
            ("203.0.113.77:1", "cache-d cache-e cache-c"),
            ("[2001:db8::1]:1", "cache-d cache-b cache-a"),
            ("[::1]:1", "cache-a cache-c cache-d"),
            ("[fe80::1234]:1", "cache-c cache-e cache-b"),
            ("100.64.0.9:1", "cache-c cache-b cache-e"),
        ];
        for (client, expected) in golden {
            assert_eq!(route(client), expected, "client {client}");
        }
    }
}
