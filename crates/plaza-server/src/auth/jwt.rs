//! Tokens the app signs: connection tokens (who the user is) and subscription tokens (this user
//! may join this channel).
//!
//! Verification is strict on purpose, because a token is the only thing standing between a
//! stranger and a user's channels:
//! - exactly one algorithm is accepted, the one the configured key implies (HS256 for a secret,
//!   RS256 for an RSA key, ES256 for an EC P-256 key). `alg: none` and algorithm confusion
//!   (an HS256 token "signed" with the RSA public key) are refused before any crypto runs;
//! - time claims are checked here against the `now` the caller passes (jsonwebtoken's own clock
//!   checks are off), so tests are deterministic and there is one place that decides;
//! - error messages name what is wrong but never echo the secret or the token.
//!
//! Plaza only *verifies* with RSA keys: signing with RSA in the `rsa` crate is exposed to
//! RUSTSEC-2023-0071 (Marvin), and a server that holds no private key cannot leak one. Signing is
//! offered for HS256 only, for development tokens (`plaza gen-token`).

use std::collections::HashSet;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use super::{AuthConfig, AuthSetupError};

/// Longest token accepted, in bytes. Bounds the work an unauthenticated client can cause; real
/// tokens are a few hundred bytes, a large `info` a few KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// RSA keys shorter than this are refused at startup (NIST SP 800-131A: 2048 bits minimum).
pub const MIN_RSA_BITS: usize = 2048;

/// What a valid connection token says.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectClaims {
    /// The user id (`sub`), never empty.
    pub user: String,
    /// `exp`, when the token has one: the connection may be asked to refresh by then.
    pub expires_at: Option<u64>,
    /// Channels the app subscribes the connection to on connect (`channels`).
    pub channels: Vec<String>,
    /// Opaque user info the app wants shown to others (presence, publications) (`info`).
    pub info: Option<Value>,
}

/// What a valid subscription token says (its `sub` and `channel` were checked already).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeClaims {
    pub expires_at: Option<u64>,
    pub info: Option<Value>,
}

/// Why a token was refused. Each case is its own variant so the caller can pick a protocol error
/// (e.g. "token expired, refresh it" differs from "bad token, do not retry").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is too long ({len} bytes, at most {MAX_TOKEN_LEN})")]
    TooLong { len: usize },
    #[error("token algorithm '{found}' is not accepted; this server accepts only {expected}")]
    WrongAlgorithm {
        expected: &'static str,
        found: String,
    },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired (exp {exp})")]
    Expired { exp: u64 },
    #[error("token is not valid yet (nbf {nbf})")]
    NotYetValid { nbf: u64 },
    #[error("token has no subject: `sub` must be a non-empty string")]
    MissingSubject,
    #[error("token claim `{0}` is missing")]
    MissingClaim(&'static str),
    #[error("token claim `{claim}` is invalid: {reason}")]
    InvalidClaim {
        claim: &'static str,
        reason: &'static str,
    },
    #[error("token audience (`aud`) does not match")]
    WrongAudience,
    #[error("token issuer (`iss`) does not match")]
    WrongIssuer,
    #[error("subscription token is for another channel")]
    WrongChannel,
    #[error("subscription token is for another user")]
    WrongUser,
    #[error("token refused: {0}")]
    Invalid(String),
}

/// Verifies connection and subscription tokens with the one configured key.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    alg: Algorithm,
    validation: Validation,
    leeway: u64,
}

impl JwtVerifier {
    /// Builds the verifier from `[auth]`; `None` when neither `hmac_secret` nor
    /// `public_key_file` is set. Reads and checks the key file now, so a bad key stops startup
    /// instead of making every token fail later as "bad signature".
    pub fn new(config: &AuthConfig) -> Result<Option<Self>, AuthSetupError> {
        let (key, alg) = match (&config.hmac_secret, &config.public_key_file) {
            (Some(_), Some(_)) => {
                return Err(AuthSetupError::Invalid(
                    "set either hmac_secret or public_key_file, not both".into(),
                ));
            }
            (Some(secret), None) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(path)) => load_public_key(path)?,
            (None, None) => return Ok(None),
        };
        let mut validation = Validation::new(alg);
        // Time claims are checked in `check_times` with the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.required_spec_claims = HashSet::new();
        // `aud`/`iss` are checked, and required, only when configured.
        validation.validate_aud = config.audience.is_some();
        if let Some(aud) = &config.audience {
            validation.set_audience(&[aud]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Some(Self {
            key,
            alg,
            validation,
            leeway: config.leeway_secs,
        }))
    }

    /// The accepted algorithm, for the startup log line.
    pub fn algorithm(&self) -> &'static str {
        alg_name(self.alg)
    }

    /// Verifies a connection token: signature, `exp`/`nbf` against `now_unix`, `aud`/`iss` when
    /// configured, and a non-empty `sub`.
    pub fn verify_connect(&self, token: &str, now_unix: u64) -> Result<ConnectClaims, TokenError> {
        let mut claims = self.verify(token, now_unix)?;
        // A subscription token must not double as a connection token: it may be handed to code
        // that should only reach one channel.
        if claims.contains_key("channel") {
            return Err(TokenError::InvalidClaim {
                claim: "channel",
                reason: "a connection token must not have it (this looks like a subscription token)",
            });
        }
        let user = match claims.remove("sub") {
            Some(Value::String(s)) if !s.is_empty() => s,
            None | Some(Value::Null) | Some(Value::String(_)) => {
                return Err(TokenError::MissingSubject);
            }
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: "sub",
                    reason: "must be a string",
                });
            }
        };
        let channels = match claims.remove("channels") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(TokenError::InvalidClaim {
                        claim: "channels",
                        reason: "must be an array of strings",
                    }),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: "channels",
                    reason: "must be an array of strings",
                });
            }
        };
        Ok(ConnectClaims {
            user,
            expires_at: time_claim(&claims, "exp")?,
            channels,
            info: take_info(&mut claims),
        })
    }

    /// Verifies a subscription token for `channel`, held by a connection of `user` (`""` for an
    /// anonymous connection, which then needs a token without `sub`): the checks of
    /// [`Self::verify_connect`] plus `sub == user` and `channel == channel`.
    pub fn verify_subscribe(
        &self,
        token: &str,
        channel: &str,
        user: &str,
        now_unix: u64,
    ) -> Result<SubscribeClaims, TokenError> {
        let mut claims = self.verify(token, now_unix)?;
        match claims.get("channel") {
            None | Some(Value::Null) => return Err(TokenError::MissingClaim("channel")),
            Some(Value::String(c)) if c == channel => {}
            Some(Value::String(_)) => return Err(TokenError::WrongChannel),
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: "channel",
                    reason: "must be a string",
                });
            }
        }
        let sub = match claims.get("sub") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: "sub",
                    reason: "must be a string",
                });
            }
        };
        if sub != user {
            return Err(TokenError::WrongUser);
        }
        Ok(SubscribeClaims {
            expires_at: time_claim(&claims, "exp")?,
            info: take_info(&mut claims),
        })
    }

    /// The checks common to both kinds of token; returns the claims object.
    fn verify(&self, token: &str, now: u64) -> Result<Map<String, Value>, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong { len: token.len() });
        }
        self.check_header(token)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| map_error(e.into_kind(), self.alg))?;
        let claims = data.claims;
        if let Some(exp) = time_claim(&claims, "exp")?
            && now >= exp.saturating_add(self.leeway)
        {
            return Err(TokenError::Expired { exp });
        }
        if let Some(nbf) = time_claim(&claims, "nbf")?
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(TokenError::NotYetValid { nbf });
        }
        Ok(claims)
    }

    /// Reads the header ourselves before jsonwebtoken does, so that `alg: none` or any other
    /// algorithm gets a clear `WrongAlgorithm` (jsonwebtoken reports `none` as a JSON error) and
    /// no key is ever used with an algorithm it was not configured for.
    fn check_header(&self, token: &str) -> Result<(), TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "a token has three parts separated by '.'",
            ));
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| TokenError::Malformed("the header is not base64url"))?;
        let header: Map<String, Value> = serde_json::from_slice(&bytes)
            .map_err(|_| TokenError::Malformed("the header is not a JSON object"))?;
        let Some(Value::String(alg)) = header.get("alg") else {
            return Err(TokenError::Malformed("the header has no `alg`"));
        };
        let expected = alg_name(self.alg);
        if alg != expected {
            return Err(TokenError::WrongAlgorithm {
                expected,
                found: printable_prefix(alg),
            });
        }
        // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we understand none.
        if header.contains_key("crit") {
            return Err(TokenError::Malformed(
                "the header lists `crit` extensions, which this server does not support",
            ));
        }
        Ok(())
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        // Never configured by `JwtVerifier::new`.
        _ => "unsupported",
    }
}

/// At most 16 printable ASCII characters of an untrusted string, for an error message.
fn printable_prefix(s: &str) -> String {
    s.chars()
        .take(16)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// An optional NumericDate claim (RFC 7519 §2): a non-negative number of seconds; fractions are
/// truncated.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, TokenError> {
    let invalid = TokenError::InvalidClaim {
        claim: name,
        reason: "must be a non-negative number of seconds since 1970",
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        Ok(Some(f as u64))
                    }
                    _ => Err(invalid),
                }
            }
        }
        Some(_) => Err(invalid),
    }
}

fn take_info(claims: &mut Map<String, Value>) -> Option<Value> {
    claims.remove("info").filter(|v| !v.is_null())
}

fn map_error(kind: ErrorKind, alg: Algorithm) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidToken => TokenError::Malformed("not a signed JWT"),
        ErrorKind::Base64(_) => TokenError::Malformed("a part is not base64url"),
        ErrorKind::Json(_) => TokenError::Malformed("the claims are not a JSON object"),
        ErrorKind::Utf8(_) => TokenError::Malformed("a part is not UTF-8"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::WrongAlgorithm {
                expected: alg_name(alg),
                found: "?".into(),
            }
        }
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::MissingClaim("aud"),
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::MissingClaim("iss"),
        // Key errors cannot happen after `load_public_key`'s check; report without detail.
        other => TokenError::Invalid(format!("{:?}", other).chars().take(60).collect()),
    }
}

/// Loads a PEM public key and picks the algorithm it implies.
fn load_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), AuthSetupError> {
    let bad = |reason: &str| AuthSetupError::BadKey {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let pem = std::fs::read(path).map_err(|source| AuthSetupError::ReadKey {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&pem);
    let Some(label) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
    else {
        return Err(bad(
            "not a PEM file (expected a '-----BEGIN PUBLIC KEY-----' block)",
        ));
    };
    if label.contains("PRIVATE") {
        // Refused even though the public half could be derived: a private key has no business
        // on the server (see the module docs), and accepting it would invite copying it around.
        return Err(bad(
            "contains a private key; give Plaza only the public key \
             (`openssl pkey -in key.pem -pubout -out public.pem`)",
        ));
    }
    if label == "CERTIFICATE" {
        return Err(bad("is a certificate; extract its public key \
             (`openssl x509 -in cert.pem -pubkey -noout > public.pem`)"));
    }
    if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
        return Err(bad(&format!(
            "unexpected PEM block '{}'; expected PUBLIC KEY",
            printable_prefix(label)
        )));
    }
    let unsupported = "unsupported key type: use an RSA (RS256, at least 2048 bits) \
                       or an EC P-256 (ES256) public key";
    let (key, alg) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        // Parsing the key into a JWK runs the same DER parser the verifier uses, and gives `n`.
        let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::RS256))
            .map_err(|e| bad(&format!("not a valid RSA public key ({e})")))?;
        let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
            return Err(bad("not a valid RSA public key"));
        };
        let modulus = URL_SAFE_NO_PAD
            .decode(&rsa.n)
            .map_err(|_| bad("not a valid RSA public key"))?;
        let bits = bit_length(&modulus);
        if bits < MIN_RSA_BITS {
            return Err(bad(&format!(
                "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
            )));
        }
        (key, Algorithm::RS256)
    } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::ES256))
            .map_err(|e| bad(&format!("not a valid EC public key ({e})")))?;
        match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {}
            AlgorithmParameters::EllipticCurve(_) => {
                return Err(bad(
                    "only EC P-256 keys (ES256) are supported; this key is on another curve",
                ));
            }
            _ => return Err(bad(unsupported)),
        }
        (key, Algorithm::ES256)
    } else {
        return Err(bad(unsupported));
    };
    // Build the crypto verifier once: for EC this checks that the point is on the curve, which
    // otherwise would only fail (as "bad signature") on the first token.
    jsonwebtoken::crypto::verify("AAAA", b"probe", &key, alg)
        .map_err(|e| bad(&format!("the key cannot verify signatures ({e})")))?;
    Ok((key, alg))
}

fn bit_length(big_endian: &[u8]) -> usize {
    let mut bytes = big_endian.iter().skip_while(|b| **b == 0);
    match bytes.next() {
        Some(first) => (8 - first.leading_zeros() as usize) + 8 * bytes.count(),
        None => 0,
    }
}

/// Seconds since 1970 from the system clock (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign the token: {0}")]
pub struct SignError(String);

/// Signs `claims` (a JSON object) with HS256. For development tokens and tests; production
/// tokens are signed by the app.
pub fn sign_hs256(secret: &[u8], claims: &Value) -> Result<String, SignError> {
    if !claims.is_object() {
        return Err(SignError("the claims must be a JSON object".into()));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| SignError(e.to_string()))
}

/// A development connection token for `plaza gen-token`: `sub` = `user`, `exp` = `now + ttl`,
/// optional `channels` and `info`, and `aud`/`iss` when configured so the token passes this
/// server's own checks.
pub fn gen_token(
    config: &AuthConfig,
    user: &str,
    ttl_secs: u64,
    channels: &[String],
    info: Option<&Value>,
    now: u64,
) -> Result<String, String> {
    if user.is_empty() {
        return Err("the user id must not be empty".into());
    }
    let mut claims = base_claims(config, ttl_secs, now)?;
    claims.insert("sub".into(), Value::from(user));
    if !channels.is_empty() {
        claims.insert("channels".into(), Value::from(channels.to_vec()));
    }
    if let Some(info) = info {
        claims.insert("info".into(), info.clone());
    }
    sign_dev(config, claims)
}

/// A development subscription token: `sub` = `user` (may be empty for anonymous connections),
/// `channel`, `exp` = `now + ttl`, optional `info`.
pub fn gen_subscribe_token(
    config: &AuthConfig,
    user: &str,
    channel: &str,
    ttl_secs: u64,
    info: Option<&Value>,
    now: u64,
) -> Result<String, String> {
    if channel.is_empty() {
        return Err("the channel must not be empty".into());
    }
    let mut claims = base_claims(config, ttl_secs, now)?;
    if !user.is_empty() {
        claims.insert("sub".into(), Value::from(user));
    }
    claims.insert("channel".into(), Value::from(channel));
    if let Some(info) = info {
        claims.insert("info".into(), info.clone());
    }
    sign_dev(config, claims)
}

fn base_claims(config: &AuthConfig, ttl_secs: u64, now: u64) -> Result<Map<String, Value>, String> {
    if config.hmac_secret.is_none() {
        return Err(if config.public_key_file.is_some() {
            "auth.public_key_file is set: tokens are signed by the app with its private key; \
             gen-token only signs HS256 tokens with auth.hmac_secret"
                .into()
        } else {
            "auth.hmac_secret is not configured; gen-token signs HS256 tokens with it".into()
        });
    }
    config.validate()?;
    if ttl_secs == 0 {
        return Err("the ttl must be at least one second".into());
    }
    let mut claims = Map::new();
    claims.insert("iat".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(now.saturating_add(ttl_secs)));
    if let Some(aud) = &config.audience {
        claims.insert("aud".into(), Value::from(aud.as_str()));
    }
    if let Some(iss) = &config.issuer {
        claims.insert("iss".into(), Value::from(iss.as_str()));
    }
    Ok(claims)
}

fn sign_dev(config: &AuthConfig, claims: Map<String, Value>) -> Result<String, String> {
    let Some(secret) = &config.hmac_secret else {
        return Err("auth.hmac_secret is not configured".into());
    };
    sign_hs256(secret.as_bytes(), &Value::Object(claims)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &str = "test-secret-test-secret-test-secret!";

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/auth/testdata")
            .join(name)
    }

    fn hs_config() -> AuthConfig {
        AuthConfig {
            hmac_secret: Some(SECRET.into()),
            leeway_secs: 0,
            ..AuthConfig::default()
        }
    }

    fn verifier(config: &AuthConfig) -> JwtVerifier {
        JwtVerifier::new(config).unwrap().unwrap()
    }

    fn hs_verifier() -> JwtVerifier {
        verifier(&hs_config())
    }

    fn key_verifier(file: &str) -> JwtVerifier {
        verifier(&AuthConfig {
            public_key_file: Some(testdata(file)),
            leeway_secs: 0,
            ..AuthConfig::default()
        })
    }

    fn hs(claims: Value) -> String {
        sign_hs256(SECRET.as_bytes(), &claims).unwrap()
    }

    fn sign_with(alg: Algorithm, private_pem: &str, claims: &Value) -> String {
        let pem = std::fs::read(testdata(private_pem)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
            _ => unreachable!(),
        };
        jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
    }

    fn b64(text: &str) -> String {
        URL_SAFE_NO_PAD.encode(text)
    }

    fn connect_claims() -> Value {
        json!({"sub": "42", "exp": NOW + 60})
    }

    #[test]
    fn no_key_means_no_verifier() {
        assert!(JwtVerifier::new(&AuthConfig::default()).unwrap().is_none());
    }

    #[test]
    fn valid_hs256_connect_token() {
        let token = hs(json!({
            "sub": "42", "exp": NOW + 60, "iat": NOW,
            "channels": ["news", "user#42"], "info": {"name": "Ada"}
        }));
        let v = hs_verifier();
        assert_eq!(v.algorithm(), "HS256");
        let claims = v.verify_connect(&token, NOW).unwrap();
        assert_eq!(
            claims,
            ConnectClaims {
                user: "42".into(),
                expires_at: Some(NOW + 60),
                channels: vec!["news".into(), "user#42".into()],
                info: Some(json!({"name": "Ada"})),
            }
        );
        // No exp: accepted, never expires; null info/channels are absent.
        let token = hs(json!({"sub": "7", "info": null, "channels": null}));
        let claims = v.verify_connect(&token, NOW).unwrap();
        assert_eq!(claims.expires_at, None);
        assert_eq!(claims.info, None);
        assert!(claims.channels.is_empty());
    }

    #[test]
    fn valid_rs256_tokens_with_both_public_key_formats() {
        let token = sign_with(Algorithm::RS256, "rsa_private.pem", &connect_claims());
        for file in ["rsa_public.pem", "rsa_public_pkcs1.pem"] {
            let v = key_verifier(file);
            assert_eq!(v.algorithm(), "RS256");
            assert_eq!(v.verify_connect(&token, NOW).unwrap().user, "42");
        }
    }

    #[test]
    fn valid_es256_token() {
        let token = sign_with(Algorithm::ES256, "ec_private.pem", &connect_claims());
        let v = key_verifier("ec_public.pem");
        assert_eq!(v.algorithm(), "ES256");
        assert_eq!(v.verify_connect(&token, NOW).unwrap().user, "42");
    }

    #[test]
    fn expiry_uses_the_given_clock_and_the_leeway() {
        let v = hs_verifier();
        let token = hs(json!({"sub": "42", "exp": NOW}));
        assert_eq!(
            v.verify_connect(&token, NOW),
            Err(TokenError::Expired { exp: NOW })
        );
        assert!(v.verify_connect(&token, NOW - 1).is_ok());
        // Fractional NumericDate.
        let token = hs(json!({"sub": "42", "exp": (NOW as f64) + 0.5}));
        assert!(v.verify_connect(&token, NOW - 1).is_ok());
        assert!(v.verify_connect(&token, NOW).is_err());

        let lenient = verifier(&AuthConfig {
            leeway_secs: 5,
            ..hs_config()
        });
        let token = hs(json!({"sub": "42", "exp": NOW - 4}));
        assert!(lenient.verify_connect(&token, NOW).is_ok());
        let token = hs(json!({"sub": "42", "exp": NOW - 5}));
        assert_eq!(
            lenient.verify_connect(&token, NOW),
            Err(TokenError::Expired { exp: NOW - 5 })
        );
    }

    #[test]
    fn not_before_is_enforced() {
        let v = hs_verifier();
        let token = hs(json!({"sub": "42", "nbf": NOW + 10}));
        assert_eq!(
            v.verify_connect(&token, NOW),
            Err(TokenError::NotYetValid { nbf: NOW + 10 })
        );
        assert!(v.verify_connect(&token, NOW + 10).is_ok());
        let lenient = verifier(&AuthConfig {
            leeway_secs: 10,
            ..hs_config()
        });
        assert!(lenient.verify_connect(&token, NOW).is_ok());
    }

    #[test]
    fn bad_time_claims_are_refused() {
        let v = hs_verifier();
        for claims in [
            json!({"sub": "42", "exp": "soon"}),
            json!({"sub": "42", "exp": -1}),
            json!({"sub": "42", "nbf": true}),
        ] {
            assert!(
                matches!(
                    v.verify_connect(&hs(claims.clone()), NOW),
                    Err(TokenError::InvalidClaim { .. })
                ),
                "{claims}"
            );
        }
    }

    #[test]
    fn wrong_signature_is_refused() {
        let v = hs_verifier();
        let other =
            sign_hs256(b"another-secret-another-secret-another", &connect_claims()).unwrap();
        assert_eq!(v.verify_connect(&other, NOW), Err(TokenError::BadSignature));

        // Same signature, changed payload.
        let token = hs(connect_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(r#"{"sub":"1","exp":1900000000}"#),
            parts[2]
        );
        assert_eq!(
            v.verify_connect(&forged, NOW),
            Err(TokenError::BadSignature)
        );
        // Empty signature.
        let unsigned = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(
            v.verify_connect(&unsigned, NOW),
            Err(TokenError::BadSignature)
        );

        let rs = key_verifier("rsa_public.pem");
        let token = sign_with(Algorithm::RS256, "rsa_other_private.pem", &connect_claims());
        assert_eq!(
            rs.verify_connect(&token, NOW),
            Err(TokenError::BadSignature)
        );

        let es = key_verifier("ec_public.pem");
        let token = sign_with(Algorithm::ES256, "ec_private.pem", &connect_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], b64(r#"{"sub":"1"}"#), parts[2]);
        assert_eq!(
            es.verify_connect(&forged, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let v = hs_verifier();
        let good = hs(connect_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let header = parts[0];
        let cases = [
            String::new(),
            "garbage".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.extra"),
            format!("!!!.{}.{}", parts[1], parts[2]),
            format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
            format!("{}.{}.{}", b64(r#"{"typ":"JWT"}"#), parts[1], parts[2]),
            format!("{}.{}.{}", b64(r#"["HS256"]"#), parts[1], parts[2]),
            format!("{header}.{}.!!!!", parts[1]),
        ];
        for token in &cases {
            assert!(
                matches!(v.verify_connect(token, NOW), Err(TokenError::Malformed(_))),
                "{token}: {:?}",
                v.verify_connect(token, NOW)
            );
        }
        // Signed, but the claims are not an object.
        let message = format!("{header}.{}", b64("[1,2]"));
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            v.verify_connect(&format!("{message}.{sig}"), NOW),
            Err(TokenError::Malformed("the claims are not a JSON object"))
        );
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            v.verify_connect(&long, NOW),
            Err(TokenError::TooLong {
                len: MAX_TOKEN_LEN + 1
            })
        );
        // `crit` extensions are not understood.
        let message = format!("{}.{}", b64(r#"{"alg":"HS256","crit":["exp"]}"#), parts[1]);
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        assert!(matches!(
            v.verify_connect(&format!("{message}.{sig}"), NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let payload = b64(r#"{"sub":"42","exp":1900000000}"#);
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None"}"#,
            r#"{"alg":"NONE"}"#,
        ] {
            let token = format!("{}.{payload}.", b64(header));
            for v in [
                hs_verifier(),
                key_verifier("rsa_public.pem"),
                key_verifier("ec_public.pem"),
            ] {
                assert!(
                    matches!(
                        v.verify_connect(&token, NOW),
                        Err(TokenError::WrongAlgorithm { .. })
                    ),
                    "{header}"
                );
            }
        }
    }

    #[test]
    fn only_the_configured_algorithm_is_accepted() {
        let rs = key_verifier("rsa_public.pem");
        let es = key_verifier("ec_public.pem");
        let hs_token = hs(connect_claims());
        assert_eq!(
            rs.verify_connect(&hs_token, NOW),
            Err(TokenError::WrongAlgorithm {
                expected: "RS256",
                found: "HS256".into()
            })
        );
        // The classic confusion attack: HMAC "signed" with the public key's bytes.
        let public_pem = std::fs::read(testdata("rsa_public.pem")).unwrap();
        let confused = sign_hs256(&public_pem, &connect_claims()).unwrap();
        assert!(matches!(
            rs.verify_connect(&confused, NOW),
            Err(TokenError::WrongAlgorithm { .. })
        ));
        let rs_token = sign_with(Algorithm::RS256, "rsa_private.pem", &connect_claims());
        let es_token = sign_with(Algorithm::ES256, "ec_private.pem", &connect_claims());
        assert!(matches!(
            es.verify_connect(&rs_token, NOW),
            Err(TokenError::WrongAlgorithm { .. })
        ));
        assert!(matches!(
            rs.verify_connect(&es_token, NOW),
            Err(TokenError::WrongAlgorithm { .. })
        ));
        assert!(matches!(
            hs_verifier().verify_connect(&rs_token, NOW),
            Err(TokenError::WrongAlgorithm { .. })
        ));
        // Same family, other hash.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &connect_claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(matches!(
            hs_verifier().verify_connect(&hs512, NOW),
            Err(TokenError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn subject_and_claim_shapes_are_checked() {
        let v = hs_verifier();
        let cases = [
            (json!({"exp": NOW + 60}), TokenError::MissingSubject),
            (json!({"sub": ""}), TokenError::MissingSubject),
            (json!({"sub": null}), TokenError::MissingSubject),
            (
                json!({"sub": 42}),
                TokenError::InvalidClaim {
                    claim: "sub",
                    reason: "must be a string",
                },
            ),
            (
                json!({"sub": "42", "channels": "news"}),
                TokenError::InvalidClaim {
                    claim: "channels",
                    reason: "must be an array of strings",
                },
            ),
            (
                json!({"sub": "42", "channels": ["a", 1]}),
                TokenError::InvalidClaim {
                    claim: "channels",
                    reason: "must be an array of strings",
                },
            ),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                v.verify_connect(&hs(claims.clone()), NOW),
                Err(expected),
                "{claims}"
            );
        }
        // A subscription token is not a connection token.
        let sub_token = hs(json!({"sub": "42", "channel": "news"}));
        assert!(matches!(
            v.verify_connect(&sub_token, NOW),
            Err(TokenError::InvalidClaim {
                claim: "channel",
                ..
            })
        ));
    }

    #[test]
    fn subscribe_tokens() {
        let v = hs_verifier();
        let token =
            hs(json!({"sub": "42", "channel": "chat:1", "exp": NOW + 60, "info": {"role": "mod"}}));
        assert_eq!(
            v.verify_subscribe(&token, "chat:1", "42", NOW).unwrap(),
            SubscribeClaims {
                expires_at: Some(NOW + 60),
                info: Some(json!({"role": "mod"})),
            }
        );
        assert_eq!(
            v.verify_subscribe(&token, "chat:2", "42", NOW),
            Err(TokenError::WrongChannel)
        );
        assert_eq!(
            v.verify_subscribe(&token, "chat:1", "43", NOW),
            Err(TokenError::WrongUser)
        );
        assert_eq!(
            v.verify_subscribe(&token, "chat:1", "", NOW),
            Err(TokenError::WrongUser)
        );
        assert_eq!(
            v.verify_subscribe(&token, "chat:1", "42", NOW + 60),
            Err(TokenError::Expired { exp: NOW + 60 })
        );
        // A connection token cannot open a channel.
        let connect = hs(connect_claims());
        assert_eq!(
            v.verify_subscribe(&connect, "chat:1", "42", NOW),
            Err(TokenError::MissingClaim("channel"))
        );
        // Anonymous connections: a token without `sub`.
        let anon = hs(json!({"channel": "public:1"}));
        assert!(v.verify_subscribe(&anon, "public:1", "", NOW).is_ok());
        assert_eq!(
            v.verify_subscribe(&anon, "public:1", "42", NOW),
            Err(TokenError::WrongUser)
        );
        let bad = hs(json!({"sub": "42", "channel": ["chat:1"]}));
        assert!(matches!(
            v.verify_subscribe(&bad, "chat:1", "42", NOW),
            Err(TokenError::InvalidClaim {
                claim: "channel",
                ..
            })
        ));
        // The algorithm rules hold for subscription tokens too.
        let rs = key_verifier("rsa_public.pem");
        let rs_token = sign_with(
            Algorithm::RS256,
            "rsa_private.pem",
            &json!({"sub": "42", "channel": "chat:1"}),
        );
        assert!(rs.verify_subscribe(&rs_token, "chat:1", "42", NOW).is_ok());
        assert!(matches!(
            rs.verify_subscribe(&token, "chat:1", "42", NOW),
            Err(TokenError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let v = verifier(&AuthConfig {
            audience: Some("plaza".into()),
            issuer: Some("https://app.example".into()),
            ..hs_config()
        });
        let ok = hs(json!({"sub": "42", "aud": "plaza", "iss": "https://app.example"}));
        assert!(v.verify_connect(&ok, NOW).is_ok());
        let ok = hs(json!({"sub": "42", "aud": ["other", "plaza"], "iss": "https://app.example"}));
        assert!(v.verify_connect(&ok, NOW).is_ok());
        let cases = [
            (
                json!({"sub": "42", "iss": "https://app.example"}),
                TokenError::MissingClaim("aud"),
            ),
            (
                json!({"sub": "42", "aud": "plaza"}),
                TokenError::MissingClaim("iss"),
            ),
            (
                json!({"sub": "42", "aud": "other", "iss": "https://app.example"}),
                TokenError::WrongAudience,
            ),
            (
                json!({"sub": "42", "aud": "plaza", "iss": "evil"}),
                TokenError::WrongIssuer,
            ),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                v.verify_connect(&hs(claims.clone()), NOW),
                Err(expected),
                "{claims}"
            );
        }
        // Unconfigured: `aud`/`iss` in a token are ignored.
        let token = hs(json!({"sub": "42", "aud": "anything", "iss": "anyone"}));
        assert!(hs_verifier().verify_connect(&token, NOW).is_ok());
    }

    #[test]
    fn key_files_are_checked_at_startup() {
        let load = |file: &str| {
            JwtVerifier::new(&AuthConfig {
                public_key_file: Some(testdata(file)),
                ..AuthConfig::default()
            })
            .unwrap_err()
            .to_string()
        };
        let cases = [
            ("missing.pem", "cannot read"),
            ("rsa_private.pem", "contains a private key"),
            ("ec_private.pem", "contains a private key"),
            ("ec_p384_public.pem", "P-256"),
            ("rsa1024_public.pem", "1024 bits"),
            ("ed25519_public.pem", "unsupported key type"),
            ("README.md", "not a PEM file"),
        ];
        for (file, expected) in cases {
            let err = load(file);
            assert!(err.contains(expected), "{file}: {err}");
            assert!(err.contains(file), "the message names the file: {err}");
        }
        // A PEM that parses as nothing.
        let dir = std::env::temp_dir().join(format!("plaza-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let err = JwtVerifier::new(&AuthConfig {
            public_key_file: Some(junk),
            ..AuthConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("unsupported key type"), "{err}");
        // A P-256 key whose point is not on the curve.
        let pem = std::fs::read_to_string(testdata("ec_public.pem")).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        let last = der.len() - 1;
        der[last] ^= 1;
        let off_curve = dir.join("off_curve.pem");
        std::fs::write(
            &off_curve,
            format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(der)
            ),
        )
        .unwrap();
        let err = JwtVerifier::new(&AuthConfig {
            public_key_file: Some(off_curve),
            ..AuthConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot verify signatures"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_never_show_the_secret_or_the_token() {
        let v = hs_verifier();
        let token =
            sign_hs256(b"another-secret-another-secret-another", &connect_claims()).unwrap();
        let tokens = [
            token.clone(),
            "garbage".into(),
            hs(json!({"sub": 42})),
            hs(json!({"sub": "42", "exp": 1})),
        ];
        for t in &tokens {
            let msg = v.verify_connect(t, NOW).unwrap_err().to_string();
            assert!(!msg.contains(SECRET), "{msg}");
            assert!(!msg.contains(t.as_str()), "{msg}");
        }
        let err = format!("{:?}", JwtVerifier::new(&hs_config()).unwrap().unwrap());
        assert!(!err.contains(SECRET));
    }

    #[test]
    fn gen_token_round_trips() {
        let config = AuthConfig {
            audience: Some("plaza".into()),
            issuer: Some("dev".into()),
            ..hs_config()
        };
        let info = json!({"name": "Ada"});
        let token = gen_token(&config, "42", 3600, &["news".into()], Some(&info), NOW).unwrap();
        let claims = verifier(&config).verify_connect(&token, NOW).unwrap();
        assert_eq!(claims.user, "42");
        assert_eq!(claims.expires_at, Some(NOW + 3600));
        assert_eq!(claims.channels, ["news"]);
        assert_eq!(claims.info, Some(info));
        assert!(
            verifier(&config)
                .verify_connect(&token, NOW + 3600)
                .is_err()
        );

        let sub = gen_subscribe_token(&config, "42", "chat:1", 60, None, NOW).unwrap();
        assert!(
            verifier(&config)
                .verify_subscribe(&sub, "chat:1", "42", NOW)
                .is_ok()
        );

        let err = gen_token(&AuthConfig::default(), "42", 60, &[], None, NOW).unwrap_err();
        assert!(err.contains("hmac_secret"), "{err}");
        let with_key = AuthConfig {
            public_key_file: Some(testdata("rsa_public.pem")),
            ..AuthConfig::default()
        };
        let err = gen_token(&with_key, "42", 60, &[], None, NOW).unwrap_err();
        assert!(err.contains("public_key_file"), "{err}");
        assert!(gen_token(&config, "", 60, &[], None, NOW).is_err());
        assert!(gen_token(&config, "42", 0, &[], None, NOW).is_err());
        let short = AuthConfig {
            hmac_secret: Some("short".into()),
            ..AuthConfig::default()
        };
        assert!(gen_token(&short, "42", 60, &[], None, NOW).is_err());
        assert!(sign_hs256(b"k", &json!([1])).is_err());
    }
}
