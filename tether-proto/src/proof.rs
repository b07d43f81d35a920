//! Proof-of-possession resume (extension [`PROOF`](crate::ext::PROOF)).
//!
//! With the bearer resume key of the base format, anyone who sees one resume
//! hello can resume the session in the client's place. With `PROOF`, the
//! 16-byte key field of the hellos carries a public [`SessionId`] instead,
//! and the client proves that it holds a [`ResumeSecret`] that never crosses
//! the wire:
//!
//! - **New session.** The server appends `01 ‖ S_pub` (a fresh X25519
//!   public key) to its ServerHello ([`ServerNew`]); the client's first
//!   payload after the hellos is its key share `01 ‖ C_pub`
//!   ([`ClientNew`]). Both derive secret₁ from the X25519 shared secret and
//!   a hash of the three payloads ([`new_session_secret`]).
//! - **Resume.** The client sends its ClientHello (key field = session id)
//!   followed by `01 ‖ counter ‖ C_pub ‖ mac_c`, MAC'd with its current
//!   secret `k` ([`ClientResume`], [`ResumeRequest`]); the server answers
//!   its ServerHello followed by `01 ‖ S_pub ‖ mac_s` ([`ServerResume`]),
//!   and both derive the next secret `k'` from `k` and a fresh X25519
//!   exchange ([`resume_secret`]).
//!
//! Layouts, the key schedule and test vectors are in `docs/PROTOCOL.md`,
//! section 5.9. Everything here is sans-IO; the deterministic constructors
//! ([`Ephemeral::from_private`], [`ResumeSecret::from_bytes`]) exist for
//! test vectors.

use core::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::hello::{flags, ClientHello, HelloError, ServerHello, HELLO_LEN};
use crate::{ext, KeyError, ResumeKey, Seq};

/// The version byte of the construction, after each hello.
pub const VERSION: u8 = 1;
/// Length of an X25519 public key.
pub const PUBLIC_LEN: usize = 32;
/// Length of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// A new session's ServerHello payload: hello, version, `S_pub`.
pub const SERVER_OFFER_LEN: usize = HELLO_LEN + 1 + PUBLIC_LEN;
/// The client's key share: version, `C_pub`.
pub const KEY_SHARE_LEN: usize = 1 + PUBLIC_LEN;
/// A resume request: hello, version, counter (u64 LE), `C_pub`, `mac_c`.
pub const RESUME_REQUEST_LEN: usize = HELLO_LEN + 1 + 8 + PUBLIC_LEN + MAC_LEN;
/// A resume reply: hello, version, `S_pub`, `mac_s`.
pub const RESUME_REPLY_LEN: usize = HELLO_LEN + 1 + PUBLIC_LEN + MAC_LEN;

/// HKDF salt of secret₁ is SHA-256 of this label.
pub const SALT_LABEL: &[u8] = b"tether pop v1";
/// HKDF info prefix of secret₁.
pub const INFO_NEW: &[u8] = b"tether new";
/// HKDF info prefix of a resumed secret.
pub const INFO_RESUME: &[u8] = b"tether resume";
/// HMAC prefix of the client's resume MAC.
pub const LABEL_CLIENT: &[u8] = b"tether client resume";
/// HMAC prefix of the server's resume MAC.
pub const LABEL_SERVER: &[u8] = b"tether server resume";

type HmacSha256 = Hmac<Sha256>;

/// Something in a proof-of-possession handshake was wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// The payload does not have the size its layout prescribes.
    #[error("proof payload has the wrong size: expected {expected} bytes, got {got}")]
    WrongSize {
        /// The size the payload must have.
        expected: usize,
        /// The size received.
        got: usize,
    },
    /// The version byte is not [`VERSION`].
    #[error("unknown proof construction version {0}")]
    Version(u8),
    /// The hello at the start of the payload is malformed.
    #[error("bad hello in proof payload: {0}")]
    Hello(#[from] HelloError),
    /// A resume request whose hello is not a resume with the `PROOF` bit.
    #[error("the hello is not a proof-of-possession resume")]
    NotAResume,
    /// The X25519 shared secret is all zero: the peer sent a low-order
    /// public key.
    #[error("the peer's public key is a low-order point")]
    LowOrder,
    /// A MAC did not verify.
    #[error("the proof did not verify")]
    BadMac,
}

/// The public identifier of a session with `PROOF`: what the key field of
/// its hellos carries. Constant for the session's life; not a secret.
///
/// Bytes 0..4 are the server's node id (u32 big-endian), bytes 4..16 are 96
/// random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A fresh id for a server with `node_id`, its 96 random bits from the
    /// operating system's random source.
    pub fn generate(node_id: u32) -> Result<SessionId, KeyError> {
        let mut bytes = [0u8; Self::LEN];
        bytes[..4].copy_from_slice(&node_id.to_be_bytes());
        getrandom::fill(&mut bytes[4..])?;
        Ok(SessionId(bytes))
    }

    /// An id with the given bytes (for example, as read from a hello).
    #[must_use]
    pub fn from_bytes(bytes: [u8; 16]) -> SessionId {
        SessionId(bytes)
    }

    /// The id's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The node id of the server that created the session.
    #[must_use]
    pub fn node_id(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The id as it travels in the key field of a hello.
    #[must_use]
    pub fn as_key(&self) -> ResumeKey {
        ResumeKey::from_bytes(self.0)
    }

    /// The id a hello's key field carries.
    #[must_use]
    pub fn from_key(key: &ResumeKey) -> SessionId {
        SessionId(*key.as_bytes())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A 32-byte resume secret: what a client proves it holds to resume. Never
/// sent. Zeroized on drop; `Debug` shows nothing of it; compared only in
/// constant time ([`ConstantTimeEq`]).
#[derive(Clone)]
pub struct ResumeSecret([u8; 32]);

impl ResumeSecret {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// A secret with the given bytes (test vectors).
    #[must_use]
    pub fn from_bytes(bytes: [u8; 32]) -> ResumeSecret {
        ResumeSecret(bytes)
    }

    /// The secret's bytes. For test vectors and tests only: the whole point
    /// of the secret is that it never leaves the process.
    #[must_use]
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

impl Drop for ResumeSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for ResumeSecret {}

impl ConstantTimeEq for ResumeSecret {
    fn ct_eq(&self, other: &ResumeSecret) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl fmt::Debug for ResumeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeSecret(…)")
    }
}

/// An X25519 ephemeral key pair, used for one handshake.
pub struct Ephemeral {
    secret: StaticSecret,
    public: PublicKey,
}

impl Ephemeral {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<Ephemeral, KeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut())?;
        Ok(Ephemeral::from_private(*bytes))
    }

    /// The key pair of a given private key (test vectors).
    #[must_use]
    pub fn from_private(private: [u8; 32]) -> Ephemeral {
        let secret = StaticSecret::from(private);
        let public = PublicKey::from(&secret);
        Ephemeral { secret, public }
    }

    /// The public key.
    #[must_use]
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The X25519 shared secret with `peer`; an all-zero result (a
    /// low-order public key) is refused.
    pub fn agree(&self, peer: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, ProofError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        let bytes = Zeroizing::new(shared.to_bytes());
        if bool::from(bytes.ct_eq(&[0u8; 32])) {
            return Err(ProofError::LowOrder);
        }
        Ok(bytes)
    }
}

impl fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ephemeral")
            .field("public", &self.public.as_bytes())
            .finish_non_exhaustive()
    }
}

fn hkdf_32(salt: &[u8], ikm: &[u8], label: &[u8], transcript: &[&[u8]]) -> ResumeSecret {
    let mut h = Sha256::new();
    for part in transcript {
        h.update(part);
    }
    let digest = h.finalize();
    let mut info = Vec::with_capacity(label.len() + digest.len());
    info.extend_from_slice(label);
    info.extend_from_slice(&digest);
    let mut okm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    let secret = ResumeSecret(okm);
    okm.zeroize();
    secret
}

/// secret₁ of a new session: HKDF-SHA256 with salt SHA-256("tether pop
/// v1"), ikm the X25519 shared secret, info "tether new" ‖
/// SHA-256(ClientHello payload ‖ ServerHello payload ‖ key-share payload).
#[must_use]
pub fn new_session_secret(
    shared: &[u8; 32],
    client_hello: &[u8],
    server_offer: &[u8],
    key_share: &[u8],
) -> ResumeSecret {
    let salt = Sha256::digest(SALT_LABEL);
    hkdf_32(
        &salt,
        shared,
        INFO_NEW,
        &[client_hello, server_offer, key_share],
    )
}

/// The secret after a resume: HKDF-SHA256 with salt the previous secret,
/// ikm the X25519 shared secret of the two fresh ephemerals, info "tether
/// resume" ‖ SHA-256(client payload ‖ server payload).
#[must_use]
pub fn resume_secret(
    previous: &ResumeSecret,
    shared: &[u8; 32],
    request: &[u8],
    reply: &[u8],
) -> ResumeSecret {
    hkdf_32(&previous.0, shared, INFO_RESUME, &[request, reply])
}

fn check_len(bytes: &[u8], expected: usize) -> Result<(), ProofError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(ProofError::WrongSize {
            expected,
            got: bytes.len(),
        })
    }
}

fn check_version(b: u8) -> Result<(), ProofError> {
    if b == VERSION {
        Ok(())
    } else {
        Err(ProofError::Version(b))
    }
}

fn array32(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(bytes);
    out
}

/// The key share, the client's first payload after the hellos of a new
/// session: `01 ‖ C_pub`.
#[must_use]
pub fn encode_key_share(public: &[u8; 32]) -> [u8; KEY_SHARE_LEN] {
    let mut out = [0u8; KEY_SHARE_LEN];
    out[0] = VERSION;
    out[1..].copy_from_slice(public);
    out
}

/// Parses a key share; returns `C_pub`.
pub fn decode_key_share(bytes: &[u8]) -> Result<[u8; 32], ProofError> {
    check_len(bytes, KEY_SHARE_LEN)?;
    check_version(bytes[0])?;
    Ok(array32(&bytes[1..]))
}

/// A new session's ServerHello payload: the hello, then `01 ‖ S_pub`.
#[must_use]
pub fn encode_server_offer(hello: &ServerHello, public: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SERVER_OFFER_LEN);
    out.extend_from_slice(&hello.encode());
    out.push(VERSION);
    out.extend_from_slice(public);
    out
}

/// Parses a new session's ServerHello payload: the hello and `S_pub`.
pub fn decode_server_offer(bytes: &[u8]) -> Result<(ServerHello, [u8; 32]), ProofError> {
    check_len(bytes, SERVER_OFFER_LEN)?;
    let hello = ServerHello::decode(&bytes[..HELLO_LEN])?;
    check_version(bytes[HELLO_LEN])?;
    Ok((hello, array32(&bytes[HELLO_LEN + 1..])))
}

/// The server's side of a new session with `PROOF`.
#[derive(Debug)]
pub struct ServerNew {
    client_hello: Vec<u8>,
    offer: Vec<u8>,
    eph: Ephemeral,
}

impl ServerNew {
    /// Answers `client_hello` (the whole payload, credential included) with
    /// `hello` and a fresh public key from `eph`.
    #[must_use]
    pub fn new(client_hello: &[u8], hello: &ServerHello, eph: Ephemeral) -> ServerNew {
        let offer = encode_server_offer(hello, &eph.public());
        ServerNew {
            client_hello: client_hello.to_vec(),
            offer,
            eph,
        }
    }

    /// The ServerHello payload to send.
    #[must_use]
    pub fn offer(&self) -> &[u8] {
        &self.offer
    }

    /// secret₁, from the client's key share.
    pub fn finish(self, key_share: &[u8]) -> Result<ResumeSecret, ProofError> {
        let peer = decode_key_share(key_share)?;
        let shared = self.eph.agree(&peer)?;
        Ok(new_session_secret(
            &shared,
            &self.client_hello,
            &self.offer,
            key_share,
        ))
    }
}

/// The client's side of a new session with `PROOF`.
#[derive(Debug)]
pub struct ClientNew {
    client_hello: Vec<u8>,
    eph: Ephemeral,
}

/// What the client has once a new session's ServerHello arrived.
#[derive(Debug)]
pub struct NewSession {
    /// The server's hello.
    pub hello: ServerHello,
    /// The session's id (the hello's key field).
    pub session_id: SessionId,
    /// The payload to send first, before any frame.
    pub key_share: [u8; KEY_SHARE_LEN],
    /// secret₁.
    pub secret: ResumeSecret,
}

impl ClientNew {
    /// A new session's handshake, whose ClientHello payload (credential
    /// included) is `client_hello`.
    #[must_use]
    pub fn new(client_hello: &[u8], eph: Ephemeral) -> ClientNew {
        ClientNew {
            client_hello: client_hello.to_vec(),
            eph,
        }
    }

    /// Reads the server's offer; returns the key share to send and secret₁.
    pub fn finish(self, server_offer: &[u8]) -> Result<NewSession, ProofError> {
        let (hello, peer) = decode_server_offer(server_offer)?;
        let shared = self.eph.agree(&peer)?;
        let key_share = encode_key_share(&self.eph.public());
        let secret = new_session_secret(&shared, &self.client_hello, server_offer, &key_share);
        Ok(NewSession {
            session_id: SessionId::from_key(&hello.resume_key),
            hello,
            key_share,
            secret,
        })
    }
}

/// A decoded resume request: ClientHello (key field = session id) ‖ `01` ‖
/// counter (u64 LE) ‖ `C_pub` ‖ `mac_c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    /// The hello.
    pub hello: ClientHello,
    /// The session to resume.
    pub session_id: SessionId,
    /// The client's attempt counter.
    pub counter: u64,
    /// The client's fresh public key.
    pub public: [u8; 32],
    /// `mac_c`.
    pub mac: [u8; 32],
}

const MAC_C_AT: usize = RESUME_REQUEST_LEN - MAC_LEN;
const MAC_S_AT: usize = RESUME_REPLY_LEN - MAC_LEN;

impl ResumeRequest {
    /// Parses a resume request. Its hello must be a resume with the `PROOF`
    /// bit. The MAC is not checked ([`verify`](Self::verify) does).
    pub fn decode(bytes: &[u8]) -> Result<ResumeRequest, ProofError> {
        check_len(bytes, RESUME_REQUEST_LEN)?;
        let hello = ClientHello::decode(&bytes[..HELLO_LEN])?;
        let Some(key) = hello.resume_key else {
            return Err(ProofError::NotAResume);
        };
        if hello.extensions & ext::PROOF == 0 {
            return Err(ProofError::NotAResume);
        }
        check_version(bytes[HELLO_LEN])?;
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&bytes[HELLO_LEN + 1..HELLO_LEN + 9]);
        Ok(ResumeRequest {
            hello,
            session_id: SessionId::from_key(&key),
            counter: u64::from_le_bytes(counter),
            public: array32(&bytes[HELLO_LEN + 9..MAC_C_AT]),
            mac: array32(&bytes[MAC_C_AT..]),
        })
    }

    /// Whether `payload` (the request's wire bytes) carries a valid
    /// `mac_c` for `secret`, checked in constant time.
    #[must_use]
    pub fn verify(payload: &[u8], secret: &ResumeSecret) -> bool {
        if payload.len() != RESUME_REQUEST_LEN {
            return false;
        }
        secret
            .mac()
            .chain_update(LABEL_CLIENT)
            .chain_update(&payload[..MAC_C_AT])
            .verify_slice(&payload[MAC_C_AT..])
            .is_ok()
    }
}

/// The client's side of a resume with `PROOF`.
#[derive(Debug)]
pub struct ClientResume {
    request: Vec<u8>,
    eph: Ephemeral,
    secret: ResumeSecret,
}

impl ClientResume {
    /// The request for session `id` with attempt `counter`, proven with
    /// `secret`. `last_received` and `extensions` are the hello's; the
    /// resume flag and the `PROOF` bit are set here.
    #[must_use]
    pub fn new(
        id: &SessionId,
        last_received: Option<Seq>,
        extensions: u8,
        counter: u64,
        eph: Ephemeral,
        secret: &ResumeSecret,
    ) -> ClientResume {
        let hello = ClientHello {
            resume_key: Some(id.as_key()),
            last_received,
            extensions: extensions | ext::PROOF,
        };
        let mut request = Vec::with_capacity(RESUME_REQUEST_LEN);
        request.extend_from_slice(&hello.encode());
        request.push(VERSION);
        request.extend_from_slice(&counter.to_le_bytes());
        request.extend_from_slice(&eph.public());
        let tag = secret
            .mac()
            .chain_update(LABEL_CLIENT)
            .chain_update(&request)
            .finalize()
            .into_bytes();
        request.extend_from_slice(&tag);
        ClientResume {
            request,
            eph,
            secret: secret.clone(),
        }
    }

    /// The payload to send.
    #[must_use]
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// Checks the server's reply (`mac_s` in constant time) and derives the
    /// next secret.
    pub fn finish(self, reply: &[u8]) -> Result<(ServerHello, ResumeSecret), ProofError> {
        check_len(reply, RESUME_REPLY_LEN)?;
        let hello = ServerHello::decode(&reply[..HELLO_LEN])?;
        check_version(reply[HELLO_LEN])?;
        self.secret
            .mac()
            .chain_update(LABEL_SERVER)
            .chain_update(&self.request)
            .chain_update(&reply[..MAC_S_AT])
            .verify_slice(&reply[MAC_S_AT..])
            .map_err(|_| ProofError::BadMac)?;
        let peer = array32(&reply[HELLO_LEN + 1..MAC_S_AT]);
        let shared = self.eph.agree(&peer)?;
        let next = resume_secret(&self.secret, &shared, &self.request, reply);
        Ok((hello, next))
    }
}

/// The server's side of a resume with `PROOF`, once the request's MAC has
/// been checked against the session's secrets ([`ResumeRequest::verify`]).
pub struct ServerResume {
    request: Vec<u8>,
    eph: Ephemeral,
    shared: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for ServerResume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerResume").finish_non_exhaustive()
    }
}

impl ServerResume {
    /// Prepares the answer to `request` (its wire bytes): the X25519
    /// exchange with a fresh `eph`. Needs no secret, so it can run before
    /// the session is looked up.
    pub fn new(request: &[u8], eph: Ephemeral) -> Result<ServerResume, ProofError> {
        let decoded = ResumeRequest::decode(request)?;
        let shared = eph.agree(&decoded.public)?;
        Ok(ServerResume {
            request: request.to_vec(),
            eph,
            shared,
        })
    }

    /// The reply payload (`hello` ‖ `01` ‖ `S_pub` ‖ `mac_s`, MAC'd with
    /// `secret`, the one the request verified with) and the next secret.
    #[must_use]
    pub fn reply(&self, hello: &ServerHello, secret: &ResumeSecret) -> (Vec<u8>, ResumeSecret) {
        let mut reply = Vec::with_capacity(RESUME_REPLY_LEN);
        reply.extend_from_slice(&hello.encode());
        reply.push(VERSION);
        reply.extend_from_slice(&self.eph.public());
        let tag = secret
            .mac()
            .chain_update(LABEL_SERVER)
            .chain_update(&self.request)
            .chain_update(&reply)
            .finalize()
            .into_bytes();
        reply.extend_from_slice(&tag);
        let next = resume_secret(secret, &self.shared, &self.request, &reply);
        (reply, next)
    }
}

/// Whether a ClientHello's flags make it a `PROOF` resume request (the
/// server still checks that it accepts the bit).
#[must_use]
pub fn is_resume_request(hello: &ClientHello) -> bool {
    hello.resume_key.is_some() && hello.extensions & ext::PROOF != 0
}

/// Most secrets a server keeps pending (issued, not yet proven) per
/// session; the oldest goes first.
pub const MAX_PENDING_SECRETS: usize = 8;

/// A server's secrets for one session: the *confirmed* secret (the one the
/// client is known to hold), up to [`MAX_PENDING_SECRETS`] *pending* ones
/// (issued in a resume reply, not yet proven), and the highest resume
/// counter accepted. Each secret has a tag, so that the caller can name it
/// (to confirm it by a first frame) without holding it.
///
/// A secret is proven by a resume MAC'd with it, or by the first frame on
/// the link whose reply carried it ([`confirm`](Self::confirm)); proving
/// one makes it the confirmed secret and drops every other, and bumps the
/// [`epoch`](Self::epoch).
#[derive(Debug, Default)]
pub struct ServerSecrets {
    confirmed: Option<(u64, ResumeSecret)>,
    pending: Vec<(u64, ResumeSecret)>,
    highest_counter: u64,
    next_tag: u64,
    epoch: u64,
}

/// A resume request that verified ([`ServerSecrets::accept`]).
#[derive(Debug)]
pub struct Accepted {
    /// The secret it was MAC'd with: the reply is MAC'd with it too, and
    /// the next secret is derived from it.
    pub secret: ResumeSecret,
    /// The epoch after the request was accepted.
    pub epoch: u64,
}

/// Why [`ServerSecrets::accept`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The session has no secret yet: the client's key share never
    /// arrived.
    NoSecret,
    /// No secret of the session verifies the MAC.
    BadMac,
    /// The MAC verifies, but the counter is not above the highest accepted:
    /// a replay.
    Replay,
}

impl ServerSecrets {
    /// No secret yet (a new session before the key share).
    #[must_use]
    pub fn new() -> ServerSecrets {
        ServerSecrets::default()
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Whether the session has any secret.
    #[must_use]
    pub fn has_secret(&self) -> bool {
        self.confirmed.is_some() || !self.pending.is_empty()
    }

    /// The highest counter accepted so far (0: none).
    #[must_use]
    pub fn highest_counter(&self) -> u64 {
        self.highest_counter
    }

    /// Bumped by every proof.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// secret₁, proven by the key share that produced it: the confirmed
    /// secret. Returns its tag.
    pub fn set_confirmed(&mut self, secret: ResumeSecret) -> u64 {
        let tag = self.tag();
        self.pending.clear();
        self.confirmed = Some((tag, secret));
        self.epoch += 1;
        tag
    }

    /// Checks `payload` (a resume request's wire bytes, decoded as
    /// `request`) against every secret, in constant time each, and its
    /// counter against the highest accepted. On success the counter is
    /// recorded and a pending secret that verified is proven.
    pub fn accept(&mut self, payload: &[u8], request: &ResumeRequest) -> Result<Accepted, Refused> {
        if !self.has_secret() {
            return Err(Refused::NoSecret);
        }
        // Every secret is tried, so the time taken does not say which one
        // verified.
        let mut found: Option<(bool, u64)> = None;
        if let Some((tag, secret)) = &self.confirmed {
            if ResumeRequest::verify(payload, secret) {
                found = Some((false, *tag));
            }
        }
        for (tag, secret) in &self.pending {
            if ResumeRequest::verify(payload, secret) && found.is_none() {
                found = Some((true, *tag));
            }
        }
        let Some((pending, tag)) = found else {
            return Err(Refused::BadMac);
        };
        if request.counter <= self.highest_counter {
            return Err(Refused::Replay);
        }
        self.highest_counter = request.counter;
        if pending {
            self.confirm(tag);
        }
        let secret = self
            .confirmed
            .as_ref()
            .map(|(_, s)| s.clone())
            .expect("a verified secret is confirmed now");
        Ok(Accepted {
            secret,
            epoch: self.epoch,
        })
    }

    /// Adds `secret` (derived for a resume reply) as pending; the oldest
    /// pending one goes if [`MAX_PENDING_SECRETS`] are held. Returns its
    /// tag.
    pub fn add_pending(&mut self, secret: ResumeSecret) -> u64 {
        if self.pending.len() >= MAX_PENDING_SECRETS {
            self.pending.remove(0);
        }
        let tag = self.tag();
        self.pending.push((tag, secret));
        tag
    }

    /// The pending secret `tag` is proven (the client sent a frame on the
    /// link that carried it): it becomes the confirmed one, every other
    /// secret is dropped. Nothing happens if `tag` is not pending.
    pub fn confirm(&mut self, tag: u64) {
        if let Some(at) = self.pending.iter().position(|(t, _)| *t == tag) {
            let proven = self.pending.swap_remove(at);
            self.pending.clear();
            self.confirmed = Some(proven);
            self.epoch += 1;
        }
    }

    /// How many secrets are pending.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[allow(dead_code)]
const _: () = assert!(flags::EXTENSION_MASK & ext::PROOF == ext::PROOF);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eph(b: u8) -> Ephemeral {
        Ephemeral::from_private([b; 32])
    }

    fn new_session(c: u8, s: u8) -> (ResumeSecret, ResumeSecret, SessionId) {
        let id = SessionId::from_bytes([9; 16]);
        let ch = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: ext::ALL,
        }
        .encode();
        let sh = ServerHello {
            rejected: false,
            resume_key: id.as_key(),
            last_received: None,
            extensions: ext::ALL,
        };
        let server = ServerNew::new(&ch, &sh, eph(s));
        let client = ClientNew::new(&ch, eph(c)).finish(server.offer()).unwrap();
        assert_eq!(client.session_id, id);
        let server_secret = server.finish(&client.key_share).unwrap();
        (client.secret, server_secret, id)
    }

    fn server_hello(id: &SessionId) -> ServerHello {
        ServerHello {
            rejected: false,
            resume_key: id.as_key(),
            last_received: Some(Seq(7)),
            extensions: ext::ALL,
        }
    }

    #[test]
    fn both_sides_derive_the_same_secrets() {
        let (c1, s1, id) = new_session(1, 2);
        assert!(bool::from(c1.ct_eq(&s1)));
        let resume = ClientResume::new(&id, Some(Seq(3)), ext::ALL, 1, eph(3), &c1);
        let request = resume.request().to_vec();
        assert_eq!(request.len(), RESUME_REQUEST_LEN);
        let decoded = ResumeRequest::decode(&request).unwrap();
        assert_eq!(decoded.counter, 1);
        assert_eq!(decoded.session_id, id);
        assert!(ResumeRequest::verify(&request, &s1));
        let server = ServerResume::new(&request, eph(4)).unwrap();
        let (reply, s2) = server.reply(&server_hello(&id), &s1);
        assert_eq!(reply.len(), RESUME_REPLY_LEN);
        let (hello, c2) = resume.finish(&reply).unwrap();
        assert_eq!(hello, server_hello(&id));
        assert!(bool::from(c2.ct_eq(&s2)));
        assert!(!bool::from(c2.ct_eq(&c1)));
    }

    #[test]
    fn wrong_secret_fails() {
        let (c1, _, id) = new_session(1, 2);
        let resume = ClientResume::new(&id, None, ext::ALL, 1, eph(3), &c1);
        let other = ResumeSecret::from_bytes([0x55; 32]);
        assert!(!ResumeRequest::verify(resume.request(), &other));
        // A reply MAC'd with another secret fails on the client.
        let server = ServerResume::new(resume.request(), eph(4)).unwrap();
        let (reply, _) = server.reply(&server_hello(&id), &other);
        assert_eq!(resume.finish(&reply).unwrap_err(), ProofError::BadMac);
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        // The all-zero point and the point of order 8 with u = 1 both give
        // an all-zero shared secret.
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one] {
            assert_eq!(eph(1).agree(&bad).unwrap_err(), ProofError::LowOrder);
            let ch = [0u8; 25];
            let server = ServerNew::new(&ch, &ServerHello::reject(), eph(2));
            assert_eq!(
                server.finish(&encode_key_share(&bad)).unwrap_err(),
                ProofError::LowOrder
            );
            let mut offer = encode_server_offer(&ServerHello::reject(), &bad);
            offer[4] = 0;
            assert_eq!(
                ClientNew::new(&ch, eph(1)).finish(&offer).unwrap_err(),
                ProofError::LowOrder
            );
        }
    }

    #[test]
    fn layouts_are_checked() {
        assert_eq!(SERVER_OFFER_LEN, 58);
        assert_eq!(KEY_SHARE_LEN, 33);
        assert_eq!(RESUME_REQUEST_LEN, 98);
        assert_eq!(RESUME_REPLY_LEN, 90);
        assert!(matches!(
            decode_key_share(&[1; 32]),
            Err(ProofError::WrongSize { .. })
        ));
        assert_eq!(decode_key_share(&[2; 33]), Err(ProofError::Version(2)));
        let (c1, _, id) = new_session(1, 2);
        let good = ClientResume::new(&id, None, 0, 1, eph(3), &c1)
            .request()
            .to_vec();
        let mut bad = good.clone();
        bad[HELLO_LEN] = 2;
        assert_eq!(ResumeRequest::decode(&bad), Err(ProofError::Version(2)));
        let mut bad = good.clone();
        bad[4] &= !ext::PROOF;
        assert_eq!(ResumeRequest::decode(&bad), Err(ProofError::NotAResume));
        let mut bad = good.clone();
        bad[4] &= !flags::CLIENT_RESUME;
        assert_eq!(ResumeRequest::decode(&bad), Err(ProofError::NotAResume));
        assert!(ResumeRequest::decode(&good[..97]).is_err());
    }

    #[test]
    fn debug_and_display() {
        let secret = ResumeSecret::from_bytes([0xab; 32]);
        assert_eq!(format!("{secret:?}"), "ResumeSecret(…)");
        let id = SessionId::from_bytes([0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xff]);
        assert_eq!(id.node_id(), 7);
        assert_eq!(id.to_string(), "000000070102030405060708090a0bff");
        let fresh = SessionId::generate(0x01020304).unwrap();
        assert_eq!(fresh.node_id(), 0x01020304);
        assert_ne!(fresh, SessionId::generate(0x01020304).unwrap());
        let e = Ephemeral::generate().unwrap();
        assert!(!format!("{e:?}").contains("secret"));
    }

    fn request(secret: &ResumeSecret, id: &SessionId, counter: u64) -> Vec<u8> {
        ClientResume::new(id, None, ext::ALL, counter, eph(3), secret)
            .request()
            .to_vec()
    }

    fn accept(state: &mut ServerSecrets, payload: &[u8]) -> Result<Accepted, Refused> {
        let decoded = ResumeRequest::decode(payload).unwrap();
        state.accept(payload, &decoded)
    }

    #[test]
    fn server_secrets_state_machine() {
        let id = SessionId::from_bytes([1; 16]);
        let k1 = ResumeSecret::from_bytes([1; 32]);
        let k2 = ResumeSecret::from_bytes([2; 32]);
        let k3 = ResumeSecret::from_bytes([3; 32]);
        let mut state = ServerSecrets::new();
        assert_eq!(
            accept(&mut state, &request(&k1, &id, 1)).unwrap_err(),
            Refused::NoSecret
        );
        state.set_confirmed(k1.clone());
        let r1 = request(&k1, &id, 1);
        let accepted = accept(&mut state, &r1).unwrap();
        assert!(bool::from(accepted.secret.ct_eq(&k1)));
        assert_eq!(state.highest_counter(), 1);
        // The same request again: a replay. A lower or equal counter too.
        assert_eq!(accept(&mut state, &r1).unwrap_err(), Refused::Replay);
        assert_eq!(
            accept(&mut state, &request(&k1, &id, 0)).unwrap_err(),
            Refused::Replay
        );
        // A wrong secret, whatever the counter.
        assert_eq!(
            accept(&mut state, &request(&k2, &id, 5)).unwrap_err(),
            Refused::BadMac
        );
        // k2 pending: both k1 and k2 work until one is proven.
        let t2 = state.add_pending(k2.clone());
        let t3 = state.add_pending(k3.clone());
        assert!(accept(&mut state, &request(&k1, &id, 2)).is_ok());
        assert_eq!(state.pending(), 2);
        let epoch = state.epoch();
        let accepted = accept(&mut state, &request(&k2, &id, 3)).unwrap();
        assert!(bool::from(accepted.secret.ct_eq(&k2)));
        assert_eq!(accepted.epoch, epoch + 1);
        assert_eq!(state.pending(), 0);
        // Proving k2 dropped k1 and k3.
        assert_eq!(
            accept(&mut state, &request(&k1, &id, 4)).unwrap_err(),
            Refused::BadMac
        );
        assert_eq!(
            accept(&mut state, &request(&k3, &id, 4)).unwrap_err(),
            Refused::BadMac
        );
        state.confirm(t3);
        state.confirm(t2);
        assert_eq!(
            state.epoch(),
            epoch + 1,
            "confirming a non-pending tag is a no-op"
        );
        // A first frame proves a pending secret.
        let t1 = state.add_pending(k1.clone());
        state.confirm(t1);
        assert_eq!(
            accept(&mut state, &request(&k2, &id, 6)).unwrap_err(),
            Refused::BadMac
        );
        assert!(accept(&mut state, &request(&k1, &id, 6)).is_ok());
        // At most MAX_PENDING_SECRETS pending, oldest dropped.
        let oldest = ResumeSecret::from_bytes([0x10; 32]);
        state.add_pending(oldest.clone());
        for i in 0..MAX_PENDING_SECRETS as u8 {
            state.add_pending(ResumeSecret::from_bytes([0x20 + i; 32]));
        }
        assert_eq!(state.pending(), MAX_PENDING_SECRETS);
        assert_eq!(
            accept(&mut state, &request(&oldest, &id, 7)).unwrap_err(),
            Refused::BadMac
        );
    }

    proptest! {
        #[test]
        fn any_flipped_bit_of_a_request_fails(bit in 0usize..RESUME_REQUEST_LEN * 8) {
            let (c1, s1, id) = new_session(1, 2);
            let resume = ClientResume::new(&id, Some(Seq(5)), ext::ALL, 9, eph(3), &c1);
            let mut request = resume.request().to_vec();
            request[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!ResumeRequest::verify(&request, &s1));
        }

        #[test]
        fn any_flipped_bit_of_a_reply_fails(bit in 0usize..RESUME_REPLY_LEN * 8) {
            let (c1, s1, id) = new_session(1, 2);
            let resume = ClientResume::new(&id, Some(Seq(5)), ext::ALL, 9, eph(3), &c1);
            let server = ServerResume::new(resume.request(), eph(4)).unwrap();
            let (mut reply, _) = server.reply(&server_hello(&id), &s1);
            reply[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(resume.finish(&reply).is_err());
        }

        #[test]
        fn any_flipped_bit_of_the_new_session_changes_the_secret(
            bit in 0usize..(SERVER_OFFER_LEN + KEY_SHARE_LEN) * 8
        ) {
            let ch = [0u8; 25];
            let hello = server_hello(&SessionId::from_bytes([3; 16]));
            let server = ServerNew::new(&ch, &hello, eph(2));
            let mut offer = server.offer().to_vec();
            let client = ClientNew::new(&ch, eph(1)).finish(&offer).unwrap();
            let mut share = client.key_share;
            if bit < SERVER_OFFER_LEN * 8 {
                offer[bit / 8] ^= 1 << (bit % 8);
                // A changed offer: the client derives another secret, or
                // refuses it outright.
                if let Ok(other) = ClientNew::new(&ch, eph(1)).finish(&offer) {
                    prop_assert!(!bool::from(other.secret.ct_eq(&client.secret)));
                }
            } else {
                let b = bit - SERVER_OFFER_LEN * 8;
                share[b / 8] ^= 1 << (b % 8);
                if let Ok(other) = server.finish(&share) {
                    prop_assert!(!bool::from(other.ct_eq(&client.secret)));
                }
            }
        }
    }
}
