//! `tether::link::any`: one server listening on TCP, Unix and TLS at once
//! through an `AnyListener`, clients built from URLs with
//! `AnyConnector::parse`, and one session that resumes over a different
//! transport on every link.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::pki::Ca;
use common::{config, exchange, within, Msg, Traffic};
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::any::{AnyConnector, AnyLink, AnyListener};
use tether::link::tls::{ClientTls, ServerTls, TlsListener};
use tether::link::{TcpListener, UnixListener};
use tether::{Connector, LinkError, Server, StableConduit};

struct Endpoints {
    server: Server<Msg>,
    urls: Vec<String>,
    /// The TCP and the TLS listener's addresses.
    addrs: [SocketAddr; 2],
    tls: ClientTls,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);
    impl Dir {
        pub(crate) fn new(tag: &str) -> Dir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = std::env::temp_dir()
                .join(format!("tether-any-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn endpoints(tag: &str, seed: u64) -> Endpoints {
    let ca = Ca::new("tether any-link test CA");
    let issued = ca.localhost();
    let server_tls = ServerTls::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
        .expect("server TLS config");
    let tls = ClientTls::from_ca_pem(ca.cert_pem.as_bytes()).expect("client TLS config");
    let dir = tempdir::Dir::new(tag);
    let socket = dir.0.join("s.sock");
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let tls_listener = TlsListener::bind((Ipv4Addr::LOCALHOST, 0), server_tls)
        .await
        .unwrap();
    let unix = UnixListener::bind(&socket).unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    let urls = vec![
        format!("tcp://localhost:{}", tcp.local_addr().unwrap().port()),
        format!("unix:{}", socket.display()),
        format!(
            "tls://localhost:{}",
            tls_listener.local_addr().unwrap().port()
        ),
        // A bare host:port is TCP.
        format!("127.0.0.1:{}", tcp.local_addr().unwrap().port()),
    ];
    let listener = AnyListener::new().with(tcp).with(unix).with(tls_listener);
    assert_eq!(listener.len(), 3);
    Endpoints {
        server: Server::new(listener, config(seed)),
        urls,
        addrs: [tcp_addr, tls_addr],
        tls,
        _dir: dir,
    }
}

#[tokio::test]
async fn one_server_on_three_transports() {
    within(async {
        let ends = endpoints("three", 1).await;
        for (i, url) in ends.urls.iter().enumerate() {
            let connector = AnyConnector::parse(url, Some(ends.tls.clone())).unwrap();
            let client = StableConduit::<Msg>::connect(connector, config(i as u64))
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let session = ends.server.accept().await.unwrap();
            let is_tls = url.starts_with("tls://");
            assert_eq!(session.session_info().unwrap().peer().tls.is_some(), is_tls);
            let t = Traffic {
                seed: i as u64,
                streams: 2,
                per_stream: 200,
                max_len: 2000,
            };
            exchange(client, session, t, t)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    })
    .await;
}

/// Connects over each URL in turn, one per link, so every resume arrives
/// over another transport than the link before it.
struct Rotating {
    connectors: Vec<AnyConnector>,
    next: AtomicUsize,
    links: Arc<AtomicUsize>,
}

impl Connector for Rotating {
    type Link = AnyLink;

    async fn connect(&self) -> Result<AnyLink, LinkError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connectors.len();
        let link = self.connectors[i].connect().await?;
        self.links.fetch_add(1, Ordering::Relaxed);
        Ok(link)
    }
}

#[tokio::test]
async fn a_session_resumes_over_another_transport() {
    within(async {
        let ends = endpoints("rotate", 2).await;
        let fault = |seed| FaultConfig {
            seed,
            mean_bytes_between_cuts: 64 * 1024,
            handshake_cut_probability: 0.1,
            max_connection_age: None,
        };
        // The fault proxies cut the TCP under each transport.
        let tcp = FaultProxy::start(ends.addrs[0], fault(20)).await.unwrap();
        let tls = FaultProxy::start(ends.addrs[1], fault(21)).await.unwrap();
        let links = Arc::new(AtomicUsize::new(0));
        let rotating = Rotating {
            connectors: vec![
                AnyConnector::parse(&format!("tcp://{}", tcp.local_addr()), None).unwrap(),
                AnyConnector::parse(
                    &format!("tls://localhost:{}", tls.local_addr().port()),
                    Some(ends.tls.clone()),
                )
                .unwrap(),
            ],
            next: AtomicUsize::new(0),
            links: links.clone(),
        };
        let client = StableConduit::<Msg>::connect(rotating, config(2))
            .await
            .unwrap();
        let session = ends.server.accept().await.unwrap();
        let t = Traffic {
            seed: 2,
            streams: 3,
            per_stream: 600,
            max_len: 4000,
        };
        exchange(client, session, t, t).await.unwrap();
        let cuts = tcp.stats().cuts + tls.stats().cuts;
        let links = links.load(Ordering::Relaxed);
        println!("{cuts} cuts, {links} links");
        assert!(cuts >= 4, "the proxies cut the links ({cuts} cuts)");
        assert!(
            links > cuts as usize / 2,
            "the client reconnected ({links} links)"
        );
        assert!(ends.server.stats().resumes >= 2);
    })
    .await;
}
