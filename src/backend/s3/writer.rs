//! A pack streamed into S3 as a multipart upload: parts go up as they fill, a few at a time,
//! so memory stays bounded whatever the pack's size; nothing is visible until the upload is
//! completed, and an abandoned upload is aborted (its parts deleted). A pack that ends before
//! its first part is full (a night that changed little) goes up as one PUT instead: one
//! request rather than three, and just as atomic.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};

use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};

use super::{io_error, Counters, S3Backend};
use crate::backend::{Finished, ObjectWriter};
use crate::throttle::{self, Throttle};

/// Bytes per part (S3 wants at least 5 MiB for every part but the last).
const PART: usize = 8 << 20;
/// Parts uploaded at once by one writer (memory: this many parts, plus the one filling).
const PARTS_IN_FLIGHT: usize = 4;

/// One pack being uploaded.
pub(super) struct S3Writer {
    store: Arc<AmazonS3>,
    path: ObjectPath,
    /// The multipart upload, started when the first part is full.
    upload: Option<WriteMultipart>,
    finished: bool,
    /// The part being filled: records are appended here, and a full part is handed to the
    /// upload whole (one call into the runtime per part, not per record).
    part: Vec<u8>,
    runtime: Arc<tokio::runtime::Runtime>,
    mark: Option<WritingMark>,
    /// `--limit-upload`.
    up: Option<Arc<Throttle>>,
    counters: Arc<Counters>,
}

/// Marks a key as being written until dropped: in the backend's set (this process), and by an
/// exclusive `flock` on a file in the host's cache directory (other processes of this host,
/// which share the cache: a command that brings the cache up to date must not adopt a pack
/// that an ingest here has uploaded but not yet recorded).
struct WritingMark {
    key: String,
    writing: Arc<Mutex<HashSet<String>>>,
    file: Option<(std::fs::File, std::path::PathBuf)>,
}

impl Drop for WritingMark {
    fn drop(&mut self) {
        self.writing.lock().unwrap().remove(&self.key);
        if let Some((_, path)) = self.file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The file whose `flock` says, to the processes of this host, that `key` is being written.
pub(super) fn writing_file(cache: &std::path::Path, key: &str) -> std::path::PathBuf {
    cache
        .join("writing")
        .join(blake3::hash(key.as_bytes()).to_hex().as_str())
}

impl S3Writer {
    /// Starts the upload of `key` into the repository of `b`.
    pub(super) fn start(b: &S3Backend, key: &str) -> io::Result<S3Writer> {
        let marker = writing_file(&b.cache, key);
        std::fs::create_dir_all(marker.parent().unwrap())?;
        let file = std::fs::File::create(&marker)?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::Error(e) => e,
            std::fs::TryLockError::WouldBlock => io::Error::other(format!(
                "{key} is being written by another process of this host"
            )),
        })?;
        b.writing.lock().unwrap().insert(key.to_string());
        let mark = WritingMark {
            key: key.to_string(),
            writing: b.writing.clone(),
            file: Some((file, marker)),
        };
        Ok(S3Writer {
            store: b.store.clone(),
            path: b.object(key),
            upload: None,
            finished: false,
            part: Vec::with_capacity(PART),
            runtime: b.runtime.clone(),
            mark: Some(mark),
            up: b.up.clone(),
            counters: b.counters.clone(),
        })
    }
}

impl ObjectWriter for S3Writer {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(PART - self.part.len());
            self.part.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.part.len() == PART {
                assert!(!self.finished, "writer used after finish");
                throttle::take(self.up.as_deref(), PART as u64);
                if self.upload.is_none() {
                    self.counters.add(1, 0, 0);
                    let started = self
                        .runtime
                        .block_on(self.store.put_multipart(&self.path))
                        .map_err(io_error)?;
                    self.upload = Some(WriteMultipart::new_with_chunk_size(started, PART));
                }
                self.counters.add(1, PART as u64, 0);
                let upload = self.upload.as_mut().expect("started above");
                let part = &self.part;
                self.runtime.block_on(async {
                    upload
                        .wait_for_capacity(PARTS_IN_FLIGHT)
                        .await
                        .map_err(io_error)?;
                    upload.write(part);
                    Ok::<_, io::Error>(())
                })?;
                self.part.clear();
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<Finished> {
        assert!(!self.finished, "writer finished twice");
        self.finished = true;
        let part = std::mem::take(&mut self.part);
        throttle::take(self.up.as_deref(), part.len() as u64);
        match self.upload.take() {
            // Smaller than a part: one PUT.
            None => {
                self.counters.add(1, part.len() as u64, 0);
                self.runtime
                    .block_on(self.store.put(&self.path, PutPayload::from(part)))
                    .map_err(io_error)?;
            }
            // The last part (if any), then the completion.
            Some(mut upload) => {
                self.counters
                    .add(1 + u64::from(!part.is_empty()), part.len() as u64, 0);
                self.runtime
                    .block_on(async {
                        upload.write(&part);
                        upload.finish().await
                    })
                    .map_err(io_error)?;
            }
        }
        Ok(Finished::new(self.mark.take()))
    }

    fn abandon(mut self: Box<Self>) {
        if let Some(upload) = self.upload.take() {
            let _ = self.runtime.block_on(upload.abort());
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Dropped without finish or abandon (an error unwound past it): abort the upload so
        // its parts do not linger in the bucket.
        if let Some(upload) = self.upload.take() {
            let _ = self.runtime.block_on(upload.abort());
        }
    }
}
