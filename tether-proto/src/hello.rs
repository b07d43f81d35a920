//! The handshake hellos that open every link attachment of a stable conduit.
//!
//! Both hellos are exactly [`HELLO_LEN`] bytes with a fixed layout:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic ([`CLIENT_MAGIC`] or [`SERVER_MAGIC`]) |
//! | 4 | 1 | flags (see [`flags`]) |
//! | 5 | 16 | resume key (all zero when absent) |
//! | 21 | 4 | last received seq, u32 little-endian (0 when absent) |

use crate::{ResumeKey, Seq};

/// Size of a [`ClientHello`] or [`ServerHello`] on the wire, in bytes.
pub const HELLO_LEN: usize = 25;

/// Magic bytes that open a [`ClientHello`]: ASCII `ROCH`.
pub const CLIENT_MAGIC: [u8; 4] = *b"ROCH";

/// Magic bytes that open a [`ServerHello`]: ASCII `ROSH`.
pub const SERVER_MAGIC: [u8; 4] = *b"ROSH";

const FLAGS_AT: usize = 4;
const KEY_AT: usize = 5;
const LAST_AT: usize = KEY_AT + ResumeKey::LEN;

/// Bits of the hello flags byte (offset 4).
pub mod flags {
    /// ClientHello: a resume key is present; this is a resume.
    pub const CLIENT_RESUME: u8 = 0x01;
    /// ClientHello: the last-received field is valid.
    pub const CLIENT_LAST_RECEIVED: u8 = 0x02;
    /// ServerHello: the resume was rejected (unknown or expired key); the
    /// session is lost.
    pub const SERVER_REJECTED: u8 = 0x01;
    /// ServerHello: the last-received field is valid.
    pub const SERVER_LAST_RECEIVED: u8 = 0x02;
    /// Reserved bits, kept for negotiated extensions. Decoding keeps them
    /// as they came; the caller intersects them with what it supports.
    pub const EXTENSION_MASK: u8 = 0xFC;
}

/// The hello a client sends first on every new link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The key of the session to resume, or `None` to open a new session.
    pub resume_key: Option<ResumeKey>,
    /// The seq of the last frame the client received from the server, if any.
    pub last_received: Option<Seq>,
    /// Extension bits (only bits in [`flags::EXTENSION_MASK`] are encoded).
    pub extensions: u8,
}

/// The hello a server answers a [`ClientHello`] with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerHello {
    /// The resume was refused: the key is unknown or expired.
    pub rejected: bool,
    /// A fresh key, for the client's next resume.
    pub resume_key: ResumeKey,
    /// The seq of the last frame the server received from the client, if any.
    pub last_received: Option<Seq>,
    /// Extension bits the server accepts (only bits in
    /// [`flags::EXTENSION_MASK`] are encoded).
    pub extensions: u8,
}

/// Most bytes of a [`Refusal`]'s reason on the wire.
pub const MAX_REASON_LEN: usize = 256;

/// Why a server refused a new session, in the typed form that follows a
/// rejected ServerHello for clients that offered
/// [`ADMISSION`](crate::ext::ADMISSION).
///
/// On the wire: the 25 bytes of [`ServerHello::reject`] with the admission
/// bit set (flags `0x41`), then `kind` (one byte), `retry_after_ms` (u32
/// little-endian) and the reason as UTF-8 (the rest of the payload, at most
/// [`MAX_REASON_LEN`] bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What kind of refusal.
    pub kind: RefusalKind,
    /// For [`RefusalKind::Busy`]: the least the client should wait before
    /// it tries again, in milliseconds (0: no hint).
    pub retry_after_ms: u32,
    /// A short human-readable reason.
    pub reason: String,
}

/// The kinds of [`Refusal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalKind {
    /// `01`: the server is at capacity (sessions, handshakes, memory); try
    /// again later.
    Busy,
    /// `02`: the application's authorization refused this client.
    Denied,
    /// `03`: the client lacks something the server requires (for example
    /// keepalive).
    Policy,
    /// `04`, to a resume: the session never started. The server dropped it
    /// because the client never proved its key (no frame arrived after the
    /// ServerHello), so its application never saw it and nothing the client
    /// sent was delivered. The client opens a new session and sends
    /// everything again.
    Restart,
    /// A kind this implementation does not know.
    Other(u8),
}

impl RefusalKind {
    /// The kind's byte on the wire.
    #[must_use]
    pub fn to_byte(self) -> u8 {
        match self {
            RefusalKind::Busy => 1,
            RefusalKind::Denied => 2,
            RefusalKind::Policy => 3,
            RefusalKind::Restart => 4,
            RefusalKind::Other(b) => b,
        }
    }

    /// The kind a wire byte stands for.
    #[must_use]
    pub fn from_byte(b: u8) -> RefusalKind {
        match b {
            1 => RefusalKind::Busy,
            2 => RefusalKind::Denied,
            3 => RefusalKind::Policy,
            4 => RefusalKind::Restart,
            b => RefusalKind::Other(b),
        }
    }
}

/// The fixed part of a refusal after the 25 hello bytes: kind and retry hint.
const REFUSAL_FIXED: usize = 5;

impl Refusal {
    /// The whole payload: the rejected ServerHello with the admission bit,
    /// then the refusal. A reason longer than [`MAX_REASON_LEN`] bytes is
    /// cut at a character boundary.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let hello = ServerHello {
            extensions: crate::ext::ADMISSION,
            ..ServerHello::reject()
        };
        let mut reason = self.reason.as_str();
        while reason.len() > MAX_REASON_LEN {
            let mut cut = MAX_REASON_LEN;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason = &reason[..cut];
        }
        let mut out = Vec::with_capacity(HELLO_LEN + REFUSAL_FIXED + reason.len());
        out.extend_from_slice(&hello.encode());
        out.push(self.kind.to_byte());
        out.extend_from_slice(&self.retry_after_ms.to_le_bytes());
        out.extend_from_slice(reason.as_bytes());
        out
    }

    /// Parses a refusal payload: a rejected ServerHello with the admission
    /// bit, followed by the refusal.
    pub fn decode(bytes: &[u8]) -> Result<Refusal, HelloError> {
        let min = HELLO_LEN + REFUSAL_FIXED;
        if bytes.len() < min || bytes.len() > min + MAX_REASON_LEN {
            return Err(HelloError::WrongSize {
                expected: min,
                got: bytes.len(),
            });
        }
        let hello = ServerHello::decode(&bytes[..HELLO_LEN])?;
        if !hello.rejected || hello.extensions & crate::ext::ADMISSION == 0 {
            return Err(HelloError::NotARefusal);
        }
        let rest = &bytes[HELLO_LEN..];
        let mut retry = [0u8; 4];
        retry.copy_from_slice(&rest[1..REFUSAL_FIXED]);
        let reason = std::str::from_utf8(&rest[REFUSAL_FIXED..])
            .map_err(|_| HelloError::NotARefusal)?
            .to_string();
        Ok(Refusal {
            kind: RefusalKind::from_byte(rest[0]),
            retry_after_ms: u32::from_le_bytes(retry),
            reason,
        })
    }
}

/// A hello could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HelloError {
    /// The payload is not exactly [`HELLO_LEN`] bytes long.
    #[error("hello has the wrong size: expected {expected} bytes, got {got}")]
    WrongSize {
        /// The size a hello must have.
        expected: usize,
        /// The size of the payload received.
        got: usize,
    },
    /// The payload does not start with the expected magic.
    #[error(
        "hello has bad magic: expected {}, got {}",
        show_magic(expected),
        show_magic(got)
    )]
    BadMagic {
        /// The magic this hello must start with.
        expected: [u8; 4],
        /// The first four bytes received.
        got: [u8; 4],
    },
    /// A payload longer than a ServerHello that is not a well-formed
    /// [`Refusal`] (not rejected, no admission bit, or a reason that is not
    /// UTF-8).
    #[error("server hello has trailing bytes but is not a well-formed refusal")]
    NotARefusal,
    /// A ClientHello longer than 25 bytes without the admission bit: only
    /// [`ADMISSION`](crate::ext::ADMISSION) allows a credential after it.
    #[error("client hello carries {len} bytes after the hello without the admission bit")]
    UnexpectedCredential {
        /// Bytes after the 25 hello bytes.
        len: usize,
    },
}

/// `"ROCH" (52 4f 43 48)`: printable form and hex.
fn show_magic(magic: &[u8; 4]) -> String {
    format!(
        "\"{}\" ({:02x} {:02x} {:02x} {:02x})",
        magic.escape_ascii(),
        magic[0],
        magic[1],
        magic[2],
        magic[3]
    )
}

fn encode_hello(
    magic: [u8; 4],
    flags: u8,
    key: Option<&ResumeKey>,
    last: Option<Seq>,
) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..FLAGS_AT].copy_from_slice(&magic);
    out[FLAGS_AT] = flags;
    if let Some(key) = key {
        out[KEY_AT..LAST_AT].copy_from_slice(key.as_bytes());
    }
    if let Some(last) = last {
        out[LAST_AT..].copy_from_slice(&last.0.to_le_bytes());
    }
    out
}

/// Checks size then magic; returns (flags, key bytes, last-received bytes).
fn decode_hello(
    magic: [u8; 4],
    bytes: &[u8],
) -> Result<(u8, [u8; ResumeKey::LEN], u32), HelloError> {
    let bytes: &[u8; HELLO_LEN] = bytes.try_into().map_err(|_| HelloError::WrongSize {
        expected: HELLO_LEN,
        got: bytes.len(),
    })?;
    let mut got = [0u8; 4];
    got.copy_from_slice(&bytes[..FLAGS_AT]);
    if got != magic {
        return Err(HelloError::BadMagic {
            expected: magic,
            got,
        });
    }
    let mut key = [0u8; ResumeKey::LEN];
    key.copy_from_slice(&bytes[KEY_AT..LAST_AT]);
    let mut last = [0u8; 4];
    last.copy_from_slice(&bytes[LAST_AT..]);
    Ok((bytes[FLAGS_AT], key, u32::from_le_bytes(last)))
}

impl ClientHello {
    /// The 25 wire bytes of this hello.
    #[must_use]
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut f = self.extensions & flags::EXTENSION_MASK;
        if self.resume_key.is_some() {
            f |= flags::CLIENT_RESUME;
        }
        if self.last_received.is_some() {
            f |= flags::CLIENT_LAST_RECEIVED;
        }
        encode_hello(
            CLIENT_MAGIC,
            f,
            self.resume_key.as_ref(),
            self.last_received,
        )
    }

    /// Parses a ClientHello payload. The size is checked before the magic.
    /// The key bytes are ignored unless [`flags::CLIENT_RESUME`] is set, the
    /// last-received field unless [`flags::CLIENT_LAST_RECEIVED`] is set.
    pub fn decode(bytes: &[u8]) -> Result<ClientHello, HelloError> {
        let (f, key, last) = decode_hello(CLIENT_MAGIC, bytes)?;
        Ok(ClientHello {
            resume_key: (f & flags::CLIENT_RESUME != 0).then(|| ResumeKey::from_bytes(key)),
            last_received: (f & flags::CLIENT_LAST_RECEIVED != 0).then_some(Seq(last)),
            extensions: f & flags::EXTENSION_MASK,
        })
    }
}

impl ClientHello {
    /// The hello followed by `credential`, with the admission bit set: for a
    /// server that admits clients by credential.
    #[must_use]
    pub fn encode_with_credential(&self, credential: &[u8]) -> Vec<u8> {
        let hello = ClientHello {
            extensions: self.extensions | crate::ext::ADMISSION,
            ..*self
        };
        let mut out = Vec::with_capacity(HELLO_LEN + credential.len());
        out.extend_from_slice(&hello.encode());
        out.extend_from_slice(credential);
        out
    }

    /// Parses a ClientHello payload that may carry a credential: exactly 25
    /// bytes (no credential), or, with the admission bit, 25 bytes then the
    /// credential. The caller bounds the payload's size before reading it.
    pub fn decode_with_credential(bytes: &[u8]) -> Result<(ClientHello, &[u8]), HelloError> {
        if bytes.len() < HELLO_LEN {
            return Err(HelloError::WrongSize {
                expected: HELLO_LEN,
                got: bytes.len(),
            });
        }
        let (head, credential) = bytes.split_at(HELLO_LEN);
        let hello = ClientHello::decode(head)?;
        if !credential.is_empty() && hello.extensions & crate::ext::ADMISSION == 0 {
            return Err(HelloError::UnexpectedCredential {
                len: credential.len(),
            });
        }
        Ok((hello, credential))
    }
}

impl ServerHello {
    /// The 25 wire bytes of this hello.
    #[must_use]
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut f = self.extensions & flags::EXTENSION_MASK;
        if self.rejected {
            f |= flags::SERVER_REJECTED;
        }
        if self.last_received.is_some() {
            f |= flags::SERVER_LAST_RECEIVED;
        }
        encode_hello(SERVER_MAGIC, f, Some(&self.resume_key), self.last_received)
    }

    /// Parses a ServerHello payload. The size is checked before the magic.
    /// The last-received field is ignored unless
    /// [`flags::SERVER_LAST_RECEIVED`] is set.
    pub fn decode(bytes: &[u8]) -> Result<ServerHello, HelloError> {
        let (f, key, last) = decode_hello(SERVER_MAGIC, bytes)?;
        Ok(ServerHello {
            rejected: f & flags::SERVER_REJECTED != 0,
            resume_key: ResumeKey::from_bytes(key),
            last_received: (f & flags::SERVER_LAST_RECEIVED != 0).then_some(Seq(last)),
            extensions: f & flags::EXTENSION_MASK,
        })
    }

    /// The answer to a resume whose key is unknown or expired: rejected, an
    /// all-zero key, no last received, no extensions.
    #[must_use]
    pub fn reject() -> ServerHello {
        ServerHello {
            rejected: true,
            resume_key: ResumeKey::from_bytes([0; ResumeKey::LEN]),
            last_received: None,
            extensions: 0,
        }
    }

    /// The answer to a resume of a session whose close already completed
    /// (tether's close handshake, [`crate::ext::CLOSE`]): the rejected flag
    /// with the close bit, an all-zero key, no last received. A client that
    /// offered the close extension reads it as "closed"
    /// ([`is_closed`](Self::is_closed)); any other reads it as a rejection.
    #[must_use]
    pub fn closed() -> ServerHello {
        ServerHello {
            extensions: crate::ext::CLOSE,
            ..ServerHello::reject()
        }
    }

    /// Whether this is the [`closed`](Self::closed) answer.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.rejected && self.extensions & crate::ext::CLOSE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a hex string with optional whitespace.
    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn seq_key(start: u8) -> ResumeKey {
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = start + i as u8;
        }
        ResumeKey::from_bytes(bytes)
    }

    // Vectors shared with docs/PROTOCOL.md ("Test vectors").
    const NEW_CLIENT_HEX: &str = "52 4f 43 48 00
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        00 00 00 00";
    const RESUME_CLIENT_HEX: &str = "52 4f 43 48 03
        10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f
        e8 03 00 00";
    const SERVER_HEX: &str = "52 4f 53 48 02
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af
        05 00 00 00";
    const REJECT_HEX: &str = "52 4f 53 48 01
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        00 00 00 00";

    #[test]
    fn client_hello_new_session_vector() {
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: 0,
        };
        let bytes = unhex(NEW_CLIENT_HEX);
        assert_eq!(bytes.len(), HELLO_LEN);
        assert_eq!(hello.encode().as_slice(), bytes.as_slice());
        assert_eq!(ClientHello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn client_hello_resume_vector() {
        let hello = ClientHello {
            resume_key: Some(seq_key(0x10)),
            last_received: Some(Seq(1000)),
            extensions: 0,
        };
        let bytes = unhex(RESUME_CLIENT_HEX);
        assert_eq!(hello.encode().as_slice(), bytes.as_slice());
        assert_eq!(ClientHello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn server_hello_vector() {
        let hello = ServerHello {
            rejected: false,
            resume_key: seq_key(0xa0),
            last_received: Some(Seq(5)),
            extensions: 0,
        };
        let bytes = unhex(SERVER_HEX);
        assert_eq!(hello.encode().as_slice(), bytes.as_slice());
        assert_eq!(ServerHello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn server_hello_reject_vector() {
        let bytes = unhex(REJECT_HEX);
        assert_eq!(ServerHello::reject().encode().as_slice(), bytes.as_slice());
        let decoded = ServerHello::decode(&bytes).unwrap();
        assert_eq!(decoded, ServerHello::reject());
        assert!(decoded.rejected);
        assert_eq!(decoded.resume_key.as_bytes(), &[0u8; 16]);
        assert_eq!(decoded.last_received, None);
        assert_eq!(decoded.extensions, 0);
    }

    #[test]
    fn server_hello_closed_vector() {
        let bytes =
            unhex("52 4f 53 48 11 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00");
        assert_eq!(ServerHello::closed().encode().as_slice(), bytes.as_slice());
        let decoded = ServerHello::decode(&bytes).unwrap();
        assert!(decoded.rejected && decoded.is_closed());
        assert!(!ServerHello::reject().is_closed());
    }

    #[test]
    fn refusal_vector() {
        // Busy, retry after 1500 ms (dc 05 00 00), reason "full".
        let bytes = unhex(
            "52 4f 53 48 41 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
             01 dc 05 00 00 66 75 6c 6c",
        );
        let refusal = Refusal {
            kind: RefusalKind::Busy,
            retry_after_ms: 1500,
            reason: "full".into(),
        };
        assert_eq!(refusal.encode(), bytes);
        assert_eq!(Refusal::decode(&bytes), Ok(refusal));
        // A base-format reader sees a rejection of the wrong size, never a
        // valid hello; the 25-byte head alone is a plain rejection.
        assert!(ServerHello::decode(&bytes).is_err());
        assert!(ServerHello::decode(&bytes[..HELLO_LEN]).unwrap().rejected);
        // A plain reject is not a refusal; a reason that is not UTF-8 is
        // malformed; a reason too long is cut to MAX_REASON_LEN.
        assert!(Refusal::decode(&ServerHello::reject().encode()).is_err());
        let mut bad = bytes.clone();
        bad.push(0xff);
        assert_eq!(Refusal::decode(&bad), Err(HelloError::NotARefusal));
        let long = Refusal {
            kind: RefusalKind::Denied,
            retry_after_ms: 0,
            reason: "é".repeat(MAX_REASON_LEN),
        };
        let decoded = Refusal::decode(&long.encode()).unwrap();
        assert!(decoded.reason.len() <= MAX_REASON_LEN);
        assert_eq!(decoded.kind, RefusalKind::Denied);
    }

    #[test]
    fn client_hello_with_credential_vector() {
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: crate::ext::ACKS,
        };
        let bytes = unhex(
            "52 4f 43 48 44 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
             74 6f 6b",
        );
        assert_eq!(hello.encode_with_credential(b"tok"), bytes);
        let (decoded, credential) = ClientHello::decode_with_credential(&bytes).unwrap();
        assert_eq!(decoded.extensions, crate::ext::ACKS | crate::ext::ADMISSION);
        assert_eq!(credential, b"tok");
        // Without the admission bit, trailing bytes are refused.
        let mut plain = hello.encode().to_vec();
        plain.push(0);
        assert_eq!(
            ClientHello::decode_with_credential(&plain),
            Err(HelloError::UnexpectedCredential { len: 1 })
        );
        let bare = hello.encode();
        let (_, none) = ClientHello::decode_with_credential(&bare).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn hello_on_stream_link() {
        // Stream links prefix each payload with its length, u32 little-endian:
        // 25 = 0x19.
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: 0,
        }
        .encode();
        let mut linked = (hello.len() as u32).to_le_bytes().to_vec();
        linked.extend_from_slice(&hello);
        assert_eq!(&linked[..4], &[0x19, 0x00, 0x00, 0x00]);
        assert_eq!(&linked[4..], unhex(NEW_CLIENT_HEX).as_slice());
    }

    #[test]
    fn last_received_zero_is_distinct_from_absent() {
        let with_zero = ClientHello {
            resume_key: None,
            last_received: Some(Seq(0)),
            extensions: 0,
        };
        let bytes = with_zero.encode();
        assert_eq!(bytes[4], flags::CLIENT_LAST_RECEIVED);
        assert_eq!(
            ClientHello::decode(&bytes).unwrap().last_received,
            Some(Seq(0))
        );
    }

    #[test]
    fn wrong_size() {
        for len in [0usize, 24, 26] {
            let bytes = vec![0u8; len];
            let expected = HelloError::WrongSize {
                expected: HELLO_LEN,
                got: len,
            };
            assert_eq!(ClientHello::decode(&bytes), Err(expected.clone()));
            assert_eq!(ServerHello::decode(&bytes), Err(expected));
        }
        // Size is checked before magic: a 24-byte prefix of a valid hello
        // and a 26-byte garbage payload both report the size.
        let good = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: 0,
        }
        .encode();
        assert!(matches!(
            ClientHello::decode(&good[..24]),
            Err(HelloError::WrongSize { got: 24, .. })
        ));
        assert!(matches!(
            ClientHello::decode(&[0xff; 26]),
            Err(HelloError::WrongSize { got: 26, .. })
        ));
    }

    #[test]
    fn bad_magic() {
        let server = ServerHello::reject().encode();
        assert_eq!(
            ClientHello::decode(&server),
            Err(HelloError::BadMagic {
                expected: CLIENT_MAGIC,
                got: SERVER_MAGIC
            })
        );
        let client = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: 0,
        }
        .encode();
        assert_eq!(
            ServerHello::decode(&client),
            Err(HelloError::BadMagic {
                expected: SERVER_MAGIC,
                got: CLIENT_MAGIC
            })
        );
        let mut garbage = [0u8; HELLO_LEN];
        garbage[..4].copy_from_slice(b"GET ");
        assert_eq!(
            ClientHello::decode(&garbage),
            Err(HelloError::BadMagic {
                expected: CLIENT_MAGIC,
                got: *b"GET "
            })
        );
    }

    #[test]
    fn error_messages_are_concrete() {
        let size = HelloError::WrongSize {
            expected: 25,
            got: 24,
        };
        assert_eq!(
            size.to_string(),
            "hello has the wrong size: expected 25 bytes, got 24"
        );
        let magic = HelloError::BadMagic {
            expected: CLIENT_MAGIC,
            got: [0x52, 0x4f, 0x53, 0x00],
        };
        assert_eq!(
            magic.to_string(),
            "hello has bad magic: expected \"ROCH\" (52 4f 43 48), got \"ROS\\x00\" (52 4f 53 00)"
        );
    }

    #[test]
    fn unknown_flag_bits_are_kept() {
        let mut bytes = unhex(RESUME_CLIENT_HEX);
        bytes[4] |= 0xA4;
        let hello = ClientHello::decode(&bytes).unwrap();
        assert_eq!(hello.extensions, 0xA4);
        assert_eq!(hello.resume_key, Some(seq_key(0x10)));
        assert_eq!(hello.last_received, Some(Seq(1000)));
        assert_eq!(hello.encode().as_slice(), bytes.as_slice());

        let mut bytes = unhex(SERVER_HEX);
        bytes[4] |= 0xFC;
        let hello = ServerHello::decode(&bytes).unwrap();
        assert_eq!(hello.extensions, 0xFC);
        assert!(!hello.rejected);
        assert_eq!(hello.encode().as_slice(), bytes.as_slice());
    }

    #[test]
    fn encode_masks_extensions() {
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: 0xFF,
        };
        let bytes = hello.encode();
        assert_eq!(bytes[4], 0xFC);
        let decoded = ClientHello::decode(&bytes).unwrap();
        assert_eq!(decoded.resume_key, None);
        assert_eq!(decoded.last_received, None);
        assert_eq!(decoded.extensions, 0xFC);

        let server = ServerHello {
            rejected: false,
            resume_key: seq_key(1),
            last_received: None,
            extensions: 0x03,
        };
        assert_eq!(server.encode()[4], 0x00);
    }

    #[test]
    fn absent_fields_ignore_their_bytes() {
        // Key and last-received bytes present but their flags clear.
        let mut bytes = unhex(RESUME_CLIENT_HEX);
        bytes[4] = 0;
        let hello = ClientHello::decode(&bytes).unwrap();
        assert_eq!(hello.resume_key, None);
        assert_eq!(hello.last_received, None);

        let mut bytes = unhex(SERVER_HEX);
        bytes[4] = 0;
        let hello = ServerHello::decode(&bytes).unwrap();
        assert_eq!(hello.last_received, None);
        assert_eq!(hello.resume_key, seq_key(0xa0));
    }
}
