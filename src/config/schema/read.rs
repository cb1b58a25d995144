//! The hand-written half of reading the schema: the types whose YAML
//! takes more than one shape (`workers: auto | N`, `accept_proxy: bool |
//! {...}`, `health: off | {...}`), the addresses checked as they are read,
//! and maps whose keys must not repeat.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::*;

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WorkersVisitor;
        impl Visitor<'_> for WorkersVisitor {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto` or a number of worker threads")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Workers, E> {
                match v {
                    "auto" => Ok(Workers::Auto),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Workers, E> {
                match usize::try_from(v) {
                    Ok(0) => Err(E::custom("must be at least 1 (or `auto`)")),
                    Ok(n) if n <= 1024 => Ok(Workers::Count(n)),
                    _ => Err(E::custom(format!(
                        "{v} workers is more than the limit of 1024"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Workers, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom("must be at least 1 (or `auto`)")),
                }
            }
        }
        deserializer.deserialize_any(WorkersVisitor)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Parsed inside the visitor so that serde_yaml gives the error the
        // position of the value itself.
        struct ListenAddrVisitor;
        impl Visitor<'_> for ListenAddrVisitor {
            type Value = ListenAddr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address such as 0.0.0.0:6379 or \"[::]:6379\" (IPv6 in quotes)")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ListenAddr, E> {
                let addr: SocketAddr = text.parse().map_err(|_| {
                    E::custom(format!(
                        "invalid socket address {text:?} (expected IPv4:port or [IPv6]:port)"
                    ))
                })?;
                if addr.port() == 0 {
                    return Err(E::custom(format!(
                        "invalid socket address {text:?}: port 0 is not allowed"
                    )));
                }
                Ok(ListenAddr(addr))
            }
        }
        deserializer.deserialize_str(ListenAddrVisitor)
    }
}

impl<'de> Deserialize<'de> for AcceptProxy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AcceptProxyVisitor;
        impl<'de> Visitor<'de> for AcceptProxyVisitor {
            type Value = AcceptProxy;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`true`, `false` or `{ from: [RANGE, ...], timeout: DURATION }`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AcceptProxy, E> {
                Ok(match v {
                    false => AcceptProxy::Off,
                    // From anywhere: the documentation warns against it.
                    true => AcceptProxy::On(ProxySources {
                        from: ["0.0.0.0/0", "::/0"]
                            .map(|range| Cidr(range.parse().expect("a valid range")))
                            .to_vec(),
                        timeout: defaults::proxy_timeout(),
                    }),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AcceptProxy, A::Error> {
                ProxySources::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(AcceptProxy::On)
            }
        }
        deserializer.deserialize_any(AcceptProxyVisitor)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CidrVisitor;
        impl Visitor<'_> for CidrVisitor {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address range such as 10.0.0.0/8, or an address")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Cidr, E> {
                let range = text
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid address range {text:?} (expected e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7)"
                        ))
                    })?;
                // `10.1.2.3/8` is taken to mean `10.0.0.0/8`.
                Ok(Cidr(range.trunc()))
            }
        }
        deserializer.deserialize_str(CidrVisitor)
    }
}

impl<'de> Deserialize<'de> for Health {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HealthVisitor;
        impl<'de> Visitor<'de> for HealthVisitor {
            type Value = Health;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`off` or a mapping of probe settings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Health, E> {
                match v {
                    "off" => Ok(Health::Off),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Health, A::Error> {
                HealthProbe::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|probe| Health::Probe(Box::new(probe)))
            }
        }
        deserializer.deserialize_any(HealthVisitor)
    }
}

/// Durations are strings such as `500ms`, `2s` or `1h`; `0` (string or
/// number) means zero, which disables the timeout it sets.
pub mod duration {
    use super::*;

    /// Longer durations are mistakes, and would overflow timer arithmetic.
    const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as `500ms`, `2s` or `1h`, or 0")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                let duration = humantime::parse_duration(v).map_err(|e| {
                    E::custom(format!(
                        "invalid duration {v:?}: {e} (write e.g. `500ms`, `2s`, `1h`)"
                    ))
                })?;
                if duration > MAX_DURATION {
                    return Err(E::custom(format!(
                        "duration {v:?} is longer than the limit of 365 days"
                    )));
                }
                Ok(duration)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                match v {
                    0 => Ok(Duration::ZERO),
                    _ => Err(E::custom(format!(
                        "duration {v} has no unit (write e.g. `{v}s` or `{v}ms`)"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("duration {v} is negative"))),
                }
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// Deserializes a mapping into a `BTreeMap`, rejecting a key that appears
/// twice (serde would otherwise keep the last one without a word).
pub(super) fn unique_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueMapVisitor<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueMapVisitor<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping of names to settings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(de::Error::custom(format!("{key:?} is defined twice")));
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(UniqueMapVisitor(PhantomData))
}
