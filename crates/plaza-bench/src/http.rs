//! A tiny HTTP/1.1 client for the backend APIs: requests are written back to back on one keep-alive
//! connection (pipelined) and responses are parsed as they come. Only what the APIs answer with is
//! supported: `Content-Length` or chunked bodies, no upgrades.

use anyhow::{Context, Result, anyhow, bail};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head or body this client accepts.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Where an `http://host:port[/prefix]` URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// `host:port` to connect to.
    pub addr: String,
    /// The `Host` header.
    pub host: String,
    /// Path prefix without the trailing slash (often empty).
    pub prefix: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("{url:?}: no host");
        }
        let addr = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            addr,
            host: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    /// The request target for `path` (which starts with `/`).
    pub fn path(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }
}

/// Appends one request to `out`.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if !body.is_empty() || method != "GET" {
        let _ = write!(out, "Content-Length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// One parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server said `Connection: close`.
    pub close: bool,
}

/// Parses one complete response at the start of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the response and how many bytes it took.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE {
            bail!("response head larger than {MAX_RESPONSE} bytes");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            close = v.contains("close") || (close && !v.contains("keep-alive"));
        }
    }
    let body_start = head_end + 4;
    if (100..200).contains(&status) {
        bail!("unexpected informational response {status}");
    }
    if status == 204 || status == 304 {
        return Ok(Some((
            Response {
                status,
                body: Vec::new(),
                close,
            },
            body_start,
        )));
    }
    if chunked {
        return Ok(parse_chunked(&buf[body_start..])?.map(|(body, used)| {
            (
                Response {
                    status,
                    body,
                    close,
                },
                body_start + used,
            )
        }));
    }
    let len = content_length
        .ok_or_else(|| anyhow!("response {status} has neither Content-Length nor chunked body"))?;
    if len > MAX_RESPONSE {
        bail!("response body larger than {MAX_RESPONSE} bytes");
    }
    if buf.len() < body_start + len {
        return Ok(None);
    }
    Ok(Some((
        Response {
            status,
            body: buf[body_start..body_start + len].to_vec(),
            close,
        },
        body_start + len,
    )))
}

fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_end) = find(&buf[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[pos..pos + line_end]).context("bad chunk size")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).context("bad chunk size")?;
        if body.len() + size > MAX_RESPONSE {
            bail!("chunked body larger than {MAX_RESPONSE} bytes");
        }
        pos += line_end + 2;
        if size == 0 {
            // Trailers (usually none), then an empty line.
            loop {
                let Some(end) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += end + 2;
                if end == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            bail!("chunk not followed by CRLF");
        }
        pos += size + 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads responses from a byte stream, keeping what is left over between them.
#[derive(Debug, Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
}

impl ResponseReader {
    /// Reads until one whole response is parsed. Errors on EOF.
    pub async fn next<R: AsyncReadExt + Unpin>(&mut self, r: &mut R) -> Result<Response> {
        loop {
            if let Some((resp, used)) = parse_response(&self.buf)? {
                self.buf.drain(..used);
                return Ok(resp);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = r
                .read(&mut chunk)
                .await
                .context("reading an HTTP response")?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One request on a fresh connection, within `timeout`.
pub async fn request(
    target: &HttpTarget,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(&target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        s.set_nodelay(true)?;
        let mut req = Vec::new();
        encode_request(
            &mut req,
            method,
            &target.path(path),
            &target.host,
            headers,
            body,
        );
        s.write_all(&req).await?;
        ResponseReader::default().next(&mut s).await
    })
    .await
    .map_err(|_| anyhow!("{method} {path}: no response within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = HttpTarget::parse("http://127.0.0.1:7701").unwrap();
        assert_eq!(t.addr, "127.0.0.1:7701");
        assert_eq!(t.host, "127.0.0.1:7701");
        assert_eq!(t.path("/api/publish"), "/api/publish");
        let t = HttpTarget::parse("http://localhost/x/").unwrap();
        assert_eq!(t.addr, "localhost:80");
        assert_eq!(t.path("/api/publish"), "/x/api/publish");
        let t = HttpTarget::parse("http://[::1]:8080").unwrap();
        assert_eq!(t.addr, "[::1]:8080");
        assert!(HttpTarget::parse("https://x").is_err());
        assert!(HttpTarget::parse("http:///x").is_err());
    }

    #[test]
    fn encodes_requests() {
        let mut out = Vec::new();
        encode_request(
            &mut out,
            "POST",
            "/api/publish",
            "h:1",
            &[("X-Plaza-Key", "k")],
            b"{}",
        );
        assert_eq!(
            out,
            b"POST /api/publish HTTP/1.1\r\nHost: h:1\r\nX-Plaza-Key: k\r\nContent-Length: 2\r\n\r\n{}"
        );
        out.clear();
        encode_request(&mut out, "GET", "/healthz", "h", &[], b"");
        assert_eq!(out, b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n");
    }

    #[test]
    fn parses_pipelined_responses() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}\
                    HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!";
        let (a, used) = parse_response(two).unwrap().unwrap();
        assert_eq!(
            (a.status, a.body.as_slice(), a.close),
            (200, &b"{}"[..], false)
        );
        let (b, used2) = parse_response(&two[used..]).unwrap().unwrap();
        assert_eq!(
            (b.status, b.body.as_slice(), b.close),
            (401, &b"nope!"[..], true)
        );
        assert_eq!(used + used2, two.len());
        for cut in 0..used {
            assert_eq!(parse_response(&two[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn parses_chunked_and_empty() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=y\r\n!!!\r\n0\r\n\r\nrest";
        let (resp, used) = parse_response(r).unwrap().unwrap();
        assert_eq!(resp.body, b"ok!!!");
        assert_eq!(&r[used..], b"rest");
        for cut in 0..used {
            assert_eq!(parse_response(&r[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (resp, _) = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status, 204);
        let (resp, _) = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(resp.close);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
