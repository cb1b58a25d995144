//! The Redis probe that logs in and asks the role: `AUTH` (when a login is
//! given), then `INFO replication` (or `PING` when any role will do), sent
//! together. A master is a primary; a replica is one whose link to its
//! master is up (a replica cut off from its master serves stale data).

use super::wire::Wire;
use super::{unexpected, ProbeFailure};
use crate::config::schema::{ProbeAuth, Role};
use crate::resp::{self, command, Parsed, Reply};

pub(super) async fn check(
    mut wire: Wire,
    role: Role,
    auth: Option<&ProbeAuth>,
) -> Result<(), ProbeFailure> {
    let mut request = Vec::new();
    if let Some(auth) = auth {
        resp::auth(&mut request, auth);
    }
    let ask: &[&str] = match role {
        Role::Any => &["PING"],
        _ => &["INFO", "replication"],
    };
    command(&mut request, ask);
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
            _ => return Err(unexpected(&wire.read)),
        }
    }
    match (next_reply(&mut wire).await?, role) {
        (Reply::Error(e), _) if e.starts_with("NOAUTH") => Err(ProbeFailure::Refused(format!(
            "{e} (give the probe a login: health.auth)"
        ))),
        (Reply::Error(e), _) => Err(ProbeFailure::Refused(e)),
        (Reply::Status(s), Role::Any) if s == "PONG" => Ok(()),
        (Reply::Bulk(Some(info)), Role::Primary | Role::Replica) => judge_role(&info, role),
        _ => Err(unexpected(&wire.read)),
    }
}

/// Reads one reply off the wire.
pub(crate) async fn next_reply(wire: &mut Wire) -> Result<Reply, ProbeFailure> {
    loop {
        match resp::parse(&wire.read) {
            Parsed::Incomplete => wire.fill().await?,
            Parsed::Invalid => return Err(unexpected(&wire.read)),
            Parsed::Reply(reply, used) => {
                let _ = wire.read.split_to(used);
                return Ok(reply);
            }
        }
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
