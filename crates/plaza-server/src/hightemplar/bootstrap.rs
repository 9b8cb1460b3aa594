//! The bootstrap call: before the WebSocket is accepted, Plaza asks the app which rooms the
//! connection may join, with `GET {api_url}bootstrap/` and the browser's credentials as headers,
//! exactly as High-templar does. Everything but a 200 with a usable `allowed_rooms` is a refusal,
//! and so is an app that does not answer within `api_timeout_ms`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Request};
use plaza_protocol::hightemplar::{AllowedRoom, parse_bootstrap};

use super::config::{HeaderRule, HighTemplarConfig};
use crate::auth::app::{AppError, AppHttp};

/// Why a connection was refused (for the log).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the app answered status {0}")]
    Status(u16),
    #[error("the app's answer is unusable: {0}")]
    BadAnswer(#[from] plaza_protocol::hightemplar::BootstrapError),
    #[error(transparent)]
    App(#[from] AppError),
}

/// Where a bootstrap header's value comes from.
#[derive(Debug, Clone)]
enum Source {
    Header(HeaderName),
    Query(String),
    Cookie(String),
    Fixed(HeaderValue),
    /// `Token <t>` from `?token=`.
    Token,
}

/// The bootstrap client: the URL, the header rules, the shared HTTP exchange.
pub struct Bootstrap {
    url: String,
    rules: Vec<(HeaderName, Source)>,
    http: AppHttp,
    max_bytes: usize,
}

impl Bootstrap {
    /// The default rules (High-templar 3.1) with the configured ones merged over them.
    pub fn new(config: &HighTemplarConfig) -> Result<Self, String> {
        let header = |name: &str| HeaderName::from_bytes(name.as_bytes());
        let mut rules: Vec<(HeaderName, Source)> = vec![
            (
                hyper::http::header::COOKIE,
                Source::Header(hyper::http::header::COOKIE),
            ),
            (
                hyper::http::header::USER_AGENT,
                Source::Header(hyper::http::header::USER_AGENT),
            ),
            (
                HeaderName::from_static("x-real-ip"),
                Source::Header(HeaderName::from_static("x-real-ip")),
            ),
            (
                HeaderName::from_static("x-csrftoken"),
                Source::Cookie("csrftoken".into()),
            ),
            (hyper::http::header::AUTHORIZATION, Source::Token),
        ];
        for HeaderRule {
            name,
            header: from_header,
            query,
            cookie,
            value,
        } in &config.headers
        {
            let name = header(name).map_err(|_| format!("'{name}' is not a header name"))?;
            let source = if let Some(h) = from_header {
                Source::Header(header(h).map_err(|_| format!("'{h}' is not a header name"))?)
            } else if let Some(q) = query {
                Source::Query(q.clone())
            } else if let Some(c) = cookie {
                Source::Cookie(c.clone())
            } else if let Some(v) = value {
                Source::Fixed(HeaderValue::from_str(v).map_err(|e| e.to_string())?)
            } else {
                return Err(format!("header {name}: no source"));
            };
            rules.retain(|(n, _)| *n != name);
            rules.push((name, source));
        }
        Ok(Self {
            url: format!("{}bootstrap/", config.api_url),
            rules,
            http: AppHttp::new(
                std::time::Duration::from_millis(config.api_timeout_ms),
                config.api_socket.clone(),
            ),
            max_bytes: config.max_bootstrap_bytes,
        })
    }

    /// The headers to send for a WebSocket request with `headers` and `query`. A header whose
    /// source is empty is not sent.
    pub fn headers(&self, headers: &HeaderMap, query: Option<&str>) -> HeaderMap {
        let query_param = |name: &str| {
            query.and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.into_owned())
            })
        };
        let cookie = |name: &str| {
            headers
                .get_all(hyper::http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(n, _)| n.trim() == name)
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        };
        let mut out = HeaderMap::new();
        for (name, source) in &self.rules {
            let value = match source {
                Source::Header(from) => {
                    let values: Vec<&[u8]> = headers
                        .get_all(from)
                        .iter()
                        .map(HeaderValue::as_bytes)
                        .collect();
                    let separator: &[u8] = if *from == hyper::http::header::COOKIE {
                        b"; "
                    } else {
                        b", "
                    };
                    HeaderValue::from_bytes(&values.join(separator)).ok()
                }
                Source::Query(q) => query_param(q).and_then(|v| HeaderValue::from_str(&v).ok()),
                Source::Cookie(c) => cookie(c).and_then(|v| HeaderValue::from_str(&v).ok()),
                Source::Fixed(v) => Some(v.clone()),
                Source::Token => query_param("token")
                    .filter(|t| !t.is_empty())
                    .and_then(|t| HeaderValue::from_str(&format!("Token {t}")).ok()),
            };
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                out.insert(name.clone(), value);
            }
        }
        out
    }

    /// Asks the app. `Ok` with the allowed rooms, or the reason for refusing.
    pub async fn call(&self, headers: HeaderMap) -> Result<Vec<AllowedRoom>, Refusal> {
        let mut request = Request::get(self.url.as_str())
            .body(Full::new(Bytes::new()))
            .map_err(|e| AppError::Unavailable(format!("GET {}: {e}", self.url)))?;
        *request.headers_mut() = headers;
        request
            .headers_mut()
            .insert(hyper::http::header::ACCEPT, HeaderValue::from_static("*/*"));
        let response = self.http.send(request, self.max_bytes).await?;
        if response.status != hyper::StatusCode::OK {
            return Err(Refusal::Status(response.status.as_u16()));
        }
        Ok(parse_bootstrap(&response.body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_configured_headers() {
        let config: HighTemplarConfig = toml::from_str(
            r#"
api_url = "http://127.0.0.1:1/api/"
[[headers]]
name = "X-Session-Token"
query = "session_token"
[[headers]]
name = "Referer"
value = "https://app.example/"
[[headers]]
name = "User-Agent"
cookie = "ua"
"#,
        )
        .unwrap();
        let bootstrap = Bootstrap::new(&config).unwrap();
        assert_eq!(bootstrap.url, "http://127.0.0.1:1/api/bootstrap/");
        let mut headers = HeaderMap::new();
        headers.insert(
            "cookie",
            HeaderValue::from_static("sessionid=a; csrftoken=C; ua=U2"),
        );
        headers.insert("user-agent", HeaderValue::from_static("U"));
        headers.insert("x-real-ip", HeaderValue::from_static("10.9.8.7"));
        headers.insert("host", HeaderValue::from_static("plaza.example"));
        headers.insert("origin", HeaderValue::from_static("http://o"));
        let out = bootstrap.headers(&headers, Some("token=T&session_token=S&x=1"));
        let get = |n: &str| out.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            get("cookie").as_deref(),
            Some("sessionid=a; csrftoken=C; ua=U2")
        );
        assert_eq!(get("user-agent").as_deref(), Some("U2"));
        assert_eq!(get("x-real-ip").as_deref(), Some("10.9.8.7"));
        assert_eq!(get("x-csrftoken").as_deref(), Some("C"));
        assert_eq!(get("authorization").as_deref(), Some("Token T"));
        assert_eq!(get("x-session-token").as_deref(), Some("S"));
        assert_eq!(get("referer").as_deref(), Some("https://app.example/"));
        assert_eq!(get("host"), None);
        assert_eq!(get("origin"), None);
        // Empty sources send nothing.
        let out = bootstrap.headers(&HeaderMap::new(), Some("token="));
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("referer"));
    }
}
