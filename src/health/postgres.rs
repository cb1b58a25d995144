//! The PostgreSQL probe that logs in and asks the role: a startup message,
//! the authentication the server asks for (cleartext, MD5 or SCRAM-SHA-256,
//! by the `postgres-protocol` crate), then `SELECT pg_is_in_recovery()`: a
//! server in recovery is a standby. With `role: any` logging in is the
//! whole check.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend::Message, frontend};

use super::wire::Wire;
use super::{unexpected, ProbeFailure};
use crate::config::schema::{ProbeAuth, Role};

pub(super) async fn check(
    mut wire: Wire,
    role: Role,
    auth: &ProbeAuth,
) -> Result<(), ProbeFailure> {
    let user = auth.user.as_deref().unwrap_or("postgres");
    let mut out = BytesMut::new();
    let mut parameters = vec![("user", user), ("application_name", "sluice-probe")];
    parameters.push(("database", auth.database.as_deref().unwrap_or("postgres")));
    frontend::startup_message(parameters, &mut out).map_err(io)?;
    wire.send(&out).await?;
    log_in(&mut wire, user, auth).await?;
    let in_recovery = match role {
        Role::Any => None,
        Role::Primary | Role::Replica => Some(in_recovery(&mut wire).await?),
    };
    // A polite goodbye; the server would log an unexpected EOF otherwise.
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    wire.send(&out).await?;
    match (role, in_recovery) {
        (Role::Primary, Some(true)) => Err(ProbeFailure::Refused("in recovery (standby)".into())),
        (Role::Replica, Some(false)) => {
            Err(ProbeFailure::Refused("not in recovery (a primary)".into()))
        }
        _ => Ok(()),
    }
}

/// Answers the server's authentication requests until it is ready for a
/// query.
async fn log_in(wire: &mut Wire, user: &str, auth: &ProbeAuth) -> Result<(), ProbeFailure> {
    let password = || {
        auth.password
            .as_ref()
            .map(|p| p.0.as_bytes())
            .ok_or_else(|| {
                ProbeFailure::Refused(format!(
                    "the server asks a password of user \"{user}\": give health.auth.password_file"
                ))
            })
    };
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let mut out = BytesMut::new();
        match next_message(wire).await? {
            Message::AuthenticationOk
            | Message::ParameterStatus(_)
            | Message::BackendKeyData(_)
            | Message::NoticeResponse(_) => {}
            Message::ReadyForQuery(_) => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?, &mut out).map_err(io)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), password()?, body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
            }
            Message::AuthenticationSasl(body) => {
                let mechanisms: Vec<&str> = body.mechanisms().collect().map_err(io)?;
                if !mechanisms.contains(&sasl::SCRAM_SHA_256) {
                    return Err(ProbeFailure::Refused(format!(
                        "the server offers only {} to log in, not SCRAM-SHA-256",
                        mechanisms.join(", ")
                    )));
                }
                let exchange =
                    sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, exchange.message(), &mut out)
                    .map_err(io)?;
                scram = Some(exchange);
            }
            Message::AuthenticationSaslContinue(body) => {
                let exchange = scram.as_mut().ok_or_else(|| unexpected(b""))?;
                exchange.update(body.data()).map_err(io)?;
                frontend::sasl_response(exchange.message(), &mut out).map_err(io)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let exchange = scram.as_mut().ok_or_else(|| unexpected(b""))?;
                // Checks the server's signature: it knew the password too.
                exchange.finish(body.data()).map_err(io)?;
            }
            Message::ErrorResponse(body) => return Err(server_error(body.fields())),
            _ => {
                return Err(ProbeFailure::Io(
                    "unexpected message while logging in".into(),
                ))
            }
        }
        if !out.is_empty() {
            wire.send(&out).await?;
        }
    }
}

/// Asks `SELECT pg_is_in_recovery()`.
async fn in_recovery(wire: &mut Wire) -> Result<bool, ProbeFailure> {
    let mut out = BytesMut::new();
    frontend::query("SELECT pg_is_in_recovery()", &mut out).map_err(io)?;
    wire.send(&out).await?;
    let mut answer = None;
    loop {
        match next_message(wire).await? {
            Message::DataRow(row) => {
                let mut ranges = row.ranges();
                if let Some(Some(range)) = ranges.next().map_err(io)? {
                    answer = Some(&row.buffer()[range] == b"t");
                }
            }
            Message::ReadyForQuery(_) => {
                return answer
                    .ok_or_else(|| ProbeFailure::Io("pg_is_in_recovery() returned no row".into()))
            }
            Message::ErrorResponse(body) => return Err(server_error(body.fields())),
            _ => {}
        }
    }
}

async fn next_message(wire: &mut Wire) -> Result<Message, ProbeFailure> {
    loop {
        // Not a PostgreSQL message at all: quote what came.
        let shown = wire.read.clone();
        match Message::parse(&mut wire.read) {
            Ok(Some(message)) => return Ok(message),
            Ok(None) => wire.fill().await?,
            Err(_) => return Err(unexpected(&shown)),
        }
    }
}

/// The server's error, as its message says it (`password authentication
/// failed for user "probe"`, `the database system is starting up`).
fn server_error(mut fields: postgres_protocol::message::backend::ErrorFields) -> ProbeFailure {
    let mut message = None;
    while let Ok(Some(field)) = fields.next() {
        if field.type_() == b'M' {
            message = Some(String::from_utf8_lossy(field.value_bytes()).into_owned());
        }
    }
    ProbeFailure::Refused(message.unwrap_or_else(|| "the server sent an error".into()))
}

fn io(e: std::io::Error) -> ProbeFailure {
    ProbeFailure::Io(e.to_string())
}
