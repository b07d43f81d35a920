//! Checks the "Test vectors" table of `docs/PROTOCOL.md` against the
//! encoders, so the document and the code cannot drift apart.

use std::collections::BTreeMap;

use bytes::BytesMut;
use tether_proto::{encode_frame, ClientHello, Control, FrameHeader, ResumeKey, Seq, ServerHello};

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
        ("control-close", control(Control::Close(Seq(u32::MAX)))),
        (
            "control-window",
            control(Control::Window {
                frames: 4096,
                bytes: 1 << 20,
            }),
        ),
    ]
    .into_iter()
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
