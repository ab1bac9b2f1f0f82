//! Streaming file transfer over the master's HTTP API: the agent's artifact
//! upload and the CLI's verified download. A file is never held in memory
//! whole: it goes through a [`FileBody`] in 64 KiB chunks one way and is
//! written chunk by chunk the other, hashed (SHA-256) on the way.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use crate::api::{API_PREFIX, ApiCallError, ApiClient, ApiError, ArtifactList};
use crate::wire::{ARTIFACT_SHA256_HEADER, BuildId, artifact_upload_path, encode_path};

/// Bytes read from a file per body frame.
const CHUNK: usize = 64 * 1024;

/// An HTTP body that streams exactly `len` bytes of an open file (fewer
/// bytes in the file is an error, not a short body).
pub struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buffer: Box<[u8]>,
}

impl FileBody {
    pub fn new(file: tokio::fs::File, len: u64) -> FileBody {
        FileBody {
            file,
            remaining: len,
            buffer: vec![0; CHUNK].into_boxed_slice(),
        }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.remaining)
            .unwrap_or(usize::MAX)
            .min(this.buffer.len());
        let mut read = ReadBuf::new(&mut this.buffer[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the file shrank while it was sent ({} bytes missing)",
                        this.remaining
                    ),
                ))))
            }
            Poll::Ready(Ok(())) => {
                let chunk = Bytes::copy_from_slice(read.filled());
                this.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Size and lowercase hex SHA-256 of a file, read in chunks (blocking:
/// call it from a blocking thread).
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// What a verified download wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

fn failure(status: Option<u16>, message: String) -> ApiCallError {
    ApiCallError { status, message }
}

/// The master's error message from a refusal's body.
async fn refusal_text(response: hyper::Response<hyper::body::Incoming>) -> String {
    use http_body_util::{BodyExt, Limited};
    let status = response.status().as_u16();
    let text = match Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let message = serde_json::from_str::<ApiError>(&text)
        .map(|e| e.error)
        .unwrap_or(text);
    format!("master answered {status}: {message}")
}

impl ApiClient {
    /// `GET /api/v1/builds/{id}/artifacts`.
    pub async fn artifacts(&self, id: BuildId) -> Result<ArtifactList, ApiCallError> {
        self.call("GET", &format!("{API_PREFIX}/builds/{id}/artifacts"), None)
            .await
    }

    /// Uploads `path` as artifact `name` of build `id` (the client's token
    /// must be the worker's): `size` bytes streamed, `sha256` announced for
    /// the master to verify.
    pub async fn upload_artifact(
        &self,
        id: BuildId,
        name: &str,
        path: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<(), ApiCallError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| failure(None, format!("cannot open {}: {e}", path.display())))?;
        let request = self
            .request("PUT", &artifact_upload_path(id, name))
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header(hyper::header::CONTENT_LENGTH, size)
            .header(ARTIFACT_SHA256_HEADER, sha256)
            .body(FileBody::new(file, size))
            .map_err(|e| failure(None, format!("bad request: {e}")))?;
        let response = self.send(request).await?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(failure(Some(status), refusal_text(response).await))
        }
    }

    /// Downloads artifact `name` of build `id` to `dest` (written as
    /// `dest.part`, renamed once complete), and checks its size and SHA-256
    /// against what the master announced; a mismatch leaves no file.
    pub async fn download_artifact(
        &self,
        id: BuildId,
        name: &str,
        dest: &Path,
    ) -> Result<Downloaded, ApiCallError> {
        use http_body_util::BodyExt;

        let path = format!("{API_PREFIX}/builds/{id}/artifacts/{}", encode_path(name));
        let request = self
            .request("GET", &path)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| failure(None, format!("bad request: {e}")))?;
        let response = self.send(request).await?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(failure(Some(status), refusal_text(response).await));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let Some(expected_sha) = header(ARTIFACT_SHA256_HEADER) else {
            return Err(failure(
                Some(status),
                format!("the master sent no {ARTIFACT_SHA256_HEADER} header"),
            ));
        };
        let expected_len = header("content-length").and_then(|v| v.parse::<u64>().ok());
        let mut partial = dest.as_os_str().to_owned();
        partial.push(".part");
        let partial = PathBuf::from(partial);
        let io = |what: &str, e: std::io::Error| {
            failure(None, format!("cannot {what} {}: {e}", partial.display()))
        };
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| io("create", e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = response.into_body();
        let outcome: Result<(), ApiCallError> = async {
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| failure(None, format!("the download broke off: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    hasher.update(&data);
                    size += data.len() as u64;
                    file.write_all(&data).await.map_err(|e| io("write", e))?;
                }
            }
            file.flush().await.map_err(|e| io("write", e))?;
            file.sync_all().await.map_err(|e| io("sync", e))?;
            let sha256 = hex::encode(hasher.clone().finalize());
            if expected_len.is_some_and(|len| len != size) {
                return Err(failure(
                    None,
                    format!(
                        "artifact `{name}`: received {size} bytes, the master announced {}",
                        expected_len.unwrap_or_default()
                    ),
                ));
            }
            if !sha256.eq_ignore_ascii_case(&expected_sha) {
                return Err(failure(
                    None,
                    format!(
                        "artifact `{name}`: checksum mismatch: received sha256 {sha256}, the master announced {expected_sha}"
                    ),
                ));
            }
            Ok(())
        }
        .await;
        drop(file);
        if let Err(e) = outcome {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        tokio::fs::rename(&partial, dest).await.map_err(|e| {
            failure(
                None,
                format!(
                    "cannot move {} to {}: {e}",
                    partial.display(),
                    dest.display()
                ),
            )
        })?;
        Ok(Downloaded {
            path: dest.to_owned(),
            size,
            sha256: expected_sha.to_ascii_lowercase(),
        })
    }
}
