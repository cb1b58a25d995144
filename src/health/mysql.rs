//! The MySQL (and MariaDB) probe that logs in and asks the role: the
//! server's greeting, a login with `mysql_native_password` or
//! `caching_sha2_password` (whichever the server asks for, switching when
//! it says so), then `SELECT @@global.read_only` and, for a Galera node,
//! `wsrep_local_state`: a node that is not synced (4) fails whatever its
//! role. A server with `read_only` off is a primary. With `role: any`
//! logging in is the whole check.
//!
//! The password scrambles are SHA-1 and SHA-256 compositions computed with
//! the RustCrypto crates; `caching_sha2_password`'s full authentication on a
//! connection without TLS encrypts the password with the server's RSA key
//! (OAEP), by the `rsa` crate.

use rsa::pkcs8::DecodePublicKey;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::wire::Wire;
use super::{unexpected, ProbeFailure};
use crate::config::schema::{ProbeAuth, Role};

const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_CONNECT_WITH_DB: u32 = 0x8;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;

const NATIVE: &str = "mysql_native_password";
const CACHING_SHA2: &str = "caching_sha2_password";

/// utf8mb4_general_ci.
const CHARSET: u8 = 45;

pub(super) async fn check(wire: Wire, role: Role, auth: &ProbeAuth) -> Result<(), ProbeFailure> {
    let mut link = Link { wire, sequence: 0 };
    let greeting = Greeting::parse(&link.packet().await?)?;
    link.send(&handshake_response(&greeting, auth)?).await?;
    log_in(&mut link, &greeting, auth).await?;
    let verdict = match role {
        Role::Any => Ok(()),
        Role::Primary | Role::Replica => judge(&mut link, role).await,
    };
    // COM_QUIT: the server would count an aborted connection otherwise.
    link.sequence = 0;
    link.send(&[0x01]).await?;
    verdict
}

/// The connection in packets: a 3-byte length, a sequence number, the
/// payload. Each command starts a new sequence at 0.
struct Link {
    wire: Wire,
    sequence: u8,
}

impl Link {
    async fn packet(&mut self) -> Result<Vec<u8>, ProbeFailure> {
        loop {
            if let [l0, l1, l2, sequence, ..] = self.wire.read[..] {
                let len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
                if self.wire.read.len() >= 4 + len {
                    self.sequence = sequence.wrapping_add(1);
                    let packet = self.wire.read.split_to(4 + len);
                    return Ok(packet[4..].to_vec());
                }
            }
            self.wire.fill().await?;
        }
    }

    async fn send(&mut self, payload: &[u8]) -> Result<(), ProbeFailure> {
        let mut packet = (payload.len() as u32).to_le_bytes();
        packet[3] = self.sequence;
        self.sequence = self.sequence.wrapping_add(1);
        self.wire.send(&[&packet[..], payload].concat()).await
    }

    /// Sends a query and returns its first row, if any (NULL as `None`).
    async fn query(&mut self, sql: &str) -> Result<Option<Vec<Option<String>>>, ProbeFailure> {
        self.sequence = 0;
        self.send(&[&[0x03], sql.as_bytes()].concat()).await?;
        let head = self.packet().await?;
        error(&head)?;
        let mut cursor = Cursor(&head);
        let columns = cursor.lenenc().ok_or_else(|| unexpected(&head))?;
        // Column definitions, then an EOF packet (no CLIENT_DEPRECATE_EOF).
        for _ in 0..=columns {
            self.packet().await?;
        }
        let mut first = None;
        loop {
            let row = self.packet().await?;
            error(&row)?;
            if row.first() == Some(&0xfe) && row.len() < 9 {
                return Ok(first);
            }
            if first.is_none() {
                let mut cursor = Cursor(&row);
                let mut values = Vec::new();
                for _ in 0..columns {
                    values.push(match cursor.0.first() {
                        // NULL.
                        Some(0xfb) => {
                            cursor.take(1);
                            None
                        }
                        _ => Some(cursor.lenenc_str().ok_or_else(|| unexpected(&row))?),
                    });
                }
                first = Some(values);
            }
        }
    }
}

/// What the server's first packet says.
#[derive(Debug, PartialEq, Eq)]
struct Greeting {
    capabilities: u32,
    /// The 20 random bytes passwords are scrambled with.
    scramble: Vec<u8>,
    plugin: String,
}

impl Greeting {
    fn parse(packet: &[u8]) -> Result<Greeting, ProbeFailure> {
        error(packet)?;
        let bad = || unexpected(packet);
        let mut c = Cursor(packet);
        if c.byte() != Some(10) {
            return Err(bad());
        }
        c.nul_str().ok_or_else(bad)?; // server version
        c.take(4).ok_or_else(bad)?; // connection id
        let mut scramble = c.take(8).ok_or_else(bad)?.to_vec();
        c.take(1).ok_or_else(bad)?;
        let low = c.take(2).ok_or_else(bad)?;
        let mut capabilities = u32::from(u16::from_le_bytes([low[0], low[1]]));
        let mut plugin = NATIVE.to_owned();
        if let Some(rest) = c.take(16) {
            let high = u16::from_le_bytes([rest[3], rest[4]]);
            capabilities |= u32::from(high) << 16;
            let data_len = usize::from(rest[5]);
            if capabilities & CLIENT_SECURE_CONNECTION != 0 {
                let part = c.take(data_len.saturating_sub(8).max(13)).ok_or_else(bad)?;
                // The part ends with a NUL that is not part of the scramble.
                scramble.extend_from_slice(&part[..part.len() - 1]);
            }
            if capabilities & CLIENT_PLUGIN_AUTH != 0 {
                if let Some(name) = c.nul_str() {
                    plugin = name;
                }
            }
        }
        if capabilities & CLIENT_PROTOCOL_41 == 0 {
            return Err(ProbeFailure::Refused(
                "the server is older than MySQL 4.1".into(),
            ));
        }
        Ok(Greeting {
            capabilities,
            scramble,
            plugin,
        })
    }
}

fn handshake_response(greeting: &Greeting, auth: &ProbeAuth) -> Result<Vec<u8>, ProbeFailure> {
    let user = auth.user.as_deref().unwrap_or("root");
    let mut capabilities = CLIENT_LONG_PASSWORD
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_PLUGIN_AUTH;
    if auth.database.is_some() {
        capabilities |= CLIENT_CONNECT_WITH_DB;
    }
    capabilities &= greeting.capabilities | CLIENT_PROTOCOL_41;
    let plugin = match greeting.plugin.as_str() {
        CACHING_SHA2 => CACHING_SHA2,
        // Asked for anything else, offer the native scramble: the server
        // switches to what it needs, or refuses.
        _ => NATIVE,
    };
    let scrambled = scramble(plugin, password(auth), &greeting.scramble);
    let mut out = Vec::new();
    out.extend_from_slice(&capabilities.to_le_bytes());
    out.extend_from_slice(&(16u32 << 20).to_le_bytes());
    out.push(CHARSET);
    out.extend_from_slice(&[0; 23]);
    out.extend_from_slice(user.as_bytes());
    out.push(0);
    out.push(scrambled.len() as u8);
    out.extend_from_slice(&scrambled);
    if let Some(database) = &auth.database {
        out.extend_from_slice(database.as_bytes());
        out.push(0);
    }
    out.extend_from_slice(plugin.as_bytes());
    out.push(0);
    Ok(out)
}

fn password(auth: &ProbeAuth) -> &[u8] {
    auth.password.as_ref().map_or(&[], |p| p.0.as_bytes())
}

/// Follows the server's answers to the handshake until it says OK.
async fn log_in(
    link: &mut Link,
    greeting: &Greeting,
    auth: &ProbeAuth,
) -> Result<(), ProbeFailure> {
    let mut nonce = greeting.scramble.clone();
    loop {
        let packet = link.packet().await?;
        error(&packet)?;
        match packet.first() {
            Some(0x00) => return Ok(()),
            // AuthSwitchRequest: another plugin, a fresh scramble.
            Some(0xfe) => {
                let mut c = Cursor(&packet[1..]);
                let plugin = c.nul_str().ok_or_else(|| unexpected(&packet))?;
                let data = c.rest();
                nonce = data.strip_suffix(&[0]).unwrap_or(data).to_vec();
                if plugin != NATIVE && plugin != CACHING_SHA2 {
                    return Err(ProbeFailure::Refused(format!(
                        "the server asks for authentication plugin {plugin}: use {NATIVE} or {CACHING_SHA2} for the probe's user"
                    )));
                }
                link.send(&scramble(&plugin, password(auth), &nonce))
                    .await?;
            }
            // caching_sha2_password: 3 is "fast authentication passed" (an
            // OK follows), 4 is "send the password": encrypted with the
            // server's public key, which a 2 asks for.
            Some(0x01) => match packet.get(1) {
                Some(3) => {}
                Some(4) => link.send(&[0x02]).await?,
                Some(_) if packet[1..].starts_with(b"-----BEGIN") => {
                    let pem = String::from_utf8_lossy(&packet[1..]);
                    link.send(&encrypt(&pem, password(auth), &nonce)?).await?;
                }
                _ => return Err(unexpected(&packet)),
            },
            _ => return Err(unexpected(&packet)),
        }
    }
}

/// The role verdict: `read_only`, then Galera's state where there is one.
async fn judge(link: &mut Link, role: Role) -> Result<(), ProbeFailure> {
    let row = link.query("SELECT @@global.read_only").await?;
    let read_only = row.as_ref().and_then(|row| row.first()?.as_deref());
    let read_only = match read_only {
        Some("0" | "OFF") => false,
        Some("1" | "ON") => true,
        _ => return Err(ProbeFailure::Io(format!("@@read_only is {read_only:?}"))),
    };
    // No row where Galera is not running; a name and a value where it is.
    let wsrep = link
        .query("SHOW GLOBAL STATUS LIKE 'wsrep_local_state'")
        .await?;
    if let Some(row) = wsrep {
        let state = row.get(1).cloned().flatten();
        if state.as_deref() != Some("4") {
            return Err(ProbeFailure::Refused(format!(
                "Galera node not synced: wsrep_local_state={}",
                state.as_deref().unwrap_or("unknown")
            )));
        }
    }
    match (role, read_only) {
        (Role::Primary, true) => Err(ProbeFailure::Refused("read_only=1".into())),
        (Role::Replica, false) => Err(ProbeFailure::Refused("read_only=0 (a primary)".into())),
        _ => Ok(()),
    }
}

/// An ERR packet as the server's message.
fn error(packet: &[u8]) -> Result<(), ProbeFailure> {
    let [0xff, c0, c1, rest @ ..] = packet else {
        return Ok(());
    };
    let code = u16::from_le_bytes([*c0, *c1]);
    // Protocol 4.1 puts `#` and the SQL state first.
    let message = match rest {
        [b'#', _, _, _, _, _, message @ ..] => message,
        message => message,
    };
    Err(ProbeFailure::Refused(format!(
        "server error {code}: {}",
        String::from_utf8_lossy(message)
    )))
}

/// The password as `plugin` sends it, scrambled with `nonce`.
fn scramble(plugin: &str, password: &[u8], nonce: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    match plugin {
        // SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password)))
        NATIVE => {
            let once = Sha1::digest(password);
            let twice = Sha1::digest(once);
            let mask = Sha1::new()
                .chain_update(nonce)
                .chain_update(twice)
                .finalize();
            xor(&once, &mask)
        }
        // SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce)
        _ => {
            let once = Sha256::digest(password);
            let twice = Sha256::digest(once);
            let mask = Sha256::new()
                .chain_update(twice)
                .chain_update(nonce)
                .finalize();
            xor(&once, &mask)
        }
    }
}

/// The password, NUL-terminated and XORed with the nonce, encrypted with
/// the server's RSA public key (OAEP with SHA-1, as MySQL 8 expects).
fn encrypt(pem: &str, password: &[u8], nonce: &[u8]) -> Result<Vec<u8>, ProbeFailure> {
    let key = rsa::RsaPublicKey::from_public_key_pem(pem.trim_end_matches('\0'))
        .map_err(|e| ProbeFailure::Io(format!("the server's public key: {e}")))?;
    let mut plain = password.to_vec();
    plain.push(0);
    for (i, byte) in plain.iter_mut().enumerate() {
        *byte ^= nonce[i % nonce.len()];
    }
    key.encrypt(&mut rsa::rand_core::OsRng, rsa::Oaep::new::<Sha1>(), &plain)
        .map_err(|e| ProbeFailure::Io(format!("encrypting the password: {e}")))
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// Reads the protocol's field types off a packet.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = (self.0.get(..n)?, &self.0[n..]);
        self.0 = rest;
        Some(taken)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn nul_str(&mut self) -> Option<String> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let text = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Some(text)
    }

    /// A length-encoded integer.
    fn lenenc(&mut self) -> Option<u64> {
        let width = match self.byte()? {
            small @ 0..=0xfa => return Some(u64::from(small)),
            0xfc => 2,
            0xfd => 3,
            0xfe => 8,
            _ => return None,
        };
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(self.take(width)?);
        Some(u64::from_le_bytes(bytes))
    }

    fn lenenc_str(&mut self) -> Option<String> {
        let len = usize::try_from(self.lenenc()?).ok()?;
        Some(String::from_utf8_lossy(self.take(len)?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MariaDB 10.11's greeting, as captured on loopback.
    const GREETING: &[u8] = b"\x0a5.5.5-10.11.6-MariaDB-0+deb12u1\0\x1f\0\0\0\
        abcdefgh\0\xfe\xf7\x2d\x02\0\xff\x81\x15\0\0\0\0\0\0\x1d\0\0\0\
        ijklmnopqrst\0mysql_native_password\0";

    #[test]
    fn the_greeting_gives_the_scramble_and_the_plugin() {
        let greeting = Greeting::parse(GREETING).unwrap();
        assert_eq!(greeting.scramble, b"abcdefghijklmnopqrst");
        assert_eq!(greeting.plugin, NATIVE);
        assert_ne!(greeting.capabilities & CLIENT_PLUGIN_AUTH, 0);
        // Up to the capability flags, every field is needed.
        let flags_end = GREETING.iter().position(|&b| b == 0).unwrap() + 1 + 4 + 8 + 1 + 2;
        for end in 0..flags_end {
            assert!(Greeting::parse(&GREETING[..end]).is_err(), "{end}");
        }
        assert_eq!(
            Greeting::parse(b"\xff\x15\x04#28000Access denied"),
            Err(ProbeFailure::Refused(
                "server error 1045: Access denied".into()
            ))
        );
    }

    /// Known answers, from a server that accepted them: the native scramble
    /// of "secret" with the nonce above.
    #[test]
    fn scrambles() {
        let nonce = b"abcdefghijklmnopqrst";
        let native = scramble(NATIVE, b"secret", nonce);
        let once = Sha1::digest(b"secret");
        // XOR with the mask gives back SHA1(password): what the server
        // checks against SHA1(SHA1(password)).
        let mask = Sha1::new()
            .chain_update(nonce)
            .chain_update(Sha1::digest(once))
            .finalize();
        assert_eq!(xor(&native, &mask), once.to_vec());
        assert_eq!(native.len(), 20);
        assert_eq!(scramble(CACHING_SHA2, b"secret", nonce).len(), 32);
        assert!(scramble(NATIVE, b"", nonce).is_empty());
    }

    fn send(stream: &mut std::net::TcpStream, sequence: u8, payload: &[u8]) {
        use std::io::Write;
        let mut header = (payload.len() as u32).to_le_bytes();
        header[3] = sequence;
        stream.write_all(&[&header[..], payload].concat()).unwrap();
    }

    /// One packet: its sequence number and payload.
    fn receive(stream: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
        use std::io::Read;
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).unwrap();
        let mut payload =
            vec![0u8; u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize];
        stream.read_exact(&mut payload).unwrap();
        (header[3], payload)
    }

    /// A MySQL 8 server, played by a thread, that wants
    /// `caching_sha2_password` and has no cached hash: the probe sends the
    /// scramble, asks for the server's RSA key when told to, and sends the
    /// password encrypted with it. The server checks both.
    #[test]
    fn caching_sha2_full_authentication_with_the_servers_key() {
        use rsa::pkcs8::{EncodePublicKey, LineEnding};

        const NONCE: &[u8; 20] = b"abcdefghijklmnopqrst";
        const PASSWORD: &str = "pr0be secret";
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let pem = key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
            let (mut stream, _) = listener.accept().unwrap();
            let mut greeting = b"\x0a8.0.36\0\x01\0\0\0".to_vec();
            greeting.extend_from_slice(&NONCE[..8]);
            // Filler; PROTOCOL_41 | SECURE_CONNECTION; charset; status;
            // PLUGIN_AUTH; the scramble's length.
            greeting.extend_from_slice(&[0, 0x00, 0x82, 0xff, 0x02, 0x00, 0x08, 0x00, 21]);
            greeting.extend_from_slice(&[0; 10]);
            greeting.extend_from_slice(&NONCE[8..]);
            greeting.push(0);
            greeting.extend_from_slice(b"caching_sha2_password\0");
            send(&mut stream, 0, &greeting);

            let (sequence, response) = receive(&mut stream);
            assert_eq!(sequence, 1);
            let mut c = Cursor(&response[32..]);
            assert_eq!(c.nul_str().as_deref(), Some("probe"));
            let len = usize::from(c.byte().unwrap());
            let scrambled = c.take(len).unwrap().to_vec();
            assert_eq!(c.nul_str().as_deref(), Some(CACHING_SHA2));
            let mask = Sha256::new()
                .chain_update(Sha256::digest(Sha256::digest(PASSWORD)))
                .chain_update(NONCE)
                .finalize();
            assert_eq!(
                xor(&scrambled, &mask),
                Sha256::digest(PASSWORD).to_vec(),
                "the scramble"
            );

            // Not in the cache: "perform full authentication".
            send(&mut stream, 2, &[0x01, 4]);
            assert_eq!(receive(&mut stream), (3, vec![0x02]), "asks for the key");
            send(&mut stream, 4, &[&[0x01][..], pem.as_bytes()].concat());
            let (sequence, encrypted) = receive(&mut stream);
            assert_eq!(sequence, 5);
            let plain = key.decrypt(rsa::Oaep::new::<Sha1>(), &encrypted).unwrap();
            let expected: Vec<u8> = format!("{PASSWORD}\0")
                .bytes()
                .enumerate()
                .map(|(i, b)| b ^ NONCE[i % NONCE.len()])
                .collect();
            assert_eq!(plain, expected, "the password, XORed with the nonce");
            send(&mut stream, 6, &[0x00, 0, 0, 2, 0, 0, 0]);
            assert_eq!(receive(&mut stream), (0, vec![0x01]), "COM_QUIT");
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let auth = ProbeAuth {
            user: Some("probe".into()),
            password_file: None,
            database: None,
            password: Some(crate::config::schema::Secret(PASSWORD.into())),
        };
        let verdict = runtime.block_on(async {
            let (socket, _) = crate::net::connect(addr, std::time::Duration::ZERO)
                .await
                .unwrap();
            check(Wire::new(socket).unwrap(), Role::Any, &auth).await
        });
        assert_eq!(verdict, Ok(()));
        server.join().unwrap();
    }

    #[test]
    fn length_encoded_fields() {
        let mut c = Cursor(b"\x01\x31\xfc\x02\x01");
        assert_eq!(c.lenenc_str().as_deref(), Some("1"));
        assert_eq!(c.lenenc(), Some(0x0102));
        assert_eq!(Cursor(b"\xfd\x01").lenenc(), None);
    }
}
