//! Redis Sentinel as the source of a pool's backend: the master that a
//! majority of the Sentinels name (`SENTINEL get-master-addr-by-name`), and
//! the news of a failover as a Sentinel announces it (`+switch-master` on
//! its pub/sub channel).
//!
//! This module speaks to Sentinels; [`crate::control`] runs the tasks that
//! ask them every `resolve_interval` and listen to each, and routes to what
//! they say. A majority of all the Sentinels listed, not of those that
//! answer: a Sentinel cut off with an old master must not outvote the rest.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::config::schema::{ProbeAuth, Sentinel};
use crate::health::{self, Wire};
use crate::net;
use crate::resp::{self, Reply};

/// How long one Sentinel may take to answer one question.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a lost subscription waits before it connects again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// The master of `sentinel.master` that more than half of the Sentinels
/// name, or why there is none.
pub async fn majority(sentinel: &Sentinel) -> Result<SocketAddr, String> {
    // Asked together: a Sentinel that does not answer must not delay the
    // others' answers.
    let asked: Vec<_> = sentinel
        .resolved
        .iter()
        .map(|&addr| {
            let (master, auth) = (sentinel.master.clone(), sentinel.auth.clone());
            tokio::task::spawn_local(async move { ask(addr, &master, auth.as_ref()).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(asked.len());
    for task in asked {
        answers.push(task.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    let mut votes: HashMap<SocketAddr, usize> = HashMap::new();
    let mut failures = Vec::new();
    for (addr, answer) in sentinel.resolved.iter().zip(answers) {
        match answer {
            Ok(master) => *votes.entry(master).or_default() += 1,
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    let needed = sentinel.resolved.len() / 2 + 1;
    if let Some((&master, _)) = votes.iter().find(|(_, &n)| n >= needed) {
        return Ok(master);
    }
    let mut named: Vec<String> = votes
        .iter()
        .map(|(master, n)| format!("{master} by {n}"))
        .collect();
    named.sort();
    Err(format!(
        "no master named by {needed} of the {} Sentinels (named: {}; {})",
        sentinel.resolved.len(),
        if named.is_empty() {
            "none".to_owned()
        } else {
            named.join(", ")
        },
        if failures.is_empty() {
            "every Sentinel answered".to_owned()
        } else {
            failures.join("; ")
        }
    ))
}

/// One Sentinel's answer: the address of the master it monitors as
/// `master`.
async fn ask(
    addr: SocketAddr,
    master: &str,
    auth: Option<&ProbeAuth>,
) -> Result<SocketAddr, String> {
    let asking = async {
        let mut wire = connect(addr, auth).await?;
        let mut request = Vec::new();
        resp::command(
            &mut request,
            &["SENTINEL", "get-master-addr-by-name", master],
        );
        wire.send(&request).await.map_err(|e| e.to_string())?;
        match health::next_reply(&mut wire)
            .await
            .map_err(|e| e.to_string())?
        {
            Reply::Array(Some(items)) => address(&items)
                .ok_or_else(|| format!("an answer that is not an address: {items:?}")),
            Reply::Array(None) => Err(format!("it does not monitor a master named {master:?}")),
            Reply::Error(e) => Err(e),
            other => Err(format!("an unexpected answer: {other:?}")),
        }
    };
    tokio::time::timeout(ASK_TIMEOUT, asking)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", ASK_TIMEOUT.as_secs())))
}

/// `[ip, port]` as the Sentinel writes an address.
fn address(items: &[Reply]) -> Option<SocketAddr> {
    let [ip, port] = items else { return None };
    let ip: IpAddr = ip.text()?.parse().ok()?;
    let port: u16 = port.text()?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

/// A connection to the Sentinel at `addr`, logged in if it wants a login.
async fn connect(addr: SocketAddr, auth: Option<&ProbeAuth>) -> Result<Wire, String> {
    let (socket, reset) = net::connect(addr, ASK_TIMEOUT)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    if let Some(e) = reset {
        return Err(format!("cannot connect: {e}"));
    }
    let mut wire = Wire::new(socket).map_err(|e| e.to_string())?;
    if let Some(auth) = auth {
        let mut request = Vec::new();
        resp::auth(&mut request, auth);
        wire.send(&request).await.map_err(|e| e.to_string())?;
        match health::next_reply(&mut wire)
            .await
            .map_err(|e| e.to_string())?
        {
            Reply::Status(_) => {}
            Reply::Error(e) => return Err(format!("authentication failed: {e}")),
            other => return Err(format!("an unexpected answer to AUTH: {other:?}")),
        }
    }
    Ok(wire)
}

/// Listens to the Sentinel at `addr` for failovers of `master`, for ever:
/// each `+switch-master` of it goes to `switched` with the new master's
/// address. A lost connection is made again after a pause.
pub async fn listen(
    addr: SocketAddr,
    master: String,
    auth: Option<ProbeAuth>,
    switched: UnboundedSender<SocketAddr>,
) {
    loop {
        let listened = subscribe(addr, &master, auth.as_ref(), &switched).await;
        if switched.is_closed() {
            return;
        }
        tracing::debug!(sentinel = %addr, "listening to the Sentinel again: {listened:?}");
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// One subscription, until the connection fails.
async fn subscribe(
    addr: SocketAddr,
    master: &str,
    auth: Option<&ProbeAuth>,
    switched: &UnboundedSender<SocketAddr>,
) -> Result<(), String> {
    let mut wire = tokio::time::timeout(ASK_TIMEOUT, connect(addr, auth))
        .await
        .map_err(|_| "no answer".to_owned())??;
    let mut request = Vec::new();
    resp::command(&mut request, &["SUBSCRIBE", "+switch-master"]);
    wire.send(&request).await.map_err(|e| e.to_string())?;
    loop {
        // Each message is read whole, however long it waits; reads are
        // bounded in size by the wire.
        let reply = health::next_reply(&mut wire)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(new) = switch_of(&reply, master) {
            if switched.send(new).is_err() {
                return Ok(());
            }
        }
    }
}

/// The new master's address, if `reply` is a `+switch-master` message
/// about `master`: `NAME OLD-IP OLD-PORT NEW-IP NEW-PORT`.
fn switch_of(reply: &Reply, master: &str) -> Option<SocketAddr> {
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    let [kind, channel, payload] = &items[..] else {
        return None;
    };
    if kind.text()? != "message" || channel.text()? != "+switch-master" {
        return None;
    }
    let payload = payload.text()?;
    let words: Vec<&str> = payload.split(' ').collect();
    let [name, _, _, ip, port] = words[..] else {
        return None;
    };
    if name != master {
        return None;
    }
    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(Some(text.as_bytes().to_vec()))
    }

    #[test]
    fn a_switch_of_our_master_names_the_new_one() {
        let message = |payload: &str| {
            Reply::Array(Some(vec![
                bulk("message"),
                bulk("+switch-master"),
                bulk(payload),
            ]))
        };
        assert_eq!(
            switch_of(&message("mymaster 10.0.0.1 6379 10.0.0.2 6380"), "mymaster"),
            Some("10.0.0.2:6380".parse().unwrap())
        );
        assert_eq!(
            switch_of(&message("other 10.0.0.1 6379 10.0.0.2 6380"), "mymaster"),
            None
        );
        assert_eq!(switch_of(&message("mymaster garbage"), "mymaster"), None);
        let confirmation = Reply::Array(Some(vec![
            bulk("subscribe"),
            bulk("+switch-master"),
            Reply::Integer(1),
        ]));
        assert_eq!(switch_of(&confirmation, "mymaster"), None);
    }

    #[test]
    fn an_address_is_an_ip_and_a_port() {
        assert_eq!(
            address(&[bulk("10.0.0.2"), bulk("6379")]),
            Some("10.0.0.2:6379".parse().unwrap())
        );
        assert_eq!(address(&[bulk("redis-a"), bulk("6379")]), None);
        assert_eq!(address(&[bulk("10.0.0.2")]), None);
    }
}
