//! Replies to publish requests, read without building a JSON tree per reply.
//!
//! The native protocol answers `{"id":N,"result":{}}`, or on a channel with history
//! `{"id":N,"result":{"epoch":"E","offset":K}}`; the backend API answers the `result` object alone
//! (`{}` or `{"epoch":"E","offset":K}`). Replies in exactly the layout the server writes are read by
//! a byte scan; anything else (another field order, whitespace, extra fields, an error) goes
//! through serde, and what serde cannot read as a reply is [`Reply::Malformed`]. Nothing here
//! panics on any input.
//!
//! The fast path checks the structure it needs (the id and offset are unsigned integers, the
//! epoch is a terminated string) but does not validate the epoch's escapes: epochs are compared as
//! written, never decoded.

use crate::payload::take_u64;
use crate::peer::native::string_end;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// A publication's position in its channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    /// The epoch as written between its quotes (escapes kept): compare it, do not decode it.
    pub epoch: &'a [u8],
    pub offset: u64,
}

/// One line (one JSON object) received on a publisher's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `{"id":N,"result":{...}}`: acknowledged, with the position when the result has one.
    Ok {
        id: u64,
        position: Option<Position<'a>>,
    },
    /// `{"id":…,"error":{...}}`; `id` is `None` for `"id":null` or an id this client never sends
    /// (not an unsigned integer).
    Error { id: Option<u64> },
    /// A push (the publisher is not subscribed, so it should get none).
    Push,
    /// Not a reply of the protocol, or a result this client cannot read.
    Malformed,
}

/// Reads one line of a native frame.
pub fn parse_reply(line: &[u8]) -> Reply<'_> {
    fast_reply(line).unwrap_or_else(|| slow_reply(line))
}

/// Reads the body of a 2xx answer to `POST /api/publish`: `Some(position)` (`None` inside when
/// the channel has no history), `None` when it is not a publish result.
pub fn parse_api_result(body: &[u8]) -> Option<Option<Position<'_>>> {
    let body = body.trim_ascii();
    if let Some((position, rest)) = fast_result(body)
        && rest.is_empty()
    {
        return Some(position);
    }
    let raw = serde_json::from_slice::<&RawValue>(body).ok()?;
    slow_result(raw)
}

/// `{"id":N,"result":R}` with `R` as [`fast_result`] reads it, and nothing after.
fn fast_reply(line: &[u8]) -> Option<Reply<'_>> {
    let rest = line.strip_prefix(b"{\"id\":")?;
    let (id, rest) = take_u64(rest)?;
    let rest = rest.strip_prefix(b",\"result\":")?;
    let (position, rest) = fast_result(rest)?;
    (rest == b"}").then_some(Reply::Ok { id, position })
}

/// `{}` or `{"epoch":"E","offset":K}` at the start of `s`; returns what follows it.
fn fast_result(s: &[u8]) -> Option<(Option<Position<'_>>, &[u8])> {
    if let Some(rest) = s.strip_prefix(b"{}") {
        return Some((None, rest));
    }
    let rest = s.strip_prefix(b"{\"epoch\":\"")?;
    let end = string_end(rest)?;
    let epoch = &rest[..end];
    let rest = rest[end + 1..].strip_prefix(b",\"offset\":")?;
    let (offset, rest) = take_u64(rest)?;
    let rest = rest.strip_prefix(b"}")?;
    Some((Some(Position { epoch, offset }), rest))
}

/// Any reply, for the slow path.
#[derive(Deserialize)]
struct AnyReply<'a> {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default)]
    push: Option<IgnoredAny>,
}

/// The part of a publish result this client reads.
#[derive(Deserialize)]
struct PublishResult<'a> {
    #[serde(default, borrow)]
    epoch: Option<&'a RawValue>,
    #[serde(default)]
    offset: Option<u64>,
}

fn slow_reply(line: &[u8]) -> Reply<'_> {
    // serde would also read a struct from an array.
    if !line.trim_ascii_start().starts_with(b"{") {
        return Reply::Malformed;
    }
    let Ok(r) = serde_json::from_slice::<AnyReply<'_>>(line) else {
        return Reply::Malformed;
    };
    let id = r.id.as_ref().and_then(serde_json::Value::as_u64);
    match (r.result, r.error, r.push) {
        (None, Some(_), _) => Reply::Error { id },
        (Some(result), None, _) => match (id, slow_result(result)) {
            (Some(id), Some(position)) => Reply::Ok { id, position },
            _ => Reply::Malformed,
        },
        (None, None, Some(_)) => Reply::Push,
        _ => Reply::Malformed,
    }
}

/// A result object: `Some(None)` without a position, `Some(Some(_))` with a string epoch and an
/// unsigned offset, `None` for anything else (not an object, half a position, wrong types).
fn slow_result(result: &RawValue) -> Option<Option<Position<'_>>> {
    if !result.get().starts_with('{') {
        return None;
    }
    let r = serde_json::from_str::<PublishResult<'_>>(result.get()).ok()?;
    match (r.epoch, r.offset) {
        (None, None) => Some(None),
        (Some(epoch), Some(offset)) => {
            let epoch = epoch
                .get()
                .as_bytes()
                .strip_prefix(b"\"")?
                .strip_suffix(b"\"")?;
            Some(Some(Position { epoch, offset }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(epoch: &[u8], offset: u64) -> Option<Position<'_>> {
        Some(Position { epoch, offset })
    }

    #[test]
    fn reads_the_server_layout_fast() {
        let line = br#"{"id":7,"result":{}}"#;
        assert_eq!(
            fast_reply(line),
            Some(Reply::Ok {
                id: 7,
                position: None
            })
        );
        let line = br#"{"id":18446744073709551615,"result":{"epoch":"c0ffee12","offset":42}}"#;
        assert_eq!(
            fast_reply(line),
            Some(Reply::Ok {
                id: u64::MAX,
                position: pos(b"c0ffee12", 42)
            })
        );
        // An escaped quote stays inside the epoch.
        let line = br#"{"id":1,"result":{"epoch":"a\"b","offset":0}}"#;
        assert_eq!(
            parse_reply(line),
            Reply::Ok {
                id: 1,
                position: pos(br#"a\"b"#, 0)
            }
        );
    }

    #[test]
    fn other_layouts_go_through_serde() {
        for line in [
            &br#"{ "id": 3, "result": {} }"#[..],
            br#"{"result":{},"id":3}"#,
            br#"{"id":3,"result":{"x":[1,{"y":2}]}}"#,
        ] {
            assert_eq!(fast_reply(line), None, "{}", String::from_utf8_lossy(line));
            assert_eq!(
                parse_reply(line),
                Reply::Ok {
                    id: 3,
                    position: None
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        for line in [
            &br#"{"id":4,"result":{"offset":9,"epoch":"e"}}"#[..],
            br#"{"id":4,"result":{"epoch":"e","offset":9,"recovered":false}}"#,
            br#"{"id":4,"result":{"epoch":"e", "offset":9}}"#,
        ] {
            assert_eq!(fast_reply(line), None, "{}", String::from_utf8_lossy(line));
            assert_eq!(
                parse_reply(line),
                Reply::Ok {
                    id: 4,
                    position: pos(b"e", 9)
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn errors_and_pushes() {
        assert_eq!(
            parse_reply(br#"{"id":5,"error":{"code":107,"message":"no"}}"#),
            Reply::Error { id: Some(5) }
        );
        assert_eq!(
            parse_reply(br#"{"id":null,"error":{"code":101,"message":"invalid JSON"}}"#),
            Reply::Error { id: None }
        );
        assert_eq!(
            parse_reply(br#"{"id":"req-1","error":{"code":100}}"#),
            Reply::Error { id: None }
        );
        assert_eq!(
            parse_reply(br#"{"push":"publication","channel":"c","data":1}"#),
            Reply::Push
        );
    }

    #[test]
    fn malformed_is_counted_not_a_panic() {
        for line in [
            &b""[..],
            b"not json",
            b"[1,2]",
            b"[1,{}]",
            br#"{"id":1,"result":[]}"#,
            br#"{"id":1,"result":["e",1]}"#,
            b"{}",
            b"{\"id\":",
            b"{\"id\":1",
            b"{\"id\":1,\"result\":",
            b"{\"id\":1,\"result\":{",
            b"{\"id\":1,\"result\":{}",
            b"{\"id\":1,\"result\":{}}}",
            b"{\"id\":1,\"result\":{}}x",
            b"{\"id\":1,\"result\":{\"epoch\":\"e",
            b"{\"id\":1,\"result\":{\"epoch\":\"e\\",
            b"{\"id\":1,\"result\":{\"epoch\":\"e\",\"offset\":",
            b"{\"id\":1,\"result\":{\"epoch\":\"e\",\"offset\":1",
            br#"{"id":1,"result":{"epoch":"e","offset":-1}}"#,
            br#"{"id":1,"result":{"epoch":"e","offset":1.5}}"#,
            br#"{"id":1,"result":{"epoch":"e","offset":18446744073709551616}}"#,
            br#"{"id":1,"result":{"epoch":7,"offset":1}}"#,
            br#"{"id":1,"result":{"epoch":"e"}}"#,
            br#"{"id":1,"result":{"offset":1}}"#,
            br#"{"id":1,"result":5}"#,
            br#"{"id":-1,"result":{}}"#,
            br#"{"id":"a","result":{}}"#,
            br#"{"id":null,"result":{}}"#,
            br#"{"result":{}}"#,
            br#"{"id":1,"result":{},"error":{"code":1}}"#,
            br#"{"id":1,"result":{},"id":2}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(
                parse_reply(line),
                Reply::Malformed,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn reads_api_results() {
        assert_eq!(parse_api_result(b"{}"), Some(None));
        assert_eq!(parse_api_result(b" {}\n"), Some(None));
        assert_eq!(
            parse_api_result(br#"{"epoch":"c0ffee12","offset":42}"#),
            Some(pos(b"c0ffee12", 42))
        );
        assert_eq!(
            parse_api_result(br#"{"offset":42,"epoch":"c0ffee12"}"#),
            Some(pos(b"c0ffee12", 42))
        );
        for bad in [
            &b""[..],
            b"{",
            b"{}{}",
            b"{}x",
            b"null",
            b"[]",
            br#"{"epoch":"e"}"#,
            br#"{"epoch":"e","offset":"1"}"#,
            br#"{"epoch":"e","offset":1}}"#,
        ] {
            assert_eq!(
                parse_api_result(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
