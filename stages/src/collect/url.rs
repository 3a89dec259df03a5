//! Downloading a source pinned by its SHA-256. The sha256 is a param, so it is in the stage key;
//! the file is kept as a memo named by the checksum, so the same pin is downloaded once (until
//! gc), and a server that serves other bytes is an error, never a silently different corpus.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why `sha256` cannot be a SHA-256 pin, if it cannot.
pub fn sha256_problem(sha256: &str) -> Option<String> {
    let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
    (!hex).then(|| format!("`sha256` must be 64 hex digits, not `{sha256}`"))
}

/// The verified local copy of `href` at `target`, downloading it unless already there. `target`
/// is a memo named by the checksum, so the same pin is downloaded once whatever else changes.
pub fn fetch(href: &str, sha256: &str, target: &Path) -> Result<PathBuf, String> {
    if let Some(problem) = sha256_problem(sha256) {
        return Err(format!("{href}: {problem}"));
    }
    let expected = sha256.to_ascii_lowercase();
    if let Ok(mut file) = File::open(target) {
        if sha256_of(&mut file).ok().as_deref() == Some(expected.as_str()) {
            return Ok(target.to_path_buf());
        }
    }
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let partial = target.with_extension(format!("part.{}", std::process::id()));
    let actual = download(href, &partial).map_err(|e| format!("{href}: {e}"));
    if actual.as_deref() != Ok(expected.as_str()) {
        let _ = std::fs::remove_file(&partial);
        let actual = actual?;
        return Err(format!(
            "{href}: sha256 mismatch: expected {expected}, downloaded {actual}"
        ));
    }
    std::fs::rename(&partial, target).map_err(|e| format!("{}: {e}", target.display()))?;
    Ok(target.to_path_buf())
}

/// Streams the body into `path`, returning its SHA-256 as hex.
fn download(href: &str, path: &Path) -> Result<String, String> {
    let response = ureq::get(href).call().map_err(|e| e.to_string())?;
    let mut body = response.into_body().into_reader();
    let mut file = File::create(path).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = body.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    file.flush().map_err(|e| e.to_string())?;
    Ok(hex(&hasher.finalize()))
}

fn sha256_of(input: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(input, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves `body` over HTTP on loopback to each connection; returns the URL.
    pub fn serve(body: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/data.txt", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(header.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        url
    }

    pub fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn downloads_verifies_and_reuses() {
        let url = serve(b"hello corpus\n");
        let work = tempfile::tempdir().unwrap();
        let path = fetch(&url, &sha(b"hello corpus\n"), &work.path().join("memo/x")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello corpus\n");
        // Reused without the server: a URL that cannot connect still works.
        let again = fetch(
            "http://127.0.0.1:1/gone",
            &sha(b"hello corpus\n"),
            &work.path().join("memo/x"),
        )
        .unwrap();
        assert_eq!(again, path);
    }

    #[test]
    fn a_mismatch_is_an_error_and_leaves_nothing() {
        let url = serve(b"other bytes");
        let work = tempfile::tempdir().unwrap();
        let err = fetch(&url, &sha(b"expected bytes"), &work.path().join("memo/x")).unwrap_err();
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert_eq!(
            std::fs::read_dir(work.path().join("memo")).unwrap().count(),
            0
        );
        assert!(fetch(&url, "abc", &work.path().join("memo/x"))
            .unwrap_err()
            .contains("64 hex digits"));
    }
}
