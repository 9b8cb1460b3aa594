//! NATS's client protocol over nats-server's WebSocket listener.
//!
//! The server sends `INFO {…}` first; the client answers `CONNECT {…}`, `SUB <subject> <sid>`
//! and `PING`, and the `PONG` confirms the subscription (the server handles a connection's
//! protocol lines in order). Publications come as `MSG <subject> <sid> [reply] <bytes>\r\n
//! <payload>\r\n`. The server's WebSocket frames are binary and cut the protocol anywhere (a
//! message may span frames, a frame may hold many), so this peer is a [`SubscriberPeer::stream`].
//! The server's `PING` must be answered with `PONG`.

use super::{Item, SubscriberPeer};
use crate::ws::{Message, WsConn};
use anyhow::{Result, bail};
use futures_util::future::BoxFuture;
use std::time::Duration;

/// The NATS protocol, as a subscriber.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nats;

/// Longest protocol line accepted (an `INFO` line is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// One protocol message at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// `MSG`/`HMSG`: the payload (for `HMSG`, headers and payload).
    Msg(&'a [u8]),
    Ping,
    Pong,
    Ok,
    Info,
    Err(&'a [u8]),
    /// A line this client does not know.
    Unknown,
}

/// Parses the protocol message at the start of `buf`: `Some((op, bytes))`, or `None` while it is
/// incomplete. A line longer than [`MAX_LINE`] without its end is returned as `Unknown` with all
/// of `buf` consumed, so a broken stream cannot grow a buffer without bound.
pub fn parse_op(buf: &[u8]) -> Option<(Op<'_>, usize)> {
    let Some(nl) = super::native::find_byte(buf, b'\n') else {
        return (buf.len() > MAX_LINE).then_some((Op::Unknown, buf.len()));
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let after = nl + 1;
    let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    let op = if verb.eq_ignore_ascii_case(b"MSG") || verb.eq_ignore_ascii_case(b"HMSG") {
        // The last argument is the total size (for HMSG: headers + payload).
        let Some(size) = args
            .split(|&b| b == b' ' || b == b'\t')
            .rfind(|a| !a.is_empty())
            .and_then(|a| crate::payload::take_u64(a).filter(|(_, rest)| rest.is_empty()))
            .map(|(n, _)| n as usize)
        else {
            return Some((Op::Unknown, after));
        };
        // Payload, then CRLF.
        let end = after.checked_add(size)?;
        if buf.len() < end + 2 {
            return None;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Some((Op::Unknown, end));
        }
        return Some((Op::Msg(&buf[after..end]), end + 2));
    } else if verb.eq_ignore_ascii_case(b"PING") {
        Op::Ping
    } else if verb.eq_ignore_ascii_case(b"PONG") {
        Op::Pong
    } else if verb.eq_ignore_ascii_case(b"+OK") {
        Op::Ok
    } else if verb.eq_ignore_ascii_case(b"INFO") {
        Op::Info
    } else if verb.eq_ignore_ascii_case(b"-ERR") {
        Op::Err(args)
    } else {
        Op::Unknown
    };
    Some((op, after))
}

/// Calls `f` for each complete protocol message of `buf`; returns the bytes consumed.
pub fn scan_ops<'a>(buf: &'a [u8], f: &mut dyn FnMut(Op<'a>)) -> usize {
    let mut at = 0;
    while at < buf.len() {
        match parse_op(&buf[at..]) {
            Some((op, n)) => {
                f(op);
                at += n;
            }
            None => break,
        }
    }
    at
}

/// The `CONNECT` line: `verbose` makes the server answer every `PUB` with `+OK`.
pub fn connect_line(verbose: bool) -> String {
    format!(
        "CONNECT {{\"verbose\":{verbose},\"pedantic\":false,\"name\":\"plaza-bench\",\
         \"lang\":\"rust\",\"version\":\"0\",\"protocol\":1,\"echo\":true}}\r\n"
    )
}

/// Reads until the server's `PONG` (after `INFO`, and `+OK`s when verbose), within `timeout`.
/// Whatever follows the `PONG` in the same frame is kept in `rest`.
pub async fn wait_pong(ws: &mut WsConn, timeout: Duration, rest: &mut Vec<u8>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = std::mem::take(rest);
    loop {
        let mut pong_at = None;
        let mut err = None;
        let mut at = 0;
        while at < buf.len() {
            let Some((op, n)) = parse_op(&buf[at..]) else {
                break;
            };
            at += n;
            match op {
                Op::Pong => {
                    pong_at = Some(at);
                    break;
                }
                Op::Err(e) => {
                    err = Some(String::from_utf8_lossy(e).into_owned());
                    break;
                }
                _ => {}
            }
        }
        if let Some(e) = err {
            bail!("NATS: -ERR {e}");
        }
        if let Some(at) = pong_at {
            *rest = buf.split_off(at);
            return Ok(());
        }
        buf.drain(..at);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_message(left).await? {
            Message::Binary(b) | Message::Text(b) => buf.extend_from_slice(&b),
            Message::Close(code) => bail!("NATS: the server closed the connection ({code:?})"),
        }
    }
}

impl SubscriberPeer for Nats {
    fn name(&self) -> &'static str {
        "nats-ws"
    }

    fn stream(&self) -> bool {
        true
    }

    fn binary(&self) -> bool {
        true
    }

    fn subscribe<'a>(
        &'a self,
        ws: &'a mut WsConn,
        channel: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if channel.is_empty() || channel.bytes().any(|b| b.is_ascii_whitespace()) {
                bail!("NATS: {channel:?} is not a subject");
            }
            let mut lines = connect_line(false);
            lines.push_str(&format!("SUB {channel} 1\r\nPING\r\n"));
            ws.send_binary(lines.as_bytes()).await?;
            let mut rest = Vec::new();
            wait_pong(ws, timeout, &mut rest).await?;
            if !rest.is_empty() {
                ws.push_pending(Message::Binary(rest));
            }
            Ok(())
        })
    }

    fn scan(&self, frame: &[u8], f: &mut dyn FnMut(Item<'_>)) -> usize {
        scan_ops(frame, &mut |op| {
            f(match op {
                Op::Msg(data) => Item::Publication(data),
                Op::Ping => Item::Reply(b"PONG\r\n"),
                Op::Pong | Op::Ok | Op::Info => Item::Control,
                Op::Err(_) => Item::Error,
                Op::Unknown => Item::Malformed,
            })
        })
    }
}

/// `PUB <subject> <bytes>\r\n<data>\r\n`.
pub fn pub_message(subject: &str, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(data.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(buf: &[u8]) -> (Vec<Op<'_>>, usize) {
        let mut v = Vec::new();
        let n = scan_ops(buf, &mut |op| v.push(op));
        (v, n)
    }

    #[test]
    fn parses_messages_and_control_lines() {
        let buf = b"INFO {\"server_id\":\"x\"}\r\n+OK\r\nPING\r\nMSG bench 1 5\r\nhello\r\n\
                    MSG bench 1 reply.to 2\r\nhi\r\nPONG\r\n-ERR 'Slow Consumer'\r\n";
        let (v, n) = ops(buf);
        assert_eq!(n, buf.len());
        assert_eq!(
            v,
            [
                Op::Info,
                Op::Ok,
                Op::Ping,
                Op::Msg(b"hello"),
                Op::Msg(b"hi"),
                Op::Pong,
                Op::Err(b"'Slow Consumer'"),
            ]
        );
        // HMSG: headers and payload together.
        let (v, _) = ops(b"HMSG s 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n");
        assert_eq!(v, [Op::Msg(b"NATS/1.0\r\n\r\nhi")]);
        // Payloads may hold CRLF and protocol words.
        let (v, _) = ops(b"MSG s 1 6\r\nPING\r\n\r\n");
        assert_eq!(v, [Op::Msg(b"PING\r\n")]);
    }

    #[test]
    fn stops_at_incomplete_messages() {
        let full = b"MSG bench 1 5\r\nhello\r\nPING\r\n";
        for cut in 0..full.len() {
            let (v, n) = ops(&full[..cut]);
            // Nothing is consumed until the whole MSG (payload and CRLF) is there.
            if cut < 22 {
                assert_eq!((v.len(), n), (0, 0), "cut {cut}");
            } else {
                assert_eq!((v, n), (vec![Op::Msg(b"hello")], 22), "cut {cut}");
            }
        }
        // Resuming from the rest gives the same messages as one buffer.
        let (v, n) = ops(full);
        assert_eq!((v, n), (vec![Op::Msg(b"hello"), Op::Ping], full.len()));
    }

    #[test]
    fn refuses_garbage_without_stalling() {
        let (v, n) = ops(b"MSG bench 1 x\r\nWHAT\r\n");
        assert_eq!(v, [Op::Unknown, Op::Unknown]);
        assert_eq!(n, 21);
        // A payload not followed by CRLF.
        let (v, n) = ops(b"MSG s 1 2\r\nabcd\r\n");
        assert_eq!(v[0], Op::Unknown);
        assert!(n > 0);
        // An endless line is dropped once it is over the limit.
        let long = vec![b'x'; MAX_LINE + 1];
        assert_eq!(ops(&long), (vec![Op::Unknown], long.len()));
        assert_eq!(ops(&long[..100]), (vec![], 0));
    }

    #[test]
    fn scans_as_a_subscriber() {
        let mut items = Vec::new();
        let buf = b"MSG b 1 3\r\n{1}\r\nPING\r\nMSG b 1 3\r\n{2";
        let n = Nats.scan(buf, &mut |i| {
            items.push(match i {
                Item::Publication(d) => format!("pub {}", String::from_utf8_lossy(d)),
                Item::Reply(r) => format!("reply {}", String::from_utf8_lossy(r)),
                other => format!("{other:?}"),
            })
        });
        assert_eq!(items, ["pub {1}", "reply PONG\r\n"]);
        assert_eq!(n, 22);
    }

    #[test]
    fn encodes_pub_and_connect() {
        let mut out = Vec::new();
        pub_message("bench", b"{\"s\":1}", &mut out);
        assert_eq!(out, b"PUB bench 7\r\n{\"s\":1}\r\n");
        let c = connect_line(true);
        let json = c.strip_prefix("CONNECT ").unwrap().trim_end();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["verbose"], true);
        assert!(c.ends_with("\r\n"));
    }
}
