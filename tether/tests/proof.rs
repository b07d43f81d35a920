//! Proof-of-possession resume (`PROOF`): exactly-once delivery across cuts,
//! captured and forged resumes, secrecy of the resume secrets, and
//! interoperation with peers that use bearer keys.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{config, exchange, within, Msg, Traffic};
use tether::link::mem::{self, MemConnector, MemLink};
use tether::link::{Connector, Link, LinkError, LinkRx, LinkTx};
use tether::proto::proof::{RESUME_REPLY_LEN, RESUME_REQUEST_LEN};
use tether::proto::{ext, ClientHello, ServerHello, HELLO_LEN};
use tether::{Config, Server, StableConduit};

/// Every payload of every link, in order per link: (link number, from the
/// client, bytes).
type Log = Arc<Mutex<Vec<(usize, bool, Bytes)>>>;

/// A connector that records everything both ways on every link.
#[derive(Clone)]
struct Capture {
    inner: MemConnector,
    log: Log,
    links: Arc<Mutex<usize>>,
}

struct CapTx {
    inner: <MemLink as Link>::Tx,
    log: Log,
    link: usize,
}
struct CapRx {
    inner: <MemLink as Link>::Rx,
    log: Log,
    link: usize,
}
struct CapLink(CapTx, CapRx);

impl Link for CapLink {
    type Tx = CapTx;
    type Rx = CapRx;
    fn split(self) -> (CapTx, CapRx) {
        (self.0, self.1)
    }
}

impl LinkTx for CapTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        self.log
            .lock()
            .unwrap()
            .push((self.link, true, payload.clone()));
        self.inner.feed(payload).await
    }
    async fn flush(&mut self) -> Result<(), LinkError> {
        self.inner.flush().await
    }
    async fn close(&mut self) -> Result<(), LinkError> {
        self.inner.close().await
    }
}

impl LinkRx for CapRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        let got = self.inner.recv().await?;
        if let Some(p) = &got {
            self.log.lock().unwrap().push((self.link, false, p.clone()));
        }
        Ok(got)
    }
    fn set_max_payload(&mut self, max: usize) {
        self.inner.set_max_payload(max);
    }
}

impl Connector for Capture {
    type Link = CapLink;
    async fn connect(&self) -> Result<CapLink, LinkError> {
        let (tx, rx) = self.inner.connect().await?.split();
        let link = {
            let mut n = self.links.lock().unwrap();
            *n += 1;
            *n
        };
        Ok(CapLink(
            CapTx {
                inner: tx,
                log: self.log.clone(),
                link,
            },
            CapRx {
                inner: rx,
                log: self.log.clone(),
                link,
            },
        ))
    }
}

fn traffic(seed: u64, n: u64) -> Traffic {
    Traffic {
        seed,
        streams: 2,
        per_stream: n,
        max_len: 2000,
    }
}

/// Sends `payload` as the hello of a fresh link; returns the answer.
async fn raw(c: &MemConnector, payload: Bytes) -> Bytes {
    let (mut tx, mut rx) = c.connect().await.unwrap().split();
    let _ = tx.send(payload).await;
    rx.recv().await.unwrap().unwrap()
}

/// Opens a new session by hand and leaves it unproven: a hello with every
/// extension, the server's offer read, no key share sent. Returns the
/// link's halves (keep them to keep the link up) and the offer.
async fn unproven_session(
    c: &MemConnector,
) -> ((<MemLink as Link>::Tx, <MemLink as Link>::Rx), Bytes) {
    let (mut tx, mut rx) = c.connect().await.unwrap().split();
    let hello = ClientHello {
        resume_key: None,
        last_received: None,
        extensions: ext::ALL,
    };
    tx.send(Bytes::copy_from_slice(&hello.encode()))
        .await
        .unwrap();
    let offer = rx.recv().await.unwrap().unwrap();
    ((tx, rx), offer)
}

/// One message each way, to show the session still delivers.
async fn still_delivers(client: &StableConduit<Msg>, server: &mut StableConduit<Msg>, i: u64) {
    client.send(&(0, i, vec![1, 2, 3])).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), server.recv())
        .await
        .expect("the session stopped delivering")
        .unwrap()
        .unwrap();
    assert_eq!(got.1, i);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_resumes_replayed_and_forged_fail_and_secrets_never_travel() {
    within(async move {
        let (listener, c) = mem::listener(64);
        let server = Server::<Msg>::new(listener, config(1));
        let capture = Capture {
            inner: c.clone(),
            log: Arc::default(),
            links: Arc::default(),
        };
        let mut cfg = config(2);
        cfg = cfg.record_secrets_for_tests(true);
        let client = StableConduit::<Msg>::connect(capture.clone(), cfg)
            .await
            .unwrap();
        let mut session = server.accept().await.unwrap();
        let id = client.session_id().expect("PROOF is on by default");
        assert_eq!(session.session_id(), Some(id));
        assert_eq!(session.session_info().unwrap().session_id(), Some(id));
        assert_eq!(id.node_id(), 0);

        // Several resumes, with traffic between them.
        for i in 0..5u64 {
            still_delivers(&client, &mut session, i).await;
            c.kill_all();
            while client.stats().proof_resumes < i + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        still_delivers(&client, &mut session, 100).await;
        assert!(server.stats().proof_resumes >= 5);
        assert_eq!(server.stats().bad_proofs, 0);

        let log = capture.log.lock().unwrap().clone();
        // Every resume request carries the session id in its key field and
        // is 98 bytes; every reply is 90.
        let requests: Vec<Bytes> = log
            .iter()
            .filter(|(_, from_client, p)| {
                *from_client && p.len() == RESUME_REQUEST_LEN && p.starts_with(b"ROCH")
            })
            .map(|(_, _, p)| p.clone())
            .collect();
        assert!(requests.len() >= 5, "{} resume requests", requests.len());
        for r in &requests {
            let hello = ClientHello::decode(&r[..HELLO_LEN]).unwrap();
            assert_eq!(hello.resume_key.unwrap().as_bytes(), id.as_bytes());
        }
        assert!(log
            .iter()
            .any(|(_, c, p)| !*c && p.len() == RESUME_REPLY_LEN && p.starts_with(b"ROSH")));

        // (b) No secret the client ever held crossed the wire.
        let secrets = client.secrets_held();
        assert!(secrets.len() >= 6, "{} secrets", secrets.len());
        for secret in &secrets {
            for (_, _, p) in &log {
                assert!(!contains(p, secret), "a secret appeared on the wire");
                assert!(!contains(p, &secret[..8]), "part of a secret on the wire");
            }
        }

        // (a) Replaying each captured resume on a fresh link is rejected,
        // and the session is not disturbed.
        for r in &requests {
            let answer = raw(&c, r.clone()).await;
            assert_eq!(&answer[..], &ServerHello::reject().encode()[..]);
        }
        assert_eq!(server.stats().bad_proofs, requests.len() as u64);
        still_delivers(&client, &mut session, 101).await;

        // (c) A forged resume: the right id, a bad MAC, a high counter.
        let mut forged = requests.last().unwrap().to_vec();
        forged[HELLO_LEN + 1..HELLO_LEN + 9].copy_from_slice(&u64::MAX.to_le_bytes());
        let answer = raw(&c, Bytes::from(forged.clone())).await;
        assert!(ServerHello::decode(&answer).unwrap().rejected);
        *forged.last_mut().unwrap() ^= 1;
        let answer = raw(&c, Bytes::from(forged)).await;
        assert!(ServerHello::decode(&answer).unwrap().rejected);
        // A bearer resume with the (public) session id is no key either.
        let bearer = ClientHello {
            resume_key: Some(id.as_key()),
            last_received: None,
            extensions: ext::ALL & !ext::PROOF,
        };
        let answer = raw(&c, Bytes::copy_from_slice(&bearer.encode())).await;
        assert!(ServerHello::decode(&answer).unwrap().rejected);
        assert_eq!(server.stats().bad_proofs, requests.len() as u64 + 2);
        still_delivers(&client, &mut session, 102).await;
        // And it still resumes afterwards: the counter the forgery claimed
        // was never recorded.
        c.kill_all();
        still_delivers(&client, &mut session, 103).await;
        assert_eq!(client.stats().state, tether::ConduitState::Resumed);
    })
    .await;
}

/// Kills every link of `c` every `period` until `stop`.
fn chaos(c: MemConnector, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            c.kill_all();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_with_proof_across_many_cuts() {
    within(async move {
        let (listener, c) = mem::listener(64);
        let server = Server::<Msg>::new(listener, config(3));
        let client = StableConduit::<Msg>::connect(c.clone(), config(4))
            .await
            .unwrap();
        let session = server.accept().await.unwrap();
        let cuts = chaos(c.clone(), Duration::from_millis(2));
        let (client_tx, server_tx) = exchange(client, session, traffic(5, 5000), traffic(6, 5000))
            .await
            .unwrap();
        cuts.abort();
        let (client, server_side) = (client_tx.stats(), server_tx.stats());
        assert!(client.reconnects > 3, "{client:?}");
        // Every resume was a proof resume (a restart would count none).
        assert_eq!(client.proof_resumes, client.reconnects);
        assert_eq!(server_side.proof_resumes, server_side.reconnects);
        assert_eq!(server.stats().bad_proofs, 0);
    })
    .await;
}

fn with(ext: u8, seed: u64) -> Config {
    let mut c = config(seed);
    c = c.extensions(ext);
    c
}

/// Each pair resumes several times and delivers everything once.
async fn interop(client_cfg: Config, server_cfg: Config, expect_proof: bool) {
    let (listener, c) = mem::listener(64);
    let server = Server::<Msg>::new(listener, server_cfg);
    let client = StableConduit::<Msg>::connect(c.clone(), client_cfg)
        .await
        .unwrap();
    // A base-format client proves its key with its first message.
    client.send(&(0, 0, vec![])).await.unwrap();
    let mut session = server.accept().await.unwrap();
    assert_eq!(session.recv().await.unwrap().unwrap().1, 0);
    assert_eq!(client.session_id().is_some(), expect_proof);
    assert_eq!(session.session_id().is_some(), expect_proof);
    for i in 1..4 {
        c.kill_all();
        still_delivers(&client, &mut session, i).await;
    }
    assert!(client.stats().reconnects >= 3);
    assert_eq!(client.stats().proof_resumes > 0, expect_proof);
    assert_eq!(server.stats().proof_resumes > 0, expect_proof);
    assert_eq!(server.stats().bad_proofs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_keys_with_peers_that_do_not_accept_proof() {
    within(async move {
        let no_proof = ext::ALL & !ext::PROOF;
        // A client with PROOF off against a PROOF server.
        interop(with(no_proof, 1), with(ext::ALL, 2), false).await;
        // A PROOF client against a server with PROOF off.
        interop(with(ext::ALL, 3), with(no_proof, 4), false).await;
        // PROOF without ADMISSION on one side: bearer keys.
        interop(
            with(ext::ALL & !ext::ADMISSION, 5),
            with(ext::ALL, 6),
            false,
        )
        .await;
        // Base format both ways, and a base-format client to a PROOF server.
        interop(with(0, 7), with(0, 8), false).await;
        interop(with(0, 9), with(ext::ALL, 10), false).await;
        // PROOF on with admission only (no acks): still proof.
        interop(
            with(ext::PROOF | ext::ADMISSION, 11),
            with(ext::ALL, 12),
            true,
        )
        .await;
        interop(with(ext::ALL, 13), with(ext::ALL, 14), true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_format_hello_still_gets_a_bearer_key() {
    within(async move {
        let (listener, c) = mem::listener(8);
        let _server = Server::<Msg>::new(listener, config(1));
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: 0,
        };
        let answer = raw(&c, Bytes::copy_from_slice(&hello.encode())).await;
        assert_eq!(answer.len(), HELLO_LEN);
        let answer = ServerHello::decode(&answer).unwrap();
        assert!(!answer.rejected);
        assert_eq!(answer.extensions, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_key_share_makes_the_client_start_over() {
    within(async move {
        // The client's link dies right after the ServerHello: the key share
        // never arrives, the server keeps the session unproven and answers
        // the resume "restart"; the client opens a new session and
        // delivers everything there.
        let (listener, c) = mem::listener(8);
        let mut cfg = config(1);
        cfg = cfg.handshake_timeout(Duration::from_millis(300));
        let server = Server::<Msg>::new(listener, cfg);
        let (link, offer) = unproven_session(&c).await;
        let (sh, _) = tether::proto::proof::decode_server_offer(&offer).unwrap();
        drop(link);
        // A resume for that session id, MAC'd with a secret the server
        // never had.
        let resume = tether::proto::proof::ClientResume::new(
            &tether::proto::SessionId::from_key(&sh.resume_key),
            None,
            ext::ALL,
            1,
            tether::proto::proof::Ephemeral::generate().unwrap(),
            &tether::proto::ResumeSecret::from_bytes([7; 32]),
        );
        // While the key share could still arrive: "come back".
        let answer = raw(&c, Bytes::copy_from_slice(resume.request())).await;
        let refusal = tether::proto::Refusal::decode(&answer).unwrap();
        assert_eq!(refusal.kind, tether::proto::RefusalKind::Busy);
        assert_eq!(server.stats().bad_proofs, 0);
        // After the proof deadline the tombstone says "restart".
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(server.stats().unproven_dropped, 1);
        let answer = raw(&c, Bytes::copy_from_slice(resume.request())).await;
        let refusal = tether::proto::Refusal::decode(&answer).unwrap();
        assert_eq!(refusal.kind, tether::proto::RefusalKind::Restart);
        // A real client is unaffected and gets its own session.
        let client = StableConduit::<Msg>::connect(c.clone(), config(2))
            .await
            .unwrap();
        let mut session = server.accept().await.unwrap();
        still_delivers(&client, &mut session, 1).await;
    })
    .await;
}

/// A connector whose first link drops everything the client sends after
/// its hello (so the server never gets the key share).
#[derive(Clone)]
struct LoseKeyShare {
    inner: MemConnector,
    links: Arc<Mutex<usize>>,
}

struct LoseTx {
    inner: <MemLink as Link>::Tx,
    sent: usize,
    lossy: bool,
}
struct LoseLink(LoseTx, <MemLink as Link>::Rx);

impl Link for LoseLink {
    type Tx = LoseTx;
    type Rx = <MemLink as Link>::Rx;
    fn split(self) -> (LoseTx, Self::Rx) {
        (self.0, self.1)
    }
}

impl LinkTx for LoseTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        self.sent += 1;
        if self.lossy && self.sent > 1 {
            return Ok(());
        }
        self.inner.feed(payload).await
    }
    async fn flush(&mut self) -> Result<(), LinkError> {
        self.inner.flush().await
    }
    async fn close(&mut self) -> Result<(), LinkError> {
        self.inner.close().await
    }
}

impl Connector for LoseKeyShare {
    type Link = LoseLink;
    async fn connect(&self) -> Result<LoseLink, LinkError> {
        let (tx, rx) = self.inner.connect().await?.split();
        let lossy = {
            let mut n = self.links.lock().unwrap();
            *n += 1;
            *n == 1
        };
        Ok(LoseLink(
            LoseTx {
                inner: tx,
                sent: 0,
                lossy,
            },
            rx,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_whose_key_share_is_lost_starts_over_exactly_once() {
    within(async move {
        let (listener, c) = mem::listener(8);
        let mut server_cfg = config(1);
        server_cfg = server_cfg.handshake_timeout(Duration::from_millis(300));
        let server = Server::<Msg>::new(listener, server_cfg);
        let lose = LoseKeyShare {
            inner: c.clone(),
            links: Arc::default(),
        };
        let client = StableConduit::<Msg>::connect(lose, config(2))
            .await
            .unwrap();
        let first_id = client.session_id().unwrap();
        for i in 0..20u64 {
            client.send(&(0, i, vec![i as u8])).await.unwrap();
        }
        // The first session is never handed out; the second gets every
        // message once, in order.
        let mut session = server.accept().await.unwrap();
        assert_ne!(session.session_id(), Some(first_id));
        for i in 0..20u64 {
            assert_eq!(session.recv().await.unwrap().unwrap().1, i);
        }
        still_delivers(&client, &mut session, 20).await;
        assert_eq!(server.stats().unproven_dropped, 1);
        assert_eq!(server.stats().sessions_created, 2);
        assert_eq!(client.session_id(), session.session_id());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_with_proof_over_tcp_through_a_cutting_proxy() {
    use tether::fault::{FaultConfig, FaultProxy};
    use tether::link::TcpConnector;
    within(async move {
        let mut cuts = 0;
        let mut handshake_cuts = 0;
        let mut proof_resumes = 0;
        for seed in 0..4u64 {
            let listener = tether::link::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let server = Server::<Msg>::new(listener, config(seed));
            let proxy = FaultProxy::start(
                addr,
                FaultConfig {
                    seed,
                    mean_bytes_between_cuts: 40_000,
                    handshake_cut_probability: 0.3,
                    max_connection_age: None,
                },
            )
            .await
            .unwrap();
            let client =
                StableConduit::<Msg>::connect(TcpConnector::new(proxy.local_addr()), config(seed))
                    .await
                    .unwrap();
            // Sessions whose key share never arrived are never handed out;
            // the client's is the one with its id.
            let session = loop {
                let s = server.accept().await.unwrap();
                if s.session_id() == client.session_id() {
                    break s;
                }
            };
            let t = traffic(seed, 300);
            let back = Traffic {
                seed: seed + 1000,
                ..t
            };
            let (client_tx, server_tx) = exchange(client, session, t, back)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(client_tx.stats().frames_received, back.total());
            assert_eq!(server_tx.stats().frames_received, t.total());
            assert_eq!(server.stats().bad_proofs, 0, "seed {seed}");
            let p = proxy.stats();
            cuts += p.cuts;
            handshake_cuts += p.handshake_cuts;
            proof_resumes += client_tx.stats().proof_resumes;
        }
        assert!(cuts > 10, "{cuts} cuts");
        assert!(handshake_cuts > 2, "{handshake_cuts} handshake cuts");
        assert!(proof_resumes > 5, "{proof_resumes} proof resumes");
    })
    .await;
}

/// A session whose client never proved its key share (a cut ate the
/// server's answer and the client started over) is nothing the application
/// saw: `Server::shutdown` drops it without counting it lost, beside a
/// session that closes gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_sessions_nobody_saw_without_counting_them() {
    within(async move {
        let (listener, c) = mem::listener(8);
        let mut cfg = config(5);
        cfg = cfg.handshake_timeout(Duration::from_millis(500));
        let server = Server::<Msg>::new(listener, cfg);
        let (link, _offer) = unproven_session(&c).await;
        // And one the application has.
        let client = StableConduit::<Msg>::connect(c.clone(), config(6))
            .await
            .unwrap();
        let mut session = server.accept().await.unwrap();
        still_delivers(&client, &mut session, 1).await;
        assert_eq!(server.stats().sessions_open, 2);
        let (reader, report) = tokio::join!(
            async {
                // The application reads until the close, as it should.
                while let Ok(Some(_)) = session.recv().await {}
            },
            server.shutdown(Duration::from_secs(5))
        );
        let () = reader;
        assert_eq!((report.closed, report.lost), (1, 0), "{report:?}");
        // Its driver lets it go at its proof deadline, as unproven.
        while server.stats().sessions_open > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(server.stats().unproven_dropped, 1);
        drop(link);
    })
    .await;
}
