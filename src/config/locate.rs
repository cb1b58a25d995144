//! Finds the line and column of a field, given its dotted path, for errors
//! found after parsing (a duplicate, a missing pool) when serde_yaml no longer
//! knows where anything was.
//!
//! serde_yaml attaches the position of the node being read to any error
//! raised while reading it. So we read the document once more, walk down the
//! path, and raise an error on purpose at the target node: its position is the
//! answer. This costs a second parse, only on the error path, and needs no
//! second YAML parser.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// The 1-based (line, column) of the node at `field` in `text`, if it exists.
pub fn position(text: &str, field: &str) -> Option<(usize, usize)> {
    let segments = parse_path(field)?;
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match Seek(&segments).deserialize(deserializer) {
        Err(e) => e.location().map(|l| (l.line(), l.column())),
        Ok(()) => None,
    }
}

/// `pools.redis.backends[1].address` → [pools, redis, backends, 1, address].
fn parse_path(field: &str) -> Option<Vec<Segment<'_>>> {
    let mut segments = Vec::new();
    for part in field.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => part.split_at(i),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']')?;
            segments.push(Segment::Index(inner[..end].parse().ok()?));
            rest = &inner[end + 1..];
        }
    }
    Some(segments)
}

/// Walks to the node at the remaining path; fails there, succeeds if the path
/// does not exist.
struct Seek<'p, 'a>(&'p [Segment<'a>]);

/// The marker error; its text is never shown.
const FOUND: &str = "found";

impl<'de> DeserializeSeed<'de> for Seek<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.0.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        // Read to the end even when the path leads nowhere: serde_yaml
        // reports a mapping left half-read as an error of its own.
        while let Some(key) = map.next_key::<String>()? {
            if *first == Segment::Key(&key) {
                map.next_value_seed(Seek(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.0.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let mut index = 0;
        loop {
            let more = if *first == Segment::Index(index) {
                seq.next_element_seed(Seek(rest))?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
}

impl Seek<'_, '_> {
    /// A scalar is the target if the path ends here; otherwise the path
    /// leads nowhere.
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
listeners:
  redis:
    listen: 127.0.0.1:6379
    pool: redis
pools:
  redis:
    backends:
      - address: 10.0.0.1:6379
      - address: 10.0.0.2:6379
        name: b
";

    #[test]
    fn finds_scalars_mappings_and_list_items() {
        assert_eq!(position(DOC, "listeners.redis.pool"), Some((4, 11)));
        assert_eq!(
            position(DOC, "pools.redis.backends[1].name"),
            Some((10, 15))
        );
        assert_eq!(position(DOC, "pools.redis.backends[1]"), Some((9, 9)));
        assert_eq!(position(DOC, "pools.redis"), Some((7, 5)));
    }

    #[test]
    fn missing_paths_have_no_position() {
        assert_eq!(position(DOC, "pools.memcached"), None);
        assert_eq!(position(DOC, "pools.redis.backends[7]"), None);
        assert_eq!(position(DOC, "listeners.redis.pool.deeper"), None);
        assert_eq!(position(DOC, "bad[path"), None);
    }
}
