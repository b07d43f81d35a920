//! Admission: who may start a handshake, and who gets a session.
//!
//! Every check here runs before a session exists, so that refusing a
//! client costs the server a socket for a moment and nothing else:
//!
//! - [`Pending`] caps the links in their handshake, over all clients and per
//!   [`Source`], and is checked before anything is read from a link;
//! - [`Authorize`] is the application's say, with what the link knows of
//!   the peer and the credential from the client's hello.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::link::PeerInfo;

/// Where a client comes from, for the per-source caps: an IPv4 address, or
/// the /64 network of an IPv6 address (one host usually holds a whole /64,
/// so counting single IPv6 addresses would cap nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Source(u128);

impl Source {
    /// The source of `addr`; `None` for links without an IP address (an
    /// in-memory or Unix link), which count only against global caps.
    pub(super) fn of(addr: Option<SocketAddr>) -> Option<Source> {
        let ip = addr?.ip();
        Some(match ip {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(u128::from(u32::from(v4))),
                // Mark v6 sources so that they never equal a v4 one.
                None => Source((u128::from(v6) & !u128::from(u64::MAX)) | 1),
            },
        })
    }
}

/// Counts per source, with a cap.
#[derive(Default)]
pub(super) struct PerSource {
    counts: HashMap<Source, usize>,
}

impl PerSource {
    pub(super) fn get(&self, source: Option<Source>) -> usize {
        source.map_or(0, |s| self.counts.get(&s).copied().unwrap_or(0))
    }

    pub(super) fn add(&mut self, source: Option<Source>) {
        if let Some(s) = source {
            *self.counts.entry(s).or_insert(0) += 1;
        }
    }

    pub(super) fn remove(&mut self, source: Option<Source>) {
        if let Some(s) = source {
            if let Some(n) = self.counts.get_mut(&s) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&s);
                }
            }
        }
    }
}

/// The links in their handshake: connected, hello not yet answered.
pub(super) struct Pending {
    max: usize,
    max_per_source: usize,
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    total: usize,
    per_source: PerSource,
}

impl Pending {
    pub(super) fn new(max: usize, max_per_source: usize) -> Arc<Pending> {
        Arc::new(Pending {
            max,
            max_per_source,
            inner: Mutex::new(PendingInner::default()),
        })
    }

    /// A slot for one more handshake from `source`, or `None` if a cap is
    /// reached. The slot frees itself when dropped.
    pub(super) fn enter(self: &Arc<Self>, source: Option<Source>) -> Option<PendingSlot> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.total >= self.max || inner.per_source.get(source) >= self.max_per_source {
            return None;
        }
        inner.total += 1;
        inner.per_source.add(source);
        Some(PendingSlot {
            pending: self.clone(),
            source,
        })
    }

    /// Handshakes in progress.
    pub(super) fn count(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One handshake's place under the caps of [`Pending`].
pub(super) struct PendingSlot {
    pending: Arc<Pending>,
    source: Option<Source>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut inner = self
            .pending
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.total -= 1;
        inner.per_source.remove(self.source);
    }
}

/// What the server knows of a client asking for a new session, handed to
/// the application's [`Authorize`] hook.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Admission {
    /// What the link knows of the peer (its address; later, a TLS identity
    /// or WebSocket request headers).
    pub peer: PeerInfo,
    /// The credential from the client's hello
    /// ([`Config::credential`](crate::Config::credential)); empty if it sent
    /// none.
    pub credential: Bytes,
    /// The extension bits the client offered.
    pub extensions: u8,
}

/// What an [`Authorize`] hook decided for an admitted client, carried by its
/// session ([`SessionInfo::grant`](super::SessionInfo::grant)): nothing, or
/// any value of the application's (a user id, a role).
#[derive(Clone, Default)]
pub struct Grant(Option<Arc<dyn Any + Send + Sync>>);

impl Grant {
    /// Admitted, with nothing to remember.
    pub fn none() -> Grant {
        Grant(None)
    }

    /// Admitted, remembering `value` for the session.
    pub fn new<T: Any + Send + Sync>(value: T) -> Grant {
        Grant(Some(Arc::new(value)))
    }

    /// The value given to [`Grant::new`], if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_deref()?.downcast_ref()
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Grant(..)"
        } else {
            "Grant(none)"
        })
    }
}

/// An [`Authorize`] hook's refusal; the client sees `reason` in
/// [`Refusal::Denied`](crate::error::Refusal::Denied) (if it speaks the
/// admission extension; other clients see a plain rejection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// Shown to the client: keep it short and free of secrets.
    pub reason: String,
}

impl Denied {
    /// A refusal with `reason`.
    pub fn new(reason: impl Into<String>) -> Denied {
        Denied {
            reason: reason.into(),
        }
    }
}

/// The application's hook that decides who gets a new session, before the
/// session costs any memory. Resumes are not asked again: the resume key
/// proves the client is the one admitted.
///
/// It runs in the link's own task, within the handshake timeout, so a slow
/// decision (a database lookup) holds up only its own client. Any
/// `Fn(&Admission) -> Result<Grant, Denied>` closure is one.
pub trait Authorize: Send + Sync + 'static {
    /// Admits the client with a [`Grant`] or refuses it.
    fn authorize(&self, request: &Admission) -> impl Future<Output = Result<Grant, Denied>> + Send;
}

impl<F> Authorize for F
where
    F: Fn(&Admission) -> Result<Grant, Denied> + Send + Sync + 'static,
{
    fn authorize(&self, request: &Admission) -> impl Future<Output = Result<Grant, Denied>> + Send {
        std::future::ready(self(request))
    }
}

type Decision<'a> = Pin<Box<dyn Future<Output = Result<Grant, Denied>> + Send + 'a>>;

/// [`Authorize`] behind a pointer (its future boxed: once per new session).
pub(super) trait DynAuthorize: Send + Sync {
    fn decide<'a>(&'a self, request: &'a Admission) -> Decision<'a>;
}

impl<A: Authorize> DynAuthorize for A {
    fn decide<'a>(&'a self, request: &'a Admission) -> Decision<'a> {
        Box::pin(self.authorize(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_group_ipv6_by_64_and_map_v4() {
        let a: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8::ffff:2]:2".parse().unwrap();
        let c: SocketAddr = "[2001:db8:0:1::1]:1".parse().unwrap();
        assert_eq!(Source::of(Some(a)), Source::of(Some(b)));
        assert_ne!(Source::of(Some(a)), Source::of(Some(c)));
        let v4: SocketAddr = "127.0.0.2:5".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.2]:6".parse().unwrap();
        assert_eq!(Source::of(Some(v4)), Source::of(Some(mapped)));
        assert_ne!(
            Source::of(Some(v4)),
            Source::of(Some("127.0.0.3:5".parse().unwrap()))
        );
        assert_eq!(Source::of(None), None);
    }

    #[test]
    fn pending_caps_global_and_per_source() {
        let pending = Pending::new(3, 2);
        let one = Source::of(Some("10.0.0.1:1".parse().unwrap()));
        let two = Source::of(Some("10.0.0.2:1".parse().unwrap()));
        let a = pending.enter(one).unwrap();
        let _b = pending.enter(one).unwrap();
        assert!(pending.enter(one).is_none(), "per-source cap");
        let _c = pending.enter(two).unwrap();
        assert!(pending.enter(None).is_none(), "global cap");
        assert_eq!(pending.count(), 3);
        drop(a);
        assert!(
            pending.enter(one).is_some(),
            "a dropped slot frees its place"
        );
    }

    #[test]
    fn grant_keeps_the_application_value() {
        let grant = Grant::new(42u32);
        assert_eq!(grant.get::<u32>(), Some(&42));
        assert_eq!(grant.get::<String>(), None);
        assert_eq!(Grant::none().get::<u32>(), None);
    }
}
