//! The Redis probe that logs in and asks the role: `AUTH` (when a login is
//! given), then `INFO replication` (or `PING` when any role will do), sent
//! together. A master is a primary; a replica is one whose link to its
//! master is up (a replica cut off from its master serves stale data).

use super::wire::Wire;
use super::{unexpected, ProbeFailure};
use crate::config::schema::{ProbeAuth, Role};

pub(super) async fn check(
    mut wire: Wire,
    role: Role,
    auth: Option<&ProbeAuth>,
) -> Result<(), ProbeFailure> {
    let mut request = Vec::new();
    if let Some(auth) = auth {
        let mut words = vec!["AUTH"];
        words.extend(auth.user.as_deref());
        words.extend(auth.password.as_ref().map(|p| p.0.as_str()));
        command(&mut request, &words);
    }
    command(
        &mut request,
        match role {
            Role::Any => &["PING"],
            _ => &["INFO", "replication"],
        },
    );
    wire.send(&request).await?;
    if let Some(auth) = auth {
        match next_reply(&mut wire).await? {
            Reply::Status(_) => {}
            Reply::Error(e) => {
                let user = auth.user.as_deref().unwrap_or("default");
                return Err(ProbeFailure::Refused(format!(
                    "authentication failed for user \"{user}\": {e}"
                )));
            }
            Reply::Bulk(_) => return Err(unexpected(&wire.read)),
        }
    }
    match (next_reply(&mut wire).await?, role) {
        (Reply::Error(e), _) if e.starts_with("NOAUTH") => Err(ProbeFailure::Refused(format!(
            "{e} (give the probe a login: health.auth)"
        ))),
        (Reply::Error(e), _) => Err(ProbeFailure::Refused(e)),
        (Reply::Status(s), Role::Any) if s == "PONG" => Ok(()),
        (Reply::Bulk(info), Role::Primary | Role::Replica) => judge_role(&info, role),
        _ => Err(unexpected(&wire.read)),
    }
}

/// Appends `words` as a RESP array of bulk strings: safe for any byte in a
/// password.
fn command(out: &mut Vec<u8>, words: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
    for word in words {
        out.extend_from_slice(format!("${}\r\n{word}\r\n", word.len()).as_bytes());
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Status(String),
    Error(String),
    Bulk(Vec<u8>),
}

/// Reads one reply off the wire.
async fn next_reply(wire: &mut Wire) -> Result<Reply, ProbeFailure> {
    loop {
        match parse(&wire.read) {
            Parsed::Incomplete => wire.fill().await?,
            Parsed::Invalid => return Err(unexpected(&wire.read)),
            Parsed::Reply(reply, used) => {
                let _ = wire.read.split_to(used);
                return Ok(reply);
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Incomplete,
    Invalid,
    /// A reply, and the bytes it took.
    Reply(Reply, usize),
}

/// Parses the simple string, error or bulk string at the start of `read`.
fn parse(read: &[u8]) -> Parsed {
    let Some(line_end) = read.windows(2).position(|w| w == b"\r\n") else {
        return Parsed::Incomplete;
    };
    let text = || String::from_utf8_lossy(&read[1..line_end]).into_owned();
    match read[0] {
        b'+' => Parsed::Reply(Reply::Status(text()), line_end + 2),
        b'-' => Parsed::Reply(Reply::Error(text()), line_end + 2),
        b'$' => {
            let Some(len) = text().parse::<usize>().ok() else {
                return Parsed::Invalid;
            };
            let start = line_end + 2;
            match read.get(start..start + len + 2) {
                None => Parsed::Incomplete,
                Some(body) if body.ends_with(b"\r\n") => {
                    Parsed::Reply(Reply::Bulk(body[..len].to_vec()), start + len + 2)
                }
                Some(_) => Parsed::Invalid,
            }
        }
        _ => Parsed::Invalid,
    }
}

/// Judges `INFO replication` by its `role:` and `master_link_status:` lines.
fn judge_role(info: &[u8], role: Role) -> Result<(), ProbeFailure> {
    let field = |name: &str| {
        info.split(|&b| b == b'\n').find_map(|line| {
            let value = line.strip_prefix(name.as_bytes())?.strip_prefix(b":")?;
            Some(String::from_utf8_lossy(value.trim_ascii_end()).into_owned())
        })
    };
    let Some(actual) = field("role") else {
        return Err(unexpected(info));
    };
    match (role, actual.as_str()) {
        (Role::Primary, "master") => Ok(()),
        (Role::Primary, other) => Err(ProbeFailure::Refused(format!("role:{other}, not master"))),
        (_, "slave") => match field("master_link_status").as_deref() {
            Some("up") => Ok(()),
            link => Err(ProbeFailure::Refused(format!(
                "replica whose master_link_status is {}",
                link.unwrap_or("unknown")
            ))),
        },
        (_, other) => Err(ProbeFailure::Refused(format!(
            "role:{other}, not a replica"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Parsed::Reply(Reply::Bulk(b"role:master".to_vec()), 18)
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
    fn roles() {
        let master = b"# Replication\r\nrole:master\r\nconnected_slaves:1\r\n";
        let replica =
            b"# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\nmaster_link_status:up\r\n";
        let cut_off = b"# Replication\r\nrole:slave\r\nmaster_link_status:down\r\n";
        assert_eq!(judge_role(master, Role::Primary), Ok(()));
        assert_eq!(
            judge_role(replica, Role::Primary),
            Err(ProbeFailure::Refused("role:slave, not master".into()))
        );
        assert_eq!(judge_role(replica, Role::Replica), Ok(()));
        assert_eq!(
            judge_role(cut_off, Role::Replica),
            Err(ProbeFailure::Refused(
                "replica whose master_link_status is down".into()
            ))
        );
        assert_eq!(
            judge_role(master, Role::Replica),
            Err(ProbeFailure::Refused("role:master, not a replica".into()))
        );
    }
}
