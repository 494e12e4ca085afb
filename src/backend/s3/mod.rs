//! The S3 backend: a repository is a prefix in a bucket of an S3-compatible object store (AWS
//! S3, Ceph RGW, MinIO, Garage, SeaweedFS), named `s3://BUCKET/PREFIX`.
//!
//! It is reached through the `object_store` crate, configured as AWS tools are
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` with
//! path-style requests, `AWS_ALLOW_HTTP=true` for a plain `http://` endpoint), and driven
//! from the library's threads through a small tokio runtime of its own.
//!
//! How the contract of [`Backend`] is kept without relying on conditional writes (which
//! some stores ignore):
//! * a whole object is one PUT, which S3 makes visible atomically and durably when it answers;
//! * a pack is a multipart upload ([`writer::S3Writer`]), invisible to every reader until it is
//!   completed, so no reader ever sees a torn pack; pack names are 128 random bits, so two
//!   writers never pick the same key;
//! * locks are small objects judged by the store's own clock ([`lock`]), so a killed holder's
//!   lock expires and client clocks may disagree.
//!
//! The index is a cache on this host: a directory of the cache dir per repository URL.

mod lock;
mod prefetch;
mod profile;
mod readahead;
mod writer;

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{
    Backend, Durability, Entry, LockAttempt, LockGuard, LockKind, ObjectWriter, RemoteOptions,
};
use crate::error::{Error, IoContext, Result};
use crate::throttle::{self, Throttle};

/// The URL scheme of S3 repositories.
pub const SCHEME: &str = "s3://";

/// Bytes fetched per request by a sequential reader.
const SEQUENTIAL_STEP: u64 = 8 << 20;
/// Prefetching GETs in flight at once (see [`prefetch`]).
const PREFETCH_IN_FLIGHT: usize = 16;

/// A repository in a bucket of an S3-compatible store.
pub struct S3Backend {
    location: PathBuf,
    store: Arc<AmazonS3>,
    /// The key prefix of the repository's objects: empty or ending in `/`.
    prefix: String,
    runtime: Arc<tokio::runtime::Runtime>,
    cache: PathBuf,
    /// Keys this process is streaming (or holds the finished guard of).
    writing: Arc<Mutex<HashSet<String>>>,
    readahead: readahead::ReadAhead,
    /// Ranges asked for ahead of their reads, and the GETs fetching them (at most
    /// [`PREFETCH_IN_FLIGHT`] at once).
    prefetch: prefetch::Prefetch,
    prefetching: Arc<tokio::sync::Semaphore>,
    /// Lengths of objects read by range (packs never change once written).
    sizes: Mutex<HashMap<String, u64>>,
    /// `--limit-upload`, `--limit-download`.
    up: Option<Arc<Throttle>>,
    down: Option<Arc<Throttle>>,
    /// Requests and bytes so far.
    counters: Arc<Counters>,
}

/// Requests made and bytes moved (see [`Backend::traffic`]).
#[derive(Default)]
pub(super) struct Counters {
    requests: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Counters {
    /// Counts `requests` requests that sent `up` and received `down` payload bytes.
    pub(super) fn add(&self, requests: u64, up: u64, down: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.up.fetch_add(up, Ordering::Relaxed);
        self.down.fetch_add(down, Ordering::Relaxed);
    }
}

impl S3Backend {
    /// The backend of `url` (`s3://BUCKET/PREFIX`), keeping its host-local files (the index)
    /// under the cache root of `remote`, moving data within its limits.
    pub fn open(url: &str, remote: &RemoteOptions) -> Result<S3Backend> {
        let bad = |reason: String| Error::Usage(format!("repository {url:?}: {reason}"));
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not an s3://BUCKET/PREFIX URL".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket named: give s3://BUCKET/PREFIX".into()));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad("the prefix may not contain . or .. parts".into()));
        }
        let builder = profile::apply(AmazonS3Builder::from_env())
            .map_err(|e| bad(format!("cannot read the AWS profile: {e}")))?;
        let store = builder
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry())
            .build()
            .map_err(|e| bad(format!("cannot configure the S3 client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmrepo-s3")
            .enable_all()
            .build()
            .ctx("start the S3 client's threads for", url)?;
        let id = blake3::hash(format!("{bucket}/{prefix}").as_bytes()).to_hex();
        let cache_root = remote
            .cache_root
            .clone()
            .unwrap_or_else(super::default_cache_root);
        let cache = cache_root.join("s3").join(&id[..32]);
        std::fs::create_dir_all(&cache).ctx("create cache directory", &cache)?;
        Ok(S3Backend {
            location: PathBuf::from(format!("{SCHEME}{bucket}/{prefix}")),
            store: Arc::new(store),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            runtime: Arc::new(runtime),
            cache,
            writing: Arc::default(),
            readahead: readahead::ReadAhead::default(),
            prefetch: prefetch::Prefetch::default(),
            prefetching: Arc::new(tokio::sync::Semaphore::new(PREFETCH_IN_FLIGHT)),
            sizes: Mutex::default(),
            up: remote.limit_upload.map(|r| Arc::new(Throttle::new(r))),
            down: remote.limit_download.map(|r| Arc::new(Throttle::new(r))),
            counters: Arc::default(),
        })
    }

    fn object(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{key}", self.prefix))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// How requests are retried: timeouts, dropped connections, 5xx answers and throttling (429,
/// 503 SlowDown) are tried again up to 10 times, waiting 0.1 s, then twice as long each time
/// up to 15 s, for at most 3 minutes from the first attempt (a request's signature must stay
/// valid); then the error reaches the command, which fails without recording anything.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: std::time::Duration::from_secs(180),
    }
}

/// An `object_store` error as an I/O error that keeps the store's message: absent objects
/// are `NotFound`, refused requests `PermissionDenied` (so callers tell "may not write here").
pub(crate) fn io_error(e: object_store::Error) -> io::Error {
    // A missing bucket answers 404 too; it is not a missing object (which callers take for
    // "no such repository here" or "nothing to read"), and the remedy is elsewhere.
    let text = e.to_string();
    if text.contains("NoSuchBucket") {
        return io::Error::other(
            "the bucket does not exist (the store answered NoSuchBucket); vmrepo does not create \
             buckets: create it with the store's own tools (aws s3 mb, radosgw-admin, garage \
             bucket create, weed shell s3.bucket.create), or check the URL and AWS_ENDPOINT_URL",
        );
    }
    let kind = match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

impl Backend for S3Backend {
    fn location(&self) -> &Path {
        &self.location
    }

    fn path(&self, key: &str) -> PathBuf {
        self.location.join(key)
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.cache)
    }

    fn has_folder(&self, _prefix: &str) -> bool {
        true
    }

    fn make_folder(&self, _prefix: &str) -> io::Result<()> {
        Ok(())
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        let path = self.object(key);
        let bytes = self.block_on(async {
            let r = self.store.get(&path).await.map_err(io_error)?;
            r.bytes().await.map(|b| b.to_vec()).map_err(io_error)
        })?;
        self.counters.add(1, 0, bytes.len() as u64);
        throttle::take(self.down.as_deref(), bytes.len() as u64);
        Ok(bytes)
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty()
            || self.prefetch.serve(key, offset, buf)
            || self.readahead.serve(key, offset, buf)
        {
            return Ok(());
        }
        let path = self.object(key);
        let end = offset + buf.len() as u64;
        let known = self.sizes.lock().unwrap().get(key).copied();
        let size = match known {
            Some(s) => s,
            None => {
                let s = self
                    .size(key)?
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))?;
                self.sizes.lock().unwrap().insert(key.to_string(), s);
                s
            }
        };
        if end > size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let plan = self.readahead.plan(key, offset, buf.len() as u64, size);
        throttle::take(self.down.as_deref(), plan.len);
        self.counters.add(1, 0, plan.len);
        match self.block_on(
            self.store
                .get_range(&path, plan.start..plan.start + plan.len),
        ) {
            Ok(b) if b.len() as u64 == plan.len => {
                buf.copy_from_slice(&b[..buf.len()]);
                // Kept even when no larger than the read: it tells where this object's
                // reader is, so the next read can be seen to follow it.
                self.readahead.keep(key, &plan, b.to_vec());
                Ok(())
            }
            Ok(_) => Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e @ object_store::Error::NotFound { .. }) => Err(io_error(e)),
            Err(e) => match self.size(key)? {
                // A range past the end is refused by the store; say it as a short read.
                Some(size) if size < end => Err(io::ErrorKind::UnexpectedEof.into()),
                _ => Err(io_error(e)),
            },
        }
    }

    fn open_sequential(&self, key: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let size = self
            .size(key)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))?;
        let reader = Sequential {
            store: self.store.clone(),
            down: self.down.clone(),
            counters: self.counters.clone(),
            runtime: self.runtime.clone(),
            path: self.object(key),
            size,
            pos: 0,
            buf: Vec::new(),
            at: 0,
        };
        Ok((Box::new(reader), size))
    }

    fn size(&self, key: &str) -> io::Result<Option<u64>> {
        self.counters.add(1, 0, 0);
        match self.block_on(self.store.head(&self.object(key))) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<Entry>> {
        // Stores list by folder; a prefix that ends inside a name (`locks/uncommitted-`) is
        // its folder, filtered.
        let folder = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let listed = format!("{}{folder}", self.prefix);
        let listed = listed.trim_end_matches('/');
        let path = (!listed.is_empty()).then(|| ObjectPath::from(listed));
        let metas: Vec<_> = self
            .block_on(self.store.list(path.as_ref()).try_collect::<Vec<_>>())
            .map_err(io_error)?;
        // A listing answers a thousand keys per request.
        self.counters
            .add((metas.len() as u64).div_ceil(1000).max(1), 0, 0);
        let mut out: Vec<Entry> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&self.prefix)?.to_string();
                key.starts_with(prefix)
                    .then_some(Entry { key, size: m.size })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        // Ranged reads need an object's length; what a listing shows saves them a HEAD each
        // (an object read by range is never rewritten: packs, descriptions).
        let mut sizes = self.sizes.lock().unwrap();
        for e in &out {
            sizes.insert(e.key.clone(), e.size);
        }
        drop(sizes);
        Ok(out)
    }

    fn will_need(&self, key: &str, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(done) = self.prefetch.begin(key, offset, len) else {
            return;
        };
        throttle::take(self.down.as_deref(), len);
        self.counters.add(1, 0, len);
        let (store, path, permits) = (
            self.store.clone(),
            self.object(key),
            self.prefetching.clone(),
        );
        self.runtime.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let fetched = store.get_range(&path, offset..offset + len).await;
            done.finish(fetched.ok().map(|b| b.to_vec()));
        });
    }

    fn put(&self, key: &str, bytes: &[u8], _durability: Durability) -> io::Result<()> {
        throttle::take(self.up.as_deref(), bytes.len() as u64);
        self.counters.add(1, bytes.len() as u64, 0);
        let payload = PutPayload::from(bytes.to_vec());
        self.block_on(self.store.put(&self.object(key), payload))
            .map(|_| ())
            .map_err(io_error)
    }

    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(writer::S3Writer::start(self, key)?))
    }

    fn is_being_written(&self, key: &str) -> bool {
        if self.writing.lock().unwrap().contains(key) {
            return true;
        }
        match std::fs::File::open(writer::writing_file(&self.cache, key)) {
            Ok(f) => f.try_lock_shared().is_err(),
            Err(_) => false,
        }
    }

    fn sync(&self, _key: &str) -> io::Result<()> {
        Ok(())
    }

    fn delete(&self, keys: &[String], _durability: Durability) -> io::Result<()> {
        for key in keys {
            self.readahead.forget(key);
            self.prefetch.forget(key);
            self.sizes.lock().unwrap().remove(key);
            self.counters.add(1, 0, 0);
            match self.block_on(self.store.delete(&self.object(key))) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(())
    }

    fn try_lock(&self, name: &str, kind: LockKind, read_only: bool) -> io::Result<LockAttempt> {
        lock::try_lock(self, name, kind, read_only)
    }

    fn wait_turn(&self, name: &str) -> io::Result<LockGuard> {
        lock::wait_turn(self, name)
    }

    fn traffic(&self) -> Option<super::Traffic> {
        let c = &self.counters;
        Some(super::Traffic {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_up: c.up.load(Ordering::Relaxed),
            bytes_down: c.down.load(Ordering::Relaxed),
        })
    }
}

/// Reads an object front to back in ranges of [`SEQUENTIAL_STEP`] bytes.
struct Sequential {
    store: Arc<AmazonS3>,
    down: Option<Arc<Throttle>>,
    counters: Arc<Counters>,
    runtime: Arc<tokio::runtime::Runtime>,
    path: ObjectPath,
    size: u64,
    /// Object offset of `buf[0]`.
    pos: u64,
    buf: Vec<u8>,
    /// Next byte of `buf` to hand out.
    at: usize,
}

impl Read for Sequential {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            let start = self.pos + self.buf.len() as u64;
            if start >= self.size {
                return Ok(0);
            }
            let end = (start + SEQUENTIAL_STEP).min(self.size);
            throttle::take(self.down.as_deref(), end - start);
            self.counters.add(1, 0, end - start);
            let bytes = self
                .runtime
                .block_on(self.store.get_range(&self.path, start..end))
                .map_err(io_error)?;
            self.pos = start;
            self.buf = bytes.to_vec();
            self.at = 0;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pack another process of this host is writing (its marker file locked) counts as being
    /// written, and stops counting once the marker is released.
    #[test]
    fn packs_other_processes_here_write_count_as_being_written() {
        let t = tempfile::tempdir().unwrap();
        let remote = RemoteOptions {
            cache_root: Some(t.path().to_path_buf()),
            ..Default::default()
        };
        let b = S3Backend::open("s3://bucket/prefix", &remote).unwrap();
        assert_eq!(b.location(), Path::new("s3://bucket/prefix"));
        let key = "data/ab/ab00000000000000000000000000000000.pack";
        assert!(!b.is_being_written(key));
        let marker = writer::writing_file(b.local_dir().unwrap(), key);
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        let held = std::fs::File::create(&marker).unwrap();
        held.lock().unwrap();
        assert!(b.is_being_written(key));
        drop(held);
        assert!(!b.is_being_written(key));
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        let t = tempfile::tempdir().unwrap();
        for (url, why) in [
            ("s3://", "no bucket"),
            ("s3:///x", "no bucket"),
            ("s3://b/a/../c", ". or .."),
        ] {
            let remote = RemoteOptions {
                cache_root: Some(t.path().to_path_buf()),
                ..Default::default()
            };
            let e = S3Backend::open(url, &remote).err().unwrap().to_string();
            assert!(e.contains(why) && e.contains(url), "{url}: {e}");
        }
    }
}
