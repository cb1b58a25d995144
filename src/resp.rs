//! The little of RESP (the Redis protocol) that sluice speaks: commands as
//! arrays of bulk strings, and replies that are simple strings, errors,
//! integers, bulk strings and arrays of them. Used by the Redis probe and by
//! Sentinel discovery; parsing is incremental (a reply may come in pieces)
//! and bounded in depth.

use crate::config::schema::ProbeAuth;

/// Appends `words` as a RESP array of bulk strings: safe for any byte in a
/// password.
pub fn command(out: &mut Vec<u8>, words: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
    for word in words {
        out.extend_from_slice(format!("${}\r\n{word}\r\n", word.len()).as_bytes());
    }
}

/// Appends `AUTH [user] password` for `auth` (no user: the default one).
pub fn auth(out: &mut Vec<u8>, auth: &ProbeAuth) {
    let mut words = vec!["AUTH"];
    words.extend(auth.user.as_deref());
    words.extend(auth.password.as_ref().map(|p| p.0.as_str()));
    command(out, &words);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    /// `None`: the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A bulk string's text.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Incomplete,
    Invalid,
    /// A reply, and the bytes it took.
    Reply(Reply, usize),
}

/// Arrays nested deeper than this are refused: nothing sluice asks for
/// nests at all.
const MAX_DEPTH: usize = 4;

/// Parses the reply at the start of `read`.
pub fn parse(read: &[u8]) -> Parsed {
    parse_at(read, 0)
}

fn parse_at(read: &[u8], depth: usize) -> Parsed {
    let Some(line_end) = read.windows(2).position(|w| w == b"\r\n") else {
        return Parsed::Incomplete;
    };
    let Some((&kind, line)) = read[..line_end].split_first() else {
        return Parsed::Invalid;
    };
    let text = || String::from_utf8_lossy(line).into_owned();
    let number = || std::str::from_utf8(line).ok()?.parse::<i64>().ok();
    let start = line_end + 2;
    match kind {
        b'+' => Parsed::Reply(Reply::Status(text()), start),
        b'-' => Parsed::Reply(Reply::Error(text()), start),
        b':' => match number() {
            Some(n) => Parsed::Reply(Reply::Integer(n), start),
            None => Parsed::Invalid,
        },
        b'$' => match number() {
            Some(-1) => Parsed::Reply(Reply::Bulk(None), start),
            Some(len) if len >= 0 => {
                let len = len as usize;
                match read.get(start..start + len + 2) {
                    None => Parsed::Incomplete,
                    Some(body) if body.ends_with(b"\r\n") => {
                        Parsed::Reply(Reply::Bulk(Some(body[..len].to_vec())), start + len + 2)
                    }
                    Some(_) => Parsed::Invalid,
                }
            }
            _ => Parsed::Invalid,
        },
        b'*' if depth < MAX_DEPTH => match number() {
            Some(-1) => Parsed::Reply(Reply::Array(None), start),
            Some(count) if (0..=1024).contains(&count) => {
                let mut items = Vec::new();
                let mut at = start;
                for _ in 0..count {
                    match parse_at(&read[at..], depth + 1) {
                        Parsed::Reply(item, used) => {
                            items.push(item);
                            at += used;
                        }
                        other => return other,
                    }
                }
                Parsed::Reply(Reply::Array(Some(items)), at)
            }
            _ => Parsed::Invalid,
        },
        _ => Parsed::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Replies are read as bytes arrive: a reply parsed from a prefix
        /// is the one parsed from the whole (the fuzz target `resp_reply`
        /// tries far more).
        #[test]
        fn a_verdict_never_changes_with_more_bytes(
            data in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                "([*][0-3]|[$][0-9]|[+:-][a-z0-9]{0,4})(\r\n([$][0-4]\r\n[a-z]{0,5}\r\n|:[0-9]\r\n|[*]-1\r\n)){0,3}"
                    .prop_map(String::into_bytes),
            ]
        ) {
            let whole = parse(&data);
            for end in 0..data.len() {
                match parse(&data[..end]) {
                    Parsed::Incomplete => {}
                    prefix => {
                        prop_assert_eq!(prefix, whole, "decided at {}", end);
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn a_password_goes_as_a_bulk_string() {
        let mut out = Vec::new();
        command(&mut out, &["AUTH", "probe", "p a\r\nss"]);
        assert_eq!(
            out,
            b"*3\r\n$4\r\nAUTH\r\n$5\r\nprobe\r\n$7\r\np a\r\nss\r\n"
        );
    }

    #[test]
    fn replies_are_parsed_only_once_whole() {
        let bulk = b"$11\r\nrole:master\r\n+OK\r\n";
        for end in 0..18 {
            assert_eq!(parse(&bulk[..end]), Parsed::Incomplete, "{end}");
        }
        assert_eq!(
            parse(bulk),
            Parsed::Reply(Reply::Bulk(Some(b"role:master".to_vec())), 18)
        );
        assert_eq!(
            parse(b"-WRONGPASS invalid username-password pair\r\n"),
            Parsed::Reply(
                Reply::Error("WRONGPASS invalid username-password pair".into()),
                43
            )
        );
        assert_eq!(parse(b"HTTP/1.1 400\r\n"), Parsed::Invalid);
        assert_eq!(parse(b"$3\r\nabcd\r\n"), Parsed::Invalid);
    }

    #[test]
    fn arrays_of_the_sentinel_and_of_pub_sub() {
        let address = b"*2\r\n$9\r\n10.0.0.2\r\n$4\r\n6379\r\n";
        // `10.0.0.2` is 8 bytes: the length is wrong.
        assert_eq!(parse(address), Parsed::Invalid);
        let address = b"*2\r\n$8\r\n10.0.0.2\r\n$4\r\n6379\r\n";
        for end in 0..address.len() {
            assert_eq!(parse(&address[..end]), Parsed::Incomplete, "{end}");
        }
        let Parsed::Reply(Reply::Array(Some(items)), used) = parse(address) else {
            panic!("an array");
        };
        assert_eq!(used, address.len());
        assert_eq!(items[0].text().as_deref(), Some("10.0.0.2"));
        assert_eq!(parse(b"*-1\r\n"), Parsed::Reply(Reply::Array(None), 5));
        assert_eq!(
            parse(b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n"),
            Parsed::Reply(
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(b"subscribe".to_vec())),
                    Reply::Bulk(Some(b"+switch-master".to_vec())),
                    Reply::Integer(1)
                ])),
                44
            )
        );
        assert_eq!(
            parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"),
            Parsed::Invalid
        );
    }
}
