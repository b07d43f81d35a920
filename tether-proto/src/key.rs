//! Session resume keys.

use core::fmt;
use core::hash::{Hash, Hasher};

use subtle::ConstantTimeEq;

/// A secret that lets a client resume its session on a new link.
///
/// The server issues a fresh key on every handshake. Keys are compared in
/// constant time, and the `Debug` output shows only the first two bytes.
#[derive(Clone, Copy)]
pub struct ResumeKey([u8; 16]);

/// The operating system's random source could not produce a resume key.
#[derive(Debug, thiserror::Error)]
#[error("could not generate a {len}-byte resume key: the OS random source failed: {source_err}", len = ResumeKey::LEN, source_err = .0)]
pub struct KeyError(getrandom::Error);

impl KeyError {
    /// The underlying error from the OS random source.
    #[must_use]
    pub fn os_error(&self) -> getrandom::Error {
        self.0
    }
}

impl From<getrandom::Error> for KeyError {
    fn from(err: getrandom::Error) -> KeyError {
        KeyError(err)
    }
}

impl ResumeKey {
    /// Length of a resume key in bytes.
    pub const LEN: usize = 16;

    /// A fresh key from the operating system's cryptographically secure
    /// random source.
    pub fn generate() -> Result<ResumeKey, KeyError> {
        let mut bytes = [0u8; Self::LEN];
        getrandom::fill(&mut bytes)?;
        Ok(ResumeKey(bytes))
    }

    /// A key with the given bytes (for example, as read from a hello).
    #[must_use]
    pub fn from_bytes(bytes: [u8; 16]) -> ResumeKey {
        ResumeKey(bytes)
    }

    /// The key's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl ConstantTimeEq for ResumeKey {
    fn ct_eq(&self, other: &ResumeKey) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for ResumeKey {
    /// Constant-time comparison.
    fn eq(&self, other: &ResumeKey) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for ResumeKey {}

impl Hash for ResumeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResumeKey({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::collections::HashMap;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hash_of(key: &ResumeKey) -> u64 {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    }

    #[test]
    fn generated_keys_differ() {
        let a = ResumeKey::generate().unwrap();
        let b = ResumeKey::generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn debug_hides_the_key() {
        let key = ResumeKey::from_bytes([
            0x3f, 0xa1, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d,
            0x0e, 0x0f,
        ]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "ResumeKey(3fa1…)");
        assert!(!shown.contains(&hex(key.as_bytes())));
        assert!(!shown.contains(&hex(&key.as_bytes()[2..])));

        let random = ResumeKey::generate().unwrap();
        let shown = format!("{random:?}");
        assert!(!shown.contains(&hex(random.as_bytes())));
        assert!(!format!("{random:#?}").contains(&hex(random.as_bytes())));
    }

    #[test]
    fn equality_and_hash() {
        let bytes = [7u8; 16];
        let a = ResumeKey::from_bytes(bytes);
        let b = ResumeKey::from_bytes(bytes);
        let mut other = bytes;
        other[15] ^= 1;
        let c = ResumeKey::from_bytes(other);
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        assert_ne!(a, c);
        assert_eq!(a.as_bytes(), &bytes);

        let mut map = HashMap::new();
        map.insert(a, "a");
        map.insert(c, "c");
        assert_eq!(map.get(&b), Some(&"a"));
        assert_eq!(map.get(&c), Some(&"c"));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn key_error_message_names_the_failure() {
        let err = KeyError::from(getrandom::Error::UNSUPPORTED);
        let msg = err.to_string();
        assert!(msg.contains("16-byte resume key"), "{msg}");
        assert!(msg.contains("OS random source failed"), "{msg}");
        assert_eq!(err.os_error(), getrandom::Error::UNSUPPORTED);
    }
}
