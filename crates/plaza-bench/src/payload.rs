//! The benchmark payload: `{"s":SEQ,"t":NANOS,"p":"xxx…"}`.
//!
//! `s` is the publication's sequence number (0-based), `t` the send time in nanoseconds since
//! [`crate::clock::base`], and `p` padding up to the requested size. Servers forward `data` byte for
//! byte, so the receive side does not parse JSON: it reads the two numbers at fixed places.

/// The start of every payload; a received `data` that does not start with it is malformed.
const PREFIX: &[u8] = b"{\"s\":";
const T_FIELD: &[u8] = b",\"t\":";
const P_FIELD: &str = ",\"p\":\"";

/// Appends the payload for publication `seq` sent at `t_ns` to `out`, padded so that the payload is
/// `size` bytes long (or its minimum length, ~30 bytes, if `size` is smaller).
pub fn encode(seq: u64, t_ns: u64, size: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(PREFIX);
    push_u64(out, seq);
    out.extend_from_slice(T_FIELD);
    push_u64(out, t_ns);
    out.extend_from_slice(P_FIELD.as_bytes());
    // What is left to write after the padding: `"}`.
    let used = out.len() - start + 2;
    let pad = size.saturating_sub(used);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// Reads `(seq, t_ns)` from a payload written by [`encode`]. `None` when it is not one.
///
/// Servers that re-serialise the data with Python's `json.dumps` (Snorky, High-templar) put a
/// space after every `:` and `,`: `{"s": 1, "t": 2, "p": "x"}` is read too.
pub fn parse(data: &[u8]) -> Option<(u64, u64)> {
    let rest = space(data.strip_prefix(PREFIX)?);
    let (seq, rest) = take_u64(rest)?;
    let rest = rest.strip_prefix(b",")?;
    let rest = space(space(rest).strip_prefix(b"\"t\":")?);
    let (t, rest) = take_u64(rest)?;
    // The next byte must end the number: `,` (padding follows) or `}`.
    match rest.first() {
        Some(b',') | Some(b'}') => Some((seq, t)),
        _ => None,
    }
}

/// `s` without one leading space.
fn space(s: &[u8]) -> &[u8] {
    s.strip_prefix(b" ").unwrap_or(s)
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Parses a run of 1 to 20 ASCII digits without overflow; returns the value and the rest.
pub(crate) fn take_u64(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in &s[..n] {
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((v, &s[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(seq: u64, t: u64, size: usize) -> Vec<u8> {
        let mut v = Vec::new();
        encode(seq, t, size, &mut v);
        v
    }

    #[test]
    fn round_trip_and_size() {
        for (seq, t, size) in [
            (0, 0, 100),
            (1999, 123_456_789_012, 100),
            (u64::MAX, u64::MAX, 0),
            (7, 8, 1000),
        ] {
            let p = enc(seq, t, size);
            assert_eq!(parse(&p), Some((seq, t)), "{}", String::from_utf8_lossy(&p));
            assert!(
                p.len() == size || size < 60,
                "len {} for size {size}",
                p.len()
            );
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["s"].as_u64(), Some(seq));
            assert_eq!(v["t"].as_u64(), Some(t));
        }
        assert_eq!(enc(1, 2, 0), br#"{"s":1,"t":2,"p":""}"#);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"{}",
            b"{\"s\":}",
            b"{\"s\":1}",
            b"{\"s\":1,\"t\":}",
            b"{\"s\":1,\"t\":2",
            b"{\"s\":1,\"t\":2x",
            b"{\"s\":-1,\"t\":2}",
            b"{\"s\":18446744073709551616,\"t\":2}",
            b"{\"t\":2,\"s\":1}",
            b" {\"s\":1,\"t\":2}",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(b"{\"s\":1,\"t\":2}"), Some((1, 2)));
        // Python's json.dumps layout.
        assert_eq!(parse(br#"{"s": 12, "t": 345, "p": "xx"}"#), Some((12, 345)));
        assert_eq!(parse(br#"{"s": 12,"t": 345}"#), Some((12, 345)));
        assert_eq!(parse(br#"{"s": 12 , "t": 345}"#), None);
        assert_eq!(parse(br#"{"s":  12, "t": 345}"#), None);
    }
}
