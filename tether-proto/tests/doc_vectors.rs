//! Checks the "Test vectors" table of `docs/PROTOCOL.md` against the
//! encoders, so the document and the code cannot drift apart.

use std::collections::BTreeMap;

use bytes::BytesMut;
use tether_proto::{
    encode_frame, encode_item_gapped, ext, ClientHello, Control, FrameHeader, Refusal, RefusalKind,
    ResumeKey, Seq, ServerHello, MAX_HEADER_LEN,
};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Rows of the table under "## Test vectors": id -> bytes.
fn doc_vectors(doc: &str) -> BTreeMap<String, Vec<u8>> {
    let section = doc
        .split("\n## Test vectors")
        .nth(1)
        .expect("docs/PROTOCOL.md has a '## Test vectors' section");
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| id | what | `hex` | test |" splits into 6 cells.
        if cells.len() != 6 || cells[1] == "id" || cells[1].starts_with("---") {
            continue;
        }
        let hex = cells[3].trim_matches('`');
        let bytes = hex
            .split_whitespace()
            .map(|b| {
                u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex {b:?} in {line}"))
            })
            .collect();
        assert!(
            rows.insert(cells[1].to_owned(), bytes).is_none(),
            "duplicate id {}",
            cells[1]
        );
    }
    rows
}

fn frame(seq: u32, ack: Option<u32>, item: &(impl serde::Serialize + ?Sized)) -> Vec<u8> {
    let mut out = BytesMut::new();
    let header = FrameHeader {
        seq: Seq(seq),
        ack: ack.map(Seq),
    };
    encode_frame(&header, item, &mut out).unwrap();
    out.to_vec()
}

fn stream(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn counting_key(start: u8) -> ResumeKey {
    ResumeKey::from_bytes(std::array::from_fn(|i| start + i as u8))
}

fn control(c: Control) -> Vec<u8> {
    let mut out = BytesMut::new();
    c.encode(&mut out);
    out.to_vec()
}

/// The frames of one message with fragments on, built the way the sender
/// builds them: the item is encoded once with a gap in front of every
/// `piece` bytes, a fragment header (`<seq> 08`) goes into every gap but the
/// last, and an ordinary data-frame header (`<seq> 00`) into the last.
fn fragments(item: &(impl serde::Serialize + ?Sized), piece: usize, first: u32) -> Vec<Vec<u8>> {
    let mut out = BytesMut::new();
    let len = encode_item_gapped(item, &mut out, MAX_HEADER_LEN, piece).unwrap();
    let pieces = len.div_ceil(piece).max(1);
    let mut frames = Vec::new();
    for i in 0..pieces {
        let seq = Seq(first.wrapping_add(i as u32));
        let mut chunk = if i + 1 == pieces {
            out.split()
        } else {
            out.split_to(MAX_HEADER_LEN + piece)
        };
        let (header, hlen) = if i + 1 == pieces {
            FrameHeader { seq, ack: None }.to_array()
        } else {
            FrameHeader::fragment_array(seq)
        };
        chunk[MAX_HEADER_LEN - hlen..MAX_HEADER_LEN].copy_from_slice(&header[..hlen]);
        frames.push(chunk[MAX_HEADER_LEN - hlen..].to_vec());
    }
    frames
}

#[test]
fn doc_vectors_match_the_encoders() {
    let client_new = ClientHello {
        resume_key: None,
        last_received: None,
        extensions: 0,
    }
    .encode();
    let expected: BTreeMap<String, Vec<u8>> = [
        ("frame-1", frame(1, Some(0), &300u32)),
        ("frame-2", frame(4_294_967_295, None, "hi")),
        ("frame-1-stream", stream(&frame(1, Some(0), &300u32))),
        ("client-new", client_new.to_vec()),
        (
            "client-credential",
            ClientHello {
                resume_key: None,
                last_received: None,
                extensions: ext::ACKS,
            }
            .encode_with_credential(b"tok"),
        ),
        (
            "server-refused-busy",
            Refusal {
                kind: RefusalKind::Busy,
                retry_after_ms: 1500,
                reason: "full".into(),
            }
            .encode(),
        ),
        ("client-new-stream", stream(&client_new)),
        (
            "client-resume",
            ClientHello {
                resume_key: Some(counting_key(0x10)),
                last_received: Some(Seq(1000)),
                extensions: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "server",
            ServerHello {
                rejected: false,
                resume_key: counting_key(0xa0),
                last_received: Some(Seq(5)),
                extensions: 0,
            }
            .encode()
            .to_vec(),
        ),
        ("server-reject", ServerHello::reject().encode().to_vec()),
        (
            "client-new-acks",
            ClientHello {
                resume_key: None,
                last_received: None,
                extensions: tether_proto::ext::ACKS,
            }
            .encode()
            .to_vec(),
        ),
        ("control-ack", control(Control::Ack(Seq(300)))),
        ("control-ping", control(Control::Ping(7))),
        ("control-pong", control(Control::Pong(7))),
        (
            "client-new-all",
            ClientHello {
                resume_key: None,
                last_received: None,
                extensions: ext::ALL,
            }
            .encode()
            .to_vec(),
        ),
        ("server-closed", ServerHello::closed().encode().to_vec()),
        ("control-close", control(Control::Close(Seq(u32::MAX)))),
        ("control-close-41", control(Control::Close(Seq(41)))),
        ("control-closed", control(Control::Closed(Seq(41)))),
        (
            "control-window",
            control(Control::Window {
                frames: 4096,
                bytes: 1 << 20,
                recv_bytes: None,
            }),
        ),
        (
            "control-window-recv",
            control(Control::Window {
                frames: 4096,
                bytes: 1 << 20,
                recv_bytes: Some(64 << 20),
            }),
        ),
        ("fragment", {
            let (header, len) = FrameHeader::fragment_array(Seq(300));
            let mut frame = header[..len].to_vec();
            frame.extend_from_slice(b"ab");
            frame
        }),
        ("fragmented-1", fragments("abcd", 3, 300)[0].clone()),
        ("fragmented-2", fragments("abcd", 3, 300)[1].clone()),
    ]
    .into_iter()
    .chain(proof_vectors())
    .map(|(id, bytes)| (id.to_owned(), bytes))
    .collect();

    let documented = doc_vectors(&doc());
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the vector ids in docs/PROTOCOL.md differ from the ones checked here"
    );
    for (id, bytes) in &expected {
        assert_eq!(&documented[id], bytes, "vector {id} in docs/PROTOCOL.md");
    }
}

/// The decoder reads the new vectors back as what the table says they are,
/// with every extension on, and refuses them when their extension is off.
#[test]
fn doc_vectors_decode_as_documented() {
    use tether_proto::{decode_payload, Incoming};
    let documented = doc_vectors(&doc());
    let closed = ServerHello::decode(&documented["server-closed"]).unwrap();
    assert!(closed.is_closed() && closed.rejected);
    let all = ClientHello::decode(&documented["client-new-all"]).unwrap();
    assert_eq!(all.extensions, 0xfc);
    assert_eq!(ext::negotiate(all.extensions, ext::ALL), ext::ALL);
    assert_eq!(
        decode_payload(&documented["control-closed"], ext::ALL).unwrap(),
        Incoming::Control(Control::Closed(Seq(41)))
    );
    assert_eq!(
        decode_payload(&documented["control-close-41"], ext::ALL).unwrap(),
        Incoming::Control(Control::Close(Seq(41)))
    );
    for (id, recv_bytes) in [
        ("control-window", None),
        ("control-window-recv", Some(64 << 20)),
    ] {
        assert_eq!(
            decode_payload(&documented[id], ext::ALL).unwrap(),
            Incoming::Control(Control::Window {
                frames: 4096,
                bytes: 1 << 20,
                recv_bytes
            }),
            "{id}"
        );
        assert!(
            decode_payload(&documented[id], ext::ALL & !ext::ACKS).is_err(),
            "{id} without ACKS"
        );
    }
    assert_eq!(
        decode_payload(&documented["fragment"], ext::ALL).unwrap(),
        Incoming::Fragment {
            seq: Seq(300),
            item_offset: 3
        }
    );
    for (id, off) in [("control-closed", ext::CLOSE), ("fragment", ext::FRAGMENTS)] {
        assert!(
            decode_payload(&documented[id], ext::ALL & !off).is_err(),
            "{id} without its extension"
        );
    }
    // The two pieces of "abcd": a fragment, then an ordinary data frame;
    // their bytes joined are the item's postcard encoding.
    let first = &documented["fragmented-1"];
    let last = &documented["fragmented-2"];
    let Incoming::Fragment { seq, item_offset } = decode_payload(first, ext::ALL).unwrap() else {
        panic!("fragmented-1 is not a fragment");
    };
    assert_eq!(seq, Seq(300));
    let Incoming::Data {
        header,
        item_offset: last_offset,
    } = decode_payload(last, ext::ALL).unwrap()
    else {
        panic!("fragmented-2 is not a data frame");
    };
    assert_eq!(
        header,
        FrameHeader {
            seq: Seq(301),
            ack: None
        }
    );
    let mut joined = first[item_offset..].to_vec();
    joined.extend_from_slice(&last[last_offset..]);
    assert_eq!(
        tether_proto::decode_item::<String>(&joined).unwrap(),
        "abcd"
    );
}

/// The `proof-*` vectors (section 5.9), recomputed with `tether_proto::proof`
/// from the inputs the document names.
fn proof_vectors() -> Vec<(&'static str, Vec<u8>)> {
    use tether_proto::proof::{
        ClientNew, ClientResume, Ephemeral, ResumeRequest, ServerNew, ServerResume,
    };
    use tether_proto::SessionId;
    fn unhex(s: &str) -> [u8; 32] {
        let v: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }
    let client_private = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    let server_private = unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
    let mut id = [0u8; 16];
    id[3] = 1;
    for (i, b) in id[4..].iter_mut().enumerate() {
        *b = 0xa0 + i as u8;
    }
    let id = SessionId::from_bytes(id);
    assert_eq!(id.node_id(), 1);
    let client_hello = ClientHello {
        resume_key: None,
        last_received: None,
        extensions: ext::ALL,
    }
    .encode();
    let server_hello = ServerHello {
        rejected: false,
        resume_key: id.as_key(),
        last_received: None,
        extensions: ext::negotiate(ext::ALL, ext::ALL),
    };
    let client_eph = Ephemeral::from_private(client_private);
    let server_eph = Ephemeral::from_private(server_private);
    let client_public = client_eph.public();
    let server_public = server_eph.public();
    let shared = client_eph.agree(&server_public).unwrap();
    assert_eq!(*shared, *server_eph.agree(&client_public).unwrap());
    let server = ServerNew::new(&client_hello, &server_hello, server_eph);
    let offer = server.offer().to_vec();
    let new = ClientNew::new(&client_hello, client_eph)
        .finish(&offer)
        .unwrap();
    assert_eq!(new.session_id, id);
    let server_secret = server.finish(&new.key_share).unwrap();
    assert_eq!(server_secret.expose_bytes(), new.secret.expose_bytes());

    let resume_client = Ephemeral::from_private([0x11; 32]);
    let resume_server = Ephemeral::from_private([0x22; 32]);
    let (rc_pub, rs_pub) = (resume_client.public(), resume_server.public());
    let resume_shared = resume_client.agree(&rs_pub).unwrap();
    let resume = ClientResume::new(
        &id,
        Some(Seq(1000)),
        ext::ALL,
        1,
        resume_client,
        &new.secret,
    );
    let request = resume.request().to_vec();
    assert!(ResumeRequest::verify(&request, &server_secret));
    let reply_hello = ServerHello {
        rejected: false,
        resume_key: id.as_key(),
        last_received: Some(Seq(5)),
        extensions: ext::ALL,
    };
    let (reply, server_next) = ServerResume::new(&request, resume_server)
        .unwrap()
        .reply(&reply_hello, &server_secret);
    let (hello, client_next) = resume.finish(&reply).unwrap();
    assert_eq!(hello, reply_hello);
    assert_eq!(client_next.expose_bytes(), server_next.expose_bytes());
    vec![
        ("proof-client-private", client_private.to_vec()),
        ("proof-client-public", client_public.to_vec()),
        ("proof-server-private", server_private.to_vec()),
        ("proof-server-public", server_public.to_vec()),
        ("proof-shared", shared.to_vec()),
        ("proof-client-hello", client_hello.to_vec()),
        ("proof-server-offer", offer),
        ("proof-key-share", new.key_share.to_vec()),
        ("proof-secret-1", new.secret.expose_bytes().to_vec()),
        ("proof-resume-client-public", rc_pub.to_vec()),
        ("proof-resume-server-public", rs_pub.to_vec()),
        ("proof-resume-shared", resume_shared.to_vec()),
        ("proof-resume-mac-c", request[66..].to_vec()),
        ("proof-resume-request", request),
        ("proof-resume-mac-s", reply[58..].to_vec()),
        ("proof-resume-reply", reply),
        ("proof-secret-2", client_next.expose_bytes().to_vec()),
    ]
}
