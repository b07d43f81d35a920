//! Hand-written wire bytes (docs/PROTOCOL.md), written out here rather than
//! taken from `tether_proto`, so that a test sends exactly what an attacker
//! would and a change of encoder cannot silently change the attack.

/// ClientHello magic, `ROCH`.
pub(crate) const CLIENT_MAGIC: [u8; 4] = *b"ROCH";
/// ServerHello magic, `ROSH`.
pub(crate) const SERVER_MAGIC: [u8; 4] = *b"ROSH";
/// Both hellos of the base format are exactly this long.
pub(crate) const HELLO_LEN: usize = 25;

/// ClientHello flag: a resume key is present.
pub(crate) const CLIENT_RESUME: u8 = 0x01;
/// ClientHello flag: the last-received field is valid.
pub(crate) const CLIENT_LAST_RECEIVED: u8 = 0x02;
/// ServerHello flag: refused (unknown key, or with `ADMISSION` a typed
/// refusal follows the 25 bytes).
pub(crate) const SERVER_REJECTED: u8 = 0x01;

/// Extension bits (PROTOCOL.md section 5, ISSUE10 for `ADMISSION`).
pub(crate) mod ext {
    /// Ack and window frames.
    pub(crate) const ACKS: u8 = 0x04;
    /// Ping and pong frames.
    pub(crate) const KEEPALIVE: u8 = 0x08;
    /// Typed refusals and a credential after the hello (issue 10).
    pub(crate) const ADMISSION: u8 = 0x40;
}

/// Control-frame tags (PROTOCOL.md 5.2).
pub(crate) mod tag {
    /// A data frame without a piggybacked ack.
    pub(crate) const DATA: u8 = 0x00;
    /// A data frame with a piggybacked ack (what a base-format peer sends).
    pub(crate) const DATA_ACK: u8 = 0x01;
    /// Ack frame.
    pub(crate) const ACK: u8 = 0x02;
    /// Pong frame.
    pub(crate) const PONG: u8 = 0x04;
    /// Window frame.
    pub(crate) const WINDOW: u8 = 0x06;
}

/// Appends `v` as a postcard varint (7 bits a byte, low group first).
pub(crate) fn varint(mut v: u32, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at the start of `b`: the value and its length.
pub(crate) fn read_varint(b: &[u8]) -> Option<(u32, usize)> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(5) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

/// A 25-byte ClientHello: magic, `flags`, `key`, `last` (LE).
pub(crate) fn client_hello(flags: u8, key: [u8; 16], last: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HELLO_LEN);
    h.extend_from_slice(&CLIENT_MAGIC);
    h.push(flags);
    h.extend_from_slice(&key);
    h.extend_from_slice(&last.to_le_bytes());
    h
}

/// A new-session ClientHello offering `extensions`.
pub(crate) fn new_session_hello(extensions: u8) -> Vec<u8> {
    client_hello(extensions, [0; 16], 0)
}

/// A resume ClientHello with `key`, `last` received if any.
pub(crate) fn resume_hello(key: [u8; 16], last: Option<u32>, extensions: u8) -> Vec<u8> {
    let mut flags = CLIENT_RESUME | extensions;
    if last.is_some() {
        flags |= CLIENT_LAST_RECEIVED;
    }
    client_hello(flags, key, last.unwrap_or(0))
}

/// `payload` behind its 4-byte little-endian length prefix.
pub(crate) fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A data frame, no ack: `seq`, tag `00`, then `item` as a postcard byte
/// string (varint length, bytes): what `tether echo` expects.
pub(crate) fn data_frame(seq: u32, item: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(item.len() + 12);
    varint(seq, &mut f);
    f.push(tag::DATA);
    varint(item.len() as u32, &mut f);
    f.extend_from_slice(item);
    f
}

/// A data frame whose item is not a postcard byte string: it announces
/// five bytes and has none (`Decode` error, the session survives).
pub(crate) fn undecodable_frame(seq: u32) -> Vec<u8> {
    let mut f = Vec::new();
    varint(seq, &mut f);
    f.push(tag::DATA);
    f.push(0x05);
    f
}

/// A control frame: seq 0, `tag`, then each value as a varint.
pub(crate) fn control(tag: u8, values: &[u32]) -> Vec<u8> {
    let mut f = vec![0x00, tag];
    for &v in values {
        varint(v, &mut f);
    }
    f
}

/// A window frame announcing `frames` and `bytes`.
pub(crate) fn window(frames: u32, bytes: u32) -> Vec<u8> {
    control(tag::WINDOW, &[frames, bytes])
}

/// A ServerHello as it came off the wire.
#[derive(Clone, Debug)]
pub(crate) struct ServerHelloRaw {
    pub(crate) flags: u8,
    pub(crate) key: [u8; 16],
    /// Bytes after the 25 (a typed refusal, with `ADMISSION`).
    pub(crate) extra: Vec<u8>,
}

impl ServerHelloRaw {
    /// Parses a ServerHello payload.
    pub(crate) fn parse(p: &[u8]) -> Result<ServerHelloRaw, String> {
        if p.len() < HELLO_LEN {
            return Err(format!("server hello of {} bytes", p.len()));
        }
        if p[..4] != SERVER_MAGIC {
            return Err(format!("server hello magic {:02x?}", &p[..4]));
        }
        let flags = p[4];
        let mut key = [0; 16];
        key.copy_from_slice(&p[5..21]);
        Ok(ServerHelloRaw {
            flags,
            key,
            extra: p[HELLO_LEN..].to_vec(),
        })
    }

    /// The refused bit (plain reject, typed refusal, or "closed").
    pub(crate) fn rejected(&self) -> bool {
        self.flags & SERVER_REJECTED != 0
    }

    /// A typed refusal (ISSUE10): rejected, `ADMISSION`, a kind byte.
    pub(crate) fn refusal_kind(&self) -> Option<u8> {
        (self.rejected() && self.flags & ext::ADMISSION != 0)
            .then(|| self.extra.first().copied())
            .flatten()
    }

    /// The extensions the server turned on.
    pub(crate) fn extensions(&self) -> u8 {
        self.flags & 0xfc
    }
}

/// The tag byte of a frame from the server (after its seq varint), or
/// `None` if it is not even a header.
pub(crate) fn frame_tag(frame: &[u8]) -> Option<u8> {
    let (_, n) = read_varint(frame)?;
    frame.get(n).copied()
}
