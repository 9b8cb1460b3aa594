//! The backend API key: configured, or generated once and kept in the data directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the backend key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the backend key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the backend key file {0} is empty; delete it to generate a new key")]
    Empty(PathBuf),
    #[error("no randomness available to generate a key: {0}")]
    Random(String),
}

pub const KEY_FILE: &str = "backend.key";

/// Where the key came from, for the startup log.
pub enum KeySource {
    Configured,
    File(PathBuf),
    Generated(PathBuf),
}

/// Returns the configured key, or the one in `data_dir/backend.key`, creating that file with a
/// new random key (mode 0600) when it does not exist.
pub fn load_or_create(
    configured: Option<&str>,
    data_dir: &Path,
) -> Result<(String, KeySource), KeyError> {
    if let Some(key) = configured {
        return Ok((key.trim().to_owned(), KeySource::Configured));
    }
    let path = data_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = text.trim();
            if key.is_empty() {
                return Err(KeyError::Empty(path));
            }
            Ok((key.to_owned(), KeySource::File(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = random_hex(32)?;
            write_private(&path, &key).map_err(|source| KeyError::Write {
                path: path.clone(),
                source,
            })?;
            Ok((key, KeySource::Generated(path)))
        }
        Err(source) => Err(KeyError::Read { path, source }),
    }
}

/// Whether `given` is the backend key, compared in constant time.
pub fn matches(given: &[u8], key: &str) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(given, key.as_bytes()))
}

/// `bytes` random bytes from the operating system, as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, key: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(key.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = std::env::temp_dir().join(format!("plaza-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (first, source) = load_or_create(None, &dir).unwrap();
        assert!(matches!(source, KeySource::Generated(_)));
        assert_eq!(first.len(), 64);
        let (second, source) = load_or_create(None, &dir).unwrap();
        assert!(matches!(source, KeySource::File(_)));
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (k, _) = load_or_create(Some(" given "), &dir).unwrap();
        assert_eq!(k, "given");
        std::fs::write(dir.join(KEY_FILE), "\n").unwrap();
        assert!(matches!(
            load_or_create(None, &dir),
            Err(KeyError::Empty(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
