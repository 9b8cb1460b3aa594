//! The RSocket codec against real rsocket-py 0.4.20 bytes, recorded by
//! `tests/python/gen_rsocket_fixtures.py` (see there for what each connection does). Every
//! recorded frame must decode to what the client meant and re-encode to the identical bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use plaza_protocol::rsocket::{
    COMPOSITE_METADATA_MIME, CompositeMetadata, ErrorCode, Frame, LengthPrefixed, MAX_REQUEST_N,
    Payload, Reassembler, encode_length_prefixed, fragment,
};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/rsocket_py_0.4.20.json");

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn connection(name: &str, direction: &str) -> Vec<u8> {
    let fx = fixture();
    let conns = fx["connections"].as_array().unwrap();
    let c = conns.iter().find(|c| c["name"] == name).unwrap();
    unhex(c[direction].as_str().unwrap())
}

/// Splits a recorded TCP byte stream into frames, feeding it `chunk` bytes at a time, and checks
/// that re-encoding every frame gives the stream back byte for byte.
fn frames_of(stream: &[u8], chunk: usize) -> Vec<Frame> {
    let codec = LengthPrefixed::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = codec.next_frame(&mut buf).unwrap() {
            frames.push(frame);
        }
    }
    assert!(buf.is_empty(), "trailing bytes");
    let mut again = BytesMut::new();
    for f in &frames {
        encode_length_prefixed(f, &mut again).unwrap();
    }
    assert_eq!(&again[..], stream, "re-encoding differs");
    frames
}

fn without_keepalives(frames: &[Frame]) -> Vec<Frame> {
    frames
        .iter()
        .filter(|f| !matches!(f, Frame::Keepalive { .. }))
        .cloned()
        .collect()
}

fn route_of(p: &Payload) -> String {
    CompositeMetadata::decode(p.metadata.as_ref().unwrap())
        .unwrap()
        .route()
        .unwrap()
}

#[test]
fn every_recorded_stream_reencodes_identically_whatever_the_read_sizes() {
    for name in ["tutorial", "fragmented_64"] {
        for dir in ["client_to_server", "server_to_client"] {
            let bytes = connection(name, dir);
            let whole = frames_of(&bytes, bytes.len());
            for chunk in [1, 2, 3, 5, 64, 1000] {
                assert_eq!(
                    frames_of(&bytes, chunk),
                    whole,
                    "{name} {dir} in {chunk}-byte reads"
                );
            }
        }
    }
}

#[test]
fn tutorial_client_frames() {
    let frames = frames_of(&connection("tutorial", "client_to_server"), 4096);
    let f = without_keepalives(&frames);

    let Frame::Setup(setup) = &f[0] else {
        panic!("{:?}", f[0])
    };
    assert_eq!((setup.major_version, setup.minor_version), (1, 0));
    // 500 ms advertised as 1000 by rsocket-py's to_milliseconds rounding.
    assert_eq!(setup.keepalive_ms, 1000);
    assert_eq!(setup.max_lifetime_ms, 600_000);
    assert_eq!(setup.metadata_mime, COMPOSITE_METADATA_MIME);
    assert_eq!(setup.data_mime, "application/json");
    assert!(!setup.lease && setup.resume_token.is_none());
    assert_eq!(setup.payload, Payload::default());
    assert_eq!(setup.unsupported(), None);

    let Frame::RequestResponse {
        stream_id: 1,
        follows: false,
        payload,
    } = &f[1]
    else {
        panic!("{:?}", f[1])
    };
    assert_eq!(route_of(payload), "login");
    assert_eq!(payload.data, "user1");

    let Frame::RequestStream {
        stream_id: 5,
        initial_n,
        payload,
        ..
    } = &f[3]
    else {
        panic!("{:?}", f[3])
    };
    assert_eq!(*initial_n, MAX_REQUEST_N);
    assert_eq!(route_of(payload), "channel.users");
    assert_eq!(payload.data, "channel1");

    let Frame::RequestStream {
        stream_id: 7,
        payload,
        ..
    } = &f[4]
    else {
        panic!("{:?}", f[4])
    };
    assert_eq!(route_of(payload), "messages.incoming");
    assert!(payload.data.is_empty());
    assert_eq!(f[5], Frame::Cancel { stream_id: 7 });

    let Frame::RequestFnf {
        stream_id: 11,
        payload,
        ..
    } = &f[7]
    else {
        panic!("{:?}", f[7])
    };
    assert_eq!(route_of(payload), "statistics");
    assert_eq!(payload.data, r#"{"memory_usage": 36244}"#);

    let Frame::RequestChannel {
        stream_id: 13,
        complete: false,
        initial_n,
        payload,
        ..
    } = &f[8]
    else {
        panic!("{:?}", f[8])
    };
    assert_eq!(*initial_n, MAX_REQUEST_N);
    assert_eq!(route_of(payload), "statistics");
    // The client's own PAYLOAD on the channel's inbound side, sent without any REQUEST_N.
    let Frame::Payload {
        stream_id: 13,
        next: true,
        complete: false,
        payload,
        ..
    } = &f[9]
    else {
        panic!("{:?}", f[9])
    };
    assert_eq!(payload.data, r#"{"ids": ["users"], "period_seconds": 1}"#);
    assert_eq!(f[10], Frame::Cancel { stream_id: 13 });

    let Frame::RequestResponse {
        stream_id: 15,
        payload,
        ..
    } = &f[11]
    else {
        panic!("{:?}", f[11])
    };
    let md = CompositeMetadata::decode(payload.metadata.as_ref().unwrap()).unwrap();
    assert_eq!(md.route().unwrap(), "file.upload");
    assert_eq!(
        md.find("chat/file-name").unwrap().content,
        "file_name_1.txt"
    );
    assert_eq!(payload.data, "abcdefg1234567");
    assert_eq!(md.to_bytes().unwrap(), payload.metadata.clone().unwrap());

    let keepalives: Vec<_> = frames
        .iter()
        .filter(|f| matches!(f, Frame::Keepalive { .. }))
        .collect();
    assert!(!keepalives.is_empty());
    assert!(
        keepalives
            .iter()
            .all(|k| matches!(k, Frame::Keepalive { respond: true, .. }))
    );
}

#[test]
fn tutorial_server_frames_are_what_our_builders_make() {
    let frames = frames_of(&connection("tutorial", "server_to_client"), 4096);
    let f = without_keepalives(&frames);
    assert_eq!(f[0], Frame::next(1, Payload::data("session-user1"), true));
    assert_eq!(f[1], Frame::complete(3));
    assert_eq!(f[2], Frame::next(5, Payload::data("user2"), false));
    assert_eq!(f[3], Frame::next(5, Payload::data("user1"), true));
    let download = f.iter().find(|f| f.stream_id() == 17).unwrap();
    let md = CompositeMetadata::new().with(
        plaza_protocol::rsocket::MimeType::Custom("chat/file-name".into()),
        "file_name_1.txt",
    );
    let expected = Payload::new(
        Some(md.to_bytes().unwrap()),
        Bytes::from_static(b"abcdefg1234567"),
    );
    assert_eq!(*download, Frame::next(17, expected, true));
    let error = f.iter().find(|f| f.stream_id() == 19).unwrap();
    assert_eq!(
        *error,
        Frame::error(19, ErrorCode::APPLICATION_ERROR, "no.such.route")
    );

    // Our KEEPALIVE replies are byte for byte the reference server's.
    let client = frames_of(&connection("tutorial", "client_to_server"), 4096);
    let ours: Vec<_> = client.iter().filter_map(Frame::keepalive_reply).collect();
    let theirs: Vec<_> = frames
        .iter()
        .filter(|f| matches!(f, Frame::Keepalive { .. }))
        .cloned()
        .collect();
    assert!(!theirs.is_empty());
    assert_eq!(ours[..theirs.len()], theirs[..]);
}

#[test]
fn fragmented_upload_and_download_reassemble() {
    let content: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    let mut reassembler = Reassembler::new(1 << 20, 1 << 20);
    let client = frames_of(&connection("fragmented_64", "client_to_server"), 4096);
    assert!(client.iter().filter(|f| f.follows()).count() > 5);
    let whole: Vec<_> = client
        .into_iter()
        .filter_map(|f| reassembler.push(f).unwrap())
        .filter(|f| f.stream_id() != 0)
        .collect();
    let Frame::RequestResponse {
        stream_id: 1,
        follows: false,
        payload,
    } = &whole[0]
    else {
        panic!("{:?}", whole[0])
    };
    let md = CompositeMetadata::decode(payload.metadata.as_ref().unwrap()).unwrap();
    assert_eq!(md.route().unwrap(), "file.upload");
    assert_eq!(md.find("chat/file-name").unwrap().content, "big.bin");
    assert_eq!(payload.data, content);
    assert_eq!(reassembler.buffered_len(), 0);

    let server = frames_of(&connection("fragmented_64", "server_to_client"), 4096);
    let whole: Vec<_> = server
        .into_iter()
        .filter_map(|f| reassembler.push(f).unwrap())
        .collect();
    let download = whole.iter().find(|f| f.stream_id() == 3).unwrap();
    let Frame::Payload {
        follows: false,
        complete: true,
        next: true,
        payload,
        ..
    } = download
    else {
        panic!("{download:?}")
    };
    assert_eq!(payload.data, content);

    // Our own fragmenter, with the reference's 61-byte frames (64 minus the length prefix).
    let pieces = fragment(download.clone(), 61).unwrap();
    assert!(pieces.len() > 5);
    assert!(pieces.iter().all(|p| p.encoded_len() <= 61));
    let mut r = Reassembler::new(1 << 20, 1 << 20);
    let back: Vec<_> = pieces
        .into_iter()
        .filter_map(|p| r.push(p).unwrap())
        .collect();
    assert_eq!(back, vec![download.clone()]);
}

fn single(name: &str) -> (Bytes, Frame) {
    let fx = fixture();
    let bytes = Bytes::from(unhex(fx["frames"][name].as_str().unwrap()));
    let frame = Frame::decode(bytes.clone()).unwrap();
    assert_eq!(
        frame.to_bytes().unwrap(),
        bytes,
        "{name} re-encodes differently"
    );
    (bytes, frame)
}

#[test]
fn single_frames() {
    let Frame::Setup(s) = single("setup_lease").1 else {
        panic!()
    };
    assert!(s.lease);
    assert_eq!(s.unsupported().unwrap().0, ErrorCode::UNSUPPORTED_SETUP);

    let Frame::Setup(s) = single("setup_resume").1 else {
        panic!()
    };
    assert_eq!(s.resume_token.as_deref(), Some(&b"resume-token"[..]));
    assert_eq!((s.keepalive_ms, s.max_lifetime_ms), (2000, 30_000));
    assert_eq!(
        s.payload,
        Payload::new(
            Some(Bytes::from_static(b"setup-metadata")),
            Bytes::from_static(b"setup-data")
        )
    );
    assert_eq!(s.unsupported().unwrap().0, ErrorCode::UNSUPPORTED_SETUP);

    let (_, ka) = single("keepalive_respond");
    assert_eq!(
        ka,
        Frame::Keepalive {
            respond: true,
            last_received_position: 0,
            data: Bytes::from_static(b"ping")
        }
    );
    assert_eq!(
        ka.keepalive_reply(),
        Some(Frame::Keepalive {
            respond: false,
            last_received_position: 0,
            data: Bytes::from_static(b"ping")
        })
    );

    assert_eq!(
        single("request_n").1,
        Frame::RequestN {
            stream_id: 3,
            n: 16
        }
    );
    assert_eq!(single("cancel").1, Frame::Cancel { stream_id: 3 });
    assert_eq!(single("payload_complete").1, Frame::complete(5));

    let Frame::Payload {
        stream_id: 7,
        complete: true,
        next: true,
        payload,
        ..
    } = single("payload_next_complete_metadata").1
    else {
        panic!()
    };
    let md = CompositeMetadata::decode(payload.metadata.as_ref().unwrap()).unwrap();
    assert_eq!(md.find("chat/file-name").unwrap().content, "f.txt");

    let Frame::RequestChannel {
        stream_id: 9,
        complete: true,
        initial_n: 2,
        payload,
        ..
    } = single("request_channel_complete").1
    else {
        panic!()
    };
    assert_eq!(route_of(&payload), "statistics");

    let Frame::MetadataPush { metadata } = single("metadata_push").1 else {
        panic!()
    };
    assert_eq!(
        CompositeMetadata::decode(&metadata)
            .unwrap()
            .route()
            .unwrap(),
        "x"
    );

    assert_eq!(
        single("error_unsupported_setup").1,
        Frame::error(0, ErrorCode::UNSUPPORTED_SETUP, "lease is not supported")
    );
    assert_eq!(
        single("error_application").1,
        Frame::error(11, ErrorCode::APPLICATION_ERROR, "No handler for route")
    );
    assert_eq!(
        single("lease").1,
        Frame::Lease {
            ttl_ms: 1000,
            number_of_requests: 5,
            metadata: Some(Bytes::from_static(b"lease-metadata"))
        }
    );
}

#[test]
fn composite_metadata_from_rsocket_py_helpers() {
    let fx = fixture();
    let md = |name: &str| {
        let bytes = Bytes::from(unhex(fx["metadata"][name].as_str().unwrap()));
        let decoded = CompositeMetadata::decode(&bytes).unwrap();
        assert_eq!(decoded.to_bytes().unwrap(), bytes);
        decoded
    };
    assert_eq!(md("route_login").route().unwrap(), "login");
    assert_eq!(
        md("route_two_tags").routing_tags().unwrap().unwrap(),
        ["a", "bb"]
    );
    assert_eq!(md("route_two_tags").route().unwrap(), "a");
    let upload = md("upload");
    assert_eq!(upload.route().unwrap(), "file.upload");
    assert_eq!(
        upload.find("chat/file-name").unwrap().content,
        "file_name_1.txt"
    );
    // rsocket-py turns a well-known name into its id.
    let json = md("json_entry");
    assert_eq!(
        json.entries[0].mime,
        plaza_protocol::rsocket::MimeType::WellKnown(0x05)
    );
    assert!(json.find("application/json").is_some());
    let built = CompositeMetadata::new()
        .with_route(&["file.upload"])
        .unwrap()
        .with(
            plaza_protocol::rsocket::MimeType::from_name("chat/file-name"),
            "file_name_1.txt",
        );
    assert_eq!(built, upload);
}
