//! The public API as a tokio user meets it (issue 12): message types,
//! what `send` takes, and what the errors say.

use std::time::Duration;

use tether::link::mem;
use tether::{ByteBuf, Config, Server, StableConduit};

/// A client and a server's session of `S` over an in-memory link.
async fn pair<S>() -> (Server<S>, StableConduit<S>, StableConduit<S>)
where
    S: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let (listener, connector) = mem::listener(64);
    let server = Server::<S>::new(listener, Config::default());
    let client = StableConduit::<S>::connect(connector, Config::default())
        .await
        .expect("connect");
    let session = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("accept timed out")
        .expect("a session");
    (server, client, session)
}

// ---- ByteBuf ----

/// A `ByteBuf` encodes as a varint length and the raw bytes: the bytes a
/// postcard `Vec<u8>` and `serde_bytes::ByteBuf` produce, so `tether echo`
/// stays interoperable with earlier versions.
#[test]
fn bytebuf_encodes_as_length_and_raw_bytes() {
    for len in [0usize, 1, 127, 128, 300, 70_000] {
        let raw: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let mut expected = Vec::new();
        let mut n = len;
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                expected.push(byte);
                break;
            }
            expected.push(byte | 0x80);
        }
        expected.extend_from_slice(&raw);
        let encoded = postcard::to_allocvec(&ByteBuf::from(raw.clone())).unwrap();
        assert_eq!(encoded, expected, "ByteBuf of {len} bytes");
        assert_eq!(
            postcard::to_allocvec(&raw).unwrap(),
            expected,
            "Vec<u8> of {len} bytes"
        );
        assert_eq!(postcard::from_bytes::<ByteBuf>(&encoded).unwrap(), raw);
        assert_eq!(postcard::from_bytes::<Vec<u8>>(&encoded).unwrap(), raw);
    }
    assert_eq!(
        postcard::to_allocvec(&ByteBuf::from(*b"abc")).unwrap(),
        b"\x03abc"
    );
}

/// Conversions keep the bytes, and those the `bytes` crate allows do not
/// copy.
#[test]
fn bytebuf_conversions() {
    let v = vec![9u8, 8, 7];
    let ptr = v.as_ptr();
    let buf = ByteBuf::from(v);
    let shared = bytes::Bytes::from(buf);
    assert_eq!(shared.as_ptr(), ptr, "ByteBuf into Bytes copied");
    let back = ByteBuf::from(shared);
    assert_eq!(back.as_ptr(), ptr, "a unique Bytes into ByteBuf copied");
    let v: Vec<u8> = back.into_vec();
    assert_eq!(v.as_ptr(), ptr);
    assert_eq!(ByteBuf::from(&v[..]), v);
    let mut buf: ByteBuf = (0..4u8).collect();
    buf[0] = 10;
    buf.extend([4u8]);
    assert_eq!(&*buf, [10, 1, 2, 3, 4]);
    assert_eq!(format!("{:?}", ByteBuf::from(*b"a\x00\"")), r#"b"a\x00\"""#);
}

/// Through a stable conduit both ways, as a `ByteBuf` and as a slice, and
/// read back as a `Vec<u8>` by a peer of that type: the same wire bytes.
#[tokio::test]
async fn bytebuf_round_trips_through_a_stable_conduit() {
    let (_server, client, mut session) = pair::<ByteBuf>().await;
    let big = ByteBuf::from(vec![0xa5; 100_000]);
    client.send(&big).await.unwrap();
    client.send(&b"slice"[..]).await.unwrap();
    client.send(&ByteBuf::new()).await.unwrap();
    assert_eq!(session.recv().await.unwrap(), Some(big.clone()));
    assert_eq!(
        session.recv().await.unwrap().as_deref(),
        Some(&b"slice"[..])
    );
    assert_eq!(session.recv().await.unwrap(), Some(ByteBuf::new()));
    session.send(&big).await.unwrap();
    let (_tx, mut rx) = client.split();
    assert_eq!(rx.recv().await.unwrap(), Some(big));

    // A peer that reads Vec<u8> gets the same bytes.
    let (listener, connector) = mem::listener(64);
    let server = Server::<ByteBuf, Vec<u8>>::new(listener, Config::default());
    let client = StableConduit::<ByteBuf, Vec<u8>>::connect(connector, Config::default())
        .await
        .unwrap();
    let session = server.accept().await.unwrap();
    client.send(&ByteBuf::from(*b"as a vec")).await.unwrap();
    let (_stx, mut srx) = session.split();
    assert_eq!(srx.recv().await.unwrap(), Some(b"as a vec".to_vec()));
}

// ---- send ----

/// `send` takes what the message type borrows as, also from a cloned
/// sender inside `select!`.
#[tokio::test]
async fn send_takes_borrowed_forms() {
    let (_server, client, mut session) = pair::<String>().await;
    client.send("a str").await.unwrap();
    let owned = String::from("a String");
    client.send(&owned).await.unwrap();
    let (tx, _rx) = client.split();
    let tx2 = tx.clone();
    tokio::select! {
        r = tx2.send("in select") => r.unwrap(),
        () = tokio::time::sleep(Duration::from_secs(5)) => panic!("send stalled"),
    }
    for want in ["a str", "a String", "in select"] {
        assert_eq!(session.recv().await.unwrap().as_deref(), Some(want));
    }
}

// ---- decode errors ----

/// Two ends that disagree on the message type: the error names the type
/// this side expected, for leftover bytes and for a failed decode, with the
/// frame's seq; the conduit stays usable.
#[tokio::test]
async fn decode_error_names_the_expected_type() {
    let (listener, connector) = mem::listener(64);
    let server = Server::<u64, u64>::new(listener, Config::default());
    let mut client = StableConduit::<String, String>::connect(connector, Config::default())
        .await
        .unwrap();
    let mut session = server.accept().await.unwrap();

    client.send("hello").await.unwrap();
    client.send("again").await.unwrap();
    let err = session.recv().await.unwrap_err();
    let tether::Error::Decode {
        seq: Some(seq),
        expected,
        error: tether::proto::FrameError::TrailingBytes(5),
        ..
    } = &err
    else {
        panic!("expected a trailing-bytes Decode error, got {err:?}");
    };
    assert_eq!(*expected, "u64");
    assert_eq!(
        err.to_string(),
        format!(
            "could not decode message {seq} as u64: \
             frame item decoded but 5 trailing byte(s) were left over"
        )
    );
    assert!(session
        .recv()
        .await
        .unwrap_err()
        .to_string()
        .contains(" as u64: "));

    // A length far past the end: the decode itself fails.
    session.send(&u64::MAX).await.unwrap();
    let err = client.recv().await.unwrap_err();
    let tether::Error::Decode {
        seq: Some(_),
        expected,
        error: tether::proto::FrameError::Decode(_),
        ..
    } = &err
    else {
        panic!("expected a failed Decode error, got {err:?}");
    };
    assert_eq!(*expected, std::any::type_name::<String>());
    assert!(
        err.to_string().contains(" as alloc::string::String: "),
        "{err}"
    );

    // Still usable: a value that is valid as both types.
    session.send(&0).await.unwrap();
    assert_eq!(client.recv().await.unwrap().as_deref(), Some(""));
}

// ---- who closed ----

/// After the peer closed, `send` says so (`PeerClosed`); on the side that
/// closed, `Closed`. Both count as `is_closed`, and neither is a lost
/// session.
#[tokio::test]
async fn send_after_close_tells_who_closed() {
    let (_server, client, session) = pair::<String>().await;
    let (ctx, mut crx) = client.split();
    let (stx, mut srx) = session.split();
    ctx.send("before").await.unwrap();
    ctx.close().await.unwrap();

    let closed = ctx.send("after my close").await.unwrap_err();
    assert!(matches!(closed, tether::Error::Closed), "{closed:?}");
    assert_eq!(closed.to_string(), "the conduit is closed (by this side)");

    // The server's session learns of the close with the message before it.
    assert_eq!(srx.recv().await.unwrap().as_deref(), Some("before"));
    assert_eq!(srx.recv().await.unwrap(), None);
    let peer = stx.send("after the peer's close").await.unwrap_err();
    assert!(matches!(peer, tether::Error::PeerClosed), "{peer:?}");
    assert_eq!(peer.to_string(), "the peer closed the conduit");
    assert!(peer.is_closed() && closed.is_closed());
    assert!(peer.session_lost().is_none());
    assert_eq!(
        std::io::Error::from(peer).kind(),
        std::io::ErrorKind::BrokenPipe
    );
    // The peer's own close() completes cleanly.
    stx.close().await.unwrap();
    assert_eq!(crx.recv().await.unwrap(), None);
}
