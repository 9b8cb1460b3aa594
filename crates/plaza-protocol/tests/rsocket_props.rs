//! Property tests of the RSocket codec: every frame survives encode then decode, fragment then
//! reassemble, and no byte sequence panics any decoder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use plaza_protocol::rsocket::{
    CompositeMetadata, ErrorCode, Frame, LengthPrefixed, MAX_REQUEST_N, MetadataEntry, MimeType,
    Payload, Reassembler, Setup, decode_routing, encode_length_prefixed, encode_routing, fragment,
};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn payload() -> impl Strategy<Value = Payload> {
    (prop::option::of(bytes(40)), bytes(60)).prop_map(|(metadata, data)| Payload { metadata, data })
}

fn stream_id() -> impl Strategy<Value = u32> {
    1..=0x7FFF_FFFFu32
}

fn n() -> impl Strategy<Value = u32> {
    0..=MAX_REQUEST_N
}

fn position() -> impl Strategy<Value = u64> {
    0..=0x7FFF_FFFF_FFFF_FFFFu64
}

fn mime() -> impl Strategy<Value = String> {
    "[ -~]{0,40}"
}

fn frame() -> impl Strategy<Value = Frame> {
    let setup = (
        any::<(u16, u16)>(),
        (n(), n()),
        any::<bool>(),
        prop::option::of(bytes(20)),
        mime(),
        mime(),
        payload(),
    )
        .prop_map(
            |(
                (major_version, minor_version),
                (keepalive_ms, max_lifetime_ms),
                lease,
                resume_token,
                m,
                d,
                p,
            )| {
                Frame::Setup(Setup {
                    major_version,
                    minor_version,
                    keepalive_ms,
                    max_lifetime_ms,
                    lease,
                    resume_token,
                    metadata_mime: m,
                    data_mime: d,
                    payload: p,
                })
            },
        );
    prop_oneof![
        setup,
        (n(), n(), prop::option::of(bytes(30))).prop_map(
            |(ttl_ms, number_of_requests, metadata)| Frame::Lease {
                ttl_ms,
                number_of_requests,
                metadata
            }
        ),
        (any::<bool>(), position(), bytes(30)).prop_map(
            |(respond, last_received_position, data)| {
                Frame::Keepalive {
                    respond,
                    last_received_position,
                    data,
                }
            }
        ),
        (stream_id(), any::<bool>(), payload()).prop_map(|(stream_id, follows, payload)| {
            Frame::RequestResponse {
                stream_id,
                follows,
                payload,
            }
        }),
        (stream_id(), any::<bool>(), payload()).prop_map(|(stream_id, follows, payload)| {
            Frame::RequestFnf {
                stream_id,
                follows,
                payload,
            }
        }),
        (stream_id(), any::<bool>(), n(), payload()).prop_map(
            |(stream_id, follows, initial_n, payload)| {
                Frame::RequestStream {
                    stream_id,
                    follows,
                    initial_n,
                    payload,
                }
            }
        ),
        (stream_id(), any::<(bool, bool)>(), n(), payload()).prop_map(
            |(stream_id, (follows, complete), initial_n, payload)| Frame::RequestChannel {
                stream_id,
                follows,
                complete,
                initial_n,
                payload
            }
        ),
        (stream_id(), n()).prop_map(|(stream_id, n)| Frame::RequestN { stream_id, n }),
        stream_id().prop_map(|stream_id| Frame::Cancel { stream_id }),
        (stream_id(), any::<(bool, bool, bool)>(), payload()).prop_map(
            |(stream_id, (follows, complete, next), payload)| Frame::Payload {
                stream_id,
                follows,
                complete,
                next,
                payload
            }
        ),
        (0..=0x7FFF_FFFFu32, any::<u32>(), bytes(30)).prop_map(|(stream_id, code, data)| {
            Frame::Error {
                stream_id,
                code: ErrorCode(code),
                data,
            }
        }),
        bytes(30).prop_map(|metadata| Frame::MetadataPush { metadata }),
        (any::<(u16, u16)>(), bytes(20), position(), position()).prop_map(
            |((major, minor), token, a, b)| {
                Frame::Resume {
                    major_version: major,
                    minor_version: minor,
                    token,
                    last_received_server_position: a,
                    first_available_client_position: b,
                }
            }
        ),
        position().prop_map(|p| Frame::ResumeOk {
            last_received_client_position: p
        }),
        (
            0..=0x7FFF_FFFFu32,
            any::<(bool, bool)>(),
            any::<u32>(),
            bytes(30)
        )
            .prop_map(
                |(stream_id, (ignore, metadata_flag), extended_type, body)| Frame::Ext {
                    stream_id,
                    ignore,
                    metadata_flag,
                    extended_type,
                    body
                }
            ),
    ]
}

/// Fragment-related frames on streams 1 to 3, so that fragments of one stream meet each other.
fn few_streams_frame() -> impl Strategy<Value = Frame> {
    (1..4u32, 0..6u8, any::<(bool, bool, bool)>(), payload()).prop_map(
        |(stream_id, kind, (follows, complete, next), payload)| match kind {
            0 => Frame::RequestResponse {
                stream_id,
                follows,
                payload,
            },
            1 => Frame::RequestChannel {
                stream_id,
                follows,
                complete,
                initial_n: 1,
                payload,
            },
            2 => Frame::Cancel { stream_id },
            3 => Frame::error(stream_id, ErrorCode::APPLICATION_ERROR, "x"),
            _ => Frame::Payload {
                stream_id,
                follows,
                complete,
                next,
                payload,
            },
        },
    )
}

fn composite() -> impl Strategy<Value = CompositeMetadata> {
    let mime = prop_oneof![
        (0..=0x7Fu8).prop_map(MimeType::WellKnown),
        "[ -~]{1,128}".prop_map(MimeType::Custom)
    ];
    prop::collection::vec((mime, bytes(50)), 0..5).prop_map(|entries| CompositeMetadata {
        entries: entries
            .into_iter()
            .map(|(mime, content)| MetadataEntry { mime, content })
            .collect(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_encode_roundtrip(f in frame()) {
        let bytes = f.to_bytes().unwrap();
        prop_assert_eq!(bytes.len(), f.encoded_len());
        prop_assert_eq!(Frame::decode(bytes).unwrap(), f);
    }

    #[test]
    fn length_prefixed_roundtrip_in_any_read_sizes(
        frames in prop::collection::vec(frame(), 0..8),
        chunk in 1usize..100,
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            encode_length_prefixed(f, &mut wire).unwrap();
        }
        let codec = LengthPrefixed::default();
        let mut buf = BytesMut::new();
        let mut back = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = codec.next_frame(&mut buf).unwrap() {
                back.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(back, frames);
    }

    #[test]
    fn fragment_then_reassemble_is_identity(f in frame(), size in 32usize..200) {
        let mut f = f;
        // Only whole frames are fragmented; a request or PAYLOAD that is itself a fragment is not.
        if let Frame::RequestResponse { follows, .. }
        | Frame::RequestFnf { follows, .. }
        | Frame::RequestStream { follows, .. }
        | Frame::RequestChannel { follows, .. }
        | Frame::Payload { follows, .. } = &mut f
        {
            *follows = false;
        }
        let pieces = fragment(f.clone(), size).unwrap();
        for p in &pieces {
            prop_assert!(p.encoded_len() <= size || pieces.len() == 1);
        }
        let mut r = Reassembler::new(1 << 20, 1 << 20);
        let mut out = Vec::new();
        for p in pieces {
            // Through the wire as well.
            let p = Frame::decode(p.to_bytes().unwrap()).unwrap();
            out.extend(r.push(p).unwrap());
        }
        prop_assert_eq!(out, vec![f]);
        prop_assert_eq!(r.buffered_len(), 0);
    }

    #[test]
    fn composite_metadata_roundtrip(md in composite()) {
        let bytes = md.to_bytes().unwrap();
        prop_assert_eq!(CompositeMetadata::decode(&bytes).unwrap(), md);
    }

    #[test]
    fn routing_roundtrip(tags in prop::collection::vec(".{0,20}", 0..5)) {
        prop_assume!(tags.iter().all(|t| t.len() <= 255));
        let bytes = encode_routing(&tags).unwrap();
        prop_assert_eq!(decode_routing(&bytes).unwrap(), tags);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(raw in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(f) = Frame::decode(Bytes::from(raw.clone())) {
            // Whatever decodes encodes again (reserved bits aside) and decodes to the same frame.
            let again = f.to_bytes().unwrap();
            prop_assert_eq!(Frame::decode(again).unwrap(), f);
        }
    }

    #[test]
    fn arbitrary_headers_never_panic(
        stream in any::<u32>(),
        type_and_flags in any::<u16>(),
        body in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut raw = stream.to_be_bytes().to_vec();
        raw.extend(type_and_flags.to_be_bytes());
        raw.extend(body);
        let _ = Frame::decode(Bytes::from(raw));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_length_prefixed_decoder(
        raw in prop::collection::vec(any::<u8>(), 0..200),
        max in 0usize..100,
        chunk in 1usize..50,
    ) {
        let codec = LengthPrefixed::new(max);
        let mut buf = BytesMut::new();
        let mut reassembler = Reassembler::new(100, 150);
        'outer: for piece in raw.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.next_frame_bytes(&mut buf) {
                    Ok(Some(bytes)) => {
                        prop_assert!(bytes.len() <= max);
                        if let Ok(f) = Frame::decode(bytes) {
                            let _ = reassembler.push(f);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_metadata_decoders(raw in prop::collection::vec(any::<u8>(), 0..120)) {
        let bytes = Bytes::from(raw);
        if let Ok(md) = CompositeMetadata::decode(&bytes) {
            prop_assert_eq!(md.to_bytes().unwrap(), bytes.clone());
            let _ = md.route();
        }
        let _ = decode_routing(&bytes);
    }

    #[test]
    fn reassembler_never_panics_and_respects_limits(frames in prop::collection::vec(few_streams_frame(), 0..40)) {
        let mut r = Reassembler::new(64, 100);
        for f in frames {
            let _ = r.push(f);
            prop_assert!(r.buffered_len() <= 100);
        }
        for id in 0..4 {
            r.discard(id);
        }
        prop_assert_eq!(r.buffered_len(), 0);
    }
}
