//! Plaza's native protocol (docs/PROTOCOL.md): `connect`, then `subscribe`; publications come as
//! `{"push":"publication","channel":…,"data":…}`, possibly several per frame separated by `\n`.

use super::{Item, SubscriberPeer};
use crate::ws::{Message, WsConn};
use anyhow::{Result, bail};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// The native protocol, as a subscriber.
#[derive(Debug, Default, Clone, Copy)]
pub struct Native;

/// How the server starts every publication push, up to the channel name's opening quote.
const PUSH_PREFIX: &[u8] = b"{\"push\":\"publication\",\"channel\":\"";
const DATA_FIELD: &[u8] = b",\"data\":";

/// Any frame of the protocol, for the slow path (replies and frames not in the server's usual
/// layout).
#[derive(Deserialize)]
struct AnyFrame<'a> {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default, borrow)]
    push: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    result: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Debug)]
struct ErrorBody {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

/// Scans one line (one JSON object) of a frame.
fn scan_line(line: &[u8]) -> Item<'_> {
    if let Some(data) = fast_publication(line) {
        return Item::Publication(data);
    }
    match serde_json::from_slice::<AnyFrame<'_>>(line) {
        Ok(AnyFrame {
            push: Some(p),
            data: Some(d),
            ..
        }) if p == "publication" => Item::Publication(d.get().as_bytes()),
        Ok(AnyFrame { error: Some(_), .. }) => Item::Error,
        Ok(AnyFrame {
            id: Some(_),
            result: Some(_),
            ..
        }) => Item::Control,
        Ok(AnyFrame { push: Some(_), .. }) => Item::Control,
        _ => Item::Malformed,
    }
}

/// The `data` of a push in the layout the server writes (`{"push":"publication","channel":"…",
/// ["epoch":"…","offset":N,] "data":…}`), found without parsing JSON: skip the channel string
/// (minding escapes) and any scalar fields, expect `"data":`, and take the rest but the final
/// `}`. `None` for any other layout (the caller then parses the line).
fn fast_publication(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(PUSH_PREFIX)?;
    let mut rest = &rest[string_end(rest)? + 1..];
    // At most a few scalar fields between the channel and the data.
    for _ in 0..8 {
        if let Some(data) = rest.strip_prefix(DATA_FIELD) {
            return data.strip_suffix(b"}");
        }
        // `,"key":value` with a string, number, true, false or null value.
        let key = rest.strip_prefix(b",\"")?;
        let value = key[string_end(key)? + 1..].strip_prefix(b":")?;
        let end = match value.first()? {
            b'"' => string_end(&value[1..])? + 2,
            b'{' | b'[' => return None,
            _ => value.iter().position(|&b| b == b',' || b == b'}')?,
        };
        rest = &value[end..];
    }
    None
}

/// The index of the `"` that closes a JSON string whose opening quote was just before `s`.
pub(crate) fn string_end(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        match *s.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
}

/// The position of the first `needle` byte, eight bytes at a time.
pub(crate) fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(needle);
    let mut chunks = hay.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ pattern;
        // The lowest byte flagged here is the first byte of `x` that is zero.
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return Some(offset + (zero.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|p| offset + p)
}

/// Sends request `id` and waits for its reply.
async fn call(
    ws: &mut WsConn,
    id: u64,
    method: &str,
    params: String,
    timeout: Duration,
) -> Result<()> {
    let request = format!(r#"{{"id":{id},"method":"{method}","params":{params}}}"#);
    ws.send_text(request.as_bytes()).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let text = match ws.next_message(left).await? {
            Message::Text(t) => t,
            Message::Binary(_) => bail!("{method}: unexpected binary message"),
            Message::Close(code) => bail!("{method}: the server closed the connection ({code:?})"),
        };
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(frame) = serde_json::from_slice::<AnyFrame<'_>>(line) else {
                bail!(
                    "{method}: unreadable reply {:?}",
                    String::from_utf8_lossy(line)
                );
            };
            if frame.id.as_ref().and_then(|v| v.as_u64()) != Some(id) {
                continue;
            }
            if let Some(e) = frame.error {
                bail!(
                    "{method}: error {} {}",
                    e.code.unwrap_or_default(),
                    e.message.unwrap_or_default()
                );
            }
            return Ok(());
        }
    }
}

/// Opens a session with `connect` (anonymous, or as whatever the server allows) on a fresh
/// WebSocket; resolves once the server accepted it. Request id 1 is used.
pub async fn connect(ws: &mut WsConn, timeout: Duration) -> Result<()> {
    call(
        ws,
        1,
        "connect",
        r#"{"name":"plaza-bench"}"#.into(),
        timeout,
    )
    .await
}

impl SubscriberPeer for Native {
    fn name(&self) -> &'static str {
        "plaza-native"
    }

    fn subscribe<'a>(
        &'a self,
        ws: &'a mut WsConn,
        channel: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            connect(ws, timeout).await?;
            let params = serde_json::json!({ "channel": channel }).to_string();
            call(ws, 2, "subscribe", params, timeout).await
        })
    }

    fn scan(&self, frame: &[u8], f: &mut dyn FnMut(Item<'_>)) -> usize {
        // Several pushes may share a frame, one per line; JSON text has no raw newline.
        let mut rest = frame;
        while !rest.is_empty() {
            let (line, next) = match find_byte(rest, b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            if !line.is_empty() {
                f(scan_line(line));
            }
            rest = next;
        }
        frame.len()
    }
}

/// The body of `POST /api/publish` for `data` on a channel already encoded as a JSON string.
pub fn api_publish_body(channel_json: &str, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"channel\":");
    out.extend_from_slice(channel_json.as_bytes());
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(frame: &str) -> Vec<Item<'_>> {
        let mut v = Vec::new();
        Native.scan(frame.as_bytes(), &mut |i| {
            // Items borrow from `frame`; re-borrow them for the Vec through a copy of the slice.
            v.push(match i {
                Item::Publication(d) => {
                    let start = d.as_ptr() as usize - frame.as_ptr() as usize;
                    Item::Publication(&frame.as_bytes()[start..start + d.len()])
                }
                Item::Control => Item::Control,
                Item::Error => Item::Error,
                Item::Malformed => Item::Malformed,
                Item::Reply(r) => Item::Reply(r),
            });
        });
        v
    }

    #[test]
    fn scans_pushes_fast_and_slow() {
        let f = r#"{"push":"publication","channel":"bench","data":{"s":1,"t":2,"p":"x"}}"#;
        assert_eq!(
            scan_all(f),
            [Item::Publication(br#"{"s":1,"t":2,"p":"x"}"#)]
        );
        // An escaped `,"data":` inside the channel does not fool the fast path.
        let f = r#"{"push":"publication","channel":"a\",\"data\":1","data":{"s":1}}"#;
        assert_eq!(scan_all(f), [Item::Publication(br#"{"s":1}"#)]);
        // Another field order goes through serde.
        let f = r#"{"channel":"b","data": {"s":3,"t":4} ,"push":"publication"}"#;
        assert_eq!(scan_all(f), [Item::Publication(br#"{"s":3,"t":4}"#)]);
        // Several pushes in one frame.
        let f = "{\"push\":\"publication\",\"channel\":\"c\",\"data\":1}\n\
                 {\"push\":\"publication\",\"channel\":\"c\",\"data\":2}\n";
        assert_eq!(
            scan_all(f),
            [Item::Publication(b"1"), Item::Publication(b"2")]
        );
    }

    #[test]
    fn scans_replies_and_garbage() {
        assert_eq!(scan_all(r#"{"id":2,"result":{}}"#), [Item::Control]);
        assert_eq!(
            scan_all(r#"{"id":null,"error":{"code":101,"message":"x"}}"#),
            [Item::Error]
        );
        assert_eq!(scan_all("not json"), [Item::Malformed]);
        assert_eq!(scan_all("[1,2]"), [Item::Malformed]);
        assert_eq!(
            scan_all(r#"{"push":"publication","channel":"c""#),
            [Item::Malformed]
        );
        assert_eq!(scan_all(r#"{"push":"other"}"#), [Item::Control]);
    }

    #[test]
    fn finds_bytes() {
        let hay: Vec<u8> = (0..100u8).map(|i| b'a' + i % 20).collect();
        for start in 0..30 {
            for needle in [b'a', b'f', b't', b'\n'] {
                let expect = hay[start..].iter().position(|&b| b == needle);
                assert_eq!(find_byte(&hay[start..], needle), expect, "{start} {needle}");
            }
        }
        assert_eq!(find_byte(b"", b'x'), None);
        assert_eq!(
            find_byte(b"\x01\x00\x01\x01\x01\x01\x01\x01\x01", 1),
            Some(0)
        );
        assert_eq!(find_byte(b"\x00\x01\x00\x00\x00\x00\x00\x00", 1), Some(1));
        assert_eq!(
            find_byte(&[0x80, 0x81, 0x7f, 0, 0xff, 0x01, 2, 3, 4, 5], 0x01),
            Some(5)
        );
    }

    #[test]
    fn fast_path_matches_the_server_layout() {
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"a\"b\\","data":[1]}"#),
            Some(&b"[1]"[..])
        );
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"a"}"#),
            None
        );
        // With history: the position comes before the data.
        assert_eq!(
            fast_publication(
                br#"{"push":"publication","channel":"c","epoch":"a\"b","offset":9,"data":{"s":1}}"#
            ),
            Some(&br#"{"s":1}"#[..])
        );
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"c","x":null,"data":2}"#),
            Some(&b"2"[..])
        );
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"c","x":{"y":1},"data":2}"#),
            None
        );
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"c","x":1"#),
            None
        );
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"a\"#),
            None
        );
        assert_eq!(
            fast_publication(br#"{"push":"publication","channel":"a","data":1"#),
            None
        );
    }

    #[test]
    fn builds_api_body() {
        let mut out = Vec::new();
        api_publish_body("\"bench\"", br#"{"s":1}"#, &mut out);
        assert_eq!(out, br#"{"channel":"bench","data":{"s":1}}"#);
    }
}
