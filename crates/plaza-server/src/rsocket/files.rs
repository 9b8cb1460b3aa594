//! `file.upload`, `file.download`, `files`: the tutorial's shared file area, kept in the store's
//! key-value table. A file is two keys written in one batch: its bytes under
//! `rsocket\0file\0<name>` and an index entry (its size) under `rsocket\0files\0<name>`, so
//! listing reads the small index, never the contents.

use bytes::Bytes;
use plaza_protocol::rsocket::{CompositeMetadata, MimeType};
use plaza_store::{Store, WriteBatch};
use tokio::sync::Mutex;

/// The composite-metadata entry that names the file.
pub const FILE_NAME_MIME: &str = "chat/file-name";
/// Longest file name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

fn data_key(name: &str) -> String {
    format!("rsocket\0file\0{name}")
}

const INDEX_PREFIX: &str = "rsocket\0files\0";

fn index_key(name: &str) -> String {
    format!("{INDEX_PREFIX}{name}")
}

/// The file name of a request: its `chat/file-name` entry, checked.
pub fn name_of(metadata: &CompositeMetadata) -> Result<String, String> {
    let entry = metadata
        .find(FILE_NAME_MIME)
        .ok_or_else(|| format!("no file name: the metadata has no '{FILE_NAME_MIME}' entry"))?;
    let name = std::str::from_utf8(&entry.content)
        .map_err(|_| "the file name must be UTF-8".to_owned())?;
    validate_name(name)?;
    Ok(name.to_owned())
}

/// A file name: 1 to 255 bytes, no control characters, no path separators, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a file name must be 1 to {MAX_NAME_LEN} bytes, not {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("'{name}' is not a file name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || *c == '/' || *c == '\\')
    {
        return Err(format!(
            "a file name may not contain {c:?} (control characters, '/' and '\\' are refused)"
        ));
    }
    Ok(())
}

/// The response metadata of a download: composite `[chat/file-name: name]`.
pub fn name_metadata(name: &str) -> Result<Bytes, String> {
    CompositeMetadata::new()
        .with(
            MimeType::from_name(FILE_NAME_MIME),
            Bytes::copy_from_slice(name.as_bytes()),
        )
        .to_bytes()
        .map_err(|e| format!("file name metadata: {e}"))
}

/// Stores `data` as `name`, replacing a file of that name.
pub async fn upload(
    store: &dyn Store,
    lock: &Mutex<()>,
    max_size: usize,
    max_files: usize,
    name: &str,
    data: Bytes,
) -> Result<(), String> {
    if data.len() > max_size {
        return Err(format!(
            "file '{name}' is too large: {} bytes, the limit is {max_size} bytes",
            data.len()
        ));
    }
    // One upload at a time, so the count below cannot be raced past max_files.
    let _guard = lock.lock().await;
    let exists = store
        .kv_get(&index_key(name))
        .await
        .map_err(|e| format!("files: {e}"))?
        .is_some();
    if !exists {
        let count = store
            .kv_scan(INDEX_PREFIX, max_files)
            .await
            .map_err(|e| format!("files: {e}"))?
            .len();
        if count >= max_files {
            return Err(format!(
                "too many files: this server keeps at most {max_files}"
            ));
        }
    }
    let batch = WriteBatch {
        kv: vec![
            (index_key(name), Some(data.len().to_string().into_bytes())),
            (data_key(name), Some(data.to_vec())),
        ],
        ..WriteBatch::default()
    };
    store
        .write(batch)
        .await
        .map_err(|e| format!("file '{name}' not stored: {e}"))?;
    Ok(())
}

/// The bytes of `name`.
pub async fn download(store: &dyn Store, name: &str) -> Result<Bytes, String> {
    store
        .kv_get(&data_key(name))
        .await
        .map_err(|e| format!("files: {e}"))?
        .map(Bytes::from)
        .ok_or_else(|| format!("no file named '{name}'"))
}

/// Up to `limit` file names, in name order.
pub async fn list(store: &dyn Store, limit: usize) -> Result<Vec<String>, String> {
    Ok(store
        .kv_scan(INDEX_PREFIX, limit)
        .await
        .map_err(|e| format!("files: {e}"))?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(INDEX_PREFIX).map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use plaza_store::MemoryStore;

    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["file_name_1.txt", "a", "résumé 2.pdf", &"x".repeat(255)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\\b",
            "a\0b",
            "a\nb",
            &"x".repeat(256),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_name_comes_from_the_chat_file_name_entry() {
        let md = CompositeMetadata::new()
            .with_route(&["file.upload"])
            .unwrap_or_else(|e| panic!("{e}"))
            .with(
                MimeType::from_name(FILE_NAME_MIME),
                Bytes::from_static(b"f.txt"),
            );
        assert_eq!(name_of(&md), Ok("f.txt".to_owned()));
        let bytes = name_metadata("f.txt").unwrap_or_else(|e| panic!("{e}"));
        let decoded = CompositeMetadata::decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(name_of(&decoded), Ok("f.txt".to_owned()));
        let none = CompositeMetadata::new()
            .with_route(&["file.upload"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(name_of(&none).is_err());
    }

    #[tokio::test]
    async fn upload_download_list_and_limits() {
        let store = MemoryStore::new();
        let lock = Mutex::new(());
        let data = Bytes::from_static(b"abcdefg1234567");
        upload(&store, &lock, 14, 2, "b.txt", data.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(download(&store, "b.txt").await, Ok(data.clone()));
        let err = upload(&store, &lock, 13, 2, "c.txt", data.clone()).await;
        assert!(err.is_err_and(|e| e.contains("too large")));
        upload(&store, &lock, 14, 2, "a.txt", Bytes::from_static(b"1"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // A third name is refused, overwriting is not.
        let err = upload(&store, &lock, 14, 2, "c.txt", Bytes::from_static(b"1")).await;
        assert!(err.is_err_and(|e| e.contains("too many files")));
        upload(&store, &lock, 14, 2, "a.txt", Bytes::from_static(b"22"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            download(&store, "a.txt").await,
            Ok(Bytes::from_static(b"22"))
        );
        assert_eq!(
            list(&store, 10).await,
            Ok(vec!["a.txt".to_owned(), "b.txt".to_owned()])
        );
        assert!(download(&store, "nope").await.is_err());
    }
}
